"""batch-predict: classify every image in a folder with a registered model.

Inputs: one ``PredictParams`` (model URI or name, input folder, output file, format, top-k).
Output: the predictions file (the same CSV/JSON as ``petalflow predict``) and a summary, also
published as a Prefect markdown artifact (rows, errors, count per predicted label).

Deployed as ``batch-predict`` by ``deployment.yaml``; or run ``petalflow predict`` directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from prefect import flow, task
from pydantic import BaseModel, ConfigDict, Field, field_validator

from petalflow.tasks.params import DEFAULT_MODEL_NAME


class PredictParams(BaseModel):
    """What to classify, with which model, and where the results go."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_uri: Optional[str] = Field(
        None, title="Model URI",
        description="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a local model "
        "folder. Empty: models:/<model_name>@champion.",
    )
    model_name: str = Field(DEFAULT_MODEL_NAME, title="Registered model name",
                            description="Used for the default model URI.")
    input_folder: str = Field(..., title="Input folder",
                              description="Folder of images, searched recursively.")
    output: str = Field(..., title="Output file", description="Where the predictions go.")
    format: Literal["csv", "json"] = Field("csv", title="Format", description="csv or json.")
    top_k: int = Field(0, ge=0, le=100, title="Top k",
                       description="Also write the k best labels per image.")
    batch_size: int = Field(64, ge=1, le=4096, title="Batch size", description="Images per batch.")

    @field_validator("input_folder")
    @classmethod
    def _folder_exists(cls, value: str) -> str:
        if not Path(value).expanduser().is_dir():
            raise ValueError(f"{value!r} is not a folder")
        return value


@task(name="predict-folder")
def predict_folder_task(params: PredictParams) -> dict:
    import pandas as pd
    from prefect.artifacts import create_markdown_artifact

    from petalflow.tasks.evaluate import markdown_table
    from petalflow.tasks.predict import iter_inputs, predict_files
    from petalflow.tasks.registry import champion_uri

    files = list(iter_inputs([params.input_folder]))
    uri = params.model_uri or champion_uri(params.model_name)
    rows, errors, labels = predict_files(uri, files, Path(params.output), params.batch_size,
                                         fmt=params.format, top_k=params.top_k)
    summary = {"model_uri": uri, "images": rows, "errors": errors, "output": params.output,
               "labels": labels}
    create_markdown_artifact(
        key="batch-predict-summary",
        markdown=(f"# Batch prediction\n\n{rows} images from `{params.input_folder}` with "
                  f"`{uri}`: {rows - errors} classified, {errors} errors. Output: "
                  f"`{params.output}`.\n\n"
                  + markdown_table(pd.DataFrame(list(labels.items()), columns=["label", "count"]))),
        description="Images per predicted label",
    )
    return summary


@flow(name="batch-predict", log_prints=True)
def batch_predict(params: PredictParams) -> dict:
    return predict_folder_task(params)
