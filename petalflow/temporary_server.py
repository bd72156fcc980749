"""Prefect's temporary server for one ``petalflow train`` / ``predict`` command, started at the
command's first moment.

Without a Prefect API (no ``PREFECT_API_URL`` in the environment or the active profile), Prefect
starts a temporary server itself, but only when the flow run asks for a client: after this
process has imported Prefect's server module (~1.4 s of imports, needed only to launch it) and
everything before it; the server then needs ~3 s of its own to answer. Launched here instead
(the same app and uvicorn options, environment and settings as Prefect's launcher,
``prefect.server.api.server.SubprocessASGIServer``), it starts while this process imports
Prefect, MLflow and TensorFlow, and this process never imports the server module. The command
points its run at it (``temporary_settings``), waits for its health check just before the run,
and stops it when it ends; on Linux the server also ends when the command is killed (the
kernel's parent-death signal, set by the server process for the thread that launched it: the
command's main thread).

The console script launches it earlier still, held (``prelaunch``): as the command starts, before
this process has imported Prefect (0.7 s) to read its settings, unless the environment, the
active profile or the folder's ``.env``, ``prefect.toml`` or ``pyproject.toml`` names a Prefect
API. A held server imports its modules, then waits for a line on
its standard input before it touches the database or a port: ``start_if_needed`` lets it go when
Prefect's settings want a temporary server, and otherwise closes its input, and it exits having
done nothing but imports (as it does when the command ends first).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Optional

# uvicorn's exit status when it could not start: its port was taken meanwhile (then launch
# again on another port, as Prefect does) or the app failed to start (reported).
_STARTUP_FAILURE = 3
_ATTEMPTS = 5
_HOLD, _GO = "--held", b"go\n"  # a held server waits for this line before it starts
_PRELAUNCHED: list = []  # the console script's held server, until start_if_needed takes it


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _taken(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def _healthy(port: int) -> bool:
    """Whether the API on loopback ``port`` answers its health check. Plain HTTP with the
    standard library: an httpx client builds a TLS context first (certifi's bundle, ~40 ms of
    the command's start-up) that a loopback health check never uses."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/api/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class ServerError(RuntimeError):
    """The temporary server exited or did not answer in time."""


class TemporaryServer:
    """One uvicorn process serving Prefect's API (no UI) on a free loopback port."""

    def __init__(self, settings_env: dict, startup_timeout_s: float, held: bool = False):
        self._settings_env = settings_env
        self.startup_timeout_s = startup_timeout_s
        self.process: Optional[subprocess.Popen] = None
        self.port = 0
        self._launch(held)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.address}/api"

    def _launch(self, held: bool = False) -> None:
        self.port = free_port()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1", **self._settings_env}
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "petalflow.temporary_server", str(self.port),
             str(os.getpid())] + ([_HOLD] if held else []), env=env,
            stdin=subprocess.PIPE if held else None, start_new_session=True)

    def release(self, startup_timeout_s: float) -> None:
        """Let a held server start (``prelaunch``)."""
        self.startup_timeout_s = startup_timeout_s
        try:
            self.process.stdin.write(_GO)
            self.process.stdin.close()
        except OSError:  # it has exited: wait_ready reports its status
            pass

    def cancel(self) -> None:
        """A held server that is not needed exits without starting."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        self.process = None

    def wait_ready(self) -> None:
        """Until the API answers its health check; a clear error if the server exits or does
        not answer within its start-up timeout."""
        timeout_s = self.startup_timeout_s
        deadline = time.monotonic() + timeout_s
        attempts = 1
        while True:
            code = self.process.poll()
            if code == _STARTUP_FAILURE and _taken(self.port) and attempts < _ATTEMPTS:
                attempts += 1
                self._launch()
                continue
            if code is not None:
                raise ServerError(f"Prefect's temporary server exited with status {code} "
                                   "before it answered (its error is above)")
            if _healthy(self.port):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"Prefect's temporary server did not answer within "
                                   f"{timeout_s:.0f} s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def _not_a_cancellation(record: logging.LogRecord) -> bool:
    """False for a record of a cancellation (its exception a ``CancelledError``)."""
    error = record.exc_info[1] if record.exc_info else None
    return not isinstance(error, asyncio.CancelledError)


def quiet_cancellations(handlers: list) -> None:
    """Keep the server's cancellations, with their tracebacks, off ``handlers`` (the command's
    console). Stopped as its command ends, the server cancels its services, and one still
    writing the run's last events logged ERRORs and tracebacks (Prefect's task run recorder:
    "Error flushing 1 events (1 to retry, 0 dropped)"; SQLAlchemy's pool: "Exception during
    reset or similar") after the command's own last line, an error message included; nothing
    the command needed is lost (its run is over). Prefect's services retry a write that a
    database driver cancelled, and an event dropped after its retries still says so."""
    for handler in handlers:
        handler.addFilter(_not_a_cancellation)  # (added once however often this is called)


def create_app():
    """Prefect's API app (``prefect.server.api.server:create_app``, which sets up Prefect's
    logging after uvicorn's), its services' cancellation kept off the console."""
    from prefect.server.api.server import create_app as prefect_app

    app = prefect_app()
    quiet_cancellations(logging.getLogger().handlers)
    return app


def _serve(port: int, parent: int, held: bool = False) -> None:
    """The server process: Prefect's API app under uvicorn, as Prefect's launcher runs it
    (``uvicorn --factory prefect.server.api.server:create_app --log-level error --lifespan
    on``; its app through ``create_app`` here, which adds a logging filter), which also ends
    when the command's process ends, however it ends: a command killed by a signal runs no
    clean-up, and Prefect's own temporary server outlived it (holding its port and its
    database)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the command ended before the line above
        sys.exit(0)
    from petalflow.tasks.common import defer_full_collections, freeze_start_up

    # Importing Prefect's server creates several hundred thousand objects, which each automatic
    # full collection scans again: ~0.5 s of the 3.4 s before the server answered here
    # (BENCHMARKS.md, "The temporary server's start"). Deferred, then what the imports made is
    # frozen, as the command's own process does (its uncollected start-up garbage: no change in
    # RSS).
    defer_full_collections()
    import prefect.server.api.server  # noqa: F401 - the imports (creates no file)
    import uvicorn

    freeze_start_up(collect=False)
    if held and sys.stdin.buffer.readline() != _GO:  # not needed, or the command ended
        sys.exit(0)  # nothing done
    uvicorn.run("petalflow.temporary_server:create_app", factory=True, host="127.0.0.1",
                port=port, log_level="error", lifespan="on")


def start_if_needed() -> Optional[TemporaryServer]:
    """The temporary server, launched now, when Prefect has no API configured and may start
    one (``PREFECT_SERVER_ALLOW_EPHEMERAL_MODE``); else None. The caller points Prefect at
    ``api_url`` and stops it."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    held = _PRELAUNCHED.pop() if _PRELAUNCHED else None
    if settings.api.url or not settings.server.ephemeral.enabled:
        if held is not None:
            held.cancel()
        return None
    timeout_s = settings.server.ephemeral.startup_timeout_seconds
    if held is not None:
        held.release(timeout_s)
        return held
    return TemporaryServer(settings.to_environment_variables(exclude_unset=True), timeout_s)


def prelaunch() -> None:
    """Launch the temporary server held, for ``start_if_needed`` to let go or cancel; not when
    the environment, the active profile (``_api_in_profile``) or the folder's settings files
    (``_api_in_files``) name a Prefect API. For the
    console script's process only, as it starts: the server gets this process's environment,
    and Prefect's settings come from it and the same files (a caller in a process that changed
    them, with ``temporary_settings``, gets a server launched with them by start_if_needed)."""
    if (os.environ.get("PREFECT_API_URL") or _api_in_profile() or _api_in_files()
            or _PRELAUNCHED):
        return
    _PRELAUNCHED.append(TemporaryServer({}, 0.0, held=True))


def _api_in_profile() -> bool:
    """Whether Prefect's active profile sets ``PREFECT_API_URL`` (read as Prefect reads it:
    ``PREFECT_PROFILES_PATH``, else ``profiles.toml`` in ``PREFECT_HOME``; the profile named by
    ``PREFECT_PROFILE``, else the file's ``active``). Only to skip a launch that would be
    cancelled: what Prefect's settings say decides (``start_if_needed``)."""
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    name = os.environ.get("PREFECT_PROFILE") or data.get("active") or "ephemeral"
    profile = data.get("profiles", {}).get(name, {})
    return bool(isinstance(profile, dict) and profile.get("PREFECT_API_URL"))


def _api_in_files() -> bool:
    """Whether the files Prefect also reads settings from, in the folder the command runs in,
    name an API: ``.env`` (``PREFECT_API_URL=``), ``prefect.toml`` (``[api] url``),
    ``pyproject.toml`` (``[tool.prefect.api] url``). Like ``_api_in_profile``, only to skip a
    launch that would be cancelled."""
    import re
    import tomllib

    try:
        dotenv = Path(".env").read_text(encoding="utf-8", errors="replace")
    except OSError:
        dotenv = ""
    if re.search(r"^\s*(?:export\s+)?PREFECT_API_URL\s*=\s*['\"]?[^\s'\"#]", dotenv,
                 re.MULTILINE):
        return True
    for name, table in (("prefect.toml", ()), ("pyproject.toml", ("tool", "prefect"))):
        try:
            data = tomllib.loads(Path(name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in (*table, "api"):
            data = data.get(key) if isinstance(data, dict) else None
        if isinstance(data, dict) and data.get("url"):
            return True
    return False


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]), held=sys.argv[3:] == [_HOLD])
