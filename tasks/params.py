"""The one typed, validated parameter model of the train-and-register flow.

Prefect renders this model as the run form in the UI (titles and descriptions are user
documentation); the CLI builds the same model from its options, so every entry point validates
the same way before any work starts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import unquote, urlparse

from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator,
)

from petalflow.tasks.common import (
    expand_input_lists, input_list, local_source, not_a_saved_model, redacted, scheme_hint,
    source_url, special_file, where_relative,
)

DEFAULT_DATA_URL = (
    "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
)
# Published digest of the flowers archive (228,813,984 bytes; TensorFlow Datasets' checksum
# record for tf_flowers), used when that URL is given without a digest of its own.
KNOWN_ARCHIVE_SHA256 = {
    url: "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
    for url in (DEFAULT_DATA_URL,
                "http://download.tensorflow.org/example_images/flower_photos.tgz",
                "https://download.tensorflow.org/example_images/flower_photos.tgz")
}
DEFAULT_BACKBONE = "https://tfhub.dev/google/tf2-preview/mobilenet_v2/feature_vector/4"
DEFAULT_MODEL_NAME = "petalflow-classifier"
CHAMPION = "champion"  # the registry alias of the version that predictions use by default
DEFAULT_TRAINING_DEPLOYMENT = "train-model/train-gpu"
TRAINING_FLOW = DEFAULT_TRAINING_DEPLOYMENT.split("/")[0]  # the training step's flow

# A digest as checksum tools print it (or alone), which is what gets pasted: `sha256sum` ("HEX  name",
# "HEX *name"), registries ("sha256:HEX"), `shasum -a 256 --tag` ("SHA256 (name) = HEX"),
# `openssl dgst -sha256` ("SHA2-256(name)= HEX").
_PRINTED_SHA256 = (re.compile(r"^(?:sha-?256:)?([0-9a-f]{64})(?:[ \t]+\*?[^\n]+)?$"),
                   re.compile(r"^sha(?:2-)?-?256 ?\([^\n]*\) ?= ?([0-9a-f]{64})$"))
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
_DEPLOYMENT_NAME = re.compile(r"^[^/\s]+/[^/\s]+$")
_URL_SCHEMES = ("http://", "https://", "file://")
# Object stores' own schemes: read through an https URL (presigned for a private object).
_OBJECT_STORE_HINTS = {
    "s3": "aws s3 presign s3://BUCKET/KEY --expires-in 604800",
    "s3a": "aws s3 presign s3://BUCKET/KEY --expires-in 604800",
    "gs": "gcloud storage sign-url gs://BUCKET/OBJECT --duration 7d",
    "gcs": "gcloud storage sign-url gs://BUCKET/OBJECT --duration 7d",
    "az": "an Azure Blob Storage SAS URL",
    "abfs": "an Azure Blob Storage SAS URL",
    "abfss": "an Azure Blob Storage SAS URL",
    "wasb": "an Azure Blob Storage SAS URL",
    "wasbs": "an Azure Blob Storage SAS URL",
}


def _some(items: list[str], shown: int = 5) -> str:
    """The first ``shown`` of ``items`` (repr) and how many more: an error about a list of
    thousands of files stays one line."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(repr(item) for item in items[:shown]) + more


def _other_case(patterns: list[str]) -> str:
    """What a pattern that matches nothing matches in another case ("photos/*.jpg" beside a
    camera's IMG_0001.JPG: a pattern is case-sensitive), said with what to give instead; else
    "". Only a pattern whose folder part is a folder is looked into."""
    import fnmatch
    import glob

    for pattern in patterns:
        path = Path(pattern).expanduser()
        if not glob.has_magic(path.name) or glob.has_magic(str(path.parent)) \
                or not path.parent.is_dir():
            continue
        wanted = path.name.lower()
        found = sorted(entry.name for entry in path.parent.iterdir()
                       if fnmatch.fnmatchcase(entry.name.lower(), wanted))
        if found:
            folder = str(Path(pattern).parent)
            names = f"{len(found)} name{'s' if len(found) > 1 else ''}"
            return (f"; a pattern is case-sensitive, and {names} in {folder!r} "
                    f"match {pattern!r} in another case ({_some(found, 3)}): write the pattern "
                    f"in their case, or give the folder {folder!r} (its images are found "
                    "whatever the case of their names)")
    return ""


def unquoted(value: str) -> str:
    """A value as typed or pasted, without surrounding spaces and one pair of matching quotes
    around it (a URL or path copied from a shell command into the UI's form) or of angle
    brackets (a link quoted by a chat or an e-mail: <https://…>)."""
    value = value.strip()
    if len(value) >= 2 and (value[0] + value[-1]) in ("''", '""', "<>"):
        value = value[1:-1].strip()
    return value


# A web address whose "://" was mistyped: "http:/host/x" (one slash), "https:host/x",
# "http:///host/x" (three: no host), "http//host/x" (no colon).
_MISTYPED_URL = re.compile(r"^(?P<scheme>https?)(?::/?|:/{3,}|/{2,3})(?=[^/])", re.IGNORECASE)


def mistyped_url(value: str) -> Optional[str]:
    """Why ``value`` is refused when it reads as a web address with its "://" mistyped (and
    names no existing file or folder), with the URL it means; None otherwise. Taken as a
    local path, it failed the run after its start-up: "does not exist"."""
    found = _MISTYPED_URL.match(value)
    if not found or Path(value).expanduser().exists():
        return None
    meant = f"{found.group('scheme')}://{value[found.end():]}"
    return (f"{value!r} is not a well-formed URL: a web address begins http:// or https:// "
            f"(a colon, two slashes): {meant}")


def file_url_problem(value: str) -> Optional[str]:
    """Why a ``file:`` URL names no local file, or None: ``file://photos.tgz`` names the host
    "photos.tgz" and the empty path (which was read as the current folder); a file URL takes
    three slashes and an absolute path, or ``localhost`` as its host."""
    if not value.lower().startswith("file:"):
        return None
    parsed = urlparse(value)
    if parsed.netloc.lower() not in ("", "localhost"):
        path = parsed.netloc + unquote(parsed.path)
        return (f"{value!r} names the host {parsed.netloc!r}, not a file: a file URL takes three "
                f"slashes and an absolute path (file:///data/photos.tgz), or give the path "
                f"itself ({path!r})")
    if not parsed.path.startswith("/"):
        return (f"{value!r} has no absolute path: write file:///<absolute path>, or give the "
                f"path itself ({unquote(parsed.path)!r})")
    return None


def _file_url_path(value: str) -> str:
    """The path a ``file:`` URL names (what a file manager's "copy link" gives), refused as
    ``file_url_problem`` says when it names none; any other value as it is."""
    problem = file_url_problem(value)
    if problem:
        raise ValueError(problem)
    return str(local_source(value)) if value.lower().startswith("file:") else value


def unsupported_scheme(value: str, allowed: str = "http://, https://, file://") -> str:
    """Why a URL with a scheme petalflow does not download is refused, and what to give."""
    scheme = value.split("://", 1)[0].lower()
    hint = _OBJECT_STORE_HINTS.get(scheme)
    if hint:
        return (f"{scheme}:// is not downloaded directly ({value!r}): give its https URL, "
                f"presigned for a private object ({hint}), or a path where it is mounted")
    return f"unsupported URL scheme in {value!r}; allowed: {allowed}, or a local path"


# A backbone's URL schemes: what TF Hub's resolvers fetch (gs://: with Google Cloud's own
# credentials), and file:// read as the path it names.
_BACKBONE_SCHEMES = ("http", "https", "gs")


def unset_or(unset: str, given: str):
    """``json_schema_extra`` for an Optional field: the Prefect UI's run form renders its
    ``anyOf`` as a switch labelled by each branch's title ("str | None" without one, the None
    side saying only 'Property is type "None"'); these name the choices as the form's user
    reads them, the unset one first (the default's)."""

    def extra(schema: dict) -> None:
        given_side, unset_side = schema["anyOf"]  # Optional[X]: [X's schema, null]
        schema["anyOf"] = [{**unset_side, "title": unset}, {**given_side, "title": given}]

    return extra


def in_declared_order(schema: dict) -> None:
    """``json_schema_extra`` of a form's model: each field's ``position``, its place in the
    model. The Prefect UI orders a run form's fields by it, else as the stored schema lists
    them, and a server on PostgreSQL stores it as jsonb, whose objects list their keys
    shortest first: train's form opened on Seed, Force retraining and Sweep, with the dataset
    URL seventh."""
    for position, field in enumerate(schema.get("properties", {}).values()):
        field["position"] = position


# allow_inf_nan: "nan" typed for a rate is named as not a number ("less than or equal to 1"
# before: NaN fails every comparison).
FORM = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False,
                  json_schema_extra=in_declared_order)


def _changed(title: str, **limits):
    """A sweep candidate's field: unset, the run's own value; set, this candidate's."""
    return Field(None, title=title, json_schema_extra=unset_or("As the run's", "This candidate's"),
                 **limits)


MAX_SWEEP = 16  # candidates in one sweep: each is a training (a gpu run when deployed)


def champion_uri(model_name: str) -> str:
    """The model URI of ``model_name``'s current champion."""
    return f"models:/{model_name}@{CHAMPION}"


def sweep_grid(grid: dict) -> list[dict]:
    """The candidates of a sweep given as a grid, ``{"learning_rate": [0.01, 0.003],
    "augment": [true, false]}``: every combination of the fields' values (the first field
    varying slowest; a single value is a one-value list). Raises ValueError for a field
    without values or a grid of more than ``MAX_SWEEP`` candidates."""
    import itertools
    import math

    axes = {name: values if isinstance(values, list) else [values]
            for name, values in grid.items()}
    if not axes:
        return []
    empty = [name for name, values in axes.items() if not values]
    if empty:
        raise ValueError(f"the grid gives {', '.join(empty)} no values: list one or more")
    sizes = [len(values) for values in axes.values()]
    total = math.prod(sizes)
    if total > MAX_SWEEP:
        raise ValueError(f"the grid makes {' x '.join(map(str, sizes))} = {total} candidates, "
                         f"more than {MAX_SWEEP}: give fewer values")
    return [dict(zip(axes, combination)) for combination in itertools.product(*axes.values())]


class SweepCandidate(BaseModel):
    """One configuration of a sweep: the training fields it changes; every other field is the
    run's own."""

    model_config = FORM

    backbone: Optional[str] = _changed("Backbone (TF Hub handle)")
    image_size: Optional[int] = _changed("Image size (px)", ge=32, le=1024)
    epochs: Optional[int] = _changed("Epochs", ge=1, le=500)
    batch_size: Optional[int] = _changed("Batch size", ge=1, le=4096)
    learning_rate: Optional[float] = _changed("Learning rate", gt=0, le=1.0)
    augment: Optional[bool] = _changed("Augment")
    balance_classes: Optional[bool] = _changed("Balance classes")
    average_weights: Optional[bool] = _changed("Average the last epochs")
    fine_tune_layers: Optional[int] = _changed("Fine-tune layers", ge=0, le=1000)
    fine_tune_epochs: Optional[int] = _changed("Fine-tune epochs", ge=1, le=100)
    fine_tune_learning_rate: Optional[float] = _changed("Fine-tune learning rate", gt=0, le=0.1)

    def changes(self) -> dict:
        """The fields this candidate sets."""
        return self.model_dump(exclude_none=True)


class TrainParams(BaseModel):
    """Everything one training run needs: the data, the backbone, how to train, and when the
    new version becomes the champion."""

    # (The docstring is the form's heading in the Prefect UI. Frozen: a run cannot drift
    # mid-way.)

    model_config = FORM

    data_url: str = Field(
        DEFAULT_DATA_URL,
        title="Dataset URL or path",
        description="http(s):// or file:// URL, or a local path, of a .tgz/.tar/.zip archive or of "
        "a folder with one subfolder per class.",
    )
    follow_champion: bool = Field(
        False, title="Follow the champion",
        description="On: train on the data and with the settings of the current champion "
        "(the parameters its version recorded: dataset URL, backbone, image size, epochs ... "
        "sweep, the quality gate, the MLflow experiment), so that a schedule keeps the "
        "registered model current on the data it was trained on, wherever that is; the data "
        "is taken as it is now behind that URL, not pinned to the bytes it was trained on. "
        "Setting one of those fields here is refused (turn this off to train with other data "
        "or settings); the model name, force, allow_dropped_classes, where training runs, "
        "the extraction limit and the training time limit stay this run's. Before there is a "
        "champion the challenger is followed (a version below the gate: its data may grow "
        "until one passes); with neither the run trains nothing. retrain-weekly and "
        "watch-data run with it on.",
    )
    data_sha256: Optional[str] = Field(
        None, json_schema_extra=unset_or("Not pinned", "Pinned to a digest"),
        title="Dataset sha256",
        description="Pin the archive to exactly these bytes (64 hex digits, or a line "
        "`sha256sum` prints): a mismatch fails the run without retrying, and a pinned copy on "
        "disk is reused without asking the server. Unset (the default; 'Not pinned' in the "
        "Prefect UI's form): the URL is revalidated every run and new data is trained on; "
        "TensorFlow's flower_photos.tgz is checked against its published digest.",
    )
    backbone: str = Field(
        DEFAULT_BACKBONE,
        title="Backbone (TF Hub handle)",
        description="TF Hub image feature-vector handle: a tfhub.dev/Kaggle URL or a local "
        "SavedModel folder. Inputs are float32 images in [0, 1].",
    )
    image_size: int = Field(
        224, ge=32, le=1024, title="Image size (px)",
        description="Square side the images are resized to; must match what the backbone expects.",
    )
    epochs: int = Field(
        5, ge=1, le=500, title="Epochs",
        description="Epochs of head training. The run warns when the validation loss says they "
        "were too few (still falling at the last) or too many (overfitting since an earlier one).",
    )
    batch_size: int = Field(32, ge=1, le=4096, title="Batch size", description="Images per batch.")
    learning_rate: float = Field(
        0.003, gt=0, le=1.0, title="Learning rate", description="Adam learning rate of the head."
    )
    augment: bool = Field(
        False,
        title="Augment",
        description="Random flip, rotation, zoom and contrast. With a frozen backbone the head "
        "also trains on an augmented copy of the training split, computed once and cached; "
        "while fine-tuning, fresh augmentations every epoch.",
    )
    balance_classes: bool = Field(
        True,
        title="Balance classes",
        description="Weight each class's training loss by how rare it is in the training "
        "split (images / (classes x the class's images)), so a class with few photos is not "
        "neglected; no effect when the classes are the same size (BENCHMARKS.md: class "
        "balance).",
    )
    average_weights: bool = Field(
        True,
        title="Average the last epochs",
        description="The head's weights are the average of those it had after each training "
        "step of its last 40 % of epochs (the last 2 of 5), not only the last step's: the "
        "last batches' noise averages out (+0.7 points of accuracy on the flowers' other "
        "splits, BENCHMARKS.md: weight averaging); kept only when its validation loss is not "
        "higher than the last step's weights' (a head still learning fast keeps those). The "
        "epochs' validation figures are the last step's; a log line gives the model's.",
    )
    val_fraction: float = Field(
        0.15, gt=0, lt=0.5, title="Validation fraction",
        description="Share of each class held out for validation (0 < f < 0.5).",
    )
    test_fraction: float = Field(
        0.15, gt=0, lt=0.5, title="Test fraction",
        description="Share of each class held out for the final test (0 < f < 0.5).",
    )
    fine_tune_layers: int = Field(
        0, ge=0, le=1000, title="Fine-tune layers",
        description="Unfreeze the top N backbone layers after the head has converged "
        "(0 = backbone fully frozen). BatchNorm stays in inference mode.",
    )
    fine_tune_epochs: int = Field(
        2, ge=1, le=100, title="Fine-tune epochs",
        description="Epochs of the fine-tuning phase (used only when fine_tune_layers > 0).",
    )
    fine_tune_learning_rate: float = Field(
        1e-5, gt=0, le=0.1, title="Fine-tune learning rate",
        description="Low learning rate for the fine-tuning phase.",
    )
    edge_export: bool = Field(
        True, title="Edge (TFLite) models",
        description="Also convert the model to TensorFlow Lite (float16, and int8 calibrated on "
        "training images), evaluate both on the test split and log them with the version "
        "(petalflow pull --format tflite). About 2 s on a 2-core CPU (MobileNetV2 0.35, "
        "225 test photos).",
    )
    model_name: str = Field(
        DEFAULT_MODEL_NAME, title="Registered model name",
        description="MLflow registered model name (letters, digits, '.', '_', '-').",
    )
    min_accuracy: float = Field(
        0.5, ge=0, le=1, title="Minimum test accuracy",
        description="Quality gate: the new version becomes 'champion' only at or above this "
        "test accuracy and only if it beats the current champion; otherwise 'challenger'.",
    )
    min_improvement: float = Field(
        0.0, ge=0, le=1, title="Minimum improvement over the champion",
        description="When the champion has the same classes it is evaluated on this run's test "
        "split, less the images it was trained on; the new version takes 'champion' only if "
        "its accuracy there beats the champion's by more than 0 and by at least this (0: "
        "strictly better; a tie keeps the champion).",
    )
    allow_dropped_classes: bool = Field(
        False, title="Allow dropping classes",
        description="Let the new version become 'champion' though its data lacks classes the "
        "champion predicts (a class folder missing or renamed). Off: such a version is "
        "registered as 'challenger' and the champion kept, so @champion's consumers do not lose "
        "a class (and its prob_ column) to an upload that missed a folder. Data with none of "
        "the champion's classes (another problem under the same model name) is promoted on the "
        "gate alone either way.",
    )
    seed: int = Field(42, ge=0, le=2**31 - 1, title="Seed", description="Split and init seed.")
    experiment_name: str = Field(
        "petalflow", min_length=1, max_length=200, title="MLflow experiment",
        description="MLflow experiment the run is logged to.",
    )
    force: bool = Field(
        False,
        title="Force retraining",
        description="Retrain even when the dataset fingerprint and the training parameters are "
        "the same as the current champion's (otherwise the run ends early: nothing to do).",
    )
    training_deployment: str = Field(
        "auto", title="Where training runs",
        description="auto: when this run itself comes from a deployment, the training step "
        "runs as a run of the train-model/train-gpu deployment (the gpu pool), otherwise in "
        "this process; local: always in this process; or the name of a deployment of the "
        "train-model flow to hand the training step to (train-model/train-gpu-big, or "
        "train-gpu-big).",
    )
    sweep: list[SweepCandidate] = Field(
        default_factory=list, max_length=MAX_SWEEP, title="Sweep",
        description="Train several configurations and keep the best: each candidate changes "
        "some of backbone, image_size, epochs, batch_size, learning_rate, augment, "
        "balance_classes, average_weights and the "
        "fine_tune_* fields (the rest as above). Candidates train at once as runs of the "
        "training deployment, one per GPU worker (in this process, one after another, when "
        "training is local); each is a nested MLflow run; the best on validation accuracy is "
        "evaluated on the test split and registered. Empty: train the one configuration above.",
    )
    max_training_hours: float = Field(
        24.0, gt=0, le=720, title="Training time limit (hours)",
        description="Stop a training step that runs longer than this (a sweep: each "
        "candidate), so that a hung training (a stalled GPU driver or network disk) ends "
        "instead of holding its model's turn, which later runs of the model, scheduled ones "
        "included, wait for: the run fails saying so, nothing is registered and the champion "
        "stays. In hours: 0.5 is half an hour; raise it for data that takes longer.",
    )
    max_extract_size: str = Field(
        "20 GiB", title="Extraction size limit",
        description="Refuse archives whose members add up to more than this (zip bombs), or "
        "that hold more files and folders than one per 4 KiB of it: a size such as 20 GiB, "
        "500 MB or 1.5 TiB, or a number of bytes.",
    )

    @field_validator("data_url")
    @classmethod
    def _check_data_url(cls, value: str) -> str:
        value = unquoted(value)
        if not value:
            raise ValueError("must be an http(s):// or file:// URL or a local path")
        if problem := mistyped_url(value):
            raise ValueError(problem)
        if "://" in value and not value.lower().startswith(_URL_SCHEMES):
            raise ValueError(unsupported_scheme(value))
        problem = file_url_problem(value)
        if problem:
            raise ValueError(problem)
        source = local_source(value)  # None for an http(s) URL
        if source is not None and (kind := special_file(source)):
            raise ValueError(
                f"{value!r} is {kind}, not an archive file or a folder: a run reads the "
                "archive more than once, and scheduled retraining reads it again where it was "
                "recorded; save it to a file first (curl -o photos.tgz URL), or give its "
                "http(s) URL")
        if redacted(value):
            raise ValueError(recorded_url_refused(
                "give the URL with its credentials (a retraining on drift: set data_url in the "
                "train deployment's own parameters, README)"))
        return value

    @field_validator("data_sha256")
    @classmethod
    def _check_sha(cls, value: Optional[str]) -> Optional[str]:
        if value is None or value.strip() == "":
            return None
        value = value.strip().lower()
        for printed in _PRINTED_SHA256:
            if found := printed.match(value):
                return found.group(1)
        raise ValueError("must be 64 hexadecimal digits (a sha256 digest)")

    @field_validator("backbone")
    @classmethod
    def _check_backbone(cls, value: str) -> str:
        value = unquoted(value)
        if not value:
            raise ValueError("must be a TF Hub handle (URL) or a local SavedModel folder")
        if problem := mistyped_url(value):
            raise ValueError(problem)
        scheme = value.split("://", 1)[0].lower() if "://" in value else None
        if scheme and redacted(value):
            raise ValueError(recorded_url_refused(
                "give the URL with its credentials, or keep them in the netrc file of the "
                "machine that trains (README)"))
        if scheme in _BACKBONE_SCHEMES:
            return scheme + value[len(scheme):]  # HTTPS:// as TF Hub's resolvers match it
        if scheme == "file":  # a file manager's "copy link": the folder it names
            value = _file_url_path(value)
        elif scheme is not None:
            raise ValueError(unsupported_scheme(value, "http://, https://, gs://, file://"))
        path = Path(value).expanduser()
        if path.name == "saved_model.pb" and path.is_file():  # the SavedModel's own file
            return str(Path(value).parent)
        if path.is_file():
            what = ("a Keras weights file (.h5, .keras) is no TF Hub backbone; "
                    if path.suffix.lower() in (".h5", ".hdf5", ".keras") else
                    "extract an archive of one first; ")
            raise ValueError(f"{value!r} is a file, not a SavedModel folder: {what}give the "
                             "folder that holds saved_model.pb")
        if not path.is_dir():
            raise ValueError(f"{value!r} is neither a URL nor an existing SavedModel "
                             f"folder{scheme_hint(value) or where_relative([value])}")
        if not (path / "saved_model.pb").is_file():
            raise ValueError(f"{value!r} is no SavedModel folder: "
                             f"{not_a_saved_model(path.resolve())}")
        return value

    @field_validator("training_deployment")
    @classmethod
    def _check_training_deployment(cls, value: str) -> str:
        # "train-model / train-gpu", as the UI lists it
        value = re.sub(r"\s*/\s*", "/", value.strip())
        if value not in ("auto", "local") and re.fullmatch(r"[^/\s]+", value):
            value = f"{TRAINING_FLOW}/{value}"  # a deployment's own name: train-gpu
        if value not in ("auto", "local") and not _DEPLOYMENT_NAME.match(value):
            raise ValueError("must be auto, local or a deployment name such as "
                             "train-model/train-gpu")
        flow_name = value.split("/")[0]
        if "/" in value and flow_name != TRAINING_FLOW:
            raise ValueError(
                f"{value} is a deployment of the {flow_name} flow; the training step is a run "
                f"of the {TRAINING_FLOW} flow: name one of its deployments, such as "
                f"{DEFAULT_TRAINING_DEPLOYMENT}")
        return value

    @field_validator("max_extract_size")
    @classmethod
    def _check_size(cls, value) -> str:
        parse_size(value)  # raises ValueError with the accepted forms
        return str(value).strip()

    @property
    def max_extract_bytes(self) -> int:
        return parse_size(self.max_extract_size)

    @field_validator("model_name")
    @classmethod
    def _check_model_name(cls, value: str) -> str:
        value = unquoted(value)  # "flowers " pasted into the form names the model flowers
        if not _MODEL_NAME.match(value):
            raise ValueError(
                "must start with a letter or digit and use only letters, digits, '.', '_', '-' "
                "(at most 100 characters)"
            )
        return value

    @field_validator("experiment_name")
    @classmethod
    def _check_experiment_name(cls, value: str) -> str:
        value = unquoted(value)  # " exp " would be an experiment of its own beside "exp"
        if not value:
            raise ValueError("must name an MLflow experiment")
        return value

    @model_validator(mode="after")
    def _followed_fields_unset(self) -> "TrainParams":
        if self.follow_champion:
            given = [name for name in TrainParams.model_fields if name not in OWN_RUN_FIELDS
                     and getattr(self, name) != TrainParams.model_fields[name].get_default(
                         call_default_factory=True)]
            if given:
                raise ValueError(
                    f"follow_champion is on, so the data and the settings are those the "
                    f"champion was trained with: {', '.join(given)} would not be used; turn "
                    "follow_champion off to train with them")
        return self

    @model_validator(mode="after")
    def _check_fractions(self) -> "TrainParams":
        if self.val_fraction + self.test_fraction >= 0.8:
            raise ValueError(
                "val_fraction + test_fraction must leave at least 20% of each class for training"
            )
        return self

    @field_validator("sweep", mode="before")
    @classmethod
    def _expand_grid(cls, value):
        # A grid ({"field": [values]}), the form sweep tools take: its candidates, listed.
        return sweep_grid(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check_sweep(self) -> "TrainParams":
        seen = set()
        for i, candidate in enumerate(self.sweep):
            changes = candidate.changes()
            if not changes:
                raise ValueError(f"sweep[{i}] changes nothing: give it at least one field")
            key = tuple(sorted(changes.items()))
            if key in seen:
                raise ValueError(f"sweep[{i}] repeats an earlier candidate")
            seen.add(key)
            try:
                self.candidate(i)
            except ValidationError as exc:  # the field that is wrong, and why
                first = exc.errors()[0]
                where = ".".join(str(part) for part in first["loc"])
                raise ValueError(f"sweep[{i}]{'.' + where if where else ''}: "
                                 f"{first['msg']}") from None
        return self

    def candidate(self, index: int) -> "TrainParams":
        """The full parameters of sweep candidate ``index`` (validated like any run's)."""
        return TrainParams.model_validate({**self.model_dump(exclude={"sweep"}),
                                           **self.sweep[index].changes()})

    def candidates(self) -> list["TrainParams"]:
        """What to train: each sweep candidate, or this one configuration."""
        return [self.candidate(i) for i in range(len(self.sweep))] if self.sweep else [self]


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          # as `du -h` / `ls -lh` print sizes (powers of 1024), and Kubernetes writes them
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value) -> int:
    """Bytes in ``value``: "20 GiB", "500MB", "1.5 TiB", "20G" (as du -h prints it), "1048576"
    (at least 1 KiB)."""
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"{value!r} is not a size: use e.g. 20 GiB, 500 MB, 1.5 TiB or a "
                         "number of bytes")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1024:
        raise ValueError(f"{value!r} is below the minimum of 1 KiB")
    return size


def image_size_set_by(params: TrainParams,
                      candidates: list[TrainParams]) -> dict[tuple[str, int], list[str]]:
    """For each (backbone, image size) the ``candidates`` (``params.candidates()``) train
    with, the sweep candidates that set that size themselves ("sweep[2]"), so that a size the
    backbone does not take is blamed on them, not on --image-size; empty when the run's own
    size is the one (no sweep, or a candidate that sets none). Keyed as each candidate is
    trained (its handle as validation leaves it: unquoted, a saved_model.pb's folder), which
    is what the flow fetches."""
    using: dict[tuple[str, int], list[int]] = {}
    for i, full in enumerate(candidates):
        using.setdefault((full.backbone, full.image_size), []).append(i)
    return {key: [] if not params.sweep or any(params.sweep[i].image_size is None for i in which)
            else [f"sweep[{i}]" for i in which] for key, which in using.items()}


def recorded_url_refused(advice: str) -> str:
    """Why a URL as petalflow records it (``common.redact_url``) is refused, then ``advice``."""
    return ("this URL holds '***' where petalflow hid its credentials when it recorded it "
            "(MLflow's tags and parameters, the model card, a drift event's parameters): a "
            f"record cannot download; {advice}")


def expected_sha256(params: TrainParams) -> Optional[str]:
    """The digest the archive must have: the user's pin, else the published digest of a
    well-known archive (applied at run time, so the run form's default stays empty)."""
    return params.data_sha256 or KNOWN_ARCHIVE_SHA256.get(params.data_url)


# Decisions about one run, not how to train: recorded with the version, but not handed on to
# a retraining started from it (a drift event's parameters), and not part of the run key.
ONE_RUN_FIELDS = ("force", "allow_dropped_classes")
# What a run that follows the champion keeps of its own parameters: which model, where it is
# trained, its limit and its one-run decisions. The rest (the data, how to train, the gate, the
# MLflow experiment) is the champion's: the settings the user trained that model with.
OWN_RUN_FIELDS = ("follow_champion", "model_name", *ONE_RUN_FIELDS, "training_deployment",
                  "max_extract_size", "max_training_hours")


def followed(params: TrainParams, recorded: dict, version: str) -> TrainParams:
    """``params`` following the champion: its own ``OWN_RUN_FIELDS``, the rest as the version
    it follows (``version``: "the champion v3") recorded them (its ``params`` tag; a field it
    predates keeps its default), but for its ``data_sha256``: a run that follows the champion
    takes the data behind its URL as it is now (a pin would fail it on any new data, so the
    model could never be kept current). Raises ValueError, naming the version, when those
    cannot be trained with here (a URL recorded without its credentials, a relative path or a
    backbone folder this machine lacks)."""
    taken = {k: v for k, v in recorded.items()
             if k in TrainParams.model_fields and k not in (*OWN_RUN_FIELDS, "data_sha256")}
    champion = f"follow_champion: {version} of {params.model_name}"
    advice = "turn follow_champion off and give the data URL and settings to train with"
    try:
        cfg = TrainParams.model_validate(
            {**params.model_dump(include=set(OWN_RUN_FIELDS) - {"follow_champion"}), **taken})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ValueError(
            f"{champion} was trained with {where or 'parameters'} {first['input']!r}, which "
            f"cannot be used here: {first['msg'].removeprefix('Value error, ')}; {advice}"
        ) from None
    path = Path(cfg.data_url).expanduser()
    if "://" not in cfg.data_url and not path.is_absolute() and not path.exists():
        # Recorded as typed: relative to the folder that training ran in, maybe not this one.
        raise ValueError(
            f"{champion} was trained on {cfg.data_url!r}, a path relative to the folder that "
            f"training ran in, and {Path.cwd()} (where this run's relative paths start) holds "
            f"no {cfg.data_url!r}: run this from that folder, or {advice}")
    return cfg


def run_key(cfg: TrainParams, fingerprint: str) -> str:
    """Identifies a training: same data and same training parameters -> same key (and workdir),
    so a retried or restarted run finds its checkpoints."""
    import hashlib
    import json

    # Not the run's own fields (its model, limits, decisions), nor the gate, the experiment or
    # where the data is (the fingerprint says what it is).
    relevant = cfg.model_dump(exclude={*OWN_RUN_FIELDS, "min_accuracy", "min_improvement",
                                       "experiment_name", "data_url", "data_sha256"})
    # A backbone URL without the credentials or signing time it may carry: the same model.
    for one in (relevant, *relevant["sweep"]):
        if one.get("backbone"):
            one["backbone"] = source_url(one["backbone"])
    blob = json.dumps({"fingerprint": fingerprint, **relevant}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# CLI spellings that differ from the field name (the rest: ``--field-name``); fields the CLI
# leaves out (an old name another option covers); list fields also given as the command's
# arguments (``petalflow predict photos/ --output p.csv``), the option then not needed.
_CLI_NAMES = {"model_uri": "--model"}
CLI_HIDDEN = {"input_folder"}
CLI_POSITIONAL = {"input"}


def training_target(params: TrainParams, from_deployment: bool) -> Optional[str]:
    """The deployment the training step is handed to, or None to train in this process."""
    if params.training_deployment == "local":
        return None
    if params.training_deployment == "auto":
        return DEFAULT_TRAINING_DEPLOYMENT if from_deployment else None
    return params.training_deployment


def cli_option(field: str) -> str:
    """The CLI spelling of a parameter field, e.g. ``image_size`` -> ``--image-size``."""
    return _CLI_NAMES.get(field) or "--" + field.replace("_", "-")


# The prediction file's format when none is given, by its name's suffix (else csv).
OUTPUT_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".tsv": "tsv",
                  ".parquet": "parquet", ".pq": "parquet"}
# Names of formats not written: refused, not filled with CSV.
SPREADSHEET_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".ods")
# A prediction file named NAME.<format>.gz is written gzip-compressed; other compressions'
# names are refused, not filled with uncompressed bytes.
OTHER_COMPRESSIONS = (".bz2", ".xz", ".zst", ".zip", ".7z", ".lz4", ".tgz")
PARQUET_GZ = "Parquet is compressed already: name the file .parquet, without .gz"


def output_suffix(output: str) -> tuple[str, bool]:
    """(the suffix that names the format, whether the file is gzip-compressed) of a prediction
    file's name: ``p.csv.gz`` -> (".csv", True)."""
    path = Path(output)
    if path.suffix.lower() == ".gz":
        return Path(path.stem).suffix.lower(), True
    return path.suffix.lower(), False


def model_folder_problem(folder: Path) -> Optional[str]:
    """What ``folder`` is instead of an MLflow model folder (one holding ``MLmodel``, as
    ``petalflow pull`` saves it), with what to give; None when it is one."""
    if (folder / "MLmodel").is_file():
        return None
    if not folder.exists():
        return (f"no such folder{where_relative([str(folder)])}: give a model folder "
                "(`petalflow pull --dest DIR` saves one) or a model URI such as "
                "models:/NAME@champion")
    if not folder.is_dir():
        return "a file, not a folder: give the folder holding the model's MLmodel file"
    inside = sorted(p.parent for p in folder.glob("*/MLmodel"))
    if len(inside) == 1:
        return f"no MLmodel file in this folder; the model is in {inside[0]}: give that folder"
    if (folder / "saved_model.pb").is_file():
        return ("a TensorFlow SavedModel, not an MLflow model: give a folder `petalflow "
                "pull` saved, or a model URI such as models:/NAME@champion")
    return ("not an MLflow model folder (no MLmodel file in it): give a folder `petalflow "
            "pull` saved, or a model URI such as models:/NAME@champion")


def parse_models_uri(model_uri: str) -> Optional[tuple[str, Optional[str], Optional[str]]]:
    """(name, alias, version) of models:/NAME@ALIAS or models:/NAME/VERSION (the one not
    given is None); None for any other URI."""
    if not model_uri.startswith("models:/"):
        return None
    rest = model_uri[len("models:/"):]
    name, at, alias = rest.partition("@")
    if at:
        return name, alias, None
    name, _, version = rest.rpartition("/")
    return name, None, version


def model_uri_problem(value: str) -> Optional[str]:
    """What is wrong with a model URI MLflow would take for another thing, with what to give;
    None for any other (MLflow resolves it): ``models:/NAME`` with no version or alias is a
    logged model's id to MLflow 3 (``models:/m-<32 hex digits>``), so the registered model NAME
    was "no model named ''"; an http(s) URL of a file (an archive of a model) reached MLflow's
    artifact proxy client ("not enough values to unpack")."""
    from urllib.parse import urlsplit

    parsed = parse_models_uri(value)
    if parsed is not None:
        rest = value[len("models:/"):]
        if rest and "@" not in rest and "/" not in rest:  # no version or alias
            if re.fullmatch(r"m-[0-9a-f]{32}", rest):  # a logged model's id (MLflow 3)
                return None
            return (f"{value!r} names no version or alias of the registered model {rest!r}: "
                    f"give models:/{rest}@champion (its champion), models:/{rest}/latest or "
                    f"models:/{rest}/N (version N)")
        name, alias, version = parsed
        if not (name and (alias or version)):
            return (f"{value!r} is cut short: give models:/NAME@ALIAS or "
                    "models:/NAME/VERSION")
        return None
    if value.lower().startswith(("http://", "https://")) and "/mlflow-artifacts/" not in (
            urlsplit(value).path):
        return (f"{value!r} is a web address, not an MLflow model URI: for a model on another "
                "MLflow server, set MLFLOW_TRACKING_URI to that server and give "
                "models:/NAME@ALIAS; for an archive of a model folder, download and extract it "
                "and give the folder that holds its MLmodel file")
    return None


class PredictParams(BaseModel):
    """What to classify, with which model, and where the predictions go."""

    # (The docstring is the form's heading in the Prefect UI.) The one typed, validated
    # parameter model of the batch-predict flow; ``petalflow predict`` builds its options from
    # it (the same way ``train`` does from TrainParams).

    model_config = FORM

    model_uri: Optional[str] = Field(
        None, json_schema_extra=unset_or("The champion", "Another model"), title="Model URI",
        description="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a local model "
        "folder. Unset (the default; 'The champion' in the Prefect UI's form): the champion "
        "of the registered model named below (models:/NAME@champion).",
    )
    model_name: str = Field(DEFAULT_MODEL_NAME, title="Registered model name",
                            description="Used for the default model URI.")
    input: list[str] = Field(
        default_factory=list, title="Images",
        description="Image files, folders (searched recursively) or glob patterns (at least "
        "one); file:/// URLs are read as the paths they name; @FILE: a text file naming "
        "them, one per line.",
    )
    input_folder: Optional[str] = Field(
        None, json_schema_extra=unset_or("Not used", "A folder"),
        title="Input folder (old name)",
        description="What batch-predict took before Images: one folder, added to Images. "
        "Kept so existing calls keep working; use Images.",
    )
    output: str = Field(..., title="Output file",
                        description="Where the predictions go (CSV, TSV, JSON or Parquet): a "
                        "file, whose folder must exist. A relative path starts from the run's "
                        "working folder: where petalflow predict runs, or for a deployment's "
                        "run the folder it was deployed from, on its worker's machine; the "
                        "run's final message gives the whole path.")
    format: Literal["auto", "csv", "tsv", "json", "jsonl", "parquet"] = Field(
        "auto", title="Format",
        description="csv, tsv (tab-separated), json (an array of objects), jsonl (one object "
        "per line) or parquet; auto: from the output's name (.tsv: tsv; .json: json; .jsonl, "
        ".ndjson: jsonl; .parquet, .pq: parquet; anything else: csv; a spreadsheet's .xlsx, "
        ".xls or .ods is refused). A name ending .gz (predictions.csv.gz) is written "
        "gzip-compressed, its format named by the suffix before .gz.",
    )
    top_k: int = Field(0, ge=0, le=100, title="Top k",
                       description="Also write the k best labels and their probabilities.")
    batch_size: int = Field(64, ge=1, le=4096, title="Batch size", description="Images per batch.")
    drift: bool = Field(
        True, title="Measure drift",
        description="Also measure how far these images are from the model's training data (a "
        "sample of up to 256 of them, compared with the reference stored with the version); "
        "over the threshold, with 20 images or more (fewer get a score, no verdict), "
        "batch-predict emits petalflow.drift.detected.",
    )

    @model_validator(mode="before")
    @classmethod
    def _one_item_is_a_list(cls, data):
        if isinstance(data, dict) and isinstance(data.get("input"), str):
            data = {**data, "input": [data["input"]]}
        return data

    @model_validator(mode="after")
    def _something_to_classify(self) -> "PredictParams":
        """``input_folder`` (one folder) is what batch-predict took before ``input``."""
        if self.input_folder:
            object.__setattr__(self, "input", [*self.input, self.input_folder])
            object.__setattr__(self, "input_folder", None)
        if not self.input:
            raise ValueError("input: give at least one image file, folder or pattern")
        suffix, compressed = output_suffix(self.output)
        if self.format == "auto":
            object.__setattr__(self, "format", OUTPUT_FORMATS.get(suffix, "csv"))
        if compressed and self.format == "parquet":
            raise ValueError("output: " + PARQUET_GZ)
        return self

    @field_validator("model_name")
    @classmethod
    def _name_as_registered(cls, value: str) -> str:
        """Any name MLflow registered (other tools allow more than train does), without the
        spaces or quotes a paste brings along."""
        value = unquoted(value)
        if not value:
            raise ValueError("must name a registered model")
        return value

    @field_validator("model_uri")
    @classmethod
    def _model_folder_holds_a_model(cls, value: Optional[str]) -> Optional[str]:
        """A local folder (a path, or a file:// URI) must be an MLflow model: refused here,
        naming what it is, instead of MLflow's error after the run has started."""
        value = unquoted(value) if value else ""
        if not value:
            return None
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value) and not value.startswith("file:"):
            if problem := model_uri_problem(value):
                raise ValueError(problem)
            return value  # models:/, runs:/, s3://, ...: MLflow resolves them
        reason = model_folder_problem(Path(_file_url_path(value)).expanduser())
        if reason:
            raise ValueError(reason)  # the CLI and the UI show the value beside it
        return value

    @field_validator("input_folder")
    @classmethod
    def _folder_exists(cls, value: Optional[str]) -> Optional[str]:
        value = _file_url_path(unquoted(value)) if value else value
        if value and not Path(value).expanduser().is_dir():
            raise ValueError(f"{value!r} is not a folder")
        return value or None

    @field_validator("input")
    @classmethod
    def _inputs_exist(cls, value: list[str]) -> list[str]:
        import glob

        value = [item if Path(item).exists() else _file_url_path(unquoted(item))
                 for item in value]
        lists = [listed for item in value if (listed := input_list(item)) is not None]
        absent = [str(listed) for listed in lists if not listed.is_file()]
        if absent:
            raise ValueError("no such list file (@FILE: a text file naming one image file, "
                             "folder or pattern per line): " + _some(absent))
        named = expand_input_lists(value)  # what the list files name, checked alike
        urls = [item for item in named if "://" in item and not Path(item).exists()]
        if urls:
            raise ValueError("images are read from files, not URLs: " + _some(urls)
                             + "; download them first (curl -O URL), or post them to a "
                             "served model (README: Serving over REST)")
        missing = [item for item in named if not Path(item).expanduser().exists()
                   and not glob.glob(str(Path(item).expanduser()), recursive=True)]
        if missing:
            raise ValueError("not a file, folder or matching pattern: " + _some(missing)
                             + where_relative(missing) + _other_case(missing))
        special = [f"{item!r} is {kind}" for item in named if (kind := special_file(item))]
        if special:
            raise ValueError("; ".join(special[:3]) + ", not an image file: a job reads each "
                             "image more than once (to classify it, to measure drift); save "
                             "it to a file first (curl -o photo.jpg URL), or give its folder")
        return value

    @field_validator("output")
    @classmethod
    def _output_folder_exists(cls, value: str) -> str:
        value = _file_url_path(unquoted(value))
        if value == "-":
            raise ValueError("'-' (standard output) is not supported: give a file, such as "
                             "'predictions.csv'")
        path = Path(value).expanduser()
        if path.is_dir():  # found after classifying every image, when the file took its place
            raise ValueError(f"{value!r} is a folder: give a file name in it, such as "
                             f"{str(Path(value) / 'predictions.csv')!r}")
        if path.parent.is_file():  # "notes.txt/predictions.csv"
            raise ValueError(f"{str(path.parent)!r} is a file, not a folder: give a file "
                             "name in an existing folder")
        if not path.parent.is_dir():
            raise ValueError(f"folder {str(path.parent)!r} does not exist"
                             + where_relative([value]))
        suffix, compressed = output_suffix(value)
        if suffix in SPREADSHEET_SUFFIXES:  # a CSV named .xlsx: Excel refuses it
            raise ValueError(f"a {suffix} spreadsheet is not written (CSV, TSV, JSON or "
                             "Parquet are): name the file .csv, which spreadsheet programs "
                             "open, or .parquet")
        if compressed and OUTPUT_FORMATS.get(suffix) == "parquet":
            raise ValueError(PARQUET_GZ)
        if path.suffix.lower() in OTHER_COMPRESSIONS:
            raise ValueError(f"{path.suffix} compression is not written: name the file .gz "
                             "(e.g. predictions.csv.gz) for gzip, or leave it uncompressed")
        # "~/predictions.csv" typed in the form (no shell expands it): the file in the home
        # folder, as the images' "~/photos" are, not a folder named "~" under the working one.
        return str(path) if value.startswith("~") else value
