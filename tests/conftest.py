"""Shared fixtures. Nothing here needs the network, a GPU or ../shared."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import export_tiny_backbone, running_processes  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _prefect_logging_set_up_for_the_session():
    """Prefect's console log handler keeps the stream ``sys.stderr`` was when its logging was
    first set up. Set up inside a test that captures output (``capsys``), it wrote to that
    test's closed stream ever after: every later log line failed and the next command in the
    process died of a RecursionError (seen when only ``-k predict`` of test_cli.py ran)."""
    from prefect.logging.configuration import setup_logging

    setup_logging()


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    return export_tiny_backbone(tmp_path_factory.mktemp("hub") / "tiny_backbone")


@pytest.fixture(scope="session")
def other_backbone(tmp_path_factory) -> Path:
    """A second tiny backbone (other weights): for sweeps over two backbones."""
    return export_tiny_backbone(tmp_path_factory.mktemp("hub") / "other_backbone", seed=1)


@pytest.fixture(scope="session")
def any_size_backbone(tmp_path_factory) -> Path:
    """A tiny backbone with no fixed input size: works at the form's default image size."""
    return export_tiny_backbone(tmp_path_factory.mktemp("hub") / "any_size", image_size=None)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for the whole test session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    """A clean working folder: embedded MLflow store and PETALFLOW_HOME live inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("PETALFLOW_HOME", str(tmp_path / "home"))
    return tmp_path


def _left_running(root: str) -> list[tuple[int, int, str, str]]:
    """Processes still running that the tests started: their command line, working folder or
    environment names a path under the session's temporary folder ``root``. Each as (pid,
    process group, command line, the test that was running when it started: pytest's
    PYTEST_CURRENT_TEST, which a started process inherits)."""
    found = []
    for pid, cmd, env, cwd in running_processes():
        if root in cmd or cwd.startswith(root) or any(root in var for var in env):
            test = next((v.split("=", 1)[1] for v in env
                         if v.startswith("PYTEST_CURRENT_TEST=")), "?")
            try:
                found.append((pid, os.getpgid(pid), cmd, test))
            except OSError:  # exited meanwhile
                continue
    return found


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """A server or worker a test started and did not stop outlives the suite (seen once: an
    MLflow server of the outage test). Say which, and which test was running when it started,
    then stop them, so a leak shows in the log instead of on the machine."""
    import signal

    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None or getattr(factory, "_basetemp", None) is None:
        return  # no test used a temporary folder
    left = _left_running(str(factory.getbasetemp()))
    if not left:
        return
    terminalreporter.section("processes the tests left running (now stopped)", yellow=True)
    for pid, group, cmd, test in left:
        terminalreporter.line(f"{cmd[:300]}  (started during {test})")
        try:  # its group (a server's workers with it), unless that is this session's own
            if group == os.getpgid(0):
                os.kill(pid, signal.SIGKILL)
            else:
                os.killpg(group, signal.SIGKILL)
        except OSError:
            pass
