"""What a run leaves on disk that later runs do not need: dataset extractions no source uses
any more (``download.prune_extractions``), their manifests (``dataset.prune_manifests``) and
the feature caches of data no manifest describes (``train.prune_feature_caches``). Done by
the training flow's last task; a run's own extraction is held until then
(``download.extract_archive``'s ``holder``) and let go of by flow hooks when the run fails,
crashes or is cancelled."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from petalflow.tasks.common import log
from petalflow.tasks.dataset import prune_manifests
from petalflow.tasks.download import prune_extractions, release_extractions
from petalflow.tasks.train import prune_feature_caches


def prune_home(home: Path) -> dict:
    """Remove what no source's current data needs under ``home`` (PETALFLOW_HOME): returns
    the names removed per folder and the bytes freed."""
    home = Path(home)
    extractions = prune_extractions(home / "datasets")
    manifests, fingerprints = prune_manifests(home / "manifests")
    features = prune_feature_caches(home / "features", fingerprints)
    return {"datasets": [name for name, _ in extractions], "manifests": manifests,
            "features": [name for name, _ in features],
            "bytes": sum(size for _, size in extractions + features)}


def release_run_extractions(flow, flow_run, state) -> None:
    """Flow-run hook (failed, crashed or cancelled runs): this run holds its extraction no
    longer."""
    release_extractions(str(flow_run.id))


@task(name="prune-home")
def prune_home_task(home: str) -> dict:
    """At the end of a run: its extraction is held no longer, then ``prune_home``."""
    from prefect.runtime import flow_run

    release_extractions(str(flow_run.id))
    removed = prune_home(Path(home))
    if removed["datasets"] or removed["features"]:
        log("removed %d dataset extraction(s) and %d feature cache(s) of data no source "
            "uses any more (%.1f MiB freed): %s", len(removed["datasets"]),
            len(removed["features"]), removed["bytes"] / 2**20,
            ", ".join(name[:12] for name in removed["datasets"] + removed["features"]))
    return removed
