"""batch-predict: classify images with a registered model.

Input: one ``PredictParams`` (model URI or name, images: files, folders or patterns, output file,
format, top-k). Output: the predictions file (the same CSV/JSON as ``petalflow predict``, which
runs the same job function, ``tasks.predict.predict_images``) and a summary, also published as a
Prefect markdown artifact (rows, errors, count per predicted label). With ``drift`` (default on)
it also publishes the ``drift-<model>`` artifact and, over the threshold, emits
``petalflow.drift.detected`` (the ``train`` deployment has a trigger for it, disabled by default).

Deployed as ``batch-predict`` by ``deployment.yaml``; ``petalflow predict`` runs this flow too
(against PREFECT_API_URL when set, so its runs and drift history show in the UI; else in a
temporary server).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefect import flow, task

from petalflow.tasks.params import PredictParams

__all__ = ["PredictParams", "batch_predict"]

PROGRESS_EVERY_S = 5


@task(name="predict-images")
def predict_images_task(params: PredictParams) -> dict:
    """Thin wrapper: the job, with a progress line in the run's log every few seconds."""
    import time

    from petalflow.tasks.common import log
    from petalflow.tasks.predict import predict_images
    from petalflow.tasks.space import disk_full_said

    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        if done == total or time.monotonic() - last[0] >= PROGRESS_EVERY_S:
            last[0] = time.monotonic()
            log("classified %d of %d images", done, total)

    with disk_full_said("writing the predictions",
                        (Path(params.output).expanduser().absolute().parent, "the predictions")):
        return predict_images(params, on_batch=progress)


@task(name="publish-predictions")
def publish_predictions_task(summary: dict) -> None:
    from prefect.artifacts import create_markdown_artifact

    from petalflow.tasks.report import prediction_markdown

    create_markdown_artifact(key="batch-predict-summary", markdown=prediction_markdown(summary),
                             description="Images per predicted label")


def _retry_if_transient(task, task_run, state) -> bool:
    from petalflow.tasks.registry import retry_if_transient

    return retry_if_transient(task, task_run, state)


# Prefect's API (the artifact, the event) and MLflow's (the version's parameters): retried on
# I/O that may pass only.
@task(name="report-drift", retries=2, retry_delay_seconds=[5, 20],
      retry_condition_fn=_retry_if_transient)
def report_drift_task(summary: dict) -> Optional[str]:
    """The drift-<model> artifact (a history per model in the UI) and, over the threshold,
    the petalflow.drift.detected event; returns the event id."""
    from prefect.artifacts import create_markdown_artifact

    from petalflow.tasks.drift import (
        drift_markdown, emit_drift_detected, model_name_of, training_params_of,
    )
    from petalflow.tasks.report import artifact_key

    name = model_name_of(summary["model_uri"])
    create_markdown_artifact(key=artifact_key("drift", name), markdown=drift_markdown(summary),
                             description="How far the classified images are from the training "
                                         "data")
    drift = summary.get("drift") or {}
    if drift.get("available") and drift["drifted"]:
        return emit_drift_detected(summary, training_params_of(
            summary.get("model_version_uri") or summary["model_uri"]))
    return None


# Ends with a state whose message says how many images were classified and where the table
# went (its absolute path); the summary is the run's result. (No docstring: it would be the
# flow's description in the UI.)
@flow(name="batch-predict", log_prints=True)
def batch_predict(params: PredictParams):
    from prefect import get_run_logger
    from prefect.states import Completed

    from petalflow.tasks.report import prediction_line

    summary = predict_images_task(params)
    publish_predictions_task(summary)
    if params.drift:
        summary["drift_event"] = report_drift_task(summary)
    message = prediction_line(summary)
    get_run_logger().info(message)
    return Completed(message=message, data=summary)
