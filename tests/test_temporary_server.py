"""Prefect's temporary server, launched by the command itself (petalflow.temporary_server): real
uvicorn processes serving Prefect's API, each test in its own Python process (the tests' shared
Prefect harness would otherwise be the configured API)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Prints, as JSON: whether a server was launched, its health answer, the port(s) it used, and
# whether its process is gone after stop().
PROBE = """
import json, os, socket, sys
import httpx
from petalflow import temporary_server as ts

busy = None
if sys.argv[1] == "busy-port":  # the first port it picks is taken before uvicorn binds it
    busy = socket.socket(); busy.bind(("127.0.0.1", 0)); busy.listen()
    ports = [busy.getsockname()[1]]
    real = ts.free_port
    ts.free_port = lambda: ports.pop() if ports else real()
server = ts.start_if_needed()
if server is None:
    print(json.dumps(None)); sys.exit(0)
first = server.process
server.wait_ready()
health = httpx.get(server.api_url + "/health").status_code
pid = server.process.pid
server.stop()
try:
    os.kill(pid, 0); gone = False
except ProcessLookupError:
    gone = True
print(json.dumps({"health": health, "port": server.port, "gone": gone,
                  "busy": busy.getsockname()[1] if busy else None,
                  "first_status": first.poll() if first is not server.process else None}))
"""


def _probe(env: dict, mode: str = "") -> dict | None:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_without_a_prefect_api_the_server_starts_answers_and_stops():
    got = _probe({"PREFECT_API_URL": ""})
    assert got["health"] == 200 and got["gone"] is True


@pytest.mark.parametrize("env", [{"PREFECT_API_URL": "http://127.0.0.1:9/api"},
                                 {"PREFECT_API_URL": "",
                                  "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false"}])
def test_no_server_with_a_prefect_api_or_when_ephemeral_mode_is_off(env):
    assert _probe(env) is None


# A flow run through the command's own wiring (cli._prefect_api, cli._run_flow); prints, as
# JSON, whether a temporary server was used and the heartbeat period its flow run saw.
HEARTBEAT_PROBE = """
import json
from prefect import flow
from prefect.settings import get_current_settings
from petalflow.flows import cli

@flow
def probe(params: dict):
    return get_current_settings().flows.heartbeat_frequency

with cli._prefect_api() as server:
    if server is None:  # a configured API: no run needed, the settings are the process's
        seen = get_current_settings().flows.heartbeat_frequency
    else:
        seen = cli._run_flow(probe, {}, quiet=True, server=server).result()
print(json.dumps({"server": server is not None, "heartbeat": seen}))
"""


def test_runs_on_the_temporary_server_send_no_heartbeats_runs_on_a_real_one_do():
    """Heartbeats let a lasting server mark runs whose process died as Crashed (the stack's
    automation); the temporary server ends with the command, and the end of each flow run
    waited up to a second for Prefect's heartbeat thread."""
    def probe(env):
        out = subprocess.run([sys.executable, "-c", HEARTBEAT_PROBE], capture_output=True,
                             text=True, env={**os.environ, **env}, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert probe({"PREFECT_API_URL": ""}) == {"server": True, "heartbeat": None}
    assert probe({"PREFECT_API_URL": "http://127.0.0.1:9/api",
                  "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}) == {"server": False,
                                                                  "heartbeat": 30}


# A flow run of many tasks through the command's own wiring, the server stopped as soon as it
# ends (the command's last moment), while the server still writes the tasks' last events.
STOP_PROBE = """
from prefect import flow, task
from petalflow.flows import cli

@task
def step(i):
    return i

@flow
def many_tasks(params: dict):
    for i in range(40):
        step(i)

with cli._prefect_api() as server:
    cli._run_flow(many_tasks, {}, quiet=True, server=server).result()
print("done")
"""


def test_the_server_stopped_as_the_command_ends_prints_no_traceback():
    """Stopped while its services still wrote the run's last events, the server logged ERRORs
    with tracebacks of their cancellation after the command's last line (CI caught it under
    `petalflow train`'s one-line error for a sign-in page): now nothing but the command's own
    lines."""
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", STOP_PROBE], capture_output=True, text=True,
                             env={**os.environ, "PREFECT_API_URL": ""}, timeout=300)
        assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr[-3000:]
        assert "Traceback" not in out.stderr and "ERROR" not in out.stderr, out.stderr[-3000:]


def test_a_port_taken_before_uvicorn_binds_it_means_another_port_as_prefect_does():
    got = _probe({"PREFECT_API_URL": ""}, "busy-port")
    assert got["health"] == 200 and got["gone"] is True
    assert got["port"] != got["busy"]
    assert got["first_status"] == 3  # uvicorn's start-up failure: the taken port


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal")
def test_the_server_ends_when_the_command_is_killed():
    """A command killed outright (SIGKILL: no clean-up runs) leaves no server behind."""
    import time

    code = ("import os, signal; from petalflow import temporary_server as ts; "
            "s = ts.start_if_needed(); s.wait_ready(); print(s.process.pid, flush=True); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    # (the server shares the command's stdout: read its pid, then wait for the command only)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PREFECT_API_URL": ""})
    pid = int(proc.stdout.readline())
    assert proc.wait(timeout=300) == -9
    proc.stdout.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, 9)
    pytest.fail(f"the temporary server (pid {pid}) outlived the killed command")


def test_a_server_that_cannot_start_fails_the_command_clearly_and_writes_nothing(
        workspace, tmp_path):
    """The temporary server's database cannot be opened: one message naming the temporary
    server, a hint, exit status 1, no traceback, no predictions file, the input untouched."""
    from pathlib import Path

    from tests.helpers import write_image

    image = workspace / "in" / "a.jpg"
    write_image(image, (200, 30, 30), seed=1)
    before = image.read_bytes()
    from petalflow.tasks.registry import create_sqlite_store

    store = f"sqlite:///{workspace / 'mlflow.db'}"
    create_sqlite_store(store)  # a model store
    exe = Path(sys.executable).with_name("petalflow")
    proc = subprocess.run(
        [str(exe), "predict", "--input", str(workspace / "in"), "--output",
         str(workspace / "p.csv"), "--model-name", "any"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PREFECT_API_URL": "", "MLFLOW_TRACKING_URI": store,
             "PREFECT_SERVER_DATABASE_CONNECTION_URL":
                 f"sqlite+aiosqlite:///{tmp_path}/no/such/folder/prefect.db"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count("petalflow predict: error: Prefect's temporary server exited "
                             "with status 3 before it answered") == 1, proc.stderr[-3000:]
    assert "unable to open database file" in proc.stderr  # the server's own error, above
    assert proc.stderr.strip().splitlines()[-2:] == [
        "petalflow predict: error: Prefect's temporary server exited with status 3 before it "
        "answered (its error is above)",
        "hint: or run against a Prefect server: set PREFECT_API_URL (`petalflow stack up` "
        "starts one)"]
    assert list(workspace.glob("p.csv*")) == []
    assert image.read_bytes() == before


# The console script's held server (temporary_server.prelaunch): prints, as JSON, what was
# in the Prefect home (its database) while it was held, and after start_if_needed decided.
HELD_PROBE = """
import json, os, sys, time
import httpx
from petalflow import temporary_server as ts

home = os.environ["PREFECT_HOME"]
ts.prelaunch()
if not ts._PRELAUNCHED:
    print(json.dumps(None)); sys.exit(0)
held = ts._PRELAUNCHED[0]
process = held.process
time.sleep(float(sys.argv[1]))  # longer than a server takes to start and answer
while_held = sorted(os.listdir(home))
if sys.argv[2] == "not-needed":  # Prefect's settings, read after the launch, say no server
    os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"
server = ts.start_if_needed()
out = {"while_held": while_held, "server": server.process is process if server else None}
if server is not None:
    server.wait_ready()
    out["health"] = httpx.get(server.api_url + "/health").status_code
    out["after"] = sorted(os.listdir(home))
    server.stop()
else:
    out["status"] = process.wait(timeout=120)
    out["after"] = sorted(os.listdir(home))
print(json.dumps(out))
"""


def _held_probe(tmp_path, mode: str, **env) -> dict | None:
    home = tmp_path / "prefect-home"
    home.mkdir()
    out = subprocess.run([sys.executable, "-c", HELD_PROBE, "8", mode], capture_output=True,
                         text=True, timeout=300,
                         env={**os.environ, "PREFECT_API_URL": "", "PREFECT_HOME": str(home),
                              **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_held_server_starts_only_when_let_go(tmp_path):
    """Launched as the command starts, it imports and waits: no database, no port, until
    Prefect's settings (read later by the command) want a temporary server."""
    got = _held_probe(tmp_path, "needed")
    assert got["while_held"] == []
    assert got["server"] is True and got["health"] == 200
    assert "prefect.db" in got["after"]


def test_a_held_server_that_is_not_needed_exits_having_done_nothing(tmp_path):
    got = _held_probe(tmp_path, "not-needed")
    assert got == {"while_held": [], "server": None, "status": 0, "after": []}


def test_no_held_server_when_the_environment_or_the_active_profile_names_an_api(tmp_path):
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "http://127.0.0.1:9/api"\n\n'
        '[profiles.local]\nPREFECT_LOGGING_LEVEL = "INFO"\n')
    for env in ({"PREFECT_HOME": str(home)},
                {"PREFECT_PROFILES_PATH": str(home / "profiles.toml")},
                {"PREFECT_API_URL": "http://127.0.0.1:9/api"}):
        code = ("import json; from petalflow import temporary_server as ts; ts.prelaunch(); "
                "print(json.dumps(len(ts._PRELAUNCHED)))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PREFECT_API_URL": "", **env})
        assert out.returncode == 0 and out.stdout.strip() == "0", (env, out.stderr[-2000:])
    # The folder's settings files, which Prefect reads too (a held server launched there
    # imported for ~2 s on the other core, then exited unused).
    code = ("import json; from petalflow import temporary_server as ts; ts.prelaunch(); "
            "from prefect.settings import get_current_settings as s; "
            "print(json.dumps([len(ts._PRELAUNCHED), s().api.url])); "
            "ts._PRELAUNCHED and ts._PRELAUNCHED[0].cancel()")
    for name, text in ((".env", "# team server\nexport PREFECT_API_URL='http://127.0.0.1:9/api'\n"),
                       ("prefect.toml", '[api]\nurl = "http://127.0.0.1:9/api"\n'),
                       ("pyproject.toml", '[project]\nname = "x"\n\n[tool.prefect.api]\n'
                                          'url = "http://127.0.0.1:9/api"\n'),
                       (".env", "PREFECT_LOGGING_LEVEL=INFO\n# PREFECT_API_URL=http://x/api\n")):
        folder = tmp_path / f"folder-{name}-{len(text)}"
        folder.mkdir()
        (folder / name).write_text(text)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120, cwd=folder,
                             env={**{k: v for k, v in os.environ.items()
                                     if k != "PREFECT_API_URL"},
                                  "PREFECT_HOME": str(tmp_path / "empty-home")})
        assert out.returncode == 0, out.stderr[-2000:]
        launched, api = json.loads(out.stdout.strip().splitlines()[-1])
        assert (launched, api) == ((0, "http://127.0.0.1:9/api") if "9/api" in text
                                   and "# PREFECT" not in text else (1, None)), (name, out.stdout)
    # Another profile made active: launched held (then, not let go, it exits).
    other = subprocess.run(
        [sys.executable, "-c", "from petalflow import temporary_server as ts; ts.prelaunch(); "
         "print(len(ts._PRELAUNCHED)); ts._PRELAUNCHED[0].cancel()"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PREFECT_API_URL": "", "PREFECT_HOME": str(home),
             "PREFECT_PROFILE": "local"})
    assert other.returncode == 0 and other.stdout.strip() == "1", other.stderr[-2000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_command_refused_before_work_leaves_no_server_and_no_database(tmp_path):
    """The console script launches the held server before it reads its options: a bad option
    ends the command, and the held server with it, having started nothing."""
    import time
    from pathlib import Path

    home = tmp_path / "prefect-home"
    home.mkdir()
    exe = Path(sys.executable).with_name("petalflow")
    proc = subprocess.run([str(exe), "train", "--data-url", str(tmp_path), "--epochs", "0"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PREFECT_API_URL": "", "PREFECT_HOME": str(home)})
    assert proc.returncode == 2 and "--epochs" in proc.stderr

    def servers() -> list[int]:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if (entry.name.isdigit() and b"petalflow.temporary_server" in
                        (entry / "cmdline").read_bytes() and
                        f"PREFECT_HOME={home}".encode() in (entry / "environ").read_bytes()):
                    found.append(int(entry.name))
            except OSError:
                pass
        return found

    deadline = time.monotonic() + 30
    while servers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert servers() == [] and list(home.iterdir()) == []
