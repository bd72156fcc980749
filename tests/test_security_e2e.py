"""Access control: MLflow's basic-auth app and the Prefect server's auth string, with real
servers on free loopback ports. Everything started here is stopped here."""

from __future__ import annotations

import hashlib
import secrets
import subprocess
import time

import httpx
import pytest

from petalflow.stack import Stack, down, start_mlflow_server, start_prefect_server
from tests.helpers import free_port, make_dataset, make_tgz, serve_directory

pytestmark = pytest.mark.e2e
MODEL = "petalflow-classifier"



def test_mlflow_basic_auth_refuses_anonymous_and_accepts_the_pipeline(
        tmp_path, monkeypatch, tiny_backbone, prefect_harness):
    from petalflow.flows.train_flow import train_and_register
    from petalflow.tasks.common import file_lock
    from petalflow.tasks.params import TrainParams

    password = secrets.token_urlsafe(16)
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", password)
    st = Stack(stack_dir=tmp_path / "stack", mlflow_port=free_port(),
               mlflow_dir=tmp_path / "mlflow", petalflow_home=tmp_path / "home")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PETALFLOW_HOME", str(tmp_path / "home"))
    try:
        start_mlflow_server(st)
        search = f"{st.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"
        assert httpx.get(search, timeout=10).status_code == 401
        assert httpx.get(search, auth=("admin", "password1234"), timeout=10).status_code == 401
        assert httpx.get(search, auth=("admin", password), timeout=10).status_code == 200

        src = make_dataset(tmp_path / "src", per_class=12)
        served = tmp_path / "served"
        archive = make_tgz(src, served / "p.tgz")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", st.mlflow_uri)
        with serve_directory(served) as url:
            params = TrainParams(
                data_url=f"{url}/p.tgz", data_sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
                backbone=str(tiny_backbone), image_size=32, epochs=6, batch_size=8,
                learning_rate=0.05, val_fraction=0.2, test_fraction=0.2, min_accuracy=0.8)
            # Wrong credentials: refused at once (not retried), nothing registered.
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-" + password)
            started = time.time()
            state = train_and_register(params, return_state=True)
            assert state.is_failed()
            assert "401" in str(state.result(raise_on_failure=False))
            assert time.time() - started < 60
            # The failed run let go of its extraction (a flow hook): a later run may prune it.
            in_use = tmp_path / "home" / "datasets" / f".{params.data_sha256}.in-use"
            with file_lock(in_use, wait=False) as free:
                assert in_use.exists() and free
            # The right ones: the pipeline registers its champion.
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
            summary = train_and_register(params)
        assert summary["alias"] == "champion" and summary["model_version"] == "1"
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=st.mlflow_uri, registry_uri=st.mlflow_uri)
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    finally:
        down(st)


def test_prefect_server_auth_string_refuses_a_worker_without_it(tmp_path, monkeypatch):
    auth = "admin:" + secrets.token_urlsafe(12)
    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", auth)
    st = Stack(stack_dir=tmp_path / "stack", prefect_port=free_port(),
               mlflow_dir=tmp_path / "mlflow", petalflow_home=tmp_path / "home")
    try:
        start_prefect_server(st)
        assert httpx.get(f"{st.prefect_api}/work_pools/cpu", timeout=10).status_code == 401
        # The stack's environment carries the auth string: the stock CLI gets in with it.
        subprocess.run([st.bin("prefect"), "--no-prompt", "work-pool", "create", "cpu",
                        "--type", "process"], env=st.env(), check=True, capture_output=True,
                       timeout=120)
        env = {k: v for k, v in st.env().items() if k != "PREFECT_API_AUTH_STRING"}
        env["PREFECT_API_AUTH_STRING"] = "admin:not-the-password"
        proc = subprocess.run(
            [st.bin("prefect"), "worker", "start", "--pool", "cpu", "--type", "process",
             "--run-once"], env=env, capture_output=True, text=True, timeout=120)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, output[-2000:]
        assert "401" in output or "Unauthorized" in output, output[-2000:]
        pool = httpx.get(f"{st.prefect_api}/work_pools/cpu", timeout=10,
                         auth=tuple(auth.split(":", 1))).json()
        assert pool["status"] != "READY"
    finally:
        down(st)


def test_registration_survives_an_mlflow_outage_and_fails_clearly_if_it_lasts(
        tmp_path, monkeypatch, tiny_backbone, prefect_harness):
    """The tracking server is down when registration starts: the task retries and registers
    exactly one version once it is back; if it never comes back the task fails and the
    champion is unchanged."""
    import threading

    import mlflow
    from prefect import flow

    from petalflow.tasks.dataset import prepare_dataset
    from petalflow.tasks.evaluate import evaluate_model
    from petalflow.tasks.params import TrainParams
    from petalflow.tasks.registry import register_model_task, start_run
    from petalflow.tasks.train import train_model

    # MLflow's own HTTP retries off: the Prefect task's retries are what is under test.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    st = Stack(stack_dir=tmp_path / "stack", mlflow_port=free_port(),
               mlflow_dir=tmp_path / "mlflow", petalflow_home=tmp_path / "home")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", st.mlflow_uri)
    cfg = TrainParams(backbone=str(tiny_backbone), image_size=32, epochs=6, batch_size=8,
                      learning_rate=0.05, min_accuracy=0.0)
    info = prepare_dataset(make_dataset(tmp_path / "d", per_class=12), tmp_path / "m",
                           0.2, 0.2, 0)
    record = train_model(info, cfg, tmp_path / "runs" / "k" / "a")
    metrics = evaluate_model(record["export_dir"], info, tmp_path / "eval")["metrics"]
    quick = register_model_task.with_options(retries=3, retry_delay_seconds=[5, 10, 20])

    @flow
    def register(run_id: str):
        return quick(run_id, record["export_dir"], cfg, info, metrics)

    try:
        start_mlflow_server(st)
        run_a = start_run(cfg, info)
        run_b = start_run(cfg, info)
        down(st)
        errors = []

        def restart():
            try:
                start_mlflow_server(st)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        restarter = threading.Timer(3.0, restart)
        restarter.start()
        state = register(run_a, return_state=True)
        restarter.join()
        assert not errors, errors
        assert state.is_completed(), state.message
        client = mlflow.MlflowClient(tracking_uri=st.mlflow_uri, registry_uri=st.mlflow_uri)
        assert len(client.search_model_versions(f"name='{MODEL}'")) == 1
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"

        down(st)  # ... and this time it stays down
        state = register(run_b, return_state=True)
        assert state.is_failed()
        assert "127.0.0.1" in str(state.result(raise_on_failure=False))
        start_mlflow_server(st)
        assert len(client.search_model_versions(f"name='{MODEL}'")) == 1
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    finally:
        down(st)
