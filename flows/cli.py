"""The ``petalflow`` command line: ``train`` runs the train-and-register flow, ``predict``
classifies images with a registered model, ``pull`` saves one for offline use and ``models``
lists the registered versions.

Options are validated (through the flow's TrainParams) before any work starts; a bad value is
reported with the option's name and what is allowed, and the exit status is 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence, get_args, get_origin

from pydantic import BaseModel, ValidationError

from petalflow.tasks.common import (
    IMPORT_LOCK, MODEL_PRELOAD_THREAD, code_version, counted, defer_full_collections,
    freeze_start_up, require_store, require_tracking_server, tls_problem,
)
from petalflow.tasks.params import (
    CLI_HIDDEN, CLI_POSITIONAL, DEFAULT_MODEL_NAME, PredictParams, TrainParams, cli_option,
    unquoted,
)

EXIT_USAGE = 2
# Exit statuses of `petalflow train` (documented in the README).
EXIT_FAILED = 1      # anything not listed below (the message says what)
EXIT_SOURCE = 3      # dataset download: unreachable, HTTP error, checksum mismatch, web page
EXIT_DATA = 4        # archive or dataset unusable (unsafe/unreadable archive, too few images)
EXIT_BACKBONE = 5    # backbone handle unusable or unreachable
EXIT_REGISTRY = 6    # MLflow tracking server or registry refused or unreachable
EXIT_NO_SPACE = 7    # a disk the run writes to is full (or over its quota)
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT), as a shell reports a command it interrupted
EXIT_TERMINATED = 143   # SIGTERM (`kill`, `timeout`, systemd, a container's stop), likewise

OFFLINE_HINT = ("offline, or behind a proxy? --data-url and --backbone take local copies: a "
                "path, a file:// URL or a URL on your network (see the README).")


class UsageError(Exception):
    """A bad option or argument: reported before any work starts."""


class Terminated(BaseException):
    """SIGTERM arrived (``on_sigterm``): ends the command as Ctrl-C's KeyboardInterrupt does."""


def on_sigterm(signum, frame) -> None:
    """The console script's SIGTERM handler. During a flow run Prefect's own handler is in
    place: it ends the run as crashed, then sends the signal again to the handler it replaced,
    this one, so the command ends with one line (``main``) rather than dying of the signal."""
    raise Terminated()


class RunFailed(Exception):
    """A flow run ended Failed; carries what a user needs: message, hint, exit status."""

    def __init__(self, message: str, hint: str = "", code: int = EXIT_FAILED):
        super().__init__(message)
        self.hint, self.code = hint, code


def _prefect_unreachable(exc: BaseException, text: str) -> RunFailed:
    """Prefect's "Failed to reach API at URL" (PREFECT_API_URL set to a server that is
    stopped, is no Prefect API, or whose certificate is not trusted), saying which server,
    why (from the error Prefect raised it from) and what to do."""
    from urllib.parse import urlsplit

    url = text[len("Failed to reach API at "):].strip()
    cause = exc.__cause__ or exc.__context__
    parts = urlsplit(url if "://" in url else f"http://{url}")
    api = f"{parts.scheme}://{parts.netloc}/api"
    status = getattr(getattr(cause, "response", None), "status_code", None)
    hint = ("start it (`petalflow stack up`), or fix PREFECT_API_URL (the server's address and "
            "/api); unset, the command runs in a temporary local server")
    if "://" not in url:
        return RunFailed(f"PREFECT_API_URL={url} has no scheme: give {api}", hint)
    if status == 404 and parts.path.rstrip("/") != "/api":
        # The UI's address (http://host:4200, …/dashboard, a run's page) copied instead.
        return RunFailed(f"PREFECT_API_URL={url} is no Prefect API (it answered 404 to "
                         f"{url.rstrip('/')}/admin/version): a Prefect server's API is at "
                         f"/api, {api}", hint)
    why = (tls_problem(exc, url, "PREFECT_API_SSL_CERT_FILE")
           or (f"{type(cause).__name__}: {cause}" if cause is not None else "no answer"))
    return RunFailed(f"the Prefect server at {url} (PREFECT_API_URL) could not be reached: "
                     f"{why}", hint)


def explain_failure(exc: BaseException) -> RunFailed:
    """The one message, hint and exit status for a failed run's exception."""
    from petalflow.tasks.errors import (
        ArchiveError, BackboneError, ChecksumMismatch, DamagedArchive, DatasetChanged,
        DatasetError, DiskFull, DownloadError, FollowChampionError, LinksInArchive, ModelNotFound,
        ModelUnreachable, OutputNotWritable, ServerBusy, StoreNotFound, TrackingServerUnreachable,
        TrainingHandoffError, TrainingTimeLimit, TransientError, UnusableImages,
        WebPageNotArchive,
    )
    from petalflow.tasks.space import DISK_FULL, disk_full_from, no_space
    from petalflow.temporary_server import ServerError

    text = str(exc).strip() or type(exc).__name__
    name = type(exc).__name__
    if isinstance(exc, RuntimeError) and text.startswith("Failed to reach API at "):
        return _prefect_unreachable(exc, text)
    if isinstance(exc, DiskFull) or no_space(exc):
        if DISK_FULL not in text:  # raised outside a step that says which disk
            text = str(disk_full_from(exc))
        return RunFailed(text, "free space on that disk, or point what it holds at a bigger "
                         "one (PETALFLOW_HOME: downloads, datasets, features and runs, caches "
                         "the next run makes again; MLFLOW_TRACKING_URI: the model store; "
                         "TMPDIR; predict's --output), then run the command again (a training "
                         "goes on from what it had done).", EXIT_NO_SPACE)
    if isinstance(exc, ServerError):  # the command's temporary Prefect server, before the run
        return RunFailed(text, "or run against a Prefect server: set PREFECT_API_URL "
                         "(`petalflow stack up` starts one)")
    if isinstance(exc, ChecksumMismatch):
        return RunFailed(text, "the archive behind the URL is not the one pinned: drop "
                         "--data-sha256 to follow the URL, or fix the URL.", EXIT_SOURCE)
    if isinstance(exc, ServerBusy) or (isinstance(exc, TransientError)
                                       and text.startswith("HTTP ")):
        return RunFailed(text, "the server is up but refused for now (a rate limit, an "
                         "overload, maintenance): run the command again later; what the run "
                         "had done is reused.",
                         EXIT_BACKBONE if "backbone" in text else EXIT_SOURCE)
    if isinstance(exc, (DownloadError, TransientError)) and "backbone" in text:
        return RunFailed(text, OFFLINE_HINT, EXIT_BACKBONE)
    if isinstance(exc, TransientError):
        return RunFailed(text, OFFLINE_HINT, EXIT_SOURCE)
    if isinstance(exc, DownloadError):
        return RunFailed(text, "check --data-url (the URL or path of a .tgz/.tar/.zip archive or "
                         "of a folder with one subfolder per class).", EXIT_SOURCE)
    if isinstance(exc, BackboneError) and " images but " in text:
        return RunFailed(text, "the backbone decides the image size; give the size it takes.",
                         EXIT_BACKBONE)
    if isinstance(exc, BackboneError):
        return RunFailed(text, "--backbone must be a TF Hub image feature-vector handle or a "
                         "local SavedModel folder; " + OFFLINE_HINT, EXIT_BACKBONE)
    if isinstance(exc, WebPageNotArchive) and "folder's listing" in text:
        return RunFailed(text, "--data-url must lead to one archive of the class folders (or "
                         "be the folder's path): a file server lists a folder's files, it "
                         "does not send them.", EXIT_SOURCE)
    if isinstance(exc, WebPageNotArchive):
        return RunFailed(text, "--data-url must lead to the archive's bytes: for a share link, "
                         "its direct-download form; open it in a browser to see the page.",
                         EXIT_SOURCE)
    if isinstance(exc, DamagedArchive):
        return RunFailed(text, "check that the archive opens where it was made (`unzip -t`, "
                         "`tar -tf`) and put a whole copy behind --data-url; the datasets "
                         "already extracted and the registered models are as they were.",
                         EXIT_DATA)
    if isinstance(exc, LinksInArchive):
        return RunFailed(text, "pack the class folders again with the files their links point "
                         "to: `tar -czhf photos.tgz photos/` (-h follows links) or `zip -r "
                         "photos.zip photos/` (without -y).", EXIT_DATA)
    if isinstance(exc, DatasetChanged):
        return RunFailed(text, "data that people or a sync client write into while runs read "
                         "it: let watch-data start the runs (it announces a folder once "
                         "nothing in it has changed for 2 minutes), or train on an archive "
                         "of it; nothing was registered, the champion is as it was.", EXIT_DATA)
    from petalflow.tasks.dataset import SAME_IMAGE

    if isinstance(exc, UnusableImages) and SAME_IMAGE in text:
        return RunFailed(text, "a photo has one label: the same photo in two class folders is "
                         "left out of both; remove it from the folder it does not belong "
                         "to.", EXIT_DATA)
    if isinstance(exc, UnusableImages):
        return RunFailed(text, "the class folders were found, but their images could not "
                         "be used, for the reason above: fix or replace those files (a format "
                         "TensorFlow cannot decode, such as TIFF or HEIC: convert them to JPEG "
                         "or PNG) and train again.", EXIT_DATA)
    if isinstance(exc, (ArchiveError, DatasetError)):
        return RunFailed(text, "see the README's 'petalflow train' section for the layout "
                         "petalflow expects (one subfolder of images per class).", EXIT_DATA)
    if isinstance(exc, TrackingServerUnreachable):
        return RunFailed(text, "start it (`petalflow stack up`), or fix MLFLOW_TRACKING_URI; "
                         "unset, the embedded store under mlflow/ is used.", EXIT_REGISTRY)
    if isinstance(exc, StoreNotFound):
        return RunFailed(text, "run the command in the folder `petalflow train` ran in (its "
                         "models are in mlflow/ there), or set MLFLOW_TRACKING_URI to your "
                         "tracking server.", EXIT_REGISTRY)
    if isinstance(exc, ModelUnreachable):
        return RunFailed(text, "offline, or behind a proxy? `petalflow pull --model URI --dest "
                         "DIR` on a machine that reaches it saves a folder to give as --model.",
                         EXIT_REGISTRY)
    if isinstance(exc, ModelNotFound):
        return RunFailed(text, "`petalflow models --model-name NAME` lists a model's versions "
                         "and aliases.", EXIT_REGISTRY)
    if isinstance(exc, OutputNotWritable):
        return RunFailed(text, "nothing was classified, and no file was left there.")
    if isinstance(exc, TrainingTimeLimit):
        return RunFailed(text, "a training that hung stops at the same point again: the "
                         "run's last log lines (--verbose) say where; one that was only slow "
                         "(more data, more epochs, a slower machine) needs a larger "
                         "--max-training-hours.")
    if isinstance(exc, TrainingHandoffError):
        return RunFailed(text, "without --training-deployment (or with `local`) `petalflow "
                         "train` trains in its own process.")
    if isinstance(exc, FollowChampionError):
        return RunFailed(text, "without --follow-champion `petalflow train` trains on "
                         "--data-url with the options given.")
    module = type(exc).__module__
    if module.startswith(("mlflow", "requests")) or name in ("MlflowException", "RestException"):
        return RunFailed(f"MLflow: {text}", "check MLFLOW_TRACKING_URI (unset: the embedded "
                         "store under mlflow/) and MLFLOW_TRACKING_USERNAME/PASSWORD.",
                         EXIT_REGISTRY)
    return RunFailed(f"{name}: {text}", "run again with --verbose for the traceback.")


def add_params_options(p: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One option per field of a parameter model (the same model the flow and the UI form
    use): ``--field-name`` (or its CLI spelling), help from the field's description."""
    for name, field in model.model_fields.items():
        if name in CLI_HIDDEN:
            continue
        option = cli_option(name)
        required = field.is_required()
        default = "required" if required else \
            "or given as the command's arguments" if name in CLI_POSITIONAL else \
            f"default: {field.get_default(call_default_factory=True)}"
        # argparse formats help with %: a description's own % signs are literal.
        help_text = f"{field.description} ({default})".replace("%", "%%")
        if field.annotation is bool:
            p.add_argument(option, dest=name, action=argparse.BooleanOptionalAction,
                           default=None, help=help_text)
        elif _is_model_list(field.annotation):
            example = '\'[{"learning_rate": 0.01}, {"augment": true}]\''
            if name == "sweep":  # TrainParams also takes a grid, listed as its combinations
                example += (', or a grid of every combination, \'{"learning_rate": '
                            '[0.01, 0.003], "augment": [true, false]}\'')
            p.add_argument(option, dest=name, default=None, metavar="JSON", required=required,
                           help=f"{help_text} A JSON list of objects, e.g. {example}.")
        elif get_origin(field.annotation) is list:
            p.add_argument(option, dest=name, nargs="+", default=None, help=help_text,
                           required=required)
            if name in CLI_POSITIONAL:
                p.add_argument(f"{name}_arguments", nargs="*", default=[],
                               metavar=field.title.upper(), help=f"the same as {option}")
        else:
            # Values stay strings here; the model validates and converts them, so every
            # entry point (CLI, UI, API) refuses the same values with the same message.
            choices = get_args(field.annotation) if get_origin(field.annotation) is Literal \
                else None
            p.add_argument(option, dest=name, default=None, choices=choices,
                           required=required,
                           metavar=None if choices else name.upper(), help=help_text)


def _is_model_list(annotation) -> bool:
    """list[SomeModel]: given on the command line as JSON."""
    args = get_args(annotation)
    return get_origin(annotation) is list and bool(args) and isinstance(args[0], type) \
        and issubclass(args[0], BaseModel)


def _add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="Show tracebacks (by default a failure prints one message and a hint).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="petalflow",
        allow_abbrev=False,
        description="Transfer-learning image classifier pipeline (Prefect + TF Hub + MLflow).",
        epilog="Also: petalflow stack up|down|deploy|status — run the Prefect and MLflow servers, "
               "work pools, workers and deployments (petalflow stack --help).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="Download, train, evaluate and register a model.",
                           allow_abbrev=False)
    add_params_options(train, TrainParams)
    train.add_argument("--summary-json", type=Path, default=None,
                       help="Also write the run summary (JSON) to this file.")
    _add_common_options(train)
    pred = sub.add_parser("predict", help="Classify images with a registered model.",
                          allow_abbrev=False)
    add_params_options(pred, PredictParams)
    pred.add_argument("--timing", action="store_true",
                      help="Also print when the first prediction was written and images/s.")
    _add_common_options(pred)
    pull = sub.add_parser("pull", help="Download a registered model for offline use.",
                          allow_abbrev=False)
    pull.add_argument("--model", default=None, type=unquoted,
                      help="Model URI: models:/NAME@ALIAS, models:/NAME/VERSION or runs:/... "
                           "(default: the champion of --model-name, "
                           f"models:/{DEFAULT_MODEL_NAME}@champion).")
    pull.add_argument("--model-name", default=DEFAULT_MODEL_NAME, type=unquoted,
                      help="The registered model whose champion is pulled when --model is not "
                           f"given (default: {DEFAULT_MODEL_NAME}).")
    pull.add_argument("--dest", type=Path, required=True,
                      help="Folder to save the model in; use it later as --model DIR.")
    pull.add_argument("--format", choices=("mlflow", "tflite"), default="mlflow",
                      help="mlflow: the MLflow model (default); tflite: the version's edge model "
                           "(TensorFlow Lite) with labels.txt and edge.json.")
    pull.add_argument("--quantization", choices=("int8", "float16"), default="int8",
                      help="Which edge model with --format tflite (default int8).")
    _add_common_options(pull)
    models = sub.add_parser("models", help="List a registered model's versions and aliases.",
                            allow_abbrev=False)
    models.add_argument("--model-name", default=DEFAULT_MODEL_NAME, type=unquoted,
                        help=f"The registered model to list (default: {DEFAULT_MODEL_NAME}).")
    _add_common_options(models)
    return parser


def params_from_args(model: type[BaseModel], args: argparse.Namespace):
    """The parameter model from parsed options; raises UsageError naming the offending
    option(s)."""
    given = {name: getattr(args, name) for name in model.model_fields
             if getattr(args, name, None) is not None}
    for name in CLI_POSITIONAL & set(model.model_fields):
        arguments = getattr(args, f"{name}_arguments", None)
        if arguments:  # petalflow predict photos/ --output p.csv
            given[name] = [*arguments, *given.get(name, [])]
    for name, value in list(given.items()):
        if _is_model_list(model.model_fields[name].annotation):
            try:
                given[name] = json.loads(value)
            except ValueError as exc:
                raise UsageError(f"{cli_option(name)}: not JSON ({exc}): {value!r}") from None
    try:
        return model(**given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = [str(part) for part in err["loc"]]
            option = cli_option(loc[0]) + "".join(  # --sweep[0].epochs: where inside a list
                f"[{part}]" if part.isdigit() else f".{part}" for part in loc[1:]) \
                if loc else "options"
            got = err["input"]
            shown = (f"{got[:5]!r} and {len(got) - 5} more"  # a shell glob's thousands of files
                     if isinstance(got, list) and len(got) > 5 else repr(got))
            problems.append(f"{option}: {err['msg']}" + (
                f" (got {shown})" if loc and not isinstance(got, dict) else ""))
        raise UsageError("invalid option(s):\n  " + "\n  ".join(problems)) from None


def train_params_from_args(args: argparse.Namespace) -> TrainParams:
    return params_from_args(TrainParams, args)


_STARTED_AT: Optional[float] = None  # when this command started: the run's start-up phase


def cmd_train(args: argparse.Namespace) -> int:
    params = train_params_from_args(args)
    if args.summary_json is not None and args.summary_json.is_dir():
        raise UsageError(f"--summary-json: {args.summary_json} is a folder: give a file name "
                         f"in it, such as {args.summary_json / 'summary.json'}")
    if args.summary_json is not None and not args.summary_json.parent.exists():
        raise UsageError(f"--summary-json: folder {args.summary_json.parent} does not exist")
    require_tracking_server()
    with _prefect_api() as server:
        code_version()  # for the run's tags: asked now, while this process is small (common.py)
        with IMPORT_LOCK:  # the side thread imports after this thread's Prefect imports
            _import_run_stack("petalflow.flows.train_flow")
            from petalflow.tasks.registry import store_opener

            # then MLflow's store opened (created on first use) on the same thread
            _warm_imports("mlflow", "tensorflow", "tensorflow_hub", then=store_opener())
        from petalflow.flows.train_flow import train_and_register

        args.run_started = True  # for ``interrupted_said``
        state = _run_flow(train_and_register, params, quiet=not args.verbose, server=server)
    summary = _result(state, args.verbose)
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    print(text)
    if args.summary_json is not None:
        args.summary_json.write_text(text + "\n")
    return 0


@contextmanager
def _prefect_api():
    """Prefect's temporary server (``petalflow.temporary_server``), launched now and used by
    the command's run, when no Prefect API is configured; else nothing (None)."""
    from petalflow.temporary_server import start_if_needed

    server = start_if_needed()
    if server is None:
        yield None
        return
    from prefect.logging import get_logger
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

    # No UI there (Prefect's own temporary server has none either): no "View at" links. No flow
    # run heartbeats: they let a lasting server mark runs whose process died as Crashed, and
    # this one ends with the command; Prefect's heartbeat thread wakes once a second, and the
    # end of every flow run (two per train command) waited for it, idle (0-1 s, measured).
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_UI_URL: "",
                                         "flows.heartbeat_frequency": None}):
            try:
                yield server
            finally:
                _send_queued_logs_and_events()  # as prefect_test_harness does before its stop
    finally:
        get_logger().info("Stopping temporary server on %s", server.address)
        server.stop()


def _send_queued_logs_and_events(timeout_s: float = 10) -> None:
    """Send the run's logs and events Prefect still holds in its queues (its workers send them
    on their own schedule) while the temporary server still answers."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout_s)


def _run_flow(flow_fn, params, quiet: bool, server=None):
    """The flow run's final state (once ``server``, the command's temporary Prefect server,
    answers). For this call only: the command's start time (the run's start-up phase), and
    (``quiet``) no tracebacks on the console."""
    from petalflow.tasks.timing import STARTED_ENV

    if server is not None:  # launched at the command's start; Prefect's logging is set up now
        from prefect.logging import get_logger

        from petalflow.temporary_server import ServerError

        get_logger().info("Starting temporary server on %s", server.address)
        try:
            server.wait_ready()
        except ServerError as exc:
            raise explain_failure(exc) from None

    previous = os.environ.get(STARTED_ENV)
    os.environ[STARTED_ENV] = str(_STARTED_AT or time.time())
    added = _console_without_tracebacks() if quiet else []
    try:
        return flow_fn(params, return_state=True)
    finally:
        for handler, filt in added:
            handler.removeFilter(filt)
        if previous is None:
            os.environ.pop(STARTED_ENV, None)
        else:
            os.environ[STARTED_ENV] = previous


def _result(state, verbose: bool):
    """A completed run's result, else RunFailed with the one message for its failure."""
    if not state.is_completed():
        exc = state.result(raise_on_failure=False)
        if verbose and isinstance(exc, BaseException):
            raise exc
        if isinstance(exc, BaseException):
            raise explain_failure(exc)
        raise RunFailed(state.message or f"the run ended {state.name}")
    return state.result()


# The most bytes of inputs handed to the flow as they are: a flow run's parameters hold at
# most 512 KiB in Prefect's API (more: "422 Unprocessable Entity" as the run was created).
INLINE_INPUTS_BYTES = 128 * 1024


@contextmanager
def _inputs_listed(params: PredictParams):
    """``params`` as they are, or, when their inputs are longer than ``INLINE_INPUTS_BYTES``
    (a shell glob's thousands of files), with the inputs in a list file the flow reads
    (``@FILE``), removed when the run is over."""
    if len(json.dumps(params.input)) <= INLINE_INPUTS_BYTES:
        yield params
        return
    import tempfile

    from petalflow.tasks.common import LIST_PREFIX

    fd, name = tempfile.mkstemp(prefix="petalflow-inputs-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("".join(f"{item}\n" for item in params.input))
        yield params.model_copy(update={"input": [LIST_PREFIX + name]})
    finally:
        os.unlink(name)


def cmd_predict(args: argparse.Namespace) -> int:
    """The batch-predict flow, run here (a temporary Prefect server unless PREFECT_API_URL is
    set); the files are checked before anything starts."""
    if not args.input and not args.input_arguments:
        raise UsageError("no images given: name the image files, folders or patterns to "
                         "classify, e.g. petalflow predict photos/ --output predictions.csv "
                         "(or --input photos/)")
    params = params_from_args(PredictParams, args)
    args.output_path = params.output  # a file:/// URL as its path (for ``interrupted_said``)
    from petalflow.tasks.predict import (
        forget_preloaded, iter_inputs, model_uri_of, no_images_message, preload_model,
    )

    if not any(True for _ in iter_inputs(params.input)):
        raise UsageError(f"--input: {no_images_message(params.input)}")
    uri = model_uri_of(params)
    require_store(uri)
    with _prefect_api() as server, _inputs_listed(params) as params:
        with IMPORT_LOCK:  # the preload imports after this thread's Prefect imports
            preload_model(uri)  # TensorFlow's import and the model load overlap the run's start
            _import_run_stack("petalflow.flows.predict_flow")
        from petalflow.flows.predict_flow import batch_predict

        try:
            state = _run_flow(batch_predict, params, quiet=not args.verbose, server=server)
        finally:
            forget_preloaded(uri)
    summary = _result(state, args.verbose)
    from petalflow.tasks.drift import drift_line
    from petalflow.tasks.report import prediction_line

    n = summary["images"]
    print(prediction_line(summary, params.output))
    if params.drift:
        print(drift_line(summary.get("drift")))
    first, done = summary.get("first_written_at"), summary.get("finished_at")
    if args.timing and first:
        started = _STARTED_AT or first
        print(f"timing: first prediction written {first - started:.1f} s after the "
              f"command started; {counted(n, 'image')} in {done - started:.1f} s "
              f"({n / max(done - first, 1e-9):.1f} images/s once the first was written)")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from petalflow.tasks.params import champion_uri, model_uri_problem
    from petalflow.tasks.registry import pinned_model_uri
    from petalflow.tasks.space import disk_full_said

    uri = args.model or champion_uri(args.model_name)
    if problem := model_uri_problem(uri):
        raise UsageError(f"--model: {problem}")
    require_store(uri)
    pinned = pinned_model_uri(uri)  # the version an alias names: pulled, and said
    with disk_full_said("pulling the model",
                        (Path(args.dest).expanduser().absolute().parent, "--dest")):
        return _pull(args, uri, pinned)


def _pull(args: argparse.Namespace, uri: str, pinned: str) -> int:
    from petalflow.tasks.errors import DestinationInUse
    from petalflow.tasks.registry import model_said, pull_edge, pull_model

    if args.format == "tflite":
        try:
            path = pull_edge(pinned, args.dest, args.quantization)
        except DestinationInUse as exc:
            raise UsageError(f"--dest: {exc}") from None
        except FileNotFoundError as exc:
            raise RunFailed(str(exc), "retrain with edge_export on (the default) to get "
                            "edge models", EXIT_FAILED) from None
        except ValueError as exc:
            raise UsageError(f"--model: {exc}") from None
        print(f"saved the {args.quantization} TFLite model of {model_said(uri, pinned)} to "
              f"{path} (labels.txt, edge.json and edge_input.py beside it: input float32 "
              "[1, S, S, 3] in [0, 1], edge_input.model_input(path, S) makes it from an image "
              "file; output class probabilities in labels.txt order)")
        return 0
    try:
        path = pull_model(pinned, args.dest)
    except DestinationInUse as exc:
        raise UsageError(f"--dest: {exc}") from None
    print(f"saved {model_said(uri, pinned)} to {path}; use it offline with: petalflow predict "
          f"--model {path} ...")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    import pandas as pd

    from petalflow.tasks.registry import list_model_versions, unregistered_name_reason

    require_store()
    table = list_model_versions(args.model_name)
    if table.empty:
        print(unregistered_name_reason(args.model_name))
        return 1
    shown = table.drop(columns="alias_reason")  # accuracy as the registration lines say it
    shown["test_accuracy"] = shown["test_accuracy"].map(
        lambda value: "" if pd.isna(value) else f"{value:.4f}")
    with pd.option_context("display.width", 160, "display.max_columns", 10):
        print(shown.to_string(index=False))
    # Why each version that holds an alias got one when it was registered (an alias moved by
    # hand since, in MLflow's UI, keeps the reason of its registration).
    reasons = [f"v{row.version}, {row.aliases}; at registration: {row.alias_reason}"
               for row in table.itertuples() if row.aliases and row.alias_reason]
    if reasons:
        print("", *reasons, sep="\n")
    return 0


# Lines TensorFlow's native code writes to stderr on every start (twice: before and after its
# logger is set up), whatever TF_CPP_MIN_LOG_LEVEL says; and on a machine without an NVIDIA
# device, the CUDA probe's error lines. Kept out of the console, nothing else is.
_TF_BANNER = re.compile(r"All log messages before absl::InitializeLog|port\.cc:\d+\] oneDNN custom "
                        r"operations|cudart_stub\.cc:\d+\] Could not find cuda drivers|"
                        # the TFLite converter and interpreter (edge models), every run
                        r"^fully_quantize: \d+, inference_type|"
                        r"^INFO: Created TensorFlow Lite XNNPACK delegate")
_NO_GPU_NOISE = re.compile(r"cuda_platform\.cc:\d+\] failed call to cuInit|cuda_executor\.cc|"
                           r"cuda_diagnostics\.cc|computation_placer\.cc")


def has_nvidia_device() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


_STDERR_RESTORE: list = []


def filter_native_stderr() -> None:
    """Route file descriptor 2 through a filter that drops TensorFlow's start-up banner (and
    the CUDA probe's errors on a machine without an NVIDIA device); Python's own stderr keeps
    writing to the terminal directly (progress bars still see a TTY)."""
    import threading

    patterns = [_TF_BANNER] + ([] if has_nvidia_device() else [_NO_GPU_NOISE])
    terminal = os.dup(2)
    sys.stderr.flush()
    sys.stderr = os.fdopen(os.dup(terminal), "w", buffering=1, encoding="utf-8",
                           errors="replace")
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                text = line.decode("utf-8", "replace")
                if not any(p.search(text) for p in patterns):
                    os.write(terminal, line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:  # let the last native lines through before the process ends
        os.dup2(terminal, 2)
        thread.join(timeout=1)

    import atexit

    atexit.register(restore)
    _STDERR_RESTORE.append(restore)  # also before an early end (``end_before_side_threads``)


def _environment_defaults() -> None:
    """The process's environment defaults (``ENV_DEFAULTS``), set here at the entry point and
    never at import time; inherited by everything the command starts (the stack's servers,
    workers and their flow runs)."""
    from petalflow.tasks.common import ENV_DEFAULTS

    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # The temporary server's telemetry heartbeat only logs lock errors on SQLite.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


class _NoTracebacks(logging.Filter):
    """Console only: a failure's log line stays, its traceback goes (it is in the run's logs
    on the Prefect server, and --verbose shows it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info or record.exc_text:
            record.exc_info, record.exc_text = None, None
        return True


def _console_without_tracebacks() -> list:
    """Add the filter to the console handlers; returns (handler, filter) pairs to undo it."""
    added = []
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _NoTracebacks) for f in handler.filters):
            filt = _NoTracebacks()
            handler.addFilter(filt)
            added.append((handler, filt))
    return added


def _import_run_stack(flow_module: str) -> None:
    """Import, on this thread, what the flow run will import from Prefect: the flow's module
    and the flow and task engines (``common.IMPORT_LOCK`` says why). Not Prefect's server
    module: the command's temporary server is a process of its own (``_prefect_api``)."""
    import importlib

    importlib.import_module(flow_module)
    importlib.import_module("prefect.flow_engine")
    importlib.import_module("prefect.task_engine")


# Side threads that may be inside TensorFlow's native code when a command ends early
# (interrupted, or failed at once): loading the model to classify with, importing TensorFlow.
_WARM_IMPORTS_THREAD = "warm-imports"
_NATIVE_SIDE_THREADS = (MODEL_PRELOAD_THREAD, _WARM_IMPORTS_THREAD)


def _warm_imports(*modules: str, then: Optional[Callable[[], None]] = None) -> None:
    """Import ``modules`` on a side thread while Prefect's temporary server starts (a
    subprocess): on a small machine this hides several seconds of start-up. ``then`` (which
    must not raise) runs on that thread after them, whether they were imported or not."""
    import importlib
    import threading

    from petalflow.tasks.common import warming

    imported = warming(modules)  # what the run's first imports of them wait for

    def work():
        try:
            with IMPORT_LOCK:
                try:
                    for name in modules:
                        try:
                            importlib.import_module(name)
                        finally:
                            imported[name].set()
                finally:
                    for event in imported.values():  # an import failed: the run's reports it
                        event.set()
                    if then is not None:
                        then()
        except Exception:  # noqa: BLE001 - the real import reports any problem later
            pass
        finally:
            freeze_start_up()

    threading.Thread(target=work, name=_WARM_IMPORTS_THREAD, daemon=True).start()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script. Called with ``argv`` (tests, other Python code), it leaves the
    process's stderr alone; as the ``petalflow`` command it filters TensorFlow's native noise."""
    code = _main(argv)
    if argv is None:
        end_before_side_threads(code)
    return code


def end_before_side_threads(code: int) -> None:
    """Ends the process at once with ``code`` while a side thread still runs TensorFlow's
    native code (Ctrl-C while `petalflow predict` loads its model): as Python shuts down it
    unwinds such threads' stacks, TensorFlow's C++ code catches that and the process aborted
    ("FATAL: exception not rethrown", SIGABRT) after its last line. Logs are flushed first;
    the command has already said how it ended and stopped its temporary server."""
    import threading

    if any(t.is_alive() and t.name in _NATIVE_SIDE_THREADS for t in threading.enumerate()):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        for restore in _STDERR_RESTORE:
            restore()
        os._exit(code)


def _main(argv: Optional[Sequence[str]]) -> int:
    command_line = argv is None
    global _STARTED_AT
    if command_line:  # the command started with its process
        from petalflow.tasks.timing import process_started_at

        _STARTED_AT = process_started_at()
    else:
        _STARTED_AT = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    _environment_defaults()
    if command_line:
        defer_full_collections()  # until the command's imports are done (tasks/common.py)
        if argv[:1] in (["train"], ["predict"]):
            from petalflow.temporary_server import prelaunch

            prelaunch()  # held until Prefect's settings say whether it is needed
    if argv[:1] == ["stack"]:  # petalflow stack up|down|deploy|status
        from petalflow.stack import main as stack_main

        return stack_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "predict" and not any(a.startswith("-") for a in extra):
        args.input_arguments += extra  # images named after an option: photos/ --output p.csv b/
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if command_line and not getattr(args, "verbose", False):
        filter_native_stderr()
    if command_line:
        import signal

        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        commands = {"train": cmd_train, "predict": cmd_predict, "pull": cmd_pull,
                    "models": cmd_models}
        return commands[args.command](args)
    except UsageError as exc:
        print(f"petalflow {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, Terminated) as exc:
        if getattr(args, "verbose", False):
            raise
        ended, code = (("interrupted", EXIT_INTERRUPTED) if isinstance(exc, KeyboardInterrupt)
                       else ("terminated (SIGTERM)", EXIT_TERMINATED))
        print(f"petalflow {args.command}: {ended}{interrupted_said(args)}", file=sys.stderr)
        return code
    except RunFailed as exc:
        failed = exc
    except Exception as exc:  # noqa: BLE001 - pull and models call MLflow directly
        if getattr(args, "verbose", False):
            raise
        failed = explain_failure(exc)
    print(f"petalflow {args.command}: error: {failed}", file=sys.stderr)
    if failed.hint:
        print(f"hint: {failed.hint}", file=sys.stderr)
    # A run that failed at once (its data) ends once the side thread has made the MLflow store
    # it was making (a new store appears only whole): it is there, as the README says.
    # Ctrl-C (or SIGTERM) during that wait, the error already said, ends it at once with the
    # failure's status: the store is made whole or not at all (``create_sqlite_store``), and
    # the next command removes a part one.
    registry = sys.modules.get("petalflow.tasks.registry")
    if registry is not None:
        try:
            registry.wait_for_store(timeout_s=120)
        except (KeyboardInterrupt, Terminated):
            pass
    return failed.code


def interrupted_said(args: argparse.Namespace) -> str:
    """What an interrupted command (Ctrl-C, SIGTERM) left, after "interrupted": a train run ends as
    crashed (its MLflow run marked failed by the flow's hook) and keeps what it finished for the
    next; predict's output is written whole or not at all (``tasks.predict``: a ``.part``
    renamed when complete, discarded otherwise)."""
    if args.command == "train" and not getattr(args, "run_started", False):
        return " before its run started"
    if args.command == "train":
        return (": the run ended as crashed; the same command again reuses what it had done "
                "(the download, the scan, computed features, finished epochs)")
    if args.command == "predict" and getattr(args, "output", None):
        output = Path(getattr(args, "output_path", args.output)).expanduser()
        written = output.is_file() and _STARTED_AT is not None \
            and output.stat().st_mtime >= _STARTED_AT
        return (f": {args.output} was written whole before it" if written else
                f": nothing was written to {args.output} (no part of a file either)")
    return ""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
