"""train-and-register: from a dataset URL to a registered, usable MLflow model.

Inputs: one ``TrainParams`` (dataset URL/sha256, TF Hub backbone, training options, model name,
quality gate, ``force``; with ``follow_champion`` the data and training settings are the current
champion's, and a model without one trains nothing). Steps: download -> extract -> scan/split
(quarantine bad files) -> "nothing to do" if the champion was trained on the same data with the
same parameters (unless ``force``) -> fetch the backbone into the shared TF Hub cache -> MLflow run
-> train (the ``train-model`` flow; resumable, per-epoch metrics) -> evaluate on the test split ->
register a version; ``champion`` moves only if it passes the gate and beats the current champion.
Output: the run summary (MLflow run id, model name/version, alias decision, test metrics, dataset
counts). Files live under ``$PETALFLOW_HOME`` (``./.petalflow``).

Run it with ``petalflow train [options]`` (ephemeral Prefect: everything in one process) or deploy
it with ``prefect deploy --prefect-file deployment.yaml --all``: then the parent runs on the ``cpu``
pool and (``training_deployment: auto``, the default) starts the ``train-model/train-gpu``
deployment on the ``gpu`` pool for the training step, handing it paths (never objects) and reading
its result back from the shared working folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger

from petalflow.tasks.common import petalflow_home, redact_url, redacted_source
from petalflow.tasks.dataset import (
    alike_names_note, dataset_line, dataset_summary, orientation_note, prepare_dataset_task,
    split_layout_note, tucked_classes_note,
)
from petalflow.tasks.download import (
    describe_source_task, download_archive_task, extract_archive_task, fetch_backbone_task,
    source_identity,
)
from petalflow.tasks.edge import edge_summary
from petalflow.tasks.evaluate import (
    compare_with_champion_task, evaluate_edge_task, evaluate_model_task,
)
from petalflow.tasks.handoff import (
    ended_training_error, ends_with_its_parent, time_limit_error, training_handoff_task,
    wait_for_training_runs,
)
from petalflow.tasks.housekeeping import end_failed_run, prune_home_task
from petalflow.tasks.params import (
    TrainParams, expected_sha256, image_size_set_by, run_key, training_target,
)
from petalflow.tasks.registry import (
    Turn, champion_info_task, end_abandoned_runs_task, failure_text, finish_run_task,
    followed_champion_task, log_timings_task, register_model_task, start_run_task, training_turn,
    unchanged_since_champion_task,
)
from petalflow.tasks.report import (
    nothing_to_follow, publish_result_task, start_progress_task, state_message,
)
from petalflow.tasks.timing import PhaseTimer
from petalflow.tasks.sweep import publish_sweep_task, rank_candidates
from petalflow.tasks.train import (
    TrainingJob, attempt_name, feature_cache_dir, train_model_task,
)


@flow(name="train-model", log_prints=True)
def train_model_flow(job: TrainingJob) -> dict:
    """The training step as its own flow, so a deployment (``train-gpu``) can run it on the GPU
    work pool: reads the dataset description and the backbone's local copy (both on the shared
    PETALFLOW_HOME), writes checkpoints, the exported model and train.json under
    ``job.workdir`` and returns the training record. Run from its deployment, it stops when
    the run that handed it over has ended (``ends_with_its_parent``)."""
    with ends_with_its_parent(job.params.max_training_hours):
        return train_model_task(job)


def run_trainings(jobs: list[TrainingJob], handoff: Optional[dict],
                  max_hours: float) -> list[dict]:
    """Each job's training record (train.json), in order. In this process (``handoff`` None)
    the jobs train one after another; handed to the deployment ``handoff`` names
    (``handoff.training_handoff``) they all start at once and run as the pool's workers allow.
    Each may run ``max_hours`` (Prefect's flow timeout here; handed over, the waiting run
    cancels it). A failed job raises, unless it is one candidate of several: then its record
    is ``{"error": why}``."""
    from prefect.flow_engine import FlowRunTimeoutError

    records = []
    if handoff is None:
        timed = train_model_flow.with_options(timeout_seconds=max_hours * 3600)
        for job in jobs:
            try:
                records.append(timed(job))
            except Exception as exc:  # noqa: BLE001 - one candidate of a sweep
                if isinstance(exc, FlowRunTimeoutError):
                    exc = time_limit_error(max_hours, "the training step", len(jobs) == 1)
                if len(jobs) == 1:
                    raise exc from None
                records.append({"error": f"{type(exc).__name__}: {exc}"})
        return records
    from prefect.deployments import run_deployment

    target = handoff["name"]
    runs = [run_deployment(name=target, parameters={"job": job.model_dump(mode="json")},
                           timeout=0, as_subflow=True) for job in jobs]
    for job, run in zip(jobs, wait_for_training_runs([run.id for run in runs], handoff,
                                                     max_hours=max_hours)):
        if run.state is not None and run.state.is_completed():
            records.append(json.loads((Path(job.workdir) / "train.json").read_text()))
            continue
        why = ended_training_error(run, target, max_hours, len(jobs) == 1)
        if len(jobs) == 1:
            raise why
        records.append({"error": str(why)})
    return records


@flow(name="train-and-register", log_prints=True,
      on_failure=[end_failed_run], on_crashed=[end_failed_run],
      on_cancellation=[end_failed_run])
def train_and_register(params: TrainParams = TrainParams()):
    logger = get_run_logger()
    home = petalflow_home()
    timer = PhaseTimer()
    if params.follow_champion:
        # The champion's data and training settings (a schedule keeping it current).
        following = followed_champion_task(params)
        if following is None:
            return _finish(nothing_to_follow(params.model_name), home=home)
        params = following[0]
    # Where training runs, before any work: a training deployment the server does not have
    # fails the run here, not after the download.
    target = _training_target(params)
    handoff = training_handoff_task(target, _own_run_id()) if target else None
    # The backbone first (each one a sweep uses): a wrong handle or image size is refused
    # before any data is fetched.
    candidates = params.candidates()
    set_by = image_size_set_by(params, candidates)
    with timer.phase("backbone"):
        backbones = {(c.backbone, c.image_size): fetch_backbone_task(
            c.backbone, str(home / "tfhub"), c.image_size, set_by[c.backbone, c.image_size])
            for c in candidates}
    with timer.phase("download"):
        archive = download_archive_task(params.data_url, str(home / "downloads"),
                                        expected_sha256(params))
        source = describe_source_task(params.data_url, archive)
    if source["kind"] == "http":
        logger.info("dataset %s: %s (sha256 %s, ETag %s, Last-Modified %s%s)",
                    redact_url(params.data_url), source["outcome"], source["sha256"][:12],
                    source.get("etag"), source.get("last_modified"),
                    f"; redirected to {source['redirected_to']}"
                    if source.get("redirected_to") else "")
    with timer.phase("scan"):
        data_root = extract_archive_task(archive, str(home / "datasets"),
                                         params.max_extract_bytes,
                                         source_identity(params.data_url))
        data_info = prepare_dataset_task(
            data_root, str(home / "manifests" / _split_key(params, data_root)),
            params.val_fraction, params.test_fraction, params.seed,
            unchanging=source["kind"] != "folder",  # an extracted archive, never changed
        )
    counts = data_info["counts"]
    logger.info(dataset_line(data_info))
    turned_note = orientation_note(counts)
    if turned_note:
        logger.info(turned_note)
    split_note = split_layout_note(counts)
    if split_note:
        logger.info(split_note)
    for warned in (tucked_classes_note(counts), alike_names_note(data_info["classes"])):
        if warned:
            logger.warning(warned)
    dataset = dataset_summary(data_info)
    # One training of this model at a time: a run that finds another one training it waits
    # (saying which), then checks below whether anything is new.
    with training_turn(home, params.model_name, _run_label()) as turn:
        if turn.waited:
            timer.add("queued", turn.waited)
        return _train(params, home, timer, data_info, dataset, source, candidates, backbones,
                      handoff, turn)


def _train(params: TrainParams, home: Path, timer: PhaseTimer, data_info: dict, dataset: dict,
           source: dict, candidates: list, backbones: dict, handoff: Optional[dict],
           turn: Turn):
    """The rest of ``train_and_register``, in this model's training turn: "nothing to do", or
    the MLflow run, the training step(s), evaluation and registration."""
    if turn.left_by:  # the training before was killed: the MLflow runs it left RUNNING end
        with timer.phase("tracking"):
            end_abandoned_runs_task(turn.left_by, _run_label())
    if not params.force:
        with timer.phase("tracking"):
            same = unchanged_since_champion_task(params, data_info)
        if same is not None:
            summary = {"status": "nothing to do", **same,
                       "dataset": dataset, "source": redacted_source(source),
                       "timings": timer.table()}
            return _finish(summary, home=home)
    fingerprint = data_info["fingerprint"]
    key = run_key(params, fingerprint)
    with timer.phase("tracking"):
        run_id = start_run_task(params, data_info, run_name=f"train-{key[:8]}", source=source,
                                turn=turn.holder)
    sweep = None
    try:
        # One job per configuration; a sweep's candidates are nested MLflow runs and each
        # shows its own progress (they may train at once).
        progress = None if params.sweep else start_progress_task(params.model_name)
        jobs = []
        for i, c in enumerate(candidates):
            backbone_path = backbones[(c.backbone, c.image_size)]
            candidate_run = start_run_task(c, data_info, run_name=f"candidate-{i + 1}",
                                           source=source, parent_run_id=run_id,
                                           turn=turn.holder) \
                if params.sweep else run_id
            jobs.append(TrainingJob(
                dataset=data_info, params=c, run_id=candidate_run,
                workdir=str(home / "runs" / run_key(c, fingerprint) / _attempt_name()),
                backbone_path=backbone_path, progress_artifact_id=progress,
                features_dir=str(feature_cache_dir(home / "features", c, fingerprint,
                                                   backbone_path))))
        training_started = time.perf_counter()
        records = run_trainings(jobs, handoff, params.max_training_hours)
        best = 0
        if params.sweep:
            sweep = rank_candidates([c.changes() for c in params.sweep], records,
                                    [job.run_id for job in jobs])
            for job, rec in zip(jobs, records):
                finish_run_task(job.run_id, "FAILED" if "error" in rec else "FINISHED",
                                rec.get("error"))
            publish_sweep_task(run_id, params.model_name, sweep)
            best = sweep[0]["candidate"] - 1
        record, trained = records[best], jobs[best].params
        timer.split_training(time.perf_counter() - training_started, record.get("timings"))
        workdir = Path(jobs[best].workdir)
        with timer.phase("evaluation"):
            evaluation = evaluate_model_task(record["export_dir"], data_info,
                                             str(workdir / "evaluation"), run_id,
                                             str(home / "predictions"))
            edge = None
            if record.get("edge_dir"):
                edge = evaluate_edge_task(record["edge_dir"], record["export_dir"], data_info,
                                          trained.image_size, run_id,
                                          evaluation["metrics"].get("serving_latency_ms"))
            champion = champion_info_task(params.model_name)
            comparison = compare_with_champion_task(champion, data_info, str(workdir),
                                                    str(home / "predictions"),
                                                    params.allow_dropped_classes,
                                                    evaluation["files"]["predictions"])
        with timer.phase("registration"):
            registration = register_model_task(run_id, record["export_dir"], trained,
                                               data_info, evaluation["metrics"], comparison,
                                               source, edge, request=params,
                                               majority=evaluation["majority"])
        timings = timer.table()
        log_timings_task(run_id, timings)
    except BaseException as exc:
        # The run fails with its own error: one recording it cannot write (the store's disk
        # full, its server gone) is logged as the task's failure, not raised in its place.
        finish_run_task(run_id, "FAILED", failure_text(exc), return_state=True)
        raise
    finish_run_task(run_id)
    summary = {
        "status": "trained",
        "mlflow_run_id": run_id,
        **registration,
        "comparison": comparison,
        "test_metrics": evaluation["metrics"],
        "edge": edge_summary(edge, evaluation["metrics"]["test_accuracy"]) if edge else None,
        "dataset": dataset,
        "source": redacted_source(source),
        "training": {**{k: record[k] for k in ("device", "epochs", "resumed_from_epoch",
                                               "seeded_from", "seconds", "features")},
                     "validation": record.get("validation"),
                     "weight_average": record.get("weight_average"),
                     "advice": record.get("advice")},
        "sweep": sweep,
        "workdir": str(workdir),
        "manifest": data_info["manifest"],
        "timings": timings,
    }
    return _finish(summary, home, str(workdir / "evaluation"))


def _finish(summary: dict, home: Path, evaluation_dir: Optional[str] = None):
    """Publish the result (artifacts, model card), remove the dataset extractions and feature
    caches no source uses any more (``housekeeping``), and end the run with a state whose
    message says what happened; the summary is the run's result."""
    from prefect.states import Completed

    summary["links"] = publish_result_task(summary, evaluation_dir)
    summary["housekeeping"] = prune_home_task(str(home))
    message = state_message(summary)
    get_run_logger().info(message)
    return Completed(message=message, data=summary)


def _training_target(params: TrainParams) -> Optional[str]:
    """The deployment ``params`` hand the training step to (``auto``: train-gpu when this run
    comes from a deployment), or None."""
    from prefect.runtime import deployment

    return training_target(params, from_deployment=deployment.id is not None)


def _own_run_id():
    """This flow run's id (None outside a run)."""
    from prefect.runtime import flow_run

    return flow_run.id


def _run_label() -> str:
    """This flow run, as another run waiting for its training turn is told."""
    from prefect.runtime import flow_run

    return (f"flow run {flow_run.name!r} ({flow_run.id})" if flow_run.id
            else f"process {os.getpid()}")


def _attempt_name() -> str:
    """This flow run's own working folder name: retries of the run reuse it (and resume)."""
    from prefect.runtime import flow_run

    return attempt_name(flow_run.id or os.getpid())


def _split_key(params: TrainParams, data_root: str) -> str:
    """One manifest folder per (dataset folder, split settings)."""
    blob = f"{data_root}|{params.val_fraction}|{params.test_fraction}|{params.seed}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
