"""Faults injected on purpose: a flaky or dead download server, interrupted downloads."""

from __future__ import annotations

import hashlib
import http.server
import socketserver
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import make_dataset, make_tgz


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

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/data.tgz", handler
    finally:
        server.shutdown()
        server.server_close()


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

    from tasks.download import download_archive_task

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
    files = [p for p in (tmp_path / "dl").rglob("*") if p.is_file() and p.name != ".lock"]
    assert files == [path]  # one intact archive, no .part left
    # The second and third requests resumed from where the partial file ended.
    assert handler.log[0] is None and handler.log[1] and handler.log[2]
    run = _read_task_run(state.state_details.task_run_id)
    assert run.run_count == 3  # two retries, visible on the task run


def test_server_that_always_fails_ends_failed_naming_the_url(prefect_harness, tmp_path,
                                                             archive_bytes):
    from prefect import flow

    from tasks.download import download_archive_task

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
    from tasks.download import download_archive

    sha = hashlib.sha256(archive_bytes).hexdigest()
    target = tmp_path / "dl" / sha / "data.tgz"
    target.parent.mkdir(parents=True)
    target.with_name("data.tgz.part").write_bytes(archive_bytes[:1000])  # what a kill leaves
    with flaky_server(archive_bytes) as (url, handler):
        got = download_archive(url, tmp_path / "dl", sha)
    assert got == target and hashlib.sha256(got.read_bytes()).hexdigest() == sha
    assert handler.log == ["bytes=1000-"]
    assert not target.with_name("data.tgz.part").exists()
