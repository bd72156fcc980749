"""The deployed stack, end to end: a real Prefect server and a real MLflow server on free
loopback ports with temporary homes, the `cpu` and `gpu` work pools, deployment.yaml deployed with
the stock CLI, one worker per pool, and runs triggered through the REST endpoint the UI's Run
button uses. Everything started here is stopped here, pass or fail."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from flows.stack import Stack, create_pools, create_zombie_automation, deploy, down, \
    prefect_request, start_mlflow_server, start_prefect_server, start_workers
from tests.helpers import free_port, make_dataset, make_tgz, serve_directory

pytestmark = pytest.mark.e2e
MODEL = "petalflow-classifier"



@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    st = Stack(stack_dir=tmp / "stack", prefect_port=free_port(), mlflow_port=free_port(),
               mlflow_dir=tmp / "mlflow", petalflow_home=tmp / "home")
    with pytest.MonkeyPatch.context() as mp:
        # The scheduler creates upcoming runs within seconds instead of a minute.
        mp.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "2")
        mp.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")
        try:
            start_prefect_server(st)
            start_mlflow_server(st)
            create_pools(st)
            # Heartbeats every 30 s (the minimum); a run silent for 45 s is Crashed.
            create_zombie_automation(st, within_s=45)
            deploy(st)
            start_workers(st)
            yield st
        finally:
            down(st)


def _api(st: Stack, method: str, path: str, **kw) -> httpx.Response:
    """Prefect REST call, retried on 503 as Prefect's client does (SQLite busy under load)."""
    return prefect_request(st, method, path, **kw)


def _deployment(st: Stack, flow: str, name: str) -> dict:
    resp = _api(st, "GET", f"/deployments/name/{flow}/{name}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def _run_button(st: Stack, deployment_id: str, parameters: dict) -> httpx.Response:
    """What the UI's Run button sends."""
    return _api(st, "POST", f"/deployments/{deployment_id}/create_flow_run",
                json={"parameters": parameters, "state": {"type": "SCHEDULED"}})


def _started(resp: httpx.Response) -> str:
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def _wait_final(st: Stack, flow_run_id: str, timeout_s: float = 420) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        run = _api(st, "GET", f"/flow_runs/{flow_run_id}").json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    logs = "\n".join(p.read_text()[-3000:] for p in st.logs.glob("*.log"))
    raise AssertionError(f"flow run {flow_run_id} did not finish:\n{logs}")


def _children(st: Stack, parent_id: str) -> list[dict]:
    task_runs = _api(st, "POST", "/task_runs/filter", json={
        "flow_runs": {"id": {"any_": [parent_id]}}}).json()
    ids = [t["id"] for t in task_runs]
    if not ids:
        return []
    return _api(st, "POST", "/flow_runs/filter", json={
        "flow_runs": {"parent_task_run_id": {"any_": ids}}}).json()


def _tiny_params(url: str, archive: Path, backbone: Path, **overrides) -> dict:
    """The `train` deployment's parameters for a tiny offline dataset and backbone."""
    return {"params": {
        "data_url": url, "data_sha256": hashlib.sha256(archive.read_bytes()).hexdigest(),
        "backbone": str(backbone), "image_size": 32, "epochs": 6, "batch_size": 8,
        "learning_rate": 0.05, "val_fraction": 0.2, "test_fraction": 0.2, "min_accuracy": 0.8,
        **overrides,
    }}


def _mlflow(st: Stack):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=st.mlflow_uri, registry_uri=st.mlflow_uri)


def test_ui_run_trains_on_gpu_pool_and_schedule_skips_unchanged_data(stack, tmp_path,
                                                                      tiny_backbone):
    src = make_dataset(tmp_path / "src", per_class=12)
    served = tmp_path / "served"
    archive = make_tgz(src, served / "photos.tgz")
    train = _deployment(stack, "train-and-register", "train")
    weekly = _deployment(stack, "train-and-register", "retrain-weekly")

    # The server enforces the parameter schema: a bad value never becomes a run.
    bad = _run_button(stack, train["id"], {"params": {"epochs": 0}})
    assert bad.status_code in (409, 422), bad.text
    assert "epochs" in bad.text

    with serve_directory(served) as url:
        params = _tiny_params(f"{url}/photos.tgz", archive, tiny_backbone)
        created = _run_button(stack, train["id"], params)
        assert created.status_code == 201, created.text
        run = _wait_final(stack, created.json()["id"])
        assert run["state"]["type"] == "COMPLETED", run["state"]
        assert run["work_pool_name"] == "cpu"
        children = _children(stack, run["id"])
        training = [c for c in children if c["deployment_id"] ==
                    _deployment(stack, "train-model", "train-gpu")["id"]]
        assert len(training) == 1 and training[0]["work_pool_name"] == "gpu"
        assert training[0]["state"]["type"] == "COMPLETED"

        client = _mlflow(stack)
        champion = client.get_model_version_by_alias(MODEL, "champion")
        assert str(champion.version) == "1"

        # The weekly schedule exists, with its timezone, and the scheduler made upcoming runs.
        schedules = weekly["schedules"]
        assert schedules and schedules[0]["schedule"]["cron"] == "0 3 * * 1"
        assert schedules[0]["schedule"]["timezone"] == "Europe/Berlin"
        deadline = time.time() + 60
        while True:
            upcoming = _api(stack, "POST", "/flow_runs/filter", json={
                "deployments": {"id": {"any_": [weekly["id"]]}},
                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}).json()
            if upcoming or time.time() > deadline:
                break
            time.sleep(2)
        assert upcoming, "the scheduler created no upcoming retrain-weekly runs"

        # A retrain on unchanged data and parameters finishes without training.
        again = _run_button(stack, weekly["id"], params)
        assert again.status_code == 201, again.text
        rerun = _wait_final(stack, again.json()["id"])
        assert rerun["state"]["type"] == "COMPLETED", rerun["state"]
        assert not _children(stack, rerun["id"]), "no training subflow on unchanged data"
        assert len(client.search_model_versions(f"name='{MODEL}'")) == 1

        # A manual and a scheduled training at once: the gpu trainings take turns.
        forced = {"params": {**params["params"], "force": True}}
        first = _started(_run_button(stack, train["id"], forced))
        second = _started(_run_button(stack, weekly["id"], forced))
        finals = [_wait_final(stack, first), _wait_final(stack, second)]
        assert [f["state"]["type"] for f in finals] == ["COMPLETED", "COMPLETED"]
        spans = sorted(
            (c["start_time"], c["end_time"]) for f in finals for c in _children(stack, f["id"])
        )
        assert len(spans) == 2 and spans[0][1] <= spans[1][0], f"trainings overlapped: {spans}"
        assert len(client.search_model_versions(f"name='{MODEL}'")) == 3
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) in {"1", "2", "3"}


def test_batch_predict_deployment_writes_predictions(stack, tmp_path):
    """Runs after the training test: classifies a folder with the champion."""
    from tests.helpers import COLOURS, write_image

    folder = tmp_path / "incoming"
    for i, name in enumerate(sorted(COLOURS)):
        write_image(folder / f"{name}.jpg", COLOURS[name], seed=70 + i)
    out = tmp_path / "predictions.csv"
    dep = _deployment(stack, "batch-predict", "batch-predict")
    bad = _api(stack, "POST", f"/deployments/{dep['id']}/create_flow_run",
               json={"parameters": {"params": {"input_folder": str(folder), "output": str(out),
                                               "top_k": -1}}})
    assert bad.status_code in (409, 422), bad.text
    # The stock CLI, as in the README: only the fields that differ from the defaults.
    cli = subprocess.run(
        [stack.bin("prefect"), "--no-prompt", "deployment", "run", "batch-predict/batch-predict",
         "--param", "params=" + json.dumps({"input_folder": str(folder), "output": str(out),
                                            "top_k": 2}),
         "--watch", "--watch-timeout", "400"],
        env=stack.env(), capture_output=True, text=True, timeout=450)
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    runs = _api(stack, "POST", "/flow_runs/filter", json={
        "deployments": {"id": {"any_": [dep["id"]]}}}).json()
    assert len(runs) == 1, runs
    run = runs[0]
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["work_pool_name"] == "cpu"
    import pandas as pd

    table = pd.read_csv(out, keep_default_na=False)
    # This test is about the deployment path; model quality is tested elsewhere.
    assert len(table) == 3 and (table["error"] == "").all()
    assert set(table["label"]) <= set(COLOURS)
    assert "top2_label" in table.columns
    arts = _api(stack, "POST", "/artifacts/filter", json={
        "artifacts": {"key": {"any_": ["batch-predict-summary"]}}}).json()
    assert arts and "3 classified" in arts[0]["data"]


CHROMIUM = "/usr/bin/chromium"


def test_browser_starts_a_run_from_the_prefect_ui(stack, tmp_path, tiny_backbone):
    """Headless Chromium opens the Prefect UI, opens the `train` deployment, starts a custom run
    from the run form and sees the run reach Completed in the UI."""

    from urllib.parse import quote

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium package is required (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    src = make_dataset(tmp_path / "src", per_class=12, seed=3)
    served = tmp_path / "served"
    archive = make_tgz(src, served / "ui.tgz")
    ui = stack.prefect_api[: -len("/api")]
    train = _deployment(stack, "train-and-register", "train")
    before = {r["id"] for r in _api(stack, "POST", "/flow_runs/filter", json={
        "deployments": {"id": {"any_": [train["id"]]}}}).json()}
    with serve_directory(served) as url, sync_playwright() as pw:
        params = _tiny_params(f"{url}/ui.tgz", archive, tiny_backbone, epochs=4,
                              min_accuracy=0.0, force=True)
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{ui}/deployments", wait_until="networkidle")
            page.get_by_role("link", name="train", exact=True).first.click()
            run_button = page.get_by_role("button", name="Run", exact=True)
            run_button.wait_for(timeout=30_000)
            run_button.click()
            page.get_by_text("Custom run", exact=True).click()
            page.wait_for_url("**/run?parameters=**", timeout=30_000)
            # The run form, prefilled the way the UI's own links do, then one field edited.
            page.goto(page.url.split("?")[0] + "?parameters="
                      + quote(quote(json.dumps(params))), wait_until="networkidle")
            epochs = page.locator(
                "xpath=//*[normalize-space(text())='Epochs (Optional)']/following::input[1]")
            epochs.wait_for(timeout=30_000)
            # A bad value typed into the form is refused: no run is created.
            epochs.fill("0")
            page.get_by_role("button", name="Submit").click()
            page.wait_for_timeout(3000)
            assert "/run" in page.url
            refused = [r for r in _api(stack, "POST", "/flow_runs/filter", json={
                "deployments": {"id": {"any_": [train["id"]]}}}).json() if r["id"] not in before]
            assert refused == [], "a run was created with epochs=0"
            epochs.fill("5")
            page.get_by_role("button", name="Submit").click()
            deadline = time.time() + 60
            new = []
            while not new and time.time() < deadline:
                runs = _api(stack, "POST", "/flow_runs/filter", json={
                    "deployments": {"id": {"any_": [train["id"]]}}}).json()
                new = [r for r in runs if r["id"] not in before]
                time.sleep(1)
            assert len(new) == 1, "the UI's Submit created no run"
            assert new[0]["parameters"]["params"]["epochs"] == 5
            page.goto(f"{ui}/runs/flow-run/{new[0]['id']}", wait_until="networkidle")
            page.get_by_text(new[0]["name"]).first.wait_for(timeout=30_000)
            # Keep serving the data until the run is over, then the UI must show it Completed.
            final = _wait_final(stack, new[0]["id"])
            assert final["state"]["type"] == "COMPLETED", final["state"]
            page.reload(wait_until="networkidle")
            page.get_by_text("Completed", exact=True).first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "completed.png"))
        except Exception:
            page.screenshot(path="/tmp/petalflow-ui-failure.png", full_page=True)
            raise
        finally:
            browser.close()


def _stop_workers(st: Stack) -> None:
    """Kill both workers and the flow processes they started, as a dead machine would."""
    import os
    import signal

    from flows.stack import descendant_pids

    victims = []
    for pool in ("cpu", "gpu"):
        pidfile = st.pids / f"worker-{pool}.pid"
        victims += descendant_pids(int(pidfile.read_text()))
        pidfile.unlink()
    for pid in victims:  # all at once, no chance to clean up: like pulling the plug
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_dead_worker_run_is_crashed_and_a_rerun_succeeds(stack, tmp_path, tiny_backbone):
    """Runs last: kills the workers mid-training. The zombie automation marks the runs
    Crashed (not Running forever); with workers back, a rerun resumes and completes."""
    src = make_dataset(tmp_path / "src", per_class=12, seed=5)
    served = tmp_path / "served"
    archive = make_tgz(src, served / "z.tgz")
    train = _deployment(stack, "train-and-register", "train")
    gpu = _deployment(stack, "train-model", "train-gpu")
    with serve_directory(served) as url:
        params = _tiny_params(f"{url}/z.tgz", archive, tiny_backbone, epochs=60,
                              min_accuracy=0.0, force=True)
        parent_id = _started(_run_button(stack, train["id"], params))
        deadline = time.time() + 240
        child = None
        while time.time() < deadline:  # wait until training has run a few epochs
            kids = [c for c in _children(stack, parent_id) if c["deployment_id"] == gpu["id"]]
            if kids and kids[0]["state"]["type"] == "RUNNING" and list(
                    (stack.petalflow_home / "runs").glob(f"*/run-{parent_id}/checkpoints/ckpt-*")):
                child = kids[0]
                break
            time.sleep(0.5)
        assert child is not None, "training never started"
        _stop_workers(stack)
        crashed = {}
        deadline = time.time() + 180
        while time.time() < deadline and len(crashed) < 2:
            for run_id in (parent_id, child["id"]):
                state = _api(stack, "GET", f"/flow_runs/{run_id}").json()["state"]
                if state["type"] == "CRASHED":
                    crashed[run_id] = state
            time.sleep(2)
        assert set(crashed) == {parent_id, child["id"]}, "runs left Running after the workers died"
        assert "heartbeat" in crashed[parent_id]["message"]

        start_workers(stack)
        rerun = _started(_run_button(stack, train["id"], params))
        final = _wait_final(stack, rerun)
        assert final["state"]["type"] == "COMPLETED", final["state"]
    record = next(p for p in (stack.petalflow_home / "runs").rglob("train.json")
                  if rerun in str(p))
    resumed = json.loads(record.read_text())
    assert resumed["resumed_from_epoch"] >= 1 and resumed["seeded_from"]
