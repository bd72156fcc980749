"""batch-predict: classify images with a registered model.

Input: one ``PredictParams`` (model URI or name, images: files, folders or patterns, output file,
format, top-k). Output: the predictions file (the same CSV/JSON as ``petalflow predict``, which
runs the same job function, ``tasks.predict.predict_images``) and a summary, also published as a
Prefect markdown artifact (rows, errors, count per predicted label).

Deployed as ``batch-predict`` by ``deployment.yaml``; or run ``petalflow predict`` directly.
"""

from __future__ import annotations

from prefect import flow, task

from petalflow.tasks.params import PredictParams

__all__ = ["PredictParams", "batch_predict"]


@task(name="predict-images")
def predict_images_task(params: PredictParams) -> dict:
    from petalflow.tasks.predict import predict_images

    return predict_images(params)


@task(name="publish-predictions")
def publish_predictions_task(summary: dict) -> None:
    from prefect.artifacts import create_markdown_artifact

    from petalflow.tasks.report import prediction_markdown

    create_markdown_artifact(key="batch-predict-summary", markdown=prediction_markdown(summary),
                             description="Images per predicted label")


@flow(name="batch-predict", log_prints=True)
def batch_predict(params: PredictParams) -> dict:
    summary = predict_images_task(params)
    publish_predictions_task(summary)
    return summary
