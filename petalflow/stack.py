"""Run the petalflow stack on one machine: Prefect server + MLflow tracking server, the ``cpu``
and ``gpu`` process work pools with one worker each, and the deployments of deployment.yaml.

    petalflow stack up [--prefect-port 4200] [--mlflow-port 5000]   # start all, wait for health
    petalflow stack up --database postgres       # both servers on a private PostgreSQL cluster
    petalflow stack up --database postgresql://USER:PASSWORD@HOST:PORT   # ... or on your server
    petalflow stack deploy                                          # (re)deploy deployment.yaml
    petalflow stack status
    petalflow stack down                                            # stop all cleanly

Everything binds to 127.0.0.1 unless ``--host`` says otherwise. With
``PREFECT_SERVER_API_AUTH_STRING`` set, the Prefect server requires it (workers and the CLI get it
as ``PREFECT_API_AUTH_STRING``); with ``MLFLOW_AUTH_ADMIN_PASSWORD`` set, MLflow runs its
basic-auth app (admin user ``admin``; clients use ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``). State lives in ``--stack-dir``
(default ``.petalflow/stack``): ``prefect/`` (PREFECT_HOME, SQLite database), ``logs/*.log``,
``pids/*.pid`` and ``env`` (the variables a shell needs to talk to the stack). MLflow keeps its
SQLite backend and artifacts under ``mlflow/``. Every start waits for its health check.

With ``--database postgres`` the stack creates a PostgreSQL cluster in ``postgres/`` under the
stack folder (Debian's ``postgresql`` package: ``initdb``, then ``postgres`` on a free loopback
port, kept in ``postgres/port``), and both servers keep their data in it: databases ``prefect``
and ``mlflow``, created with ``createdb`` and migrated with ``prefect server database upgrade``
and ``mlflow db upgrade``. With a ``postgresql://`` URL it uses that server the same way. As
root, the cluster runs as the ``postgres`` system user (PostgreSQL refuses root), so the stack
folder must be reachable by that user.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import httpx

from petalflow.tasks.common import ENV_DEFAULTS, holder_lock
from petalflow.temporary_server import free_port

REPO = Path(__file__).resolve().parent.parent
POOLS = {"cpu": "download, scan, evaluation, registration", "gpu": "training"}
# The servers, in start order (stopped in reverse, after every worker).
SERVERS = ("postgres", "prefect-server", "mlflow-server")
# How many flow runs one worker of each pool runs at once (``prefect worker start --limit``).
# A run is one Python process with TensorFlow: 1.5-2.5 GB for train and batch-predict on the
# flowers; a gpu worker trains one candidate at a time, so N gpu workers train N at once.
WORKER_LIMITS = {"cpu": 2, "gpu": 1}
PG_USER = "petalflow"  # the private cluster's superuser (trust authentication, loopback only)


@dataclass
class Stack:
    """Locations and ports of one stack; every path is absolute."""

    stack_dir: Path = field(default_factory=lambda: Path(".petalflow/stack").resolve())
    host: str = "127.0.0.1"
    prefect_port: int = 4200
    mlflow_port: int = 5000
    mlflow_dir: Path = field(default_factory=lambda: (REPO / "mlflow").resolve())
    petalflow_home: Path = field(default_factory=lambda: Path(".petalflow").resolve())
    repo: Path = REPO
    # "sqlite" (default), "postgres" (a private cluster under stack_dir/postgres) or the
    # postgresql://user:password@host:port URL of a server to use.
    database: str = "sqlite"
    workers: dict = field(default_factory=lambda: {"cpu": 1, "gpu": 1})  # workers per pool
    # Where each service's log stood when this process started it (its logs are appended to):
    # a start's error is looked for after that.
    log_starts: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def postgres_dir(self) -> Path:
        return self.stack_dir / "postgres"

    @property
    def postgres_server(self) -> Optional[str]:
        """postgresql://… of the server holding both databases (no database name); None on
        SQLite."""
        if self.database == "sqlite":
            return None
        if self.database == "postgres":
            port = (self.postgres_dir / "port").read_text().strip()
            return f"postgresql://{PG_USER}@127.0.0.1:{port}"
        return self.database.rstrip("/")

    def database_url(self, name: str, driver: str = "") -> Optional[str]:
        """The URL of database ``name`` (``prefect`` or ``mlflow``) with the SQLAlchemy
        ``driver`` (``asyncpg`` for Prefect); None on SQLite."""
        server = self.postgres_server
        if server is None:
            return None
        scheme, rest = server.split("://", 1)
        return f"{scheme}{'+' + driver if driver else ''}://{rest}/{name}"

    @property
    def prefect_api(self) -> str:
        return f"http://{self.host}:{self.prefect_port}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def logs(self) -> Path:
        return self.stack_dir / "logs"

    @property
    def pids(self) -> Path:
        return self.stack_dir / "pids"

    @property
    def mlflow_auth(self) -> bool:
        """MLflow's basic-auth app is on when an admin password is set in the environment."""
        return bool(os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"))

    def env(self) -> dict:
        """Environment for every process of the stack (and for a shell that uses it)."""
        bin_dir = str(Path(sys.executable).parent)
        extra = {}
        if os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
            # Clients of an authenticated server present the same string unless told otherwise.
            extra["PREFECT_API_AUTH_STRING"] = os.environ.get(
                "PREFECT_API_AUTH_STRING", os.environ["PREFECT_SERVER_API_AUTH_STRING"])
        if self.mlflow_auth:
            extra["MLFLOW_TRACKING_USERNAME"] = os.environ.get("MLFLOW_TRACKING_USERNAME", "admin")
            extra["MLFLOW_TRACKING_PASSWORD"] = os.environ.get(
                "MLFLOW_TRACKING_PASSWORD", os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"])
            extra["MLFLOW_AUTH_CONFIG_PATH"] = str(self.stack_dir / "mlflow_auth.ini")
        return {
            **ENV_DEFAULTS,  # what the petalflow command sets when the stack is started by it
            **os.environ,
            "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "PREFECT_HOME": str(self.stack_dir / "prefect"),
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # `prefect deployment run --watch` streams a run's logs only when the server
            # publishes them.
            "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "true",
            "PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED": "true",
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "PETALFLOW_HOME": str(self.petalflow_home),
            # Heartbeats let the zombie automation crash runs whose worker died.
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": os.environ.get(
                "PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30"),
            **extra,
        }

    def bin(self, name: str) -> str:
        return str(Path(sys.executable).parent / name)


def _start(stack: Stack, name: str, cmd: list[str], cwd: Optional[Path] = None,
           extra_env: Optional[dict] = None, user_kwargs: Optional[dict] = None) -> int:
    stack.logs.mkdir(parents=True, exist_ok=True)
    stack.pids.mkdir(parents=True, exist_ok=True)
    pidfile = stack.pids / f"{name}.pid"
    if pidfile.exists() and _alive(int(pidfile.read_text())):
        return int(pidfile.read_text())
    log = open(stack.logs / f"{name}.log", "ab")
    stack.log_starts[name] = log.tell()
    proc = subprocess.Popen(cmd, cwd=cwd or stack.repo, env={**stack.env(), **(extra_env or {})},
                            stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            **(user_kwargs or {}))
    pidfile.write_text(str(proc.pid))
    return proc.pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child counts as dead
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _processes() -> Iterator[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc/<pid>/stat."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        yield int(entry), fields[0], int(fields[1]), int(fields[2])


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies do not count)."""
    return any(group == pgid and state != "Z" for _pid, state, _ppid, group in _processes())


def descendant_pids(root: int) -> list[int]:
    """``root`` and every process below it (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for pid, _state, ppid, _group in _processes():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _wait(what: str, check, timeout_s: float, stack: Stack, name: str) -> None:
    deadline = time.time() + timeout_s
    pid = int((stack.pids / f"{name}.pid").read_text())
    while time.time() < deadline:
        if not _alive(pid):
            said = _log_error(stack, name)
            raise RuntimeError(f"{what} exited as it started{': ' + said if said else ''} "
                               f"(its log: {stack.logs / (name + '.log')})")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not healthy after {timeout_s:.0f}s; see "
                       f"{stack.logs / (name + '.log')}")


_ERROR_LINE = re.compile(r"error|exception|denied|refused|in use|not found|fatal", re.I)
_STAMP = re.compile(r"^\s*\d{4}[/-]\d\d[/-]\d\d[ T][\d:.,]+\s*")  # a log line's date and time


def _log_error(stack: Stack, name: str) -> str:
    """The last line of ``name``'s log, written since this process started it, that reads as
    an error ("" when none does)."""
    try:
        with open(stack.logs / f"{name}.log", "rb") as fh:
            fh.seek(stack.log_starts.get(name, 0))
            text = fh.read()[-65536:].decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [" ".join(_STAMP.sub("", line).split()) for line in text.splitlines()
             if _ERROR_LINE.search(line)]
    return lines[-1][:300] if lines else ""


def _bind_problem(host: str, port: int) -> Optional[str]:
    """Why a server could not listen on ``host``:``port`` (None when it could): binds a socket
    there a moment, as the server would (SO_REUSEADDR: a port a stopped server left in
    TIME_WAIT is free)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"{host} is no address of this machine ({exc.strerror})"
    family, _type, _proto, _name, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "in use by another program"
            return f"cannot be listened on: {exc.strerror}"
    return None


def _free_port_after(host: str, port: int) -> Optional[int]:
    return next((p for p in range(port + 1, min(port + 50, 65536))
                 if _bind_problem(host, p) is None), None)


def port_problems(stack: Stack) -> list[str]:
    """What stops ``up`` before it starts anything: the two servers given one port, or a port
    another program holds (the Prefect or MLflow server of another stack, say, whose health
    check would pass for this one's). A server this stack folder already runs keeps its port."""
    if stack.prefect_port == stack.mlflow_port:
        return [f"--prefect-port and --mlflow-port are both {stack.prefect_port}: the two "
                "servers need a port each"]
    running = status(stack)
    problems = []
    for name, what, port, option in (
            ("prefect-server", "the Prefect server's", stack.prefect_port, "--prefect-port"),
            ("mlflow-server", "the MLflow server's", stack.mlflow_port, "--mlflow-port")):
        if running.get(name) == "running":
            continue
        why = _bind_problem(stack.host, port)
        if why:
            free = _free_port_after(stack.host, port) if "in use" in why else None
            problems.append(
                f"port {port} on {stack.host} ({what}, {option}) is {why}: stop that program, "
                f"or give the server another port" + (f" ({option} {free} is free)"
                                                      if free else ""))
    return problems


def prefect_client(stack: Stack):
    """Prefect's own (sync) client for the stack's API, with its auth string; it retries
    429/502/503 itself (a SQLite-backed server answers 503 when writes collide)."""
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(stack.prefect_api, auth_string=stack.env().get(
        "PREFECT_API_AUTH_STRING"))


def postgres_tool(name: str) -> str:
    """A PostgreSQL program (initdb, postgres, createdb, pg_isready) from PATH or Debian's
    /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name) or next(iter(sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} not found: install Debian's postgresql "
                           "package (`make postgres`), or use --database sqlite")
    return found


def _as_postgres_user() -> dict:
    """Popen arguments that drop root to the postgres system user (PostgreSQL refuses root)."""
    return {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}


def start_postgres(stack: Stack, timeout_s: float = 60) -> None:
    """The private cluster: initdb on first use, then the server on the recorded port (a free
    one the first time), loopback only."""
    pg = stack.postgres_dir
    data = pg / "data"
    if not (data / "PG_VERSION").exists():
        pg.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(pg, "postgres", "postgres")
            probe = subprocess.run(["test", "-w", str(pg)], **_as_postgres_user())
            if probe.returncode:
                raise RuntimeError(f"the postgres user cannot reach {pg}: choose a --stack-dir "
                                   "whose parent folders others may enter, or run as a user")
        subprocess.run([postgres_tool("initdb"), "-D", str(data), "-U", PG_USER,
                        "--auth=trust", "-E", "UTF8", "--no-instructions"], check=True,
                       capture_output=True, text=True, **_as_postgres_user())
    port_file = pg / "port"
    if not port_file.exists():
        port_file.write_text(f"{free_port()}\n")
    port = port_file.read_text().strip()
    _start(stack, "postgres", [postgres_tool("postgres"), "-D", str(data), "-p", port,
                               "-h", "127.0.0.1", "-k", str(pg)], user_kwargs=_as_postgres_user())
    _wait("PostgreSQL", lambda: subprocess.run(
        [postgres_tool("pg_isready"), "-q", "-h", "127.0.0.1", "-p", port]).returncode == 0,
        timeout_s, stack, "postgres")


def prepare_databases(stack: Stack) -> None:
    """Create the ``prefect`` and ``mlflow`` databases if missing (``createdb``) and bring both
    schemas to the installed versions with the stock tools."""
    for name in ("prefect", "mlflow"):
        made = subprocess.run([postgres_tool("createdb"),
                               f"--maintenance-db={stack.database_url('postgres')}", name],
                              capture_output=True, text=True)
        if made.returncode and "already exists" not in made.stderr:
            raise RuntimeError(f"createdb {name}: {made.stderr.strip()}")
    _prefect(stack, "server", "database", "upgrade", "-y",
             extra_env=_prefect_database_env(stack))
    subprocess.run([stack.bin("mlflow"), "db", "upgrade", stack.database_url("mlflow")],
                   env=stack.env(), check=True, capture_output=True, text=True, timeout=300)


def _prefect_database_env(stack: Stack) -> dict:
    url = stack.database_url("prefect", "asyncpg")
    return {"PREFECT_SERVER_DATABASE_CONNECTION_URL": url} if url else {}


def start_database(stack: Stack) -> None:
    """PostgreSQL ready for both servers (nothing to do on SQLite)."""
    if stack.database == "postgres":
        start_postgres(stack)
    if stack.database != "sqlite":
        prepare_databases(stack)


def start_prefect_server(stack: Stack, timeout_s: float = 120) -> None:
    _start(stack, "prefect-server", [stack.bin("prefect"), "server", "start", "--host",
                                      stack.host, "--port", str(stack.prefect_port)],
           extra_env=_prefect_database_env(stack))

    def healthy() -> bool:
        with prefect_client(stack) as client:
            return client.api_healthcheck() is None

    _wait("Prefect server", healthy, timeout_s, stack, "prefect-server")


def write_mlflow_auth_config(stack: Stack) -> Path:
    """basic-auth settings: users in mlflow/basic_auth.db, no default password (the admin
    password comes from MLFLOW_AUTH_ADMIN_PASSWORD), new users may read only."""
    path = stack.stack_dir / "mlflow_auth.ini"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{stack.mlflow_dir / 'basic_auth.db'}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


def start_mlflow_server(stack: Stack, timeout_s: float = 120) -> None:
    stack.mlflow_dir.mkdir(parents=True, exist_ok=True)
    if not stack.database_url("mlflow"):  # SQLite: its records follow a moved stack folder
        from petalflow.mlflow_artifacts import relocate_artifacts, relocation_said

        for old, new in relocate_artifacts(f"sqlite:///{stack.mlflow_dir / 'mlflow.db'}"):
            print(f"petalflow stack up: {relocation_said(stack.mlflow_dir, old, new)}",
                  file=sys.stderr, flush=True)
    auth, extra = [], {}
    if stack.mlflow_auth:
        write_mlflow_auth_config(stack)
        auth = ["--app-name", "basic-auth"]
        # The auth app's CSRF protection needs a secret key: a fresh random one unless set
        # (set MLFLOW_FLASK_SERVER_SECRET_KEY yourself when several servers share users).
        if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
            import secrets

            extra["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
    _start(stack, "mlflow-server", [
        stack.bin("mlflow"), "server", "--host", stack.host, "--port", str(stack.mlflow_port),
        "--backend-store-uri",
        stack.database_url("mlflow") or f"sqlite:///{stack.mlflow_dir / 'mlflow.db'}",
        "--artifacts-destination", (stack.mlflow_dir / "artifacts").as_uri(),
        "--workers", "1", *auth,
    ], extra_env=extra)
    _wait("MLflow server", lambda: httpx.get(f"{stack.mlflow_uri}/health", timeout=3)
          .status_code == 200, timeout_s, stack, "mlflow-server")


def _prefect(stack: Stack, *args: str, check: bool = True,
             extra_env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run([stack.bin("prefect"), "--no-prompt", *args], cwd=stack.repo,
                          env={**stack.env(), **(extra_env or {})}, capture_output=True,
                          text=True, check=check, timeout=300)


def deploy(stack: Stack) -> str:
    """``prefect deploy --prefect-file deployment.yaml --all`` with the stock CLI."""
    out = _prefect(stack, "deploy", "--prefect-file", str(stack.repo / "deployment.yaml"),
                   "--all")
    return out.stdout


def worker_names(stack: Stack) -> list[str]:
    """``worker-cpu``, ``worker-gpu``, ``worker-gpu-2`` …: one service per worker."""
    return [f"worker-{pool}" + (f"-{n}" if n > 1 else "")
            for pool in POOLS for n in range(1, stack.workers.get(pool, 1) + 1)]


def _started_workers(stack: Stack) -> list[str]:
    """The workers this stack folder has pid files for (whatever ``--*-workers`` said)."""
    return sorted(p.stem for p in stack.pids.glob("worker-*.pid")) if stack.pids.exists() \
        else []


def start_workers(stack: Stack, timeout_s: float = 120) -> None:
    """``stack.workers`` process workers per pool, each running at most ``WORKER_LIMITS[pool]``
    flow runs at once; a worker creates its pool when it is missing."""
    for name in worker_names(stack):
        pool = name.split("-")[1]
        _start(stack, name, [stack.bin("prefect"), "worker", "start", "--pool", pool,
                             "--type", "process", "--limit", str(WORKER_LIMITS[pool])])

    def ready(pool: str) -> bool:
        from prefect.exceptions import ObjectNotFound

        with prefect_client(stack) as client:
            try:
                return client.read_work_pool(pool).status == "READY"
            except ObjectNotFound:  # the worker has not created it yet
                return False

    for pool in POOLS:
        _wait(f"worker for pool {pool}", lambda p=pool: ready(p), timeout_s, stack,
              f"worker-{pool}")


AUTOMATIONS = REPO / "infra" / "automations"
ZOMBIE_AUTOMATION_FILE = AUTOMATIONS / "crash-silent-runs.yaml"
PENDING_AUTOMATION_FILE = AUTOMATIONS / "crash-stuck-pending-runs.yaml"


def create_zombie_automation(stack: Stack, within_s: Optional[int] = None,
                             pending_within_s: Optional[int] = None) -> None:
    """Mark a flow run Crashed when its worker or machine died, instead of leaving it Running
    (heartbeats stop: ``crash-silent-runs.yaml``) or Pending (submitted, never started:
    ``crash-stuck-pending-runs.yaml``) forever; both created with the stock ``prefect
    automation create`` unless one of that name exists. ``within_s`` / ``pending_within_s``
    override their ``within`` (the first must exceed the heartbeat period)."""
    import yaml

    for path, within in ((ZOMBIE_AUTOMATION_FILE, within_s),
                         (PENDING_AUTOMATION_FILE, pending_within_s)):
        spec = yaml.safe_load(path.read_text())
        with prefect_client(stack) as client:
            if client.read_automations_by_name(spec["name"]):
                continue
        if within is None:
            _prefect(stack, "automation", "create", "--from-file", str(path))
        else:
            spec["trigger"]["within"] = within
            _prefect(stack, "automation", "create", "--from-json", json.dumps(spec))


def write_env_file(stack: Stack) -> Path:
    path = stack.stack_dir / "env"
    keys = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PETALFLOW_HOME", "PREFECT_HOME")
    env = stack.env()
    path.write_text("".join(f"export {k}={env[k]}\n" for k in keys))
    return path


def up(stack: Stack) -> None:
    """Start every service, each after the last is healthy, then deploy. When a step fails (a
    server exits, a health check times out, a command fails, Ctrl-C) the services this call
    started are stopped again, so no half stack is left behind; the exception says which
    (its note), and services that were running before stay.
    """
    before = {name for name, state in status(stack).items() if state == "running"}
    try:
        start_database(stack)
        start_prefect_server(stack)
        start_mlflow_server(stack)
        start_workers(stack)  # they create the pools, which `prefect deploy` needs
        create_zombie_automation(stack)
        deploy(stack)
        write_env_file(stack)
    except BaseException as exc:
        now = status(stack)
        started = [name for name, state in now.items()
                   if state == "running" and name not in before]
        for name, state in now.items():  # a service that exited at its start leaves its pid
            if state == "stopped" and name not in before:
                (stack.pids / f"{name}.pid").unlink(missing_ok=True)
        stopped = stop(stack, started)
        kept = sorted(before & set(now))
        exc.add_note("; ".join(
            (["stopped what this start had started: " + ", ".join(stopped)] if stopped
             else ["nothing this start began is left running"])
            + (["still running from before it: " + ", ".join(kept)] if kept else [])))
        raise


def down(stack: Stack, timeout_s: float = 30) -> list[str]:
    """Stop every service of the stack (``stop``)."""
    return stop(stack, [*_started_workers(stack), *SERVERS], timeout_s)


def stop(stack: Stack, names: list[str], timeout_s: float = 30) -> list[str]:
    """Stop the services ``names`` that have a pid file: the workers (all at once), then the
    servers (MLflow, Prefect, PostgreSQL, one after another): SIGTERM to each process group,
    SIGKILL to one still running ``timeout_s`` later. The names stopped, a killed one with
    "(killed: ...)" after its name."""
    stopped = []
    workers = [name for name in names if name not in SERVERS]
    servers = [[name] for name in reversed(SERVERS) if name in names]
    for batch in (workers, *servers):
        groups = {}
        for name in batch:
            pidfile = stack.pids / f"{name}.pid"
            if pidfile.exists():
                groups[name] = int(pidfile.read_text())
        killed = _stop_groups(groups, timeout_s)
        for name in groups:
            (stack.pids / f"{name}.pid").unlink(missing_ok=True)
            stopped.append(f"{name} (killed: still running {timeout_s:g} s after SIGTERM)"
                           if name in killed else name)
    return stopped


def _stop_groups(groups: dict[str, int], timeout_s: float) -> set[str]:
    """SIGTERM to each process group (each service leads its own: servers fork workers), wait
    until no member of any is left, so their ports are really free when this returns; SIGKILL
    to those still running after ``timeout_s``, whose names are returned."""
    def running(pid: int) -> bool:
        return _alive(pid) or _group_alive(pid)

    for pid in groups.values():
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout_s
    while any(running(pid) for pid in groups.values()) and time.time() < deadline:
        time.sleep(0.2)
    killed = {name for name, pid in groups.items() if running(pid)}
    for name in killed:
        try:
            os.killpg(groups[name], signal.SIGKILL)
        except ProcessLookupError:
            pass
    while any(_group_alive(groups[name]) for name in killed) and time.time() < deadline + 10:
        time.sleep(0.2)
    return killed


@contextmanager
def one_command_at_a_time(stack: Stack, action: str, say,
                          stop_a_start: bool = False) -> Iterator[None]:
    """Hold the stack folder's lock (``lock``, a ``holder_lock``: released when this process
    ends, however it ends) while ``action`` starts or stops services. Two ``stack up`` at once
    each started a worker per pool and kept one pid file of the two, so ``down`` left a worker
    per pool running (polling for ever, and taking runs when the stack came back). A command
    that finds the lock held says so (``say``) and waits for it; with ``stop_a_start``
    (``down``) a ``stack up`` in progress is first sent SIGTERM, on which it stops what it had
    started (a start that hangs does not keep the stack from being stopped)."""
    def on_wait(holder: str) -> None:
        start = re.search(r"`petalflow stack up` \(pid (\d+)\)", holder)
        if stop_a_start and start:
            say(f"stopping {holder} in progress on {stack.stack_dir} first")
            try:
                os.kill(int(start.group(1)), signal.SIGTERM)
            except OSError:  # gone meanwhile, or another user's: wait for it
                pass
        else:
            say(f"waiting for {holder} in progress on {stack.stack_dir} to end")

    acting = False
    try:
        with holder_lock(stack.stack_dir / "lock",
                         f"the `petalflow stack {action}` (pid {os.getpid()})", on_wait):
            acting = True
            yield
    except KeyboardInterrupt as exc:
        if not acting:
            exc.add_note("it was still waiting: nothing was started or stopped")
        raise


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def status(stack: Stack) -> dict:
    """running/stopped per service: the servers, the workers this stack starts and any other
    worker it started earlier (``--gpu-workers``/``--cpu-workers`` at ``up``)."""
    out = {}
    for name in dict.fromkeys([*SERVERS, *worker_names(stack), *_started_workers(stack)]):
        pidfile = stack.pids / f"{name}.pid"
        out[name] = "running" if pidfile.exists() and _alive(int(pidfile.read_text())) else "stopped"
    return out


def _failure(exc: BaseException) -> str:
    """A failed start in a line: a command's own last error line (stderr) with its name."""
    if isinstance(exc, subprocess.CalledProcessError):
        said = [line.strip() for line in (exc.stderr or exc.output or "").splitlines()
                if line.strip()]
        command = " ".join([Path(str(exc.cmd[0])).name, *map(str, exc.cmd[1:3])])
        return (f"`{command} …` failed (exit status {exc.returncode})"
                + (f": {said[-1]}" if said else ""))
    if isinstance(exc, subprocess.TimeoutExpired):
        return f"`{Path(str(exc.cmd[0])).name} …` did not finish in {exc.timeout:g} s"
    return str(exc)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    # The help's description: the module docstring's opening sentence and its example commands
    # (its first two paragraphs), as written.
    ap = argparse.ArgumentParser(prog="petalflow stack",
                                 description="\n\n".join(__doc__.split("\n\n")[:2]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("action", choices=("up", "down", "deploy", "status"))
    ap.add_argument("--host", default=os.environ.get("PETALFLOW_STACK_HOST", "127.0.0.1"),
                    help="the address every server binds to (default 127.0.0.1)")
    ap.add_argument("--prefect-port", type=int,
                    default=int(os.environ.get("PETALFLOW_PREFECT_PORT", 4200)),
                    help="the Prefect server's port (default 4200)")
    ap.add_argument("--mlflow-port", type=int,
                    default=int(os.environ.get("PETALFLOW_MLFLOW_PORT", 5000)),
                    help="the MLflow server's port (default 5000)")
    ap.add_argument("--stack-dir", type=Path, default=Path(".petalflow/stack"),
                    help="where the stack keeps its state, logs, pids and env file (default "
                         ".petalflow/stack)")
    ap.add_argument("--gpu-workers", type=int, default=1,
                    help="gpu pool workers (one training each; a sweep's candidates spread "
                         "over them)")
    ap.add_argument("--cpu-workers", type=int, default=1,
                    help=f"cpu pool workers ({WORKER_LIMITS['cpu']} runs each)")
    ap.add_argument("--database", default=os.environ.get("PETALFLOW_STACK_DATABASE", "sqlite"),
                    help="sqlite (default), postgres (a private PostgreSQL cluster in the stack "
                         "folder) or postgresql://USER:PASSWORD@HOST:PORT (your server)")
    args = ap.parse_args(argv)
    for option, count, pool in (("--gpu-workers", args.gpu_workers, "gpu"),
                                ("--cpu-workers", args.cpu_workers, "cpu")):
        if count < 1:
            ap.error(f"{option} {count}: at least 1 ({POOLS[pool]} run on the {pool} pool's "
                     "workers" + ("; on a machine without a GPU the gpu worker trains on the "
                                  "CPU)" if pool == "gpu" else ")"))
    if args.database not in ("sqlite", "postgres") and not args.database.startswith(
            "postgresql://"):
        ap.error(f"--database: {args.database!r} is not sqlite, postgres or a postgresql:// URL")
    stack = Stack(stack_dir=args.stack_dir.resolve(), host=args.host,
                  prefect_port=args.prefect_port, mlflow_port=args.mlflow_port,
                  database=args.database,
                  workers={"cpu": args.cpu_workers, "gpu": args.gpu_workers})
    if args.action == "status":
        print(json.dumps(status(stack), indent=2))
        return 0

    # What is refused at once is refused before the lock, creating nothing (the stack folder
    # included); a start checks its ports again once it holds the lock.
    if args.action == "up" and _port_refusal(stack):
        return 2
    if args.action == "deploy" and _no_server_refusal(stack):
        return 1
    if args.action == "down" and not stack.stack_dir.exists():  # a start creates it first
        print("stopped: nothing was running")
        return 0

    def say(line: str) -> None:
        print(f"petalflow stack {args.action}: {line}", file=sys.stderr, flush=True)

    # SIGTERM (what `stack down` sends a start in progress, and a service manager's stop) ends
    # a start as Ctrl-C does: what it had started is stopped.
    before = signal.getsignal(signal.SIGTERM)
    if args.action == "up":
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        with one_command_at_a_time(stack, args.action, say, stop_a_start=args.action == "down"):
            return _act(args.action, stack)
    except KeyboardInterrupt as exc:
        print(f"petalflow stack {args.action}: interrupted" + "".join(
            "; " + note for note in getattr(exc, "__notes__", [])), file=sys.stderr)
        return 130
    finally:
        if args.action == "up" and before is not None:  # None: not set from Python
            signal.signal(signal.SIGTERM, before)


def _port_refusal(stack: Stack) -> bool:
    """``port_problems``, each said in a line; whether there were any."""
    problems = port_problems(stack)
    for problem in problems:
        print(f"petalflow stack up: error: {problem}", file=sys.stderr)
    return bool(problems)


def _no_server_refusal(stack: Stack) -> bool:
    """Whether no Prefect server answers at the stack's API (said in a line)."""
    try:  # any answer will do: with an auth string set, a 401 is a server too
        httpx.get(f"{stack.prefect_api}/health", timeout=10)
    except httpx.TransportError as exc:
        print(f"petalflow stack deploy: error: no Prefect server answers at "
              f"{stack.prefect_api} ({exc.__class__.__name__}): start the stack first "
              "(petalflow stack up), or give the port it runs on (--prefect-port)",
              file=sys.stderr)
        return True
    return False


def _act(action: str, stack: Stack) -> int:
    """``main``'s action, run while it holds the stack folder's lock."""
    if action == "up":
        if _port_refusal(stack):
            return 2
        try:
            up(stack)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            print(f"petalflow stack up: error: {_failure(exc)}", file=sys.stderr)
            for note in getattr(exc, "__notes__", []):
                print(note, file=sys.stderr)
            return 1
        print(f"Prefect UI   http://{stack.host}:{stack.prefect_port}\n"
              f"MLflow UI    {stack.mlflow_uri}\nlogs         {stack.logs}\n"
              f"shell setup  source {stack.stack_dir / 'env'}")
    elif action == "deploy":
        try:
            print(deploy(stack))
        except subprocess.SubprocessError as exc:
            print(f"petalflow stack deploy: error: {_failure(exc)}", file=sys.stderr)
            return 1
    else:
        print("stopped: " + (", ".join(down(stack)) or "nothing was running"))
    return 0

