"""Faults injected on purpose: a flaky or dead download server, interrupted downloads."""

from __future__ import annotations

import hashlib
import http.server
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import base_url, make_dataset, make_tgz, serve_handler


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Serves one file with Range support; the first `drops` answers are cut off mid-transfer,
    and with `always_fail` every answer is a 503."""

    payload = b""
    drops = 0
    always_fail = False
    log: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server API
        cls = type(self)
        cls.log.append(self.headers.get("Range"))
        if cls.always_fail:
            self.send_error(503, "Service Unavailable")
            return
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
        body = cls.payload[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(cls.payload) - 1}/"
                                              f"{len(cls.payload)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if cls.drops > 0:
            cls.drops -= 1
            self.wfile.write(body[: len(body) // 3])  # then drop the connection
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@contextmanager
def flaky_server(payload: bytes, drops: int = 0, always_fail: bool = False):
    handler = type("Handler", (_Flaky,), {"payload": payload, "drops": drops,
                                           "always_fail": always_fail, "log": []})
    with serve_handler(handler) as server:
        yield f"{base_url(server)}/data.tgz", handler


@pytest.fixture(scope="module")
def archive_bytes(tmp_path_factory) -> bytes:
    tmp = tmp_path_factory.mktemp("flaky")
    return make_tgz(make_dataset(tmp / "src", per_class=4), tmp / "data.tgz").read_bytes()


def _read_task_run(task_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_task_run(task_run_id)


def test_connection_dropped_twice_then_resumed(prefect_harness, tmp_path, archive_bytes):
    from prefect import flow

    from petalflow.tasks.download import download_archive_task

    sha = hashlib.sha256(archive_bytes).hexdigest()
    quick = download_archive_task.with_options(retry_delay_seconds=[0.1, 0.1, 0.1, 0.1])

    @flow
    def fetch(url: str):
        return quick(url, str(tmp_path / "dl"), sha, return_state=True)

    with flaky_server(archive_bytes, drops=2) as (url, handler):
        state = fetch(url)
    assert state.is_completed()
    path = Path(state.result())
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    files = [p for p in (tmp_path / "dl").rglob("*")
             if p.is_file() and p.name not in (".lock", "source.json")]
    assert files == [path]  # one intact archive, no .part left
    # The second and third requests resumed from where the partial file ended.
    assert handler.log[0] is None and handler.log[1] and handler.log[2]
    run = _read_task_run(state.state_details.task_run_id)
    assert run.run_count == 3  # two retries, visible on the task run


def test_server_that_always_fails_ends_failed_naming_the_url(prefect_harness, tmp_path,
                                                             archive_bytes):
    from prefect import flow

    from petalflow.tasks.download import download_archive_task

    quick = download_archive_task.with_options(retries=2, retry_delay_seconds=0)

    @flow
    def fetch(url: str):
        return quick(url, str(tmp_path / "dl"), None)

    with flaky_server(archive_bytes, always_fail=True) as (url, handler):
        state = fetch(url, return_state=True)
    assert state.is_failed()
    assert url in state.message or url in str(state.result(raise_on_failure=False))
    assert len(handler.log) == 3  # the configured attempts, no more
    assert not [p for p in (tmp_path / "dl").rglob("*") if p.is_file() and p.name != ".lock"]


def test_partial_file_from_a_killed_run_is_resumed(tmp_path, archive_bytes):
    from petalflow.tasks.download import download_archive

    sha = hashlib.sha256(archive_bytes).hexdigest()
    target = tmp_path / "dl" / sha / "data.tgz"
    target.parent.mkdir(parents=True)
    target.with_name("data.tgz.part").write_bytes(archive_bytes[:1000])  # what a kill leaves
    with flaky_server(archive_bytes) as (url, handler):
        got = download_archive(url, tmp_path / "dl", sha)
    assert got == target and hashlib.sha256(got.read_bytes()).hexdigest() == sha
    assert handler.log == ["bytes=1000-"]
    assert not target.with_name("data.tgz.part").exists()


def test_huge_image_dimensions_are_quarantined_without_decoding(tmp_path):
    """A PNG whose header claims 20000x20000 pixels is refused from its header alone."""
    import struct
    import zlib

    from petalflow.tasks.dataset import scan_dataset

    root = make_dataset(tmp_path / "d", per_class=3)
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    png = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
           + struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", 0) + b"IEND"
           + struct.pack(">I", zlib.crc32(b"IEND")))
    (root / "red" / "huge.png").write_bytes(png)
    m = scan_dataset(root).set_index("path")
    assert m.loc["red/huge.png", "status"] == "quarantined"
    assert m.loc["red/huge.png", "reason"].startswith("image too large (20000x20000")


KILL_SCRIPT = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[4])
from petalflow.tasks.params import TrainParams
from petalflow.tasks.train import train_model
info = json.loads(open(sys.argv[1]).read())
cfg = TrainParams(backbone=sys.argv[2], image_size=32, epochs=5, batch_size=8,
                  learning_rate=0.05)
def hook(epoch, total, metrics):
    if epoch == 2:
        open(sys.argv[3], "w").write("2")
        time.sleep(600)  # killed here, mid-run, with a process still holding the lock
train_model(info, cfg, __import__("pathlib").Path(sys.argv[5]), on_epoch_end=hook)
"""


def test_killed_training_process_resumes_from_its_last_checkpoint(tmp_path, tiny_backbone):
    """SIGKILL a real training process after epoch 2; the rerun resumes at epoch 3."""
    import json
    import signal
    import subprocess
    import sys
    import time

    from petalflow.tasks.dataset import prepare_dataset
    from petalflow.tasks.params import TrainParams
    from petalflow.tasks.train import train_model

    info = prepare_dataset(make_dataset(tmp_path / "d", per_class=10), tmp_path / "m",
                           0.2, 0.2, 0)
    info_path = tmp_path / "info.json"
    info_path.write_text(json.dumps(info))
    flag = tmp_path / "epoch2"
    repo = str(Path(__file__).resolve().parent.parent)
    workdir = tmp_path / "runs" / "key" / "run-killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(info_path),
                             str(tiny_backbone), str(flag), repo, str(workdir)])
    try:
        deadline = time.time() + 180
        while not flag.exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (workdir / "train.json").exists()
    cfg = TrainParams(backbone=str(tiny_backbone), image_size=32, epochs=5, batch_size=8,
                      learning_rate=0.05)
    epochs = []
    record = train_model(info, cfg, workdir.parent / "run-rerun",
                         on_epoch_end=lambda e, t, m: epochs.append(e))
    assert record["seeded_from"] == str(workdir)
    assert record["resumed_from_epoch"] == 2 and epochs == [3, 4, 5]


class _AnswersWith(http.server.BaseHTTPRequestHandler):
    """Answers every request with ``status`` and ``body`` (JSON when it is a dict)."""

    status, body = 503, "Service Unavailable"

    def log_message(self, *args):
        pass

    def _answer(self):
        import json

        cls = type(self)
        text = json.dumps(cls.body) if isinstance(cls.body, dict) else cls.body
        data = text.encode()
        self.send_response(cls.status)
        self.send_header("Content-Type", "application/json" if isinstance(cls.body, dict)
                         else "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer  # noqa: N815 - http.server API


def test_mlflow_calls_are_retried_on_io_that_may_pass_and_on_nothing_else(
        tmp_path, monkeypatch):
    """The MLflow tasks' retry condition, on what real MLflow calls raise: a server that is
    down, one (or a proxy) answering 5xx or 429, a SQL store busy are retried; refused
    credentials, a missing model, a 4xx, an error MLflow raises before any request (a URI it
    cannot use: 3 retries took 43 s to say so) and errors that are not I/O (a TensorFlow or a
    Python error in the evaluation of the champion) are not."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from petalflow.tasks.registry import is_transient_io_error

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

    def raised(tracking_uri: str, call=lambda c: c.get_registered_model("m")):
        with pytest.raises(Exception) as info:
            call(MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri))
        return info.value

    from petalflow.temporary_server import free_port

    assert is_transient_io_error(raised(f"http://127.0.0.1:{free_port()}"))  # refused
    answers = [
        ((503, "Service Unavailable"), True), ((502, "<html>Bad Gateway</html>"), True),
        ((429, "slow down"), True),
        ((500, {"error_code": "INTERNAL_ERROR", "message": "database is down"}), True),
        ((503, {"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}), True),
        ((401, "Unauthorized"), False), ((403, "Forbidden"), False),
        ((401, {"error_code": "UNAUTHENTICATED", "message": "who are you"}), False),
        ((404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no model m"}), False),
        ((400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "bad name"}), False),
        ((404, "Not Found"), False),
    ]
    for (status, body), transient in answers:
        handler = type("Handler", (_AnswersWith,), {"status": status, "body": body})
        with serve_handler(handler) as server:
            exc = raised(base_url(server))
        assert is_transient_io_error(exc) is transient, (status, body, exc)
    # A SQL store that is busy: MLflow's code for SQLAlchemy's OperationalError.
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    assert is_transient_io_error(
        MlflowException("database is locked", error_code=TEMPORARILY_UNAVAILABLE))
    # Raised before any request: an artifact URI the store's client cannot use (a server's
    # mlflow-artifacts:/ location read through a SQLite URI whose store is not there).
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    elsewhere = f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"
    with pytest.raises(MlflowException, match="must be a valid http or https URI") as info:
        get_artifact_repository("mlflow-artifacts:/1/m", tracking_uri=elsewhere) \
            .download_artifacts("m", str(tmp_path))
    assert not is_transient_io_error(info.value)
    assert not is_transient_io_error(MlflowException("no such flavor"))
    assert not is_transient_io_error(ValueError("exported model's classes differ"))
    assert not is_transient_io_error(KeyError("test_accuracy"))
    assert not is_transient_io_error(FileNotFoundError("champion/MLmodel"))
    # Prefect's client (report-drift's artifact and event): httpx's errors.
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1:4200/api/artifacts/")
    assert is_transient_io_error(httpx.ConnectError("refused", request=request))
    for status, transient in ((503, True), (500, True), (429, True), (422, False),
                              (404, False)):
        error = httpx.HTTPStatusError("", request=request,
                                      response=httpx.Response(status, request=request))
        assert is_transient_io_error(error) is transient, status
