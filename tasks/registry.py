"""MLflow tracking and model registry: runs, metrics, the registered model and its aliases.

The tracking server is reached through the standard ``MLFLOW_TRACKING_URI`` (and
``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` for an authenticated server); without it petalflow uses
an embedded SQLite store under ``./mlflow``. Aliases: ``champion`` is the version users pull;
a new version takes it only if it passes the quality gate and beats the current champion's test
accuracy, otherwise it is tagged ``challenger``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from prefect import task

from petalflow.mlflow_artifacts import (
    relocate_artifacts, relocation_said, sqlite_database, store_artifacts_dir,
)
from petalflow.tasks.common import (
    ask_tracking_server, code_version, error_chain, holder_lock, imports_settled, local_store_db,
    log, pid_alive, redact_url, redact_urls_in, tls_failure, tls_problem, utc_now,
)
from petalflow.tasks.dataset import DatasetInfo
from petalflow.tasks.errors import FollowChampionError, is_transient_status
from petalflow.tasks.space import disk_full_said
from petalflow.tasks.params import CHAMPION, TrainParams, followed, parse_models_uri, run_key

CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"
# What MLflow's UI shows as a training run's and its logged model's source ("Logged from"),
# rather than the file that started the process (Prefect's engine.py under a worker).
SOURCE_NAME = "petalflow train"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else the embedded SQLite store ./mlflow/mlflow.db."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = local_store_db()
    store.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store}"


# URI schemes of the SQL stores (MLflow's DATABASE_ENGINES, without importing MLflow).
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_STORE_OPEN = threading.Event()  # cleared until store_opener's function has run
_STORE_OPEN.set()
_STORE_ERROR: list = []  # (URI, what that function raised): for the first MLflow call


def store_opener() -> Optional[Callable[[], None]]:
    """A function that opens the tracking and registry stores, when the tracking URI is a
    database (the embedded SQLite store, PostgreSQL, ...), for a side thread to run early:
    importing MLflow's SQL stores and alembic (~0.5 s) and, on a store's first use, MLflow's
    creation of its schema (~0.75 s for a new SQLite file). ``petalflow train`` runs it after
    its side thread's imports, while Prefect's temporary server starts. None for other URIs.

    MLflow keeps one store per URI, so the run's calls use the ones opened there; from now
    until the function has run, ``configure_mlflow`` waits (two first uses at once would both
    create the schema). The function never raises: its error is raised by the run's first
    ``configure_mlflow`` instead of opening again (MLflow itself retries a database it cannot
    reach for ~100 s), so a task's own retries go on as they would have. Call it with
    ``common.IMPORT_LOCK`` held (it imports)."""
    uri = tracking_uri()
    if uri.split(":", 1)[0].split("+", 1)[0] not in DATABASE_SCHEMES:
        return None

    def open_stores() -> None:
        try:
            import mlflow

            create_sqlite_store(uri)
            client = mlflow.MlflowClient(tracking_uri=uri)
            client.search_experiments(max_results=1)
            client.search_registered_models(max_results=1)
        except Exception as exc:  # noqa: BLE001 - the run's first MLflow call raises it
            _STORE_ERROR.append((uri, exc))
        finally:
            _STORE_OPEN.set()

    _STORE_ERROR.clear()
    _STORE_OPEN.clear()
    return open_stores


def wait_for_store(timeout_s: float) -> bool:
    """Wait (at most ``timeout_s``) until ``store_opener``'s function, if one was made, has
    run; whether it has."""
    return _STORE_OPEN.wait(timeout_s)


_CREATING = ".creating"  # a new SQLite store's file while MLflow creates its schema


def create_sqlite_store(uri: str) -> None:
    """Create the SQLite store ``uri`` names, if its file does not exist yet, whole or not at
    all. MLflow creates a new store's schema by running every migration it ships (~0.75 s),
    each committed on its own: a command that ended meanwhile (a run that failed at once on
    its data, Ctrl-C, a kill) left a store that every later command refused ("table jobs
    already exists", or "out-of-date database schema"). The schema is created in a file
    beside it, put in place when complete; one a killed command left there is removed. A
    store that exists has its artifacts' records follow its folder (``relocate_artifacts``:
    moved or copied) and is otherwise left to MLflow, as is any other URI."""
    db = sqlite_database(uri)
    if db is None or db.name == ":memory:":
        return
    if db.exists():
        for old, new in relocate_artifacts(uri):
            log("%s", relocation_said(db.parent.resolve(), old, new), level=30)
        return
    import mlflow

    query = uri.partition("?")[2]
    db.parent.mkdir(parents=True, exist_ok=True)
    for left in db.parent.glob(f".{db.name}.*{_CREATING}"):
        pid = left.name[len(db.name) + 2:-len(_CREATING)].split("-")[0]
        try:  # a killed command's (its process gone a minute ago: not one in a container)
            if (not pid.isdigit() or not pid_alive(int(pid))) \
                    and time.time() - left.stat().st_mtime > 60:
                left.unlink()
        except OSError:
            pass
    # A name of its own each time: MLflow keeps the store it opened for a URI for the
    # process's life, and would answer from that one (its file gone) for the same name.
    part = db.with_name(f".{db.name}.{os.getpid()}-{os.urandom(4).hex()}{_CREATING}")
    part_uri = f"sqlite:///{part}" + (f"?{query}" if query else "")
    # MLflow's "Creating initial MLflow database tables..." / "Updating database tables": the
    # store is petalflow's to make; those lines came after a failed command's error.
    said = logging.getLogger("mlflow.store.db.utils")
    level = said.level
    said.setLevel(logging.WARNING)
    try:
        # The tracking store's creation writes the whole schema (the registry's tables too).
        mlflow.MlflowClient(tracking_uri=part_uri).search_experiments(max_results=1)
        try:
            os.link(part, db)  # in place at once, unless another command's store is there
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: renamed, unless one is there
            if not db.exists():
                os.replace(part, db)
    finally:
        said.setLevel(level)
        part.unlink(missing_ok=True)


def check_server_certificate(uri: str) -> None:
    """For an https tracking server: one request as MLflow's client makes it, without its
    retries (``common.ask_tracking_server``): a certificate it does not trust raises
    MlflowException naming the host and the setting at once, where MLflow's client retried
    each call 7 times (8 minutes) and the tasks would have retried that again; so does a
    server that does not answer in TLS (an https:// URI of a plain-HTTP server). Anything else
    (refused, an answer of any status) is left to MLflow's calls; none with
    MLFLOW_TRACKING_INSECURE_TLS."""
    from mlflow.exceptions import MlflowException

    if not uri.lower().startswith("https://"):
        return
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("true", "1"):
        return
    refused = tls_problem(ask_tracking_server(uri), uri, "MLFLOW_TRACKING_SERVER_CERT_PATH")
    if refused:
        raise MlflowException(f"{refused} (tracking server {redact_url(uri)})")


def configure_mlflow() -> str:
    """Point the mlflow library at the tracking/registry store; return the tracking URI."""
    imports_settled("mlflow")  # the command's side thread may be importing it still
    import mlflow

    _STORE_OPEN.wait()  # store_opener's function, if one is to open the stores first
    uri = tracking_uri()
    create_sqlite_store(uri)
    if _STORE_ERROR:
        opened, error = _STORE_ERROR.pop()
        if opened == uri:
            raise error
    check_server_certificate(uri)
    mlflow.set_tracking_uri(uri)
    # The registry follows the tracking URI unless MLFLOW_REGISTRY_URI says otherwise (MLflow
    # reads that variable itself); setting it here would pin a stale registry into os.environ.
    return uri


def mlflow_client():
    """An MlflowClient on the configured tracking/registry store."""
    import mlflow

    configure_mlflow()
    return mlflow.MlflowClient()


def artifact_location(uri: str) -> Optional[str]:
    """Where a new experiment keeps its artifacts: beside the database for a SQLite store
    (``mlflow/artifacts`` for the embedded one), the server's choice for a tracking server.

    Decided from the URI, not from the environment: ``mlflow.set_tracking_uri`` itself sets
    MLFLOW_TRACKING_URI, and MLflow's default for a SQLite store is ``./mlruns`` of whatever
    folder the process runs in."""
    folder = store_artifacts_dir(uri)
    return folder.as_uri() if folder else None


def ensure_experiment(client, name: str) -> str:
    """Experiment id of ``name``, created if missing (artifacts under ./mlflow for the local store)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = artifact_location(tracking_uri())
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - created concurrently by another run: use that one
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# How a source description (tasks.download.describe_source) is recorded as tags.
SOURCE_TAGS = {"sha256": "archive_sha256", "etag": "source_etag",
               "last_modified": "source_last_modified", "outcome": "source_outcome",
               "listing_fingerprint": "listing_fingerprint",
               "contents_sha256": "archive_contents_sha256",
               "redirected_to": "source_redirected_to"}


def source_tags(source: Optional[dict], with_outcome: bool = True) -> dict:
    """Tags for what a source description holds: the archive's sha256, the server's
    validators, the folder listing fingerprint and (run tags only) this run's outcome."""
    return {tag: str(source[key]) for key, tag in SOURCE_TAGS.items()
            if source and source.get(key) and (with_outcome or key != "outcome")}


RUN_TAG_CHARS = 8000  # MLflow's longest run tag value (a varchar(8000) in SQL stores)


def class_names_tag(classes: list[str]) -> str:
    """The run's ``petalflow.class_names`` tag: the JSON list, or when that is longer than a run
    tag may be (hundreds of classes) its count and as many names as fit; the full list is in the
    model's metadata and its version's ``class_names`` tag."""
    text = json.dumps(classes, ensure_ascii=False)
    if len(text) <= RUN_TAG_CHARS:
        return text
    head = f"{len(classes)} classes (the full list is in the model's metadata): "
    return head + text[: RUN_TAG_CHARS - len(head) - 1] + "…"


def recorded_params(cfg: TrainParams, mode: str = "python") -> dict:
    """``cfg`` as MLflow records it (run parameters, the version's ``params`` tag): its data
    URL and backbone URLs without the secrets they may carry (``common.redact_url``): other
    teams read the registry."""
    dumped = cfg.model_dump(mode=mode)
    sweep = [{**c, "backbone": redact_url(c["backbone"])} if c.get("backbone") else c
             for c in dumped.get("sweep") or []]
    return {**dumped, "data_url": redact_url(cfg.data_url),
            "backbone": redact_url(cfg.backbone), "sweep": sweep}


def params_record(cfg: TrainParams) -> str:
    """``recorded_params`` as the JSON a version's ``params`` tag (and its run's
    ``petalflow.params``) holds."""
    return json.dumps(recorded_params(cfg, mode="json"), separators=(",", ":"),
                      ensure_ascii=False)


# The artifact folder where a training run keeps its data's manifest (``start_run``), which
# says what images it trained on (``learned_images``).
RUN_MANIFEST_DIR = "dataset"


def start_run(cfg: TrainParams, data_info: DatasetInfo, run_name: Optional[str] = None,
              source: Optional[dict] = None, parent_run_id: Optional[str] = None,
              turn: Optional[str] = None) -> str:
    """Create the MLflow run of this training; log parameters and provenance (dataset
    fingerprint, data URL, the archive's sha256 and the server's validators, backbone, classes,
    code version). A sweep candidate's run is nested under ``parent_run_id``. ``turn``: the
    text of the training turn it is made in (``TURN_TAG``: the next turn ends it if its
    training is killed, ``end_abandoned_runs``)."""
    client = mlflow_client()
    exp_id = ensure_experiment(client, cfg.experiment_name)
    tags = {
        "petalflow.dataset_fingerprint": data_info["fingerprint"],
        "petalflow.data_url": redact_url(cfg.data_url),
        "petalflow.backbone": redact_url(cfg.backbone),
        "petalflow.class_names": class_names_tag(data_info["classes"]),
        "petalflow.code_version": code_version(),
        "mlflow.source.name": SOURCE_NAME,
        # What a version registered from this run's model records (``register_model``), for
        # one registered by hand (``version_tags``): the request and its key.
        "petalflow.request_key": run_key(cfg, data_info["fingerprint"]),
    }
    request = params_record(cfg)
    if len(request) <= RUN_TAG_CHARS:
        tags["petalflow.params"] = request
    tags.update({f"petalflow.{k}": v for k, v in source_tags(source).items()})
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # MLflow's own nesting tag
    if turn:
        tags[TURN_TAG] = turn_tag(turn)
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in recorded_params(cfg).items()]
    counts = data_info["counts"]
    params += [Param("dataset_" + k, str(counts[k])) for k in ("found", "used", "quarantined")]
    client.log_batch(run_id, params=params)
    client.log_inputs(run_id, datasets=split_inputs(data_info, cfg.data_url))
    client.log_artifact(run_id, data_info["manifest"], RUN_MANIFEST_DIR)
    return run_id


# The manifest's splits as MLflow dataset inputs, each with the context MLflow's UI shows.
SPLIT_CONTEXTS = (("train", "training"), ("val", "validation"), ("test", "test"))
DATASET_NAME_CHARS = 250  # MLflow's SQL stores keep 500
ARCHIVE_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".tbz2", ".txz", ".tar", ".zip")


def dataset_name(data_url: str) -> str:
    """The name a training's data has among MLflow's datasets: the archive's or the folder's
    name as the URL or path gives it, without an archive's suffix (``…/flower_photos.tgz`` ->
    ``flower_photos``)."""
    from urllib.parse import unquote, urlsplit

    path = unquote(urlsplit(data_url).path) if "://" in data_url else data_url
    name = Path(path.rstrip("/\\")).name
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[:-len(suffix)]
            break
    return (name or "dataset")[:DATASET_NAME_CHARS]


def split_inputs(data_info: DatasetInfo, data_url: str) -> list:
    """The run's dataset inputs (MLflow's "Datasets used"): one per split of the manifest's
    usable images (its files' paths, labels and sha256), named by ``dataset_name``, the source
    the URL as recorded (``redact_url``) or the path, the digest that of the split's images and
    labels (the same photos give the same digest whatever their paths), tagged with the split's
    context (``SPLIT_CONTEXTS``)."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from petalflow.tasks.dataset import load_manifest

    manifest = load_manifest(Path(data_info["manifest"]))
    used = manifest[manifest["status"] == "ok"]
    recorded = redact_url(data_url)
    source = (HTTPDatasetSource(recorded) if recorded.lower().startswith(("http://", "https://"))
              else get_dataset_source_from_json(json.dumps({"uri": recorded}), "local"))
    name = dataset_name(data_url)
    inputs = []
    for split, context in SPLIT_CONTEXTS:
        rows = used.loc[used["split"] == split, ["path", "label", "sha256"]].reset_index(drop=True)
        if rows.empty:
            continue
        digest = hashlib.sha256("".join(sorted(
            f"{sha} {label}\n" for sha, label in zip(rows["sha256"], rows["label"]))).encode())
        dataset = from_pandas(rows, source=source, name=name,
                              targets="label", digest=digest.hexdigest()[:12])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(),
                                   [InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs


def log_epoch(run_id: str, epoch: int, metrics: dict) -> None:
    """Per-epoch training metrics (loss, accuracy, val_loss, val_accuracy) at step ``epoch``."""
    from mlflow.entities import Metric

    client = mlflow_client()
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, epoch) for k, v in metrics.items()
             if isinstance(v, (int, float))]
    client.log_batch(run_id, metrics=items)


def log_training(run_id: str, record: dict) -> None:
    client = mlflow_client()
    client.set_tag(run_id, "petalflow.device", record["device"])
    client.log_metric(run_id, "train_seconds", record["seconds"])
    for name, value in (record.get("validation") or {}).items():  # the trained model's
        client.log_metric(run_id, f"final_{name}", float(value))
    client.log_text(run_id, json.dumps(record, indent=2), "training/train.json")


def log_sweep(run_id: str, rows: list[dict]) -> None:
    """A sweep's ranking in its parent run: ``sweep/ranking.json`` and the winner's number."""
    client = mlflow_client()
    client.log_text(run_id, json.dumps(rows, indent=2), "sweep/ranking.json")
    client.set_tag(run_id, "petalflow.sweep_winner", str(rows[0]["candidate"]))


def log_evaluation(run_id: str, evaluation: dict) -> None:
    """Test metrics plus the per-class/confusion CSVs, confusion PNG and report."""
    from mlflow.entities import Metric

    client = mlflow_client()
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0)
                                      for k, v in evaluation["metrics"].items()])
    for path in evaluation["files"].values():
        client.log_artifact(run_id, path, "evaluation")


EDGE_ARTIFACTS = "edge"  # run artifact folder of the TFLite models, labels.txt and edge.json


def log_edge(run_id: str, edge_dir: str, description: dict) -> None:
    """The edge models with their labels and description as run artifacts (``edge/``), and each
    one's test accuracy, size and latency as metrics ``edge_<format>_<figure>``."""
    from mlflow.entities import Metric

    client = mlflow_client()
    now = int(time.time() * 1000)
    metrics = [Metric(f"edge_{fmt}_{key}", float(result[key]), now, 0)
               for fmt, result in description["models"].items()
               for key in ("test_accuracy", "size_bytes", "latency_ms") if key in result]
    client.log_batch(run_id, metrics=metrics)
    client.log_artifacts(run_id, edge_dir, EDGE_ARTIFACTS)


def edge_tags(description: Optional[dict]) -> dict:
    """Version tags naming the edge models and their test accuracy and size."""
    if not description:
        return {}
    made = {fmt: r for fmt, r in description["models"].items() if r.get("file")}
    tags = {"edge_formats": ",".join(made)}
    for fmt, result in description["models"].items():
        if result.get("error"):
            tags[f"edge_{fmt}_error"] = result["error"][:500]
            continue
        if "test_accuracy" in result:
            tags[f"edge_{fmt}_test_accuracy"] = f"{result['test_accuracy']:.{PRECISION}f}"
        tags[f"edge_{fmt}_size_bytes"] = str(result["size_bytes"])
    return tags


def _not_a_file(dest: Path) -> Path:
    """``dest``, a folder to pull into (there or not yet); ``DestinationInUse`` when it is a
    file."""
    from petalflow.tasks.errors import DestinationInUse

    if dest.exists() and not dest.is_dir():
        raise DestinationInUse(f"{dest} is a file, not a folder")
    return dest


def pull_edge(model_uri: str, dest: Path, fmt: str) -> Path:
    """Download a version's edge model ``fmt`` (float16 or int8) with labels.txt, edge.json
    and edge_input.py into ``dest`` (each file moved in whole: no half-written model); returns
    the .tflite file. The version is found from a models:/ or runs:/ URI. A version made
    before edge_input.py travelled with the models gets this petalflow's."""
    import mlflow

    from petalflow.tasks.edge import EDGE_INPUT, FORMATS, model_file, write_edge_input

    if fmt not in FORMATS:
        raise ValueError(f"no edge format {fmt!r}; choose from {', '.join(FORMATS)}")
    dest = _not_a_file(Path(dest))
    configure_mlflow()
    run_id = run_of(model_uri)
    dest.mkdir(parents=True, exist_ok=True)
    names = {a.path.rsplit("/", 1)[-1] for a in
             mlflow_client().list_artifacts(run_id, EDGE_ARTIFACTS)}
    if model_file(fmt) not in names:
        raise FileNotFoundError(f"{model_uri} has no {fmt} edge model (its conversion failed: "
                                f"see the version's tag edge_{fmt}_error; or it was trained "
                                "with edge_export off, or before edge models existed)")
    import tempfile

    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        for name in (model_file(fmt), "labels.txt", "edge.json", EDGE_INPUT):
            if name == EDGE_INPUT and name not in names:
                os.replace(write_edge_input(Path(tmp)), dest / name)
                continue
            got = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{EDGE_ARTIFACTS}/{name}", dst_path=tmp)
            os.replace(got, dest / name)
    return dest / model_file(fmt)


def model_version_of(model_uri: str):
    """The registry's ModelVersion behind a models:/ URI (by alias or number)."""
    parsed = parse_models_uri(model_uri)
    if parsed is None:
        raise ValueError(f"{model_uri!r} is not a models:/ URI")
    name, alias, version = parsed
    client = mlflow_client()
    with explaining_missing(model_uri):
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if not version.isdigit():  # models:/NAME/latest (or a stage): as MLflow resolves it
            version = _latest_version(client, model_uri)
        return client.get_model_version(name, version)


def _latest_version(client, model_uri: str) -> str:
    """The version MLflow loads for models:/NAME/latest or models:/NAME/STAGE; none there is
    ``ModelNotFound`` with ``unresolved_model_reason`` (MLflow says INTERNAL_ERROR)."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    from petalflow.tasks.errors import ModelNotFound

    try:
        return str(get_model_name_and_version(client, model_uri)[1])
    except Exception as exc:  # noqa: BLE001 - MLflow raises MlflowException
        if "no versions of model" not in str(exc).lower():
            raise
        raise ModelNotFound(unresolved_model_reason(model_uri) or str(exc)) from exc


def pinned_model_uri(model_uri: str) -> str:
    """``model_uri`` with a registry alias, or MLflow's ``latest``, replaced by the version it
    names now (models:/NAME@ALIAS, models:/NAME/latest -> models:/NAME/VERSION); any other
    URI as it is. A job that loads the pinned URI uses one version throughout, and can say
    which: an alias moves whenever a retraining promotes another version, ``latest`` with
    every registration."""
    parsed = parse_models_uri(model_uri)
    if parsed is None or not parsed[0] or (parsed[1] is None and parsed[2].isdigit()):
        return model_uri
    return f"models:/{parsed[0]}/{model_version_of(model_uri).version}"


def model_said(model_uri: str, pinned: Optional[str]) -> str:
    """How a job names the model it used: ``model_uri``, with the version an alias named
    ("models:/NAME@champion (version 3)") or, for a folder ``petalflow pull`` saved, the
    version it is a copy of (MLflow's ``registered_model_meta`` beside its MLmodel)."""
    parsed = parse_models_uri(pinned) if pinned and pinned != model_uri else None
    if parsed:
        return f"{model_uri} (version {parsed[2]})"
    pulled = pulled_version(Path(model_uri)) if Path(model_uri).is_dir() else None
    return f"{model_uri} (a copy of {pulled[0]} version {pulled[1]})" if pulled else model_uri


def pulled_version(folder: Path) -> Optional[tuple[str, str]]:
    """(name, version) of the registered version a downloaded model folder is a copy of,
    from the ``registered_model_meta`` file MLflow writes beside its MLmodel; None for any
    other folder, or a file that does not say."""
    import yaml

    try:
        meta = yaml.safe_load((folder / "registered_model_meta").read_text(encoding="utf-8"))
        return str(meta["model_name"]), str(meta["model_version"])
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return None


def run_of(model_uri: str) -> str:
    """The MLflow run that produced ``model_uri`` (models:/NAME/VERSION, models:/NAME@ALIAS,
    runs:/RUN_ID/...)."""
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/"):].split("/", 1)[0]
    if parse_models_uri(model_uri) is None:
        raise ValueError(f"{model_uri!r}: give a models:/ or runs:/ URI for edge models")
    return model_version_of(model_uri).run_id


def log_timings(run_id: str, timings: dict) -> None:
    """The run's per-phase wall times: metrics ``time_<phase>_s`` and ``timings.json``."""
    from mlflow.entities import Metric

    client = mlflow_client()
    now = int(time.time() * 1000)
    names = {k: "time_" + k.replace("-", "_").replace(" ", "_") + "_s" for k in timings}
    client.log_batch(run_id, metrics=[Metric(names[k], float(v), now, 0)
                                      for k, v in timings.items()])
    client.log_text(run_id, json.dumps(timings, indent=2), "timings.json")


# Characters of a model version's description that MLflow's SQL stores keep: the column is
# varchar(5000), which PostgreSQL enforces (a longer description fails the update).
DESCRIPTION_LIMIT = 5000


def log_model_card(summary: dict, card: str, description: str) -> None:
    """The model card beside the version's run (model_card.md), and ``description`` (the
    card, shortened to ``DESCRIPTION_LIMIT`` when longer) as the version's description in the
    registry."""
    if len(description) > DESCRIPTION_LIMIT:
        raise ValueError(f"a model version's description holds at most {DESCRIPTION_LIMIT} "
                         f"characters, not {len(description)}")
    client = mlflow_client()
    client.log_text(summary["mlflow_run_id"], card, "model_card.md")
    client.update_model_version(summary["model_name"], summary["model_version"],
                                description=description)


FAILURE_TAG = "petalflow.failure"


def finish_run(run_id: str, status: str = "FINISHED", why: Optional[str] = None) -> None:
    """End the MLflow run with ``status``; a failed one records ``why`` (its error, URLs
    redacted) as a tag and as the run's description, where the MLflow UI shows it."""
    client = mlflow_client()
    if why:
        why = redact_urls_in(why)[:4000]
        client.set_tag(run_id, FAILURE_TAG, why)
        client.set_tag(run_id, "mlflow.note.content", f"**{status.capitalize()}:** {why}")
    client.set_terminated(run_id, status=status)


def failure_text(exc: BaseException) -> str:
    """How a run's failure is recorded: its error's kind and message; an interruption (Ctrl-C,
    a cancelled flow run) as such."""
    if not isinstance(exc, Exception):  # KeyboardInterrupt, Prefect's TerminationSignal, ...
        return "interrupted (Ctrl-C, a signal, or the flow run cancelled) before it ended"
    return f"{type(exc).__name__}: {str(exc).strip() or type(exc).__name__}"


# --------------------------------------------------------------------------- model logging


def _tiny_png_base64() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 160, 96)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def model_requirements() -> list[str]:
    """What a registered model needs, pinned to the versions that produced it: the loader
    travels inside the model, so petalflow itself is not among them."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("mlflow", "tensorflow", "pandas", "numpy")]


def pyfunc_arguments(export_dir: Path, class_names: list[str], code_dir: Path) -> dict:
    """MLflow's pyfunc arguments for an exported SavedModel, as every version is packaged: the
    SavedModel as its data, ``tasks/serving.py`` as its loader (copied into ``code_dir`` and
    shipped as ``code_paths``, importable as ``petalflow_serving``), requirements pinned by
    ``model_requirements``, its signature and metadata (public MLflow API only)."""
    from petalflow.tasks import serving

    meta = json.loads((Path(export_dir) / "petalflow.json").read_text())
    loader = Path(code_dir) / f"{serving.LOADER_MODULE}.py"
    shutil.copyfile(serving.__file__, loader)
    return dict(
        loader_module=serving.LOADER_MODULE,
        data_path=str(export_dir),
        code_paths=[str(loader)],
        pip_requirements=model_requirements(),
        signature=model_signature(class_names),
        metadata={k: meta[k] for k in ("class_names", "image_size", "backbone", "fingerprint")},
    )


def log_model(export_dir: Path, class_names: list[str], registered_model_name: str):
    """Log the exported SavedModel as a self-contained pyfunc model (``pyfunc_arguments``)
    with an input example, registered as ``registered_model_name``. Returns ModelInfo. Call
    inside the run (``mlflow.start_run(run_id=...)``)."""
    import tempfile

    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        return mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            registered_model_name=registered_model_name,
            input_example=pd.DataFrame({"image": [_tiny_png_base64()]}),
            tags={"mlflow.source.name": SOURCE_NAME},
            **pyfunc_arguments(Path(export_dir), class_names, Path(tmp)),
        )


def saved_model_dir(model_dir: Path) -> Path:
    """The SavedModel folder inside a downloaded petalflow model (any version: the pyfunc
    flavor's ``data`` says where)."""
    import yaml

    mlmodel = yaml.safe_load((Path(model_dir) / "MLmodel").read_text())
    return Path(model_dir) / mlmodel["flavors"]["python_function"]["data"]


def model_signature(class_names: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from petalflow.tasks.model import PROB_PREFIX

    inputs = Schema([ColSpec("string", "image")])
    outputs = Schema(
        [ColSpec("string", "label"), ColSpec("float", "probability"), ColSpec("string", "error")]
        + [ColSpec("float", PROB_PREFIX + c) for c in class_names]
    )
    # params {"output": "drift"}: one row saying how far the batch is from the training data.
    params = ParamSchema([ParamSpec("output", "string", "predictions")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _version_for_run(client, name: str, run_id: str):
    versions = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    ready = [v for v in versions if v.status == "READY"]
    return max(ready, key=lambda v: int(v.version)) if ready else None


def is_missing(exc: Exception) -> bool:
    """True only for MLflow's answers "no such registered model" and "no such alias"."""
    code = getattr(exc, "error_code", None)
    if code == "RESOURCE_DOES_NOT_EXIST":
        return True
    return code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc).lower()


def version_by_alias(client, name: str, alias: str):
    """The version of registered model ``name`` holding ``alias``, or None when the model or
    the alias does not exist. Any other error (server down, refused credentials, a 5xx)
    propagates: "could not ask" is not "there is none", or a registry hiccup would promote a
    worse model."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception as exc:  # noqa: BLE001 - MLflow raises MlflowException/RestException
        if is_missing(exc):
            return None
        raise


def version_tags(client, mv) -> dict:
    """What a registered version records (the tags ``register_model`` sets): its own tags; for
    a version registered by hand from a petalflow training run's model (the MLflow UI's
    "Register model", ``mlflow.register_model``), which has none of them, what its run
    recorded: data and source, backbone, classes, test accuracy, and (runs from this one on)
    the training request and its key. A version of any other run: its own tags, and its run's
    test accuracy where the version has none."""
    tags = dict(mv.tags or {})
    if "params" in tags or not mv.run_id:
        return tags
    try:
        run = client.get_run(mv.run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises MlflowException/RestException
        if is_missing(exc):
            return tags
        raise
    accuracy = run.data.metrics.get("test_accuracy")
    found = {"test_accuracy": f"{accuracy:.{PRECISION}f}" if accuracy is not None else None}
    recorded = run.data.tags
    if "petalflow.dataset_fingerprint" not in recorded:
        return {**{k: v for k, v in found.items() if v is not None}, **tags}
    found.update({key: recorded.get(f"petalflow.{key}") for key in (
        "dataset_fingerprint", "data_url", "backbone", "params", "request_key", "code_version",
        *(tag for key, tag in SOURCE_TAGS.items() if key != "outcome"))})
    found["image_size"] = run.data.params.get("image_size")
    classes = recorded.get("petalflow.class_names")  # cut short for hundreds of classes
    found["class_names"] = classes if classes and classes.startswith("[") else None
    if found["class_names"] is None and mv.source:
        import mlflow

        metadata = mlflow.models.get_model_info(mv.source).metadata or {}
        if metadata.get("class_names"):
            found["class_names"] = json.dumps(metadata["class_names"], ensure_ascii=False)
    return {**{k: v for k, v in found.items() if v is not None}, **tags}


def current_champion(client, name: str):
    """(version, test_accuracy) of the current champion, or (None, None) when there is none
    (``version_by_alias``)."""
    mv = version_by_alias(client, name, CHAMPION)
    if mv is None:
        return None, None
    acc = version_tags(client, mv).get("test_accuracy")
    return mv, (float(acc) if acc is not None else None)


def champion_info(model_name: str) -> Optional[dict]:
    """The current champion as plain data (version, class names, stored test accuracy, model
    URI, the source it was trained on), or None when there is none."""
    client = mlflow_client()
    mv, accuracy = current_champion(client, model_name)
    return None if mv is None else version_info(version_tags(client, mv), mv, accuracy,
                                                model_name)


def version_info(tags: dict, mv, accuracy: Optional[float], model_name: str,
                 alias: str = CHAMPION) -> dict:
    """A registered version (``tags``: its ``version_tags``) as plain data: ``champion_info``'s
    fields and its ``alias``."""
    classes = tags.get("class_names")
    return {
        "alias": alias,
        "version": str(mv.version),
        "model_uri": f"models:/{model_name}/{mv.version}",
        "class_names": json.loads(classes) if classes else None,
        "stored_test_accuracy": accuracy,
        "dataset_fingerprint": tags.get("dataset_fingerprint"),
        "data_url": tags.get("data_url"),
        "archive_sha256": tags.get("archive_sha256"),
        "listing_fingerprint": tags.get("listing_fingerprint"),
        "archive_contents_sha256": tags.get("archive_contents_sha256"),
        "run_key": tags.get("run_key"),
        "run_id": mv.run_id,
    }


def followed_champion(params: TrainParams) -> Optional[tuple[TrainParams, dict]]:
    """What a run that follows the champion trains (``params.followed``) and the version it
    follows (``version_info``): the champion, or before there is one the challenger (a model
    none of whose versions has passed the gate yet: the data may grow until one does); None
    when ``params.model_name`` has neither. Raises FollowChampionError when the version's
    recorded parameters cannot be trained with here (none recorded, a URL without its
    credentials, a backbone folder this machine lacks): nothing is guessed."""
    client = mlflow_client()
    mv, accuracy = current_champion(client, params.model_name)
    alias = CHAMPION
    if mv is None:
        mv, alias = version_by_alias(client, params.model_name, CHALLENGER), CHALLENGER
        if mv is None:
            return None
    tags = version_tags(client, mv)
    raw = tags.get("params")
    if not raw:
        raise FollowChampionError(
            f"follow_champion: the {alias} v{mv.version} of {params.model_name} records no "
            "training parameters (its version tag 'params'): turn follow_champion off and give "
            "the data URL and settings to train with")
    try:
        cfg = followed(params, json.loads(raw), f"the {alias} v{mv.version}")
    except ValueError as exc:
        raise FollowChampionError(str(exc)) from None
    log("following the %s v%s of %s%s: its data %s, backbone %s", alias, mv.version,
        params.model_name, "" if alias == CHAMPION else " (no version has passed the gate yet)",
        redact_url(cfg.data_url), redact_url(cfg.backbone))
    return cfg, version_info(tags, mv, accuracy, params.model_name, alias)


def learned_images(run_id: str, dest: Path) -> Optional[frozenset]:
    """The sha256 of the images the model of MLflow run ``run_id`` was trained on: its run's
    manifest (``manifest.csv`` in ``RUN_MANIFEST_DIR``, logged by ``start_run``), rows of the
    train split (the val split is only measured, never fitted); None when the run holds no
    manifest, or one without those columns."""
    rows = run_manifest(run_id, dest, ["sha256", "status", "split"])
    if rows is None:
        return None
    return frozenset(rows.loc[(rows["status"] == "ok") & (rows["split"] == "train"), "sha256"])


def run_manifest(run_id: str, dest: Path, columns: list[str]):
    """``columns`` of the manifest MLflow run ``run_id`` logged (``start_run``), as strings;
    None when the run holds no manifest, or one without those columns (not one this code
    wrote). An error asking the store propagates."""
    import pandas as pd

    try:
        path = mlflow_client().download_artifacts(run_id, f"{RUN_MANIFEST_DIR}/manifest.csv",
                                                   str(dest))
    except Exception as exc:  # noqa: BLE001 - MlflowException; "could not ask" propagates
        if is_missing(exc):
            return None
        raise
    try:
        return pd.read_csv(path, usecols=columns, dtype=str, keep_default_na=False)
    except ValueError:  # columns missing: not a manifest this code wrote
        return None


def download_model(model_uri: str, dest: Path) -> str:
    """Download a registered petalflow model and return its SavedModel folder (for evaluating
    the champion with the same code as the challenger)."""
    saved = saved_model_dir(pull_model(model_uri, Path(dest)))
    if not (saved / "saved_model.pb").is_file():
        raise ValueError(f"{model_uri} holds no petalflow SavedModel ({saved.name}/)")
    return str(saved)


PRECISION = 6  # accuracies are stored (tags) and compared at this many decimals


def decide_alias(accuracy: float, min_accuracy: float, champion_accuracy: Optional[float],
                 min_improvement: float = 0.0, basis: str = "",
                 majority: Optional[dict] = None, held: str = "",
                 compared: Optional[float] = None) -> tuple:
    """(alias, reason). ``champion_accuracy`` is the champion's accuracy on the *same* test
    images as ``compared``, the new version's (default ``accuracy``; ``basis`` says which
    images when they are not the whole test split), or None: no champion, or one with other
    classes, which ``basis`` then says. The new version becomes champion when it passes the
    gate and, against a champion, beats it by more than 0 and by at least ``min_improvement``;
    both figures are rounded to the same precision first, so a tie is a tie and keeps the
    champion. The gate is ``min_accuracy`` and, with ``majority``
    (``evaluate.majority_baseline``), beating the accuracy of answering the test split's most
    common class for every image: on 95 % "ok" photos a model that never says "defect" scores
    0.95, far above any --min-accuracy. ``held`` (``evaluate.class_list_changed``,
    ``evaluate.unseen_comparison``) keeps a version that passes the gate from replacing the
    champion, and is the reason."""
    acc = round(float(accuracy), PRECISION)
    if acc < min_accuracy:
        return CHALLENGER, f"test accuracy {acc:.4f} is below --min-accuracy {min_accuracy}"
    if champion_accuracy is not None:
        champ = round(float(champion_accuracy), PRECISION)
        mine = acc if compared is None else round(float(compared), PRECISION)
        margin = round(mine - champ, PRECISION)
        on = f" on {basis}" if basis else ""
        if margin <= 0:
            return CHALLENGER, (f"test accuracy {mine:.4f} does not beat the champion's "
                                f"{champ:.4f}{on}")
        if margin < min_improvement:
            return CHALLENGER, (f"test accuracy {mine:.4f} beats the champion's {champ:.4f}{on} "
                                f"by {margin:.4f}, less than --min-improvement {min_improvement}")
    if majority is not None and acc <= round(float(majority["accuracy"]), PRECISION):
        return CHALLENGER, (f"test accuracy {acc:.4f} does not beat answering "
                            f"'{majority['class']}', the test split's most common class, for "
                            f"every image ({majority['accuracy']:.4f}): the model is no better "
                            "than that guess")
    if held:
        return CHALLENGER, f"{held} (test accuracy {acc:.4f} >= {min_accuracy})"
    if champion_accuracy is None:
        why = basis or "first model to pass the gate"
        return CHAMPION, f"{why} ({acc:.4f} >= {min_accuracy})"
    return CHAMPION, f"test accuracy {mine:.4f} beats the champion's {champ:.4f}{on}"


def register_model(
    run_id: str, export_dir: Path, cfg: TrainParams, data_info: DatasetInfo, metrics: dict,
    comparison: Optional[dict] = None, source: Optional[dict] = None,
    edge: Optional[dict] = None, request: Optional[TrainParams] = None,
    majority: Optional[dict] = None,
) -> dict:
    """Log the exported model to ``run_id``, register a version, set the alias; idempotent.

    ``cfg`` is what was trained; ``request`` (default ``cfg``) the run's parameters, which
    differ for a sweep (``cfg`` is the winning candidate): the version's ``params`` tag and
    ``request_key`` describe the request, so the same sweep on the same data is "nothing to do"
    and a retraining started from the version repeats the sweep.

    ``comparison`` (from ``compare_with_champion``) holds the champion's version and its
    accuracy on this run's test split; without it the champion's stored figure is used and the
    reason says so. ``majority`` (the evaluation's ``majority``) is part of the gate
    (``decide_alias``). ``source`` (``tasks.download.describe_source``) is recorded on the
    version.
    A retry after a successful registration finds the version already made from this run and
    reuses it, so no duplicate is created. The alias is set only once the version is READY.
    """
    import mlflow

    client = mlflow_client()
    name = cfg.model_name
    mv = _version_for_run(client, name, run_id)
    if mv is None:
        # MLflow creates the registered model with its first version (created beforehand, it
        # printed "Registered model 'NAME' already exists" on a model's first run).
        with mlflow.start_run(run_id=run_id):
            info = log_model(Path(export_dir), data_info["classes"], name)
        mv = client.get_model_version(name, str(info.registered_model_version))
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description="petalflow image classifier")
    version = str(mv.version)
    accuracy = float(metrics["test_accuracy"])
    version_tags = {
        "test_accuracy": f"{accuracy:.{PRECISION}f}",
        "dataset_fingerprint": data_info["fingerprint"],
        "data_url": redact_url(cfg.data_url),
        "backbone": redact_url(cfg.backbone),
        "image_size": str(cfg.image_size),
        "class_names": json.dumps(data_info["classes"], ensure_ascii=False),
        "params": params_record(request or cfg),
        "run_key": run_key(cfg, data_info["fingerprint"]),
        "request_key": run_key(request or cfg, data_info["fingerprint"]),
        "code_version": code_version(),
    }
    version_tags.update(source_tags(source, with_outcome=False))
    version_tags.update(edge_tags(edge))
    if comparison and comparison.get("champion_accuracy") is not None:
        version_tags["champion_compared"] = str(comparison["champion_version"])
        version_tags["champion_accuracy_same_split"] = (
            f"{comparison['champion_accuracy']:.{PRECISION}f}")
        if comparison.get("accuracy") is not None:  # on the images the champion did not see
            version_tags["compared_accuracy"] = f"{comparison['accuracy']:.{PRECISION}f}"
            version_tags["compared_images"] = str(comparison["compared_images"])
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version, key, value)

    aliases = set(client.get_model_version(name, version).aliases or [])
    champion, stored_acc = current_champion(client, name)
    compared = (comparison or {}).get("champion_version")
    champion_acc = stored_acc
    if champion is not None and str(champion.version) == version:
        alias, reason = CHAMPION, "this version is already the champion (retried registration)"
    elif CHALLENGER in aliases:
        alias, reason = CHALLENGER, "this version is already the challenger (retried registration)"
    elif comparison is not None and str(champion.version if champion else None) != str(compared):
        alias, reason = CHALLENGER, (
            f"the champion changed during this run (compared with version {compared}, now "
            f"{champion.version if champion else 'none'}); not promoted, compare again")
        client.set_registered_model_alias(name, alias, version)
    else:
        if comparison is not None:
            champion_acc = comparison.get("champion_accuracy")
            basis = comparison.get("basis", "")
        else:
            basis = "the champion's stored figure (its own test split)" if champion else ""
        alias, reason = decide_alias(accuracy, cfg.min_accuracy, champion_acc,
                                     cfg.min_improvement, basis, majority,
                                     (comparison or {}).get("held", ""),
                                     (comparison or {}).get("accuracy"))
        # The decision and the champion it was made against: a run on the same data with the
        # same parameters and gate would repeat it (``unchanged_since_champion``).
        client.set_model_version_tag(name, version, "alias_reason", reason[:DESCRIPTION_LIMIT])
        client.set_model_version_tag(name, version, "decided_against",
                                     str(champion.version) if champion is not None else "none")
        client.set_registered_model_alias(name, alias, version)
    return {
        "model_name": name,
        "model_version": version,
        "model_uri": f"models:/{name}/{version}",
        "alias": alias,
        "alias_reason": reason,
        "previous_champion": str(champion.version) if champion is not None else None,
        "previous_champion_accuracy": champion_acc,
    }


def training_lock_path(home: Path, model_name: str) -> Path:
    """The lock a training of ``model_name`` in this tracking store holds (``training_turn``),
    under ``home``/locks: the model's name (made file-safe) and a hash of the store and name.
    A SQLite store named by a relative path counts as its absolute one (the same database)."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    key = hashlib.sha256(f"{uri}\n{model_name}".encode()).hexdigest()[:12]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name)[:60]
    return Path(home) / "locks" / f"train-{safe}-{key}.lock"


@dataclasses.dataclass(frozen=True)
class Turn:
    """A training's turn (``training_turn``): the seconds it waited for it, the text it holds
    it with (``turn_tag`` of it tags its MLflow runs), and the text a killed holder left."""

    waited: float
    holder: str
    left_by: Optional[str] = None


TURN_TAG = "petalflow.turn"  # the MLflow run tag naming the training turn it was made in


def turn_tag(holder: str) -> str:
    """The ``TURN_TAG`` value of the runs made in the turn held with the text ``holder``."""
    return hashlib.sha256(holder.encode()).hexdigest()[:16]


@contextmanager
def training_turn(home: Path, model_name: str, holder: str):
    """One training of a registered model at a time (per PETALFLOW_HOME and tracking store),
    held from the check "anything new to train?" to the registration. Without it two runs on the
    same data (the weekly schedule and a watch-data event, Run clicked twice) both trained, and
    the later one ended as challenger ("the champion changed during this run"). A run that finds
    another one training the model says which and waits for it, then makes that check itself:
    on the same data it ends "nothing to do". A cancelled run's or a killed worker's turn ends
    with its process; a killed one's is said by the next (``Turn.left_by``). Yields a ``Turn``."""
    def waiting(other: str) -> None:
        log("model %r: another training of it is running (%s); this run waits for it to end, "
            "then checks again whether there is anything new to train", model_name, other)

    left: list = []

    def killed(other: str) -> None:
        left.append(other)
        log("model %r: the training before this one (%s) ended without ending its turn: its "
            "process was killed (the out-of-memory killer, its machine or worker gone)",
            model_name, other, level=30)

    text = f"{holder}, since {utc_now()}"
    with holder_lock(training_lock_path(home, model_name), text, waiting, killed) as waited:
        if waited:
            log("model %r: the other training ended; this run waited %.1f s and goes on",
                model_name, waited)
        yield Turn(waited, text, left[0] if left else None)


def end_abandoned_runs(left_by: str, by: str) -> list[str]:
    """The MLflow runs that a killed training (its turn's text ``left_by``) left RUNNING, in any
    experiment (the next run of the model may log to another), ended KILLED, saying so
    (``finish_run``) and naming the run that found them (``by``). Returns their ids."""
    client = mlflow_client()
    left = f"tags.`{TURN_TAG}` = '{turn_tag(left_by)}' and attributes.status = 'RUNNING'"
    runs, token = [], None
    while True:  # the active experiments, a page at a time
        page = client.search_experiments(max_results=100, page_token=token)
        if page:
            runs += client.search_runs([e.experiment_id for e in page], left)
        token = page.token
        if not token:
            break
    for run in runs:
        # Killed between its registration and the end of its run, it has a version.
        made = client.search_model_versions(f"run_id = '{run.info.run_id}'")
        registered = ("it had registered " + ", ".join(f"{v.name} version {v.version}"
                                                        for v in made)
                      if made else "nothing of it was registered")
        finish_run(run.info.run_id, "KILLED", (
            f"its run was killed before it ended (the out-of-memory killer, its machine or "
            f"worker gone: {left_by}); {registered}. Ended by {by}"))
    ended = [run.info.run_id for run in runs]
    if ended:
        log("the MLflow runs it left RUNNING are ended KILLED, saying why: %s", ", ".join(ended))
    return ended


def unchanged_since_champion(cfg: TrainParams, data_info: DatasetInfo) -> Optional[dict]:
    """What makes this run pointless, else None: the champion was trained on the same data with
    the same training parameters (same run key), or the challenger was and was decided against
    this very champion (or none) with the same gate: retraining would reproduce it and the
    decision. The description names that version, its alias and why."""
    client = mlflow_client()
    champion, accuracy = current_champion(client, cfg.model_name)
    key = run_key(cfg, data_info["fingerprint"])
    # request_key: what the run asked for (a sweep); versions from before sweeps have run_key.
    recorded = version_tags(client, champion) if champion is not None else {}
    if champion is not None and (
            recorded.get("request_key") or recorded.get("run_key")) == key:
        return {"model_name": cfg.model_name, "model_version": str(champion.version),
                "model_uri": f"models:/{cfg.model_name}/{champion.version}",
                "champion_accuracy": accuracy, "alias": CHAMPION,
                "alias_reason": "unchanged data and parameters; champion kept"}
    challenger = version_by_alias(client, cfg.model_name, CHALLENGER)
    if challenger is None:
        return None
    tags = version_tags(client, challenger)
    try:
        recorded = json.loads(tags.get("params", "{}"))
    except ValueError:
        return None
    # What decided (a version from before allow_dropped_classes was decided without it: off).
    fields = ("min_accuracy", "min_improvement", "allow_dropped_classes")
    gate = {k: recorded.get(k, TrainParams.model_fields[k].default) for k in fields}
    if (tags.get("request_key") != key
            or tags.get("decided_against") != (str(champion.version) if champion else "none")
            or gate != {k: getattr(cfg, k) for k in fields}):
        return None
    kept = (f"the champion v{champion.version} stays" if champion is not None
            else "there is no champion")
    return {"model_name": cfg.model_name, "model_version": str(challenger.version),
            "model_uri": f"models:/{cfg.model_name}/{challenger.version}",
            "champion_accuracy": accuracy, "alias": CHALLENGER,
            "champion_version": str(champion.version) if champion is not None else None,
            "alias_reason": (
                f"unchanged data and parameters since the challenger v{challenger.version}, "
                f"which was not promoted: {tags.get('alias_reason', 'see its model card')}; "
                f"retraining would repeat it, and {kept}")}


def list_model_versions(name: str):
    """pandas table of a registered model's versions: version, aliases, test accuracy, number
    of classes, created, dataset fingerprint, run id and the alias decision's reason (newest
    first). Reads the registry only; TensorFlow not needed."""
    import pandas as pd

    client = mlflow_client()
    rows = []
    try:  # search results do not carry aliases; the registered model does
        alias_map = client.get_registered_model(name).aliases or {}
    except Exception:  # noqa: BLE001 - no such model: empty table
        alias_map = {}
    aliases_of: dict[str, list[str]] = {}
    for alias, version in alias_map.items():
        aliases_of.setdefault(str(version), []).append(alias)
    for mv in client.search_model_versions(f"name='{name}'"):
        tags = version_tags(client, mv)
        rows.append({
            "version": int(mv.version),
            "aliases": ",".join(sorted(aliases_of.get(str(mv.version), []))),
            "test_accuracy": float(tags["test_accuracy"]) if "test_accuracy" in tags
            else None,
            "classes": len(json.loads(tags["class_names"])) if "class_names" in tags
            else None,
            "created": pd.to_datetime(mv.creation_timestamp, unit="ms", utc=True),
            "dataset_fingerprint": tags.get("dataset_fingerprint", "")[:12],
            "run_id": mv.run_id,
            "alias_reason": tags.get("alias_reason", ""),
        })
    columns = ["version", "aliases", "test_accuracy", "classes", "created",
               "dataset_fingerprint", "run_id", "alias_reason"]
    return pd.DataFrame(rows, columns=columns).astype({"classes": "Int64"}).sort_values(
        "version", ascending=False, ignore_index=True)


def unresolved_model_reason(model_uri: str) -> Optional[str]:
    """Why ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` does not resolve: NAME's versions
    (aliases, test accuracy) and what to pass instead, or, when NAME has no versions, the
    names that are registered (``unregistered_name_reason``). None when the URI resolves or is
    not a models:/ URI."""
    parsed = parse_models_uri(model_uri)
    if parsed is None:
        return None
    import pandas as pd

    name, alias, version = parsed
    versions = list_model_versions(name)
    if versions.empty:
        return unregistered_name_reason(name)
    if (alias and alias in set(",".join(versions["aliases"]).split(","))) or (
            version and version.isdigit() and int(version) in set(versions["version"])):
        return None
    if version and version.lower() == "latest":
        return None  # the model has versions: latest resolves

    def describe(row) -> str:
        parts = [a for a in row.aliases.split(",") if a]
        if pd.notna(row.test_accuracy):  # versions without the tag read as NaN
            parts.append(f"test accuracy {row.test_accuracy:.4f}")
        return f"v{row.version}" + (f" ({', '.join(parts)})" if parts else "")

    listing = ", ".join(describe(row) for row in versions.itertuples(index=False))
    newest = int(versions["version"].max())
    if alias:
        what = f"no version with the alias '{alias}'"
    elif version.isdigit():
        what = f"no version {version}"
    else:
        what = (f"no version in the stage '{version}' (MLflow's stages are deprecated: "
                f"petalflow names versions by alias, models:/{name}@{CHAMPION})")
    why = (" (a version takes it only by passing the quality gate, --min-accuracy)"
           if alias == CHAMPION else "")
    return (f"registered model {name} has {what}{why}; its versions: {listing}. Pass --model "
            f"models:/{name}/{newest} to use one of them.")


def registered_model_names(limit: int = 100) -> list[str]:
    """The names registered in the configured store (up to ``limit``), sorted."""
    return sorted(m.name for m in mlflow_client().search_registered_models(max_results=limit))


def unregistered_name_reason(name: str) -> str:
    """What to say when ``name`` has no versions in the configured store: which names it
    holds (a typo, or another store) or that it holds none yet."""
    names = registered_model_names()
    store = redact_url(tracking_uri())
    if name in names:
        return f"registered model {name} has no versions in {store}"
    if not names:
        return (f"no model is registered in {store}: `petalflow train` registers one, or "
                f"point MLFLOW_TRACKING_URI at the store that holds {name!r}")
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return (f"no model named {name!r} is registered in {store}; it holds {shown}: use "
            f"{'that name' if len(names) == 1 else 'one of those names'}, or point "
            f"MLFLOW_TRACKING_URI at the store that holds {name!r}")


@contextmanager
def explaining_missing(model_uri: str):
    """Inside it, MLflow's "not found" for ``model_uri`` becomes ``ModelNotFound`` with
    ``unresolved_model_reason`` (the model's versions, what to pass instead) when NAME is
    registered; any other error passes unchanged."""
    from petalflow.tasks.errors import ModelNotFound

    try:
        yield
    except Exception as exc:  # noqa: BLE001 - MLflow raises MlflowException/RestException
        reason = unresolved_model_reason(model_uri) if is_missing(exc) else None
        if reason:
            raise ModelNotFound(reason) from exc
        raise


# What an MLflow model folder holds at its top: a folder of nothing else is a previous pull.
MODEL_FOLDER_NAMES = frozenset({
    "MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "input_example.json",
    "serving_input_example.json", "registered_model_meta", "code", "data", "artifacts",
    "metadata"})


def _pulled_before(folder: Path) -> bool:
    """Whether ``folder`` holds a model a previous pull saved and nothing else: its MLmodel
    and model files at the top (or one folder down, for a runs:/ URI). A folder holding the
    user's own files beside a model is not one: replacing it would delete them."""
    def model_only(path: Path) -> bool:
        names = {p.name for p in path.iterdir()}
        return "MLmodel" in names and names <= MODEL_FOLDER_NAMES

    entries = list(folder.iterdir())
    return model_only(folder) or (len(entries) == 1 and entries[0].is_dir()
                                  and model_only(entries[0]))


def pull_model(model_uri: str, dest: Path) -> Path:
    """Download a registered model (any MLflow model URI) into ``dest`` for offline use;
    returns the model's folder. ``dest`` is a new or empty folder, or one a previous pull
    filled: replaced whole once the new model is downloaded beside it, so a pull that fails
    leaves the previous model as it was, and no file of it stays mixed with the new one. A
    folder holding anything else is refused (``DestinationInUse``), untouched."""
    import tempfile

    import mlflow

    from petalflow.tasks.errors import DestinationInUse

    dest = _not_a_file(Path(dest))
    if dest.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise DestinationInUse(f"{dest} is the current folder or holds it: give a folder of "
                               "its own, such as ./model")
    if dest.is_dir() and any(dest.iterdir()) and not _pulled_before(dest):
        shown = ", ".join(sorted(p.name for p in dest.iterdir())[:3])
        raise DestinationInUse(f"{dest} holds other files ({shown}, ...): give a new or empty "
                               "folder, or one a previous pull filled (it is replaced)")
    configure_mlflow()
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.pull-", dir=dest.parent))
    try:
        with explaining_missing(model_uri):
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                           dst_path=str(staging)))
        inside = got.resolve().relative_to(staging.resolve())
        if dest.exists():
            previous = staging.with_name(staging.name + ".previous")
            os.replace(dest, previous)
            os.replace(staging, dest)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest / inside


# --------------------------------------------------------------------------- Prefect tasks
# MLflow error codes of a server or database that may answer a moment later (MLflow gives a
# SQL store's OperationalError, "database is locked" or a dropped connection, the first).
_TRANSIENT_MLFLOW_ERRORS = {"TEMPORARILY_UNAVAILABLE", "RESOURCE_EXHAUSTED",
                            "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED"}
# MLflow's message for an answer that was not JSON (a proxy's 502/503 page, say).
_HTTP_STATUS = re.compile(r"failed with error code (\d{3})")


def is_transient_io_error(exc: BaseException) -> bool:
    """Whether a failure of MLflow's or Prefect's client is one of I/O that may pass: the
    connection refused, dropped or timed out (MLflow raises its own exception while handling
    requests'), a server error or rate limit answered by the server or a proxy in front of it
    (after MLflow's own retries of it), a SQL store busy or unreachable. Not: refused
    credentials, bad requests, missing models, errors MLflow raises before any request (a URI
    it cannot use) and everything that is not I/O."""
    import httpx
    import requests
    from mlflow.exceptions import RestException

    if tls_failure(exc) is not None:  # a certificate not trusted, no TLS: no retry changes it
        return False
    for cause in error_chain(exc):
        # RetryError: MLflow's own retries of a 408/429/5xx answer ran out.
        if isinstance(cause, (ConnectionError, TimeoutError, requests.ConnectionError,
                              requests.Timeout, requests.exceptions.ChunkedEncodingError,
                              requests.exceptions.RetryError, httpx.TransportError)):
            return True
        if isinstance(cause, httpx.HTTPStatusError):  # Prefect's client
            return is_transient_status(cause.response.status_code)
    code = getattr(exc, "error_code", None)
    if code in _TRANSIENT_MLFLOW_ERRORS:
        return True
    if code == "INTERNAL_ERROR" and isinstance(exc, RestException):
        return True  # the server said 500: its database or storage failed this time
    status = _HTTP_STATUS.search(str(exc))
    return bool(status) and is_transient_status(int(status[1]))


def retry_if_transient(task, task_run, state) -> bool:
    """Retry MLflow and Prefect calls only on I/O that may pass (``is_transient_io_error``)."""
    return is_transient_io_error(state.result(raise_on_failure=False))


# MLflow calls cross the network when a tracking server is used: retried (3 s, 10 s, 30 s).
MLFLOW_RETRY = dict(retries=3, retry_delay_seconds=[3, 10, 30],
                     retry_condition_fn=retry_if_transient)


@task(name="start-mlflow-run", **MLFLOW_RETRY)
def start_run_task(cfg: TrainParams, data_info: DatasetInfo, run_name: Optional[str] = None,
                   source: Optional[dict] = None, parent_run_id: Optional[str] = None,
                   turn: Optional[str] = None) -> str:
    with disk_full_said("starting the MLflow run"):
        return start_run(cfg, data_info, run_name, source, parent_run_id, turn)


@task(name="end-abandoned-runs", **MLFLOW_RETRY)
def end_abandoned_runs_task(left_by: str, by: str) -> list[str]:
    return end_abandoned_runs(left_by, by)


@task(name="register-model", **MLFLOW_RETRY)
def register_model_task(run_id: str, export_dir: str, cfg: TrainParams, data_info: DatasetInfo,
                        metrics: dict, comparison: Optional[dict] = None,
                        source: Optional[dict] = None, edge: Optional[dict] = None,
                        request: Optional[TrainParams] = None,
                        majority: Optional[dict] = None) -> dict:
    with disk_full_said("registering the model"):
        return register_model(run_id, Path(export_dir), cfg, data_info, metrics, comparison,
                              source, edge, request, majority)


@task(name="read-champion", **MLFLOW_RETRY)
def champion_info_task(model_name: str) -> Optional[dict]:
    return champion_info(model_name)


@task(name="follow-champion", **MLFLOW_RETRY)
def followed_champion_task(params: TrainParams) -> Optional[tuple[TrainParams, dict]]:
    return followed_champion(params)


@task(name="check-unchanged", **MLFLOW_RETRY)
def unchanged_since_champion_task(cfg: TrainParams, data_info: DatasetInfo) -> Optional[dict]:
    return unchanged_since_champion(cfg, data_info)


@task(name="log-timings", **MLFLOW_RETRY)
def log_timings_task(run_id: str, timings: dict) -> None:
    with disk_full_said("logging the timings"):
        log_timings(run_id, timings)


@task(name="finish-mlflow-run", **MLFLOW_RETRY)
def finish_run_task(run_id: str, status: str = "FINISHED", why: Optional[str] = None) -> None:
    with disk_full_said("ending the MLflow run"):
        finish_run(run_id, status, why)
