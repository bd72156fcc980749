"""What a run leaves on disk that later runs do not need: the downloads and extraction records
of sources no run used for weeks (``download.forget_unused_sources``), dataset extractions no
source uses any more (``download.prune_extractions``), their manifests
(``dataset.prune_manifests``), the feature caches of data no manifest describes
(``train.prune_feature_caches``) and the working folders of trainings whose run ended
(``train.prune_attempts``: their models are in MLflow).
Done by the training flow's last task; a run's own extraction is held until then
(``download.extract_archive``'s ``holder``), and flow hooks let go of it and end the run's
trainings when the run fails, crashes or is cancelled."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from petalflow.tasks.common import counted, log, petalflow_home
from petalflow.tasks.dataset import described_shas, prune_manifests
from petalflow.tasks.download import (
    UNUSED_SOURCE_DAYS, forget_unused_sources, prune_extractions, release_extractions,
)
from petalflow.tasks.train import (
    FEATURE_BANKS, attempt_name, compact_feature_banks, end_attempts, prune_attempts,
    prune_feature_caches,
)


def prune_home(home: Path, keep_attempts: str = "") -> dict:
    """Remove what no source's current data needs under ``home`` (PETALFLOW_HOME), and the
    training attempts whose runs ended but those called ``keep_attempts`` (this run's):
    returns the names removed per folder and the bytes freed."""
    home = Path(home)
    downloads = forget_unused_sources(home / "datasets", home / "downloads")
    extractions = prune_extractions(home / "datasets")
    manifests, fingerprints = prune_manifests(home / "manifests")
    features = prune_feature_caches(home / "features", fingerprints)
    banks = compact_feature_banks(home / "features" / FEATURE_BANKS,
                                  described_shas(home / "manifests"))
    runs = prune_attempts(home / "runs", keep_attempts)
    return {"downloads": [name for name, _ in downloads],
            "datasets": [name for name, _ in extractions], "manifests": manifests,
            "features": [name for name, _ in features], "runs": [name for name, _ in runs],
            "feature_bank_rows": sum(rows for _, rows, _ in banks),
            "bytes": sum(size for _, size in downloads + extractions + features + runs)
            + sum(size for _, _, size in banks)}


def removed_sentence(removed: dict) -> str:
    """What ``prune_home`` removed, in one sentence naming only what there was ("removed 1
    training folder of ended runs (3.6 MiB freed)"); "" when it removed nothing."""
    groups = [
        ([(len(removed["downloads"]), "download")],
         f"of sources no run used for {UNUSED_SOURCE_DAYS} days"),
        ([(len(removed["datasets"]), "dataset extraction"),
          (len(removed["features"]), "feature cache")], "of data no source uses any more"),
        ([(len(removed["runs"]), "training folder")], "of ended runs"),
        ([(removed["feature_bank_rows"], "feature bank row")], "of images no data holds now"),
    ]
    said = []
    for counts, what in groups:
        some = [counted(n, noun) for n, noun in counts if n]
        if some:
            said.append(" and ".join(some) + " " + what)
    if not said:
        return ""
    return f"removed {'; '.join(said)} ({removed['bytes'] / 2**20:.1f} MiB freed)"


def end_run(home: Path, flow_run_id: str) -> None:
    """The run is over: it holds its extraction no longer, and its finished trainings are
    done with (``train.end_attempts``)."""
    release_extractions(flow_run_id)
    end_attempts(Path(home) / "runs", attempt_name(flow_run_id))


def end_failed_run(flow, flow_run, state) -> None:
    """Flow-run hook (failed, crashed or cancelled runs): ``end_run``."""
    end_run(petalflow_home(), str(flow_run.id))


@task(name="prune-home")
def prune_home_task(home: str) -> dict:
    """At the end of a run: ``end_run``, then ``prune_home`` (this run's attempts stay until
    the next run)."""
    from prefect.runtime import flow_run

    end_run(Path(home), str(flow_run.id))
    removed = prune_home(Path(home), attempt_name(flow_run.id))
    names = [f"downloads/{name}" for name in removed["downloads"]] + [
        name[:12] for name in removed["datasets"] + removed["features"]] + [
        f"runs/{name}" for name in removed["runs"]]
    said = removed_sentence(removed)
    if said:
        log("%s", said + (": " + ", ".join(names) if names else ""))
    return removed
