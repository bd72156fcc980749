"""Sweeps: rank the candidates a train run trained and publish the ranking.

A sweep (``TrainParams.sweep``) trains several configurations of one run; the flow hands each to
the training deployment at once, so N GPU workers train N candidates side by side. The best on
validation accuracy (ties: lower validation loss, then the earlier candidate) goes on to the
test split and registration; the ranking is the run's summary ``sweep``, a Prefect table
artifact ``sweep-<model>`` and ``sweep/ranking.json`` in the parent MLflow run.
"""

from __future__ import annotations

from typing import Optional

from prefect import task

from petalflow.tasks.registry import PRECISION


def _final(record: dict, name: str) -> Optional[float]:
    """The trained model's validation figure ``name``: the record's ``validation`` (with
    ``average_weights`` the averaged head's, not the last epoch's), else the last epoch's."""
    if (value := (record.get("validation") or {}).get(name)) is not None:
        return float(value)
    values = (record.get("history") or {}).get(name) or []
    return float(values[-1]) if values else None


def rank_candidates(changes: list[dict], records: list[dict], run_ids: list[str]) -> list[dict]:
    """One row per candidate, best first: what it changed, its final validation accuracy and
    loss, epochs, seconds, its MLflow run and, for a failed one, why. Raises RuntimeError when
    every candidate failed."""
    rows = []
    for i, (change, record, run_id) in enumerate(zip(changes, records, run_ids)):
        rows.append({
            "candidate": i + 1,
            "changes": ", ".join(f"{k}={v}" for k, v in sorted(change.items())),
            "val_accuracy": _final(record, "val_accuracy"),
            "val_loss": _final(record, "val_loss"),
            "epochs": record.get("epochs"),
            "seconds": record.get("seconds"),
            "mlflow_run_id": run_id,
            "error": record.get("error", ""),
        })
    ok = [r for r in rows if not r["error"] and r["val_accuracy"] is not None]
    failed = [r for r in rows if r["error"] or r["val_accuracy"] is None]
    if not ok:
        raise RuntimeError("every sweep candidate failed: " + "; ".join(
            f"candidate {r['candidate']}: {r['error'] or 'no validation accuracy'}"
            for r in rows))
    # At the precision accuracies are compared at (registry.PRECISION, as the champion
    # decision compares them): a fine-tuned candidate's is Keras's float32 metric (10 of 12:
    # 0.83333331), a head's on cached features an exact fraction (0.83333333...); compared as
    # they are, the same count of correct images ranked the fine-tuned one below, whatever
    # its validation loss.
    ok.sort(key=lambda r: (-round(r["val_accuracy"], PRECISION), r["val_loss"]
                           if r["val_loss"] is not None else float("inf"), r["candidate"]))
    for rank, row in enumerate(ok, 1):
        row["rank"] = rank
    for row in failed:
        row["rank"] = None
    return ok + failed


def sweep_markdown(rows: list[dict]) -> str:
    """The ranking as text (console and model card)."""
    lines = []
    for row in rows:
        what = (f"val_accuracy {row['val_accuracy']:.4f}, val_loss {row['val_loss']:.4f}"
                if row["rank"] else f"failed: {row['error']}")
        lines.append(f"{row['rank'] or '-'}. candidate {row['candidate']} ({row['changes']}): "
                     f"{what}")
    return "\n".join(lines)


@task(name="publish-sweep")
def publish_sweep_task(run_id: str, model_name: str, rows: list[dict]) -> None:
    """The ranking as a Prefect table artifact and in the parent MLflow run."""
    from prefect.artifacts import create_table_artifact

    from petalflow.tasks.common import log
    from petalflow.tasks.registry import log_sweep
    from petalflow.tasks.report import artifact_key

    create_table_artifact(key=artifact_key("sweep", model_name), table=rows,
                          description=f"Sweep of {model_name}: candidates ranked by validation "
                                      "accuracy; the first is evaluated and registered")
    log_sweep(run_id, rows)
    log("sweep ranking:\n%s", sweep_markdown(rows))
