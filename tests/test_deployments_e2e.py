"""The deployed stack, end to end: a real Prefect server and a real MLflow server on free
loopback ports with temporary homes, the `cpu` and `gpu` work pools, deployment.yaml deployed with
the stock CLI, one worker per pool, and runs triggered through the REST endpoint the UI's Run
button uses. Everything started here is stopped here, pass or fail."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from petalflow.stack import Stack, create_zombie_automation, deploy, down, \
    start_database, start_mlflow_server, start_prefect_server, start_workers
from tests.helpers import free_port, make_dataset, make_tgz, many_colours, prefect_request, \
    serve_directory

pytestmark = pytest.mark.e2e
MODEL = "petalflow-classifier"
FINAL_STATES = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")



@pytest.fixture(scope="module")
def stack():
    """The stack as `petalflow stack up --database postgres` starts it: both servers on a
    private PostgreSQL cluster in the stack folder (a folder the postgres system user can
    reach when the tests run as root; pytest's own temporary folders are private)."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="petalflow-e2e-"))
    tmp.chmod(0o755)
    st = Stack(stack_dir=tmp / "stack", prefect_port=free_port(), mlflow_port=free_port(),
               mlflow_dir=tmp / "mlflow", petalflow_home=tmp / "home", database="postgres")
    with pytest.MonkeyPatch.context() as mp:
        # The scheduler creates upcoming runs within seconds instead of a minute.
        mp.setenv("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS", "2")
        mp.setenv("PREFECT_WORKER_QUERY_SECONDS", "2")
        try:
            start_database(st)
            start_prefect_server(st)
            start_mlflow_server(st)
            start_workers(st)  # as `petalflow stack up`: the workers create the pools
            # Heartbeats every 30 s (the minimum); a run silent for 45 s is Crashed, and so is
            # one Pending for 60 s.
            create_zombie_automation(st, within_s=45, pending_within_s=60)
            deploy(st)
            yield st
        finally:
            down(st)
            shutil.rmtree(tmp, ignore_errors=True)


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
        if run["state"]["type"] in FINAL_STATES:
            return run
        time.sleep(2)
    logs = "\n".join(p.read_text()[-3000:] for p in st.logs.glob("*.log"))
    raise AssertionError(f"flow run {flow_run_id} did not finish; {_unfinished(st)}\n{logs}")


def _unfinished(st: Stack) -> str:
    """What else is queued or running, per deployment and state: what a run waits behind."""
    import collections

    names = {d["id"]: d["name"] for d in _api(st, "POST", "/deployments/filter", json={}).json()}
    runs = _api(st, "POST", "/flow_runs/filter", json={"flow_runs": {"state": {"type": {
        "not_any_": list(FINAL_STATES)}}}}).json()
    counts = collections.Counter((names.get(r["deployment_id"], "(none)"), r["state"]["name"])
                                 for r in runs)
    return "unfinished runs: " + (", ".join(f"{n} {d} {s}" for (d, s), n in sorted(
        counts.items())) or "none")


def _logged(st: Stack, flow_run_id: str, until: str, timeout_s: float = 60) -> list[str]:
    """The run's log messages once `until` is among them (or the timeout passes). A flow run's
    process sends its logs in batches, the last at exit, after the run's final state is set:
    a run seen COMPLETED may not have its last lines on the server yet."""
    deadline = time.time() + timeout_s
    while True:
        logs = _api(st, "POST", "/logs/filter", json={
            "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_DESC"}).json()
        messages = [entry["message"] for entry in logs]
        if until in messages or time.time() > deadline:
            return messages
        time.sleep(1)


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


def _running_training(st: Stack, parent_id: str, gpu_id: str) -> dict:
    """The training run (of deployment ``gpu_id``) that run ``parent_id`` handed its training
    to, once it is Running."""
    deadline = time.time() + 240
    while time.time() < deadline:
        kids = [c for c in _children(st, parent_id) if c["deployment_id"] == gpu_id]
        if kids and kids[0]["state"]["type"] == "RUNNING":
            return kids[0]
        time.sleep(0.5)
    raise AssertionError(f"the training never started; {_unfinished(st)}")


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
    assert bad.status_code == 409, bad.text  # the server's schema check (422: a malformed request)
    assert "epochs" in bad.text

    # Quick run of retrain-weekly as it is deployed (its own parameters, the schedule's):
    # following the champion, before there is one it trains nothing (it trained the flowers).
    idle = _wait_final(stack, _started(_run_button(stack, weekly["id"], {})))
    assert idle["parameters"] == {"params": {"follow_champion": True}}
    assert idle["state"]["type"] == "COMPLETED", idle["state"]
    assert idle["state"]["message"].startswith(
        f"nothing to do: {MODEL} has no champion to follow yet"), idle["state"]

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

        # A retrain on unchanged data and parameters finishes without training; the stock
        # CLI's --watch shows why (the run's final log line and state message).
        before_weekly = _run_ids(stack, weekly["id"])
        cli = subprocess.run(
            [stack.bin("prefect"), "--no-prompt", "deployment", "run",
             "train-and-register/retrain-weekly", "--param",
             "params=" + json.dumps(params["params"]), "--watch", "--watch-timeout", "400"],
            env={**stack.env(), "COLUMNS": "200"}, capture_output=True, text=True, timeout=450)
        assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
        watched = " ".join((cli.stdout + cli.stderr).split())
        assert "nothing to do: champion v1" in watched, watched[-4000:]
        [again] = [r for r in _new_runs(stack, weekly["id"], before_weekly)
                   if r["state"]["type"] != "SCHEDULED"]
        rerun = _wait_final(stack, again["id"])
        assert rerun["state"]["message"].startswith("nothing to do")
        assert rerun["state"]["type"] == "COMPLETED", rerun["state"]
        assert not _children(stack, rerun["id"]), "no training subflow on unchanged data"
        # As the schedule runs it: the champion's own data (this URL) and settings, unchanged.
        own = _wait_final(stack, _started(_run_button(stack, weekly["id"], {})))
        assert own["state"]["type"] == "COMPLETED", own["state"]
        assert own["state"]["message"].startswith("nothing to do: champion v1"), own["state"]
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
    assert bad.status_code == 409, bad.text  # the server's schema check (422: a malformed request)
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


def _new_runs(st: Stack, deployment_id: str, before: set, timeout_s: float = 120) -> list:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        runs = _api(st, "POST", "/flow_runs/filter", json={
            "deployments": {"id": {"any_": [deployment_id]}}}).json()
        new = [r for r in runs if r["id"] not in before]
        if new:
            return new
        time.sleep(2)
    return []


def _delete_schedule(st: Stack, deployment_id: str, schedule_id: str,
                     quiet_s: float = 8, timeout_s: float = 120) -> None:
    """Delete a schedule, then any run it left Scheduled, until none has appeared for
    `quiet_s` (four scheduler loops). Prefect's scheduler reads a deployment's next runs in one
    transaction and inserts them in another (PrefectHQ/prefect#17703): a schedule deleted in
    between, its Scheduled runs with it, gets them all back, 100 of a 5-s interval, which then
    run against a server the test has stopped and hold the cpu pool's slots ahead of every
    later test's runs. A run deleted as the worker takes it is only gone, not waited for."""
    _api(st, "DELETE", f"/deployments/{deployment_id}/schedules/{schedule_id}")
    deadline = time.time() + timeout_s
    quiet_since = time.time()
    while time.time() - quiet_since < quiet_s and time.time() < deadline:
        left = [r for r in _api(st, "POST", "/flow_runs/filter", json={
            "deployments": {"id": {"any_": [deployment_id]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}}).json()
                # this schedule's runs only (the scheduler's key names it), not the others'
                if schedule_id in (r.get("idempotency_key") or "")]
        for run in left:
            _api(st, "DELETE", f"/flow_runs/{run['id']}")
        if left:
            quiet_since = time.time()
        time.sleep(1)


def _run_ids(st: Stack, deployment_id: str) -> set:
    return {r["id"] for r in _api(st, "POST", "/flow_runs/filter", json={
        "deployments": {"id": {"any_": [deployment_id]}}}).json()}


def test_schedule_fires_watch_data_whose_event_trains_a_new_version(stack, tmp_path,
                                                                    tiny_backbone):
    """watch-data on a short interval (a schedule with the user's parameters) sees data that
    differs from what the champion was trained on, emits petalflow.dataset.changed, and the
    trigger of deployment.yaml starts a `train` run that registers a new version."""
    src = make_dataset(tmp_path / "src", per_class=12, seed=11)
    served = tmp_path / "served"
    archive = make_tgz(src, served / "watched.tgz")
    watch = _deployment(stack, "watch-data", "watch-data")
    train = _deployment(stack, "train-and-register", "train")
    assert watch["schedules"][0]["schedule"]["interval"] == 900
    client = _mlflow(stack)
    versions_before = len(client.search_model_versions(f"name='{MODEL}'"))
    train_before, watch_before = _run_ids(stack, train["id"]), _run_ids(stack, watch["id"])
    with serve_directory(served) as url:
        params = _tiny_params(f"{url}/watched.tgz", archive, tiny_backbone, min_accuracy=0.0)
        params["params"].pop("data_sha256")  # followed, not pinned
        resp = _api(stack, "POST", f"/deployments/{watch['id']}/schedules", json=[{
            "schedule": {"interval": 5}, "active": True, "parameters": params}])
        assert resp.status_code == 201, resp.text
        schedule_id = resp.json()[0]["id"]
        try:
            fired = _new_runs(stack, watch["id"], watch_before)
            assert fired, "the schedule created no watch-data run"
            _wait_final(stack, sorted(fired, key=lambda r: r["expected_start_time"])[0]["id"])
        finally:
            _delete_schedule(stack, watch["id"], schedule_id)
        # Runs the schedule started may overlap (the cpu worker runs two at once): the one
        # that sees the change first announces it, the others say it was announced.
        started = [r for r in _api(stack, "POST", "/flow_runs/filter", json={
            "deployments": {"id": {"any_": [watch["id"]]}}}).json()
                   if r["id"] not in watch_before and r["state"]["type"] != "SCHEDULED"]
        watched = [_wait_final(stack, r["id"]) for r in started]
        assert all(r["state"]["type"] == "COMPLETED" for r in watched), watched
        said = [r["state"]["message"] for r in watched]
        announced = [m for m in said if "emitted petalflow.dataset.changed" in m]
        assert len(announced) == 1, said
        assert all(", not announced again" in m for m in said if m not in announced), said
        triggered = _new_runs(stack, train["id"], train_before)
        assert len(triggered) == 1, triggered
        assert triggered[0]["parameters"]["params"]["data_url"] == f"{url}/watched.tgz"
        final = _wait_final(stack, triggered[0]["id"])
    assert final["state"]["type"] == "COMPLETED", final["state"]
    assert final["state"]["message"].startswith("registered petalflow-classifier v")
    assert len(client.search_model_versions(f"name='{MODEL}'")) == versions_before + 1
    # The run the user (here: the trigger) started carries its result and the model card.
    keys = ["model-card-petalflow-classifier", "train-result-petalflow-classifier",
            "training-progress-petalflow-classifier"]
    arts = _api(stack, "POST", "/artifacts/filter", json={"artifacts": {
        "key": {"any_": keys}, "flow_run_id": {"any_": [triggered[0]["id"]]}}}).json()
    assert {a["key"] for a in arts} == set(keys)
    # Training ran in a train-gpu run; its progress shows on the run that was started.
    progress = next(a for a in arts if a["key"].startswith("training-progress"))
    assert progress["data"] == 100.0
    card = next(a for a in arts if a["key"].startswith("model-card"))["data"]
    assert "Champion comparison" in card and "Images per class" in card


def test_an_export_job_emits_the_event_with_the_stock_cli_and_a_train_run_follows(
        stack, tmp_path, tiny_backbone):
    """What the README tells a user's own export job to run after refreshing the data."""
    src = make_dataset(tmp_path / "src", per_class=12, seed=12)
    served = tmp_path / "served"
    archive = make_tgz(src, served / "exported.tgz")
    train = _deployment(stack, "train-and-register", "train")
    client = _mlflow(stack)
    versions_before = len(client.search_model_versions(f"name='{MODEL}'"))
    before = _run_ids(stack, train["id"])
    with serve_directory(served) as url:
        params = _tiny_params(f"{url}/exported.tgz", archive, tiny_backbone, min_accuracy=0.0)
        cli = subprocess.run(
            [stack.bin("prefect"), "--no-prompt", "event", "emit", "petalflow.dataset.changed",
             "--resource-id", "petalflow.dataset.my-export",
             "--payload", json.dumps(params)],
            env=stack.env(), capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        started = _new_runs(stack, train["id"], before)
        assert len(started) == 1, "the event started no train run"
        final = _wait_final(stack, started[0]["id"])
        assert final["state"]["type"] == "COMPLETED", final["state"]
        assert len(client.search_model_versions(f"name='{MODEL}'")) == versions_before + 1

        # The README's other way: one HTTP call to the Prefect API.
        import datetime

        before = _run_ids(stack, train["id"])
        posted = _api(stack, "POST", "/events", json=[{
            "id": str(uuid.uuid4()),
            "occurred": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%SZ"),
            "event": "petalflow.dataset.changed",
            "resource": {"prefect.resource.id": "petalflow.dataset.my-export"},
            "payload": params}])
        assert posted.status_code == 204, posted.text
        started = _new_runs(stack, train["id"], before)
        assert len(started) == 1, "the posted event started no train run"
        assert _wait_final(stack, started[0]["id"])["state"]["type"] == "COMPLETED"


CHROMIUM = "/usr/bin/chromium"


SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"


def _field(page, title: str, optional: bool = True):
    """The input under a run-form field's label, found by its title as a person reads it (the
    form adds "(Optional)" to the title of a field with a default)."""
    label = f"{title} (Optional)" if optional else title
    return page.locator(f"xpath=//*[normalize-space(text())='{label}']"
                        "/following::*[self::input or self::textarea][1]")


def _open_custom_run_form(page, ui: str, deployment: str = "train",
                          first_field: str = "Dataset URL or path") -> None:
    page.goto(f"{ui}/deployments", wait_until="networkidle")
    page.get_by_role("link", name=deployment, exact=True).first.click()
    run_button = page.get_by_role("button", name="Run", exact=True)
    run_button.wait_for(timeout=30_000)
    run_button.click()
    page.get_by_text("Custom run", exact=True).click()
    _field(page, first_field).wait_for(timeout=30_000)


def _click_for_a_box(page, title: str, button: str) -> None:
    """Click ``button`` under the Optional field titled ``title`` and wait for the input box
    it brings."""
    boxes = page.locator("input, textarea")
    before = boxes.count()
    page.locator(f"xpath=//*[normalize-space(text())='{title} (Optional)']"
                 f"/following::button[normalize-space(.)='{button}'][1]").click()
    deadline = time.time() + 30
    while boxes.count() == before and time.time() < deadline:
        page.wait_for_timeout(200)


def _add_list_item(page, title: str, value: str) -> None:
    """Click the list field's "Add item" and type ``value`` into the box it adds."""
    _click_for_a_box(page, title, "Add item")
    _field(page, title).fill(value)


def _choose(page, title: str, choice: str) -> None:
    """Click ``choice`` on an Optional field's switch (its choices are named by the parameter
    model, ``params.unset_or``) and wait for the input that choice brings."""
    _click_for_a_box(page, title, choice)


def _launch_chromium(pw):
    return pw.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])


def test_browser_starts_a_run_from_the_prefect_ui(stack, tmp_path, any_size_backbone):
    """Headless Chromium opens the Prefect UI, opens the `train` deployment's run form, changes
    only the dataset URL and the backbone as a person would (typing into the fields), submits,
    and the run completes and registers a version; the run page shows the result. A bad value
    typed into the form is refused. The screenshots go to docs/screenshots/ (the README's)."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium package is required (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    src = make_dataset(tmp_path / "src", per_class=20, seed=3)
    served = tmp_path / "served"
    make_tgz(src, served / "ui.tgz")
    ui = stack.prefect_api[: -len("/api")]
    train = _deployment(stack, "train-and-register", "train")
    client = _mlflow(stack)
    versions_before = len(client.search_model_versions(f"name='{MODEL}'"))
    before = _run_ids(stack, train["id"])
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with serve_directory(served) as url, sync_playwright() as pw:
        browser = _launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            # A bad value typed into the form is refused: no run is created.
            _open_custom_run_form(page, ui)
            _field(page, "Epochs").fill("0")
            page.get_by_role("button", name="Submit").click()
            page.wait_for_timeout(3000)
            assert "/run" in page.url
            assert _run_ids(stack, train["id"]) == before, "a run was created with epochs=0"

            # A fresh form: only the dataset URL and the backbone change. Its fields come in
            # TrainParams' order (on this PostgreSQL-backed server, without their positions,
            # shortest name first: Seed, Force retraining, Sweep, ..., the dataset URL seventh).
            _open_custom_run_form(page, ui)
            from petalflow.tasks.params import TrainParams

            titles = [f"{field.title} (Optional)" for field in TrainParams.model_fields.values()]
            shown = [label for label in page.locator(
                "xpath=//*[substring(normalize-space(text()),"
                " string-length(normalize-space(text())) - 9) = '(Optional)']"
            ).all_inner_texts() if label.strip() in titles]
            assert [label.strip() for label in shown] == titles
            _field(page, "Dataset URL or path").fill(f"{url}/ui.tgz")
            _field(page, "Backbone (TF Hub handle)").fill(str(any_size_backbone))
            # The screenshot once the form shows both values (it caught the backbone's box
            # before its redraw, showing the default).
            from playwright.sync_api import expect

            expect(_field(page, "Dataset URL or path")).to_have_value(f"{url}/ui.tgz")
            expect(_field(page, "Backbone (TF Hub handle)")).to_have_value(str(any_size_backbone))
            page.wait_for_timeout(1000)
            page.screenshot(path=str(SCREENSHOTS / "ui-run-form.png"))
            page.get_by_role("button", name="Submit").click()
            new = _new_runs(stack, train["id"], before, timeout_s=60)
            assert len(new) == 1, "the UI's Submit created no run"
            sent = new[0]["parameters"]["params"]
            assert sent["data_url"] == f"{url}/ui.tgz"
            assert sent["backbone"] == str(any_size_backbone)
            assert not sent.get("data_sha256"), "the form submitted a digest the user never typed"
            final = _wait_final(stack, new[0]["id"])
            assert final["state"]["type"] == "COMPLETED", final["state"]
            assert final["state"]["message"].startswith("registered petalflow-classifier v")
            page.goto(f"{ui}/runs/flow-run/{new[0]['id']}", wait_until="networkidle")
            page.get_by_text("Completed", exact=True).first.wait_for(timeout=60_000)
            page.screenshot(path=str(SCREENSHOTS / "ui-run-completed.png"))
            page.get_by_text("Artifacts", exact=True).first.click()
            page.get_by_text("train-result-petalflow-classifier").first.wait_for(timeout=30_000)
            page.screenshot(path=str(SCREENSHOTS / "ui-run-artifacts.png"), full_page=True)
            page.get_by_text("train-result-petalflow-classifier").first.click()
            page.get_by_text("Registered version").first.wait_for(timeout=30_000)
            page.screenshot(path=str(SCREENSHOTS / "ui-run-result.png"), full_page=True)

            # Whoever pulls the model opens its version in the MLflow UI, at an address of
            # their own (not the workers' 127.0.0.1): the model card's confusion matrix is
            # shown (the image loads), its links lead there, and the run names its data.
            version = re.search(r" v(\d+) ", final["state"]["message"]).group(1)
            theirs = stack.mlflow_uri.replace("127.0.0.1", "localhost")
            page.goto(f"{theirs}/#/models/{MODEL}/versions/{version}")
            image = page.locator("img[src*='confusion.png']")
            image.wait_for(timeout=60_000)
            page.wait_for_function("img => img.complete", arg=image.element_handle(),
                                   timeout=30_000)
            assert image.evaluate("img => img.naturalWidth") > 0, image.get_attribute("src")
            link = page.get_by_role("link", name="MLflow run").first.evaluate("a => a.href")
            assert link.startswith(f"{theirs}/#/experiments/"), link
            run = client.get_run(client.get_model_version(MODEL, version).run_id)
            page.goto(f"{stack.mlflow_uri}/#/experiments/{run.info.experiment_id}/runs/"
                      f"{run.info.run_id}")
            page.get_by_text("Datasets", exact=True).first.wait_for(timeout=60_000)
            shown = page.get_by_text(re.compile(r"^ui \([0-9a-f]{12}\)$")).first
            shown.wait_for(timeout=30_000)
        except Exception:
            page.screenshot(path=str(tmp_path / "ui-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
    assert len(client.search_model_versions(f"name='{MODEL}'")) == versions_before + 1


def test_browser_classifies_a_folder_from_the_batch_predict_form(stack, tmp_path):
    """Runs after a training test (a version exists; it is made champion if no version passed
    the gate on the tests' tiny data). A person opens batch-predict's run form, switches
    Model URI from "The champion" to "Another model" and types the champion's URI (the switch
    said "str | None" before its choices were named), adds a folder to Images ("Add item",
    then typing), types a file name as the output and
    submits: the run classifies the folder with the champion and writes the table in the
    folder the deployment was deployed from (its worker's working folder); the run's final
    message, its log and its artifact give the table's whole path, as the form's help says.
    The form reads as written: the default model is named (a placeholder in angle brackets
    was swallowed by the UI's markdown: "Empty: models:/@champion")."""
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium package is required (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    from tests.helpers import COLOURS, write_image

    folder = tmp_path / "incoming"
    for i, name in enumerate(sorted(COLOURS)):
        write_image(folder / f"{name}.jpg", COLOURS[name], seed=90 + i)
    client = _mlflow(stack)
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert versions, "no version registered: run after a training test"
    if "champion" not in client.get_registered_model(MODEL).aliases:
        client.set_registered_model_alias(MODEL, "champion",
                                          max(int(v.version) for v in versions))
    ui = stack.prefect_api[: -len("/api")]
    dep = _deployment(stack, "batch-predict", "batch-predict")
    (step,) = dep["pull_steps"]
    workdir = Path(step["prefect.deployments.steps.set_working_directory"]["directory"])
    name = f"ui-predictions-{uuid.uuid4().hex[:8]}.csv"
    written = workdir / name
    before = _run_ids(stack, dep["id"])
    with sync_playwright() as pw:
        browser = _launch_chromium(pw)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            _open_custom_run_form(page, ui, "batch-predict", first_field="Registered model name")
            said = " ".join(page.inner_text("body").split())
            assert ("Unset (the default; 'The champion' in the Prefect UI's form): the "
                    "champion of the registered model named below (models:/NAME@champion).") in said
            assert "the run's final message gives the whole path" in said
            # The model named explicitly: Model URI's switch from its default to a text box.
            _choose(page, "Model URI", "Another model")
            _field(page, "Model URI").fill(f"models:/{MODEL}@champion")
            _add_list_item(page, "Images", str(folder))
            _field(page, "Output file", optional=False).fill(name)
            page.get_by_role("button", name="Submit").click()
            new = _new_runs(stack, dep["id"], before, timeout_s=60)
            assert len(new) == 1, "the UI's Submit created no run"
            sent = new[0]["parameters"]["params"]
            assert sent["input"] == [str(folder)] and sent["output"] == name
            assert sent["model_uri"] == f"models:/{MODEL}@champion"
            final = _wait_final(stack, new[0]["id"])
            message = final["state"]["message"]
            assert final["state"]["type"] == "COMPLETED", message
            assert message.startswith(f"classified 3 of 3 images (0 errors) with "
                                      f"models:/{MODEL}@champion (version "), message
            assert message.endswith(f" -> {written}"), message
            import pandas as pd

            table = pd.read_csv(written, keep_default_na=False)
            assert len(table) == 3 and (table["error"] == "").all()
            assert message in _logged(stack, new[0]["id"], until=message)
            arts = _api(stack, "POST", "/artifacts/filter", json={
                "artifacts": {"flow_run_id": {"any_": [new[0]["id"]]},
                              "key": {"any_": ["batch-predict-summary"]}}}).json()
            assert len(arts) == 1 and f"Output: `{written}`." in arts[0]["data"], arts
        except Exception:
            page.screenshot(path=str(tmp_path / "ui-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
            written.unlink(missing_ok=True)


def test_a_training_over_its_time_limit_is_stopped_by_its_worker_and_the_next_run_goes_on(
        stack, tmp_path, tiny_backbone):
    """A hung training held its model's turn for ever: the runs of the model after it (the
    weekly schedule's) waited behind it, each holding a cpu worker slot. Started as the UI's
    Run button does, a training on the gpu pool running longer than max_training_hours (here
    11 s, against 500 epochs) is cancelled by the run that handed it over; the gpu worker
    stops its process; the run fails saying so, and a run of the same model that was waiting
    for its turn trains and registers."""
    src = make_dataset(tmp_path / "src", per_class=12, seed=7)
    archive = make_tgz(src, tmp_path / "served" / "slow.tgz")
    train = _deployment(stack, "train-and-register", "train")
    gpu = _deployment(stack, "train-model", "train-gpu")
    with serve_directory(tmp_path / "served") as url:
        slow = _tiny_params(f"{url}/slow.tgz", archive, tiny_backbone, model_name="slow",
                            epochs=500, max_training_hours=0.003, edge_export=False)
        slow_id = _started(_run_button(stack, train["id"], slow))
        _running_training(stack, slow_id, gpu["id"])
        after = _tiny_params(f"{url}/slow.tgz", archive, tiny_backbone, model_name="slow",
                             edge_export=False, min_accuracy=0.0)
        after_id = _started(_run_button(stack, train["id"], after))
        stopped = _wait_final(stack, slow_id)
        done = _wait_final(stack, after_id)
    assert stopped["state"]["type"] == "FAILED", stopped["state"]
    assert ("TrainingTimeLimit: the training step, handed to train-model/train-gpu (run "
            in stopped["state"]["message"]), stopped["state"]
    assert ("ran longer than max_training_hours (0.003 hours = 11 s) allows and was stopped; "
            "nothing was registered" in stopped["state"]["message"]), stopped["state"]
    (child,) = [c for c in _children(stack, slow_id) if c["deployment_id"] == gpu["id"]]
    assert child["state"]["type"] == "CANCELLED", child["state"]
    told = [s["message"] for s in _api(stack, "GET", "/flow_run_states/",
                                       params={"flow_run_id": child["id"]}).json()]
    assert any((m or "").startswith("stopped: it ran longer than max_training_hours (0.003 "
                                    "hours = 11 s) allows") for m in told), told
    assert not list((stack.petalflow_home / "runs").glob(f"*/run-{slow_id}/train.json")), \
        "the training ran to its end: give it more epochs"
    assert done["state"]["type"] == "COMPLETED", done["state"]
    deadline = time.time() + 30  # the run's logs reach the server in batches
    while not any(m.startswith("model 'slow': another training of it is running")
                  for m in _logged(stack, after_id, until="", timeout_s=0)):
        assert time.time() < deadline, "the next run did not wait for the stopped one's turn"
        time.sleep(1)
    versions = _mlflow(stack).search_model_versions("name='slow'")
    assert [(str(v.version), v.run_id) for v in versions] == [
        ("1", _mlflow(stack).get_model_version_by_alias("slow", "champion").run_id)]


def test_a_training_whose_run_was_killed_stops_and_the_next_run_ends_its_mlflow_run(
        stack, tmp_path, tiny_backbone):
    """The out-of-memory killer ends the process of a run that handed its training over (its
    worker lives on). Prefect marks that run Crashed but lets its training run go on: it
    trained on for nobody (nothing it makes is registered), holding the gpu worker, and its
    MLflow run stayed RUNNING for ever. Now the training run sees its run ended and cancels
    itself, saying why; its worker stops it; the model's next run (started as the UI's Run
    button does) says the training before it was killed, ends its MLflow run KILLED, trains
    on the freed gpu worker and registers."""
    from petalflow.stack import descendant_pids

    src = make_dataset(tmp_path / "src", per_class=80, seed=9)  # minutes of training
    archive = make_tgz(src, tmp_path / "served" / "killed.tgz")
    train = _deployment(stack, "train-and-register", "train")
    gpu = _deployment(stack, "train-model", "train-gpu")
    with serve_directory(tmp_path / "served") as url:
        doomed = _tiny_params(f"{url}/killed.tgz", archive, tiny_backbone, model_name="killed",
                              epochs=500, augment=True, batch_size=2, edge_export=False)
        doomed_id = _started(_run_button(stack, train["id"], doomed))
        child = _running_training(stack, doomed_id, gpu["id"])
        # Its process only (not a scheduled watch-data run beside it), as that killer picks.
        worker = int((stack.pids / "worker-cpu.pid").read_text())
        mark = f"PREFECT__FLOW_RUN_ID={doomed_id}".encode()
        doomed_pids = [pid for pid in descendant_pids(worker) if pid != worker
                       and mark in _environ(pid)]
        assert doomed_pids, "the run's process was not found"
        _kill(doomed_pids)
        crashed = _wait_final(stack, doomed_id, timeout_s=120)
        stopped = _wait_final(stack, child["id"], timeout_s=120)
        assert not list((stack.petalflow_home / "runs").glob(f"*/run-{doomed_id}/train.json")), \
            "the training ran to its end: give it more epochs"
        after = _tiny_params(f"{url}/killed.tgz", archive, tiny_backbone, model_name="killed",
                             edge_export=False, min_accuracy=0.0)
        after_id = _started(_run_button(stack, train["id"], after))
        done = _wait_final(stack, after_id)
    assert crashed["state"]["type"] == "CRASHED", crashed["state"]
    assert stopped["state"]["type"] == "CANCELLED", stopped["state"]
    told = [s["message"] or "" for s in _api(stack, "GET", "/flow_run_states/",
                                             params={"flow_run_id": child["id"]}).json()]
    said = (f"cancelled: the run that handed this training over ended before it "
            f"({crashed['name']} ended Crashed: ")
    (cancelling,) = [m for m in told if m.startswith(said)]
    assert cancelling in _logged(stack, child["id"], until=cancelling, timeout_s=30)
    assert done["state"]["type"] == "COMPLETED", done["state"]
    logged = _logged(stack, after_id, until="", timeout_s=0)
    assert any(m.startswith(f"model 'killed': the training before this one (flow run "
                            f"{crashed['name']!r} ({doomed_id}), since ") and m.endswith(
        ") ended without ending its turn: its process was killed (the out-of-memory killer, "
        "its machine or worker gone)") for m in logged), logged
    client = _mlflow(stack)
    registered = client.get_model_version_by_alias("killed", "champion")
    runs = client.search_runs([client.get_run(registered.run_id).info.experiment_id],
                              "params.model_name = 'killed'")
    (left,) = [r for r in runs if r.info.run_id != registered.run_id]
    assert left.info.status == "KILLED", left.info
    assert left.data.tags["petalflow.failure"].startswith(
        f"its run was killed before it ended (the out-of-memory killer, its "
        f"machine or worker gone: flow run {crashed['name']!r} ({doomed_id}), since "), left.data
    assert left.data.tags["petalflow.failure"].endswith(
        f"nothing of it was registered. Ended by flow run {done['name']!r} ({after_id})")
    assert registered.version == "1"


def _environ(pid: int) -> bytes:
    """A process's environment (empty once it has ended)."""
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _freeze_workers(st: Stack) -> list[int]:
    """Stop (SIGSTOP) both workers and the flow processes they started, all at once: nothing
    they run moves on from here. Returns their pids for ``_kill``."""
    import os
    import signal

    from petalflow.stack import descendant_pids

    victims = []
    for pool in ("cpu", "gpu"):
        pidfile = st.pids / f"worker-{pool}.pid"
        victims += descendant_pids(int(pidfile.read_text()))
        pidfile.unlink()
    for pid in victims:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    return victims


def _kill(victims: list[int]) -> None:
    """Kill them, no chance to clean up: like pulling the plug."""
    import os
    import signal

    for pid in victims:
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
        # Not forced: a forced retrain starts fresh, this rerun must resume the killed attempt.
        params = _tiny_params(f"{url}/z.tgz", archive, tiny_backbone, epochs=150,
                              min_accuracy=0.0)
        parent_id = _started(_run_button(stack, train["id"], params))
        attempts = f"*/run-{parent_id}"
        deadline = time.time() + 240
        child = None
        while time.time() < deadline:  # wait until training has saved an epoch's checkpoint
            kids = [c for c in _children(stack, parent_id) if c["deployment_id"] == gpu["id"]]
            if kids and kids[0]["state"]["type"] == "RUNNING" and list(
                    (stack.petalflow_home / "runs").glob(f"{attempts}/checkpoints/checkpoint")):
                child = kids[0]
                break
            time.sleep(0.1)
        assert child is not None, "training never started"
        # Frozen at once, then killed: a fast machine must not finish the epochs in between.
        victims = _freeze_workers(stack)
        ended = list((stack.petalflow_home / "runs").glob(f"{attempts}/train.json"))
        _kill(victims)
        assert not ended, "the training ended before the workers died: give it more epochs"
        index = next((stack.petalflow_home / "runs").glob(f"{attempts}/checkpoints/checkpoint"))
        last = re.search(r'^model_checkpoint_path: "ckpt-(\d+)"', index.read_text(), re.M)
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
    assert resumed["seeded_from"], resumed  # from the killed attempt's checkpoints
    assert resumed["resumed_from_epoch"] == int(last.group(1)) >= 1, resumed


def test_a_run_left_pending_by_a_dead_worker_is_crashed(stack):
    """A worker that dies between submitting a run (Pending) and its start leaves no process
    to send heartbeats: the Pending automation crashes the run, saying why. (The run is put in
    Pending here as that worker would have, through the API.)"""
    dep = _deployment(stack, "batch-predict", "batch-predict")
    resp = _api(stack, "POST", f"/deployments/{dep['id']}/create_flow_run",
                json={"parameters": {"params": {"input": ["/nowhere"], "output": "/tmp/x.csv"}},
                      "state": {"type": "PENDING", "name": "Pending"}})
    run_id = _started(resp)
    started = time.time()
    state = None
    while time.time() - started < 200:
        state = _api(stack, "GET", f"/flow_runs/{run_id}").json()["state"]
        if state["type"] != "PENDING":
            break
        time.sleep(3)
    assert state["type"] == "CRASHED", state
    assert "stayed Pending" in state["message"]
    assert time.time() - started >= 55  # not before the automation's 60 s


def test_a_sweep_spreads_over_two_gpu_workers_and_registers_the_best(
        stack, tmp_path, tiny_backbone, other_backbone):
    """A second gpu worker joins (what `petalflow stack up --gpu-workers 2` starts); a sweep of
    three candidates over two backbones, started as the UI's Run button does: the candidates
    are train-gpu runs on the gpu pool that overlap in time, each a nested MLflow run, and the
    best on validation accuracy is registered."""
    stack.workers = {**stack.workers, "gpu": 2}
    start_workers(stack)  # the running workers stay; worker-gpu-2 starts
    assert (stack.pids / "worker-gpu-2.pid").exists()
    src = make_dataset(tmp_path / "src", per_class=12)
    archive = make_tgz(src, tmp_path / "served" / "photos.tgz")
    train = _deployment(stack, "train-and-register", "train")
    gpu = _deployment(stack, "train-model", "train-gpu")
    sweep = [{"learning_rate": 0.05}, {"learning_rate": 0.001, "epochs": 2},
             {"backbone": str(other_backbone)}]
    with serve_directory(tmp_path / "served") as url:
        params = _tiny_params(f"{url}/photos.tgz", archive, tiny_backbone, model_name="swept",
                              edge_export=False, min_accuracy=0.0, sweep=sweep)
        run = _wait_final(stack, _started(_run_button(stack, train["id"], params)))
    assert run["state"]["type"] == "COMPLETED", run["state"]
    trainings = [c for c in _children(stack, run["id"]) if c["deployment_id"] == gpu["id"]]
    assert len(trainings) == 3
    assert all(t["state"]["type"] == "COMPLETED" and t["work_pool_name"] == "gpu"
               for t in trainings)
    spans = sorted((t["start_time"], t["end_time"]) for t in trainings)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), \
        f"no two candidates trained at once: {spans}"

    client = _mlflow(stack)
    champion = client.get_model_version_by_alias("swept", "champion")
    parent = client.get_run(champion.run_id)
    winner = int(parent.data.tags["petalflow.sweep_winner"])
    assert champion.tags["backbone"] == (sweep[winner - 1].get("backbone") or str(tiny_backbone))
    children = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'"))
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    ranking = json.loads(Path(client.download_artifacts(
        parent.info.run_id, "sweep/ranking.json", str(tmp_path))).read_text())
    assert ranking[0]["candidate"] == winner and len(ranking) == 3


def test_a_dataset_of_many_classes_registers_its_model_card_on_postgresql(stack, tmp_path,
                                                                         tiny_backbone):
    """MLflow's registry on PostgreSQL keeps 5,000 characters of a version's description
    (varchar(5000)) and refuses more; the model card of a 40-class dataset is longer, and the
    run failed after registering its version. Now the run completes: the version's
    description is the card shortened to fit, its run keeps the whole card."""
    import mlflow

    from petalflow.tasks.registry import DESCRIPTION_LIMIT

    name = "petalflow-many-classes"
    src = make_dataset(tmp_path / "src", per_class=5, colours=many_colours(40))
    served = tmp_path / "served"
    archive = make_tgz(src, served / "photos.tgz")
    train = _deployment(stack, "train-and-register", "train")
    with serve_directory(served) as url:
        params = _tiny_params(f"{url}/photos.tgz", archive, tiny_backbone, model_name=name,
                              min_accuracy=0.0, epochs=2)
        run = _wait_final(stack, _started(_run_button(stack, train["id"], params)))
    assert run["state"]["type"] == "COMPLETED", run["state"]
    client = _mlflow(stack)
    version = client.get_model_version_by_alias(name, "champion")
    card = Path(client.download_artifacts(version.run_id, "model_card.md", str(tmp_path))
                ).read_text()
    assert len(card) > DESCRIPTION_LIMIT and "40 classes: the whole matrix" in card
    description = version.description
    assert len(description) <= DESCRIPTION_LIMIT
    assert description.startswith(f"# Model card: {name} version {version.version}")
    assert re.search(r"held-out images \(95 % interval [0-9.]+–[0-9.]+\); macro F1", description)
    assert "The whole card is the version's run artifact `model_card.md`.*" in description
    # What the run could not do before: the whole card is refused as a description.
    with pytest.raises(mlflow.exceptions.MlflowException, match="value too long"):
        client.update_model_version(name, version.version, description=card)


def test_both_servers_keep_their_data_in_postgresql(stack):
    """What the runs above did is in the private cluster's databases, and neither server wrote
    a SQLite file."""
    import psycopg

    with psycopg.connect(stack.database_url("prefect")) as conn:
        runs = conn.execute("SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'"
                            ).fetchone()[0]
    with psycopg.connect(stack.database_url("mlflow")) as conn:
        versions = conn.execute("SELECT count(*) FROM model_versions WHERE name = %s",
                                (MODEL,)).fetchone()[0]
    assert runs >= 5 and versions >= 2
    assert not list(stack.stack_dir.rglob("*.db")) and not list(stack.mlflow_dir.rglob("*.db"))
