"""Shared fixtures. Nothing here needs the network, a GPU or ../shared."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import export_tiny_backbone  # noqa: E402


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
