"""train-and-register: from a dataset URL to a registered, usable MLflow model.

Inputs: one ``TrainParams`` (dataset URL/sha256, TF Hub backbone, training options, model name,
quality gate). Steps: download -> extract -> scan/split (quarantine bad files) -> MLflow run ->
train (resumable, per-epoch metrics) -> evaluate on the test split -> register a model version and
move the ``champion`` alias only if it passes the gate and beats the current champion.
Output: the run summary (MLflow run id, model name/version, alias decision, test metrics,
dataset counts). Files live under ``$PETALFLOW_HOME`` (default ``./.petalflow``).

Run it with ``petalflow train [options]`` (ephemeral Prefect, no server needed) or deploy it
with ``prefect deploy --prefect-file deployment.yaml --all``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from prefect import flow, get_run_logger

from tasks.dataset import prepare_dataset_task
from tasks.download import download_archive_task, extract_archive_task
from tasks.evaluate import evaluate_model_task
from tasks.params import TrainParams
from tasks.registry import finish_run_task, register_model_task, start_run_task
from tasks.train import run_key, train_model_task


def petalflow_home() -> Path:
    """Where downloads, extracted datasets and run working folders live."""
    return Path(os.environ.get("PETALFLOW_HOME", ".petalflow")).resolve()


@flow(name="train-and-register", log_prints=True)
def train_and_register(params: TrainParams = TrainParams()) -> dict:
    logger = get_run_logger()
    home = petalflow_home()
    archive = download_archive_task(params.data_url, str(home / "downloads"), params.data_sha256)
    data_root = extract_archive_task(archive, str(home / "datasets"), params.max_extract_bytes)
    data_info = prepare_dataset_task(
        data_root, str(home / "manifests" / _split_key(params, data_root)),
        params.val_fraction, params.test_fraction, params.seed,
    )
    counts = data_info["counts"]
    logger.info("dataset: %d classes, %d files found, %d used, %d quarantined",
                len(data_info["classes"]), counts["found"], counts["used"], counts["quarantined"])
    key = run_key(params, data_info["fingerprint"])
    workdir = home / "runs" / key
    run_id = start_run_task(params, data_info, run_name=f"train-{key[:8]}")
    try:
        record = train_model_task(data_info, params, str(workdir), run_id)
        evaluation = evaluate_model_task(record["export_dir"], data_info,
                                         str(workdir / "evaluation"), run_id)
        registration = register_model_task(run_id, record["export_dir"], params, data_info,
                                           evaluation["metrics"])
    except BaseException:
        finish_run_task(run_id, "FAILED")
        raise
    finish_run_task(run_id)
    summary = {
        "mlflow_run_id": run_id,
        **registration,
        "test_metrics": evaluation["metrics"],
        "dataset": {
            "fingerprint": data_info["fingerprint"],
            "classes": data_info["classes"],
            "found": counts["found"],
            "used": counts["used"],
            "quarantined": counts["quarantined"],
            "splits": counts["splits"],
            "quarantine_reasons": counts["quarantine_reasons"],
        },
        "training": {k: record[k] for k in ("device", "epochs", "resumed_from_epoch", "seconds")},
        "workdir": str(workdir),
    }
    logger.info("registered %s version %s as %s (%s)", registration["model_name"],
                registration["model_version"], registration["alias"], registration["alias_reason"])
    return summary


def _split_key(params: TrainParams, data_root: str) -> str:
    """One manifest folder per (dataset folder, split settings)."""
    blob = f"{data_root}|{params.val_fraction}|{params.test_fraction}|{params.seed}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
