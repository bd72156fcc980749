"""Drift at prediction time: report it, and announce it as a Prefect event.

The measure itself travels with the model (``tasks/serving.py``: the version's stored reference
of its training data, ``drift_scores``); this module turns a prediction job's result into the
``drift-<model>`` artifact and, over the threshold, the ``petalflow.drift.detected`` event,
whose payload carries the version's training parameters so a trigger can start a retraining.
"""

from __future__ import annotations

import json
from typing import Optional

from petalflow.tasks.common import counted, log, redacted
from petalflow.tasks.params import ONE_RUN_FIELDS
from petalflow.tasks.registry import (
    mlflow_client, model_said, model_version_of, parse_models_uri, version_tags,
)

EVENT = "petalflow.drift.detected"


def verdict(drift: dict) -> str:
    """"drifted", "too few" (a batch under the version's ``min_images``: no verdict; versions
    registered before the minimum existed judge any batch) or "alike"."""
    if drift["drifted"]:
        return "drifted"
    return "too few" if drift["images"] < drift.get("min_images", 0) else "alike"


# How the console line and the drift artifact say each verdict.
VERDICT_LINE = {
    "drifted": "DRIFTED: these images do not look like the training data",
    "too few": "too few images to tell (a verdict needs {min_images} or more; the score of a few "
               "photos is mostly chance)",
    "alike": "like the training data",
}
VERDICT_MARKDOWN = {
    "drifted": "**over the threshold: these images do not look like the training data**",
    "too few": "no verdict: too few images to tell (it needs {min_images} or more)",
    "alike": "under the threshold: like the training data",
}


def drift_line(drift: Optional[dict]) -> str:
    """One line on drift for the console and the summary artifact."""
    if not drift:
        return "drift: not measured"
    if not drift.get("available"):
        return f"drift: not available ({drift.get('reason')})"
    said = VERDICT_LINE[verdict(drift)].format(**drift)
    return (f"drift: score {drift['drift_score']:.3f} (threshold {drift['threshold']:.2f}; "
            f"features {drift['feature_drift']:.3f}, image statistics "
            f"{drift['image_drift']:.3f}) on {counted(drift['images'], 'image')}: {said}")


EVENT_INPUTS = 20  # of a job's inputs, named in its drift event (``drift_payload``)


def inputs_said(inputs: list) -> str:
    """A job's inputs for its artifacts: the first three and how many more (a shell's glob
    names every file: 30,000 of them made the artifacts a list of files)."""
    shown = ", ".join(f"`{item}`" for item in inputs[:3])
    return shown + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")


def drift_markdown(summary: dict) -> str:
    """The artifact: the score, its parts, the threshold and what was compared."""
    drift = summary.get("drift") or {}
    inputs = inputs_said(summary["inputs"])
    model = model_said(summary["model_uri"], summary.get("model_version_uri"))
    if not drift.get("available"):
        return (f"# Drift\n\nNot measured for `{model}`: "
                f"{drift.get('reason', 'turned off')}.\n")
    said = VERDICT_MARKDOWN[verdict(drift)].format(**drift)
    return "\n".join([
        "# Drift", "",
        f"{counted(drift['images'], 'image')} from {inputs} compared with what `{model}` "
        f"was trained on: drift score **{drift['drift_score']:.3f}** (threshold "
        f"{drift['threshold']:.2f}), {said}.", "",
        *(["Compared with training photos in this batch's own class mix (the share of its "
           "images classified as each class): photos of one class, or any mix unlike the "
           "training split's, are not drifted for that alone.", ""]
          if drift.get("class_mix") else []),
        "| measure | value |", "|---|---|",
        f"| backbone features (standardised mean shift, RMS over dimensions) | "
        f"{drift['feature_drift']:.3f} |",
        f"| image statistics (size, as far as the model sees it; aspect, brightness, "
        f"contrast, saturation) | "
        f"{drift['image_drift']:.3f} |",
        f"| drift score (the larger) | {drift['drift_score']:.3f} |", ""])


def model_name_of(model_uri: str) -> str:
    """The registered model's name in a models:/ URI ("local" for anything else)."""
    parsed = parse_models_uri(model_uri)
    return parsed[0] if parsed else "local"


def model_resource(model_uri: str) -> str:
    """The event's resource id: ``petalflow.model.<name>``."""
    return f"petalflow.model.{model_name_of(model_uri)}"


def drift_payload(summary: dict, training_params: Optional[dict]) -> dict:
    """The event's payload: ``model_version_uri`` is the version that classified the images
    (``model_uri``'s alias may name another by now), ``params`` its training parameters; the
    first ``EVENT_INPUTS`` inputs and their count (a shell's glob names every file: 30,000
    made the event larger than Prefect's limit, 1.5 MB, and the job failed emitting it)."""
    return {"model_uri": summary["model_uri"],
            "model_version_uri": summary.get("model_version_uri", summary["model_uri"]),
            "inputs": summary["inputs"][:EVENT_INPUTS], "inputs_count": len(summary["inputs"]),
            "output": summary["output"], "drift": summary["drift"],
            "params": training_params}


def refused_retraining(training_params: Optional[dict]) -> Optional[str]:
    """Why the retraining a drift event starts with ``training_params`` will be refused, else
    None: a data URL recorded without its credentials (``common.redacted``)."""
    url = (training_params or {}).get("data_url")
    if not url or not redacted(url):
        return None
    return (f"the retraining this drift event starts will be refused: the version's data URL "
            f"was recorded without its credentials ({url}); set data_url in the train "
            "deployment's own parameters and drop the drift trigger's parameters (README)")


def emit_drift_detected(summary: dict, training_params: Optional[dict]) -> str:
    """Emit ``petalflow.drift.detected``; returns the event id. The run's log warns first when
    the retraining it starts will be refused (``refused_retraining``)."""
    from prefect.events import emit_event

    refused = refused_retraining(training_params)
    if refused:
        log("%s", refused, level=30)

    event = emit_event(
        event=EVENT,
        resource={"prefect.resource.id": model_resource(summary["model_uri"]),
                  "prefect.resource.name": summary["model_uri"]},
        payload=drift_payload(summary, training_params),
    )
    if event is None:
        raise RuntimeError("Prefect events are disabled here; cannot announce the drift")
    return str(event.id)


def training_params_of(model_uri: str) -> Optional[dict]:
    """The train parameters a registered version was trained with (its ``params`` tag), for
    a retraining trigger; None for a local folder or a version without the tag. The decisions
    about that one run (``force``, ``allow_dropped_classes``) are not handed on: a retraining
    on drift trains only on changed data, and decides on its own classes."""
    if parse_models_uri(model_uri) is None:
        return None
    raw = version_tags(mlflow_client(), model_version_of(model_uri)).get("params")
    if not raw:
        return None
    return {k: v for k, v in json.loads(raw).items() if k not in ONE_RUN_FIELDS}
