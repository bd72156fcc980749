"""What cannot run here is validated offline: deployment.yaml's structure and the Kubernetes
GPU job template rendered with the job variables a user sets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def test_deployment_yaml_declares_the_deployments_and_pools():
    spec = yaml.safe_load((REPO / "deployment.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"train", "retrain-weekly", "watch-data", "train-gpu", "batch-predict"}
    assert deps["train-gpu"]["work_pool"]["name"] == "gpu"
    # One training per gpu worker (each started with --limit 1), so N workers train N at once.
    from petalflow.stack import WORKER_LIMITS

    assert "concurrency_limit" not in deps["train-gpu"] and WORKER_LIMITS["gpu"] == 1
    assert {deps[n]["work_pool"]["name"] for n in ("train", "retrain-weekly", "watch-data",
                                                   "batch-predict")} == {"cpu"}
    assert deps["watch-data"]["schedules"][0]["interval"] == 900
    trigger, on_drift = deps["train"]["triggers"]
    assert trigger["expect"] == ["petalflow.dataset.changed"]
    assert trigger["parameters"] == {"params": "{{ event.payload.params }}"}
    # Drift can start a retraining too, but only once someone turns it on.
    assert on_drift["expect"] == ["petalflow.drift.detected"] and on_drift["enabled"] is False
    assert on_drift["match"] == {"prefect.resource.id": "petalflow.model.*"}
    assert on_drift["parameters"] == {"params": "{{ event.payload.params }}"}
    sched = deps["retrain-weekly"]["schedules"][0]
    assert sched["cron"] == "0 3 * * 1" and sched["timezone"]
    for dep in deps.values():
        path, func = dep["entrypoint"].split(":")
        assert (REPO / path).exists() and f"def {func}(" in (REPO / path).read_text()
        assert dep["enforce_parameter_schema"] is True


def test_texts_the_prefect_ui_renders_as_markdown_hold_no_html_like_placeholders():
    """The Prefect UI renders deployment descriptions and the run form's help (the parameter
    models' docstrings and field descriptions) as markdown, dropping anything that reads as an
    HTML tag: "models:/<model_name>@champion" showed as "models:/@champion". None may hold one
    (placeholders are written NAME)."""
    from petalflow.tasks.params import PredictParams, TrainParams

    spec = yaml.safe_load((REPO / "deployment.yaml").read_text())
    texts = {f"deployment {d['name']}": d.get("description", "") for d in spec["deployments"]}

    def collect(schema, where):
        for key, value in schema.items():
            if key in ("description", "title") and isinstance(value, str):
                texts[f"{where}.{key}"] = value
            elif isinstance(value, dict):
                collect(value, f"{where}.{key}")

    for model in (TrainParams, PredictParams):
        collect(model.model_json_schema(), model.__name__)
    from petalflow.flows.predict_flow import batch_predict
    from petalflow.flows.train_flow import train_and_register, train_model_flow
    from petalflow.flows.watch_flow import watch_data

    for flow in (train_and_register, train_model_flow, batch_predict, watch_data):
        texts[f"flow {flow.name}"] = flow.description or ""
    tag = re.compile(r"<[A-Za-z_/][^>]*>")
    found = {where: tag.findall(text) for where, text in texts.items() if tag.search(text)}
    assert not found, found


def _forms_people_fill() -> dict:
    """The parameter schemas Prefect stores for the run forms people fill (train,
    batch-predict, watch-data), by flow name."""
    from prefect.utilities.callables import parameter_schema

    from petalflow.flows.predict_flow import batch_predict
    from petalflow.flows.train_flow import train_and_register
    from petalflow.flows.watch_flow import watch_data

    return {flow.name: parameter_schema(flow.fn).model_dump_for_openapi()
            for flow in (train_and_register, batch_predict, watch_data)}


def test_the_run_forms_optional_fields_name_their_choices():
    """The Prefect UI renders an Optional field of a run form (its ``anyOf``) as a switch
    labelled by each branch's title, else by its type: "str | None", the None side saying only
    'Property is type "None"' (batch-predict's Model URI, train's Dataset sha256, each field of a
    sweep candidate). Every such field of the forms people fill names its choices, the unset
    one (the default) first. (train-model's form, filled by the train flow, is left as is.)"""
    switches = {}

    def collect(schema, where):
        if isinstance(schema, dict):
            branches = schema.get("anyOf", [])
            if any(b.get("type") == "null" for b in branches):
                switches[where] = [(b.get("type"), b.get("title")) for b in branches]
            for key, value in schema.items():
                collect(value, f"{where}.{key}")
        elif isinstance(schema, list):
            for i, value in enumerate(schema):
                collect(value, f"{where}[{i}]")

    for flow_name, schema in _forms_people_fill().items():
        collect(schema, flow_name)
    assert switches["batch-predict.definitions.PredictParams.properties.model_uri"] == [
        ("null", "The champion"), ("string", "Another model")]
    unnamed = {where: branches for where, branches in switches.items()
               if branches[0][0] != "null" or not all(title for _, title in branches)}
    assert not unnamed, unnamed


def test_the_run_forms_list_their_fields_as_the_models_declare_them():
    """The Prefect UI orders a run form's fields by their ``position``, else as the stored
    schema lists them; a Prefect server on PostgreSQL stores the schema as jsonb, which lists
    keys shortest first (train's form opened on Seed, Force retraining, Sweep; the dataset URL
    seventh). Every field of the forms people fill has its place in its model as position."""
    from petalflow.tasks.params import PredictParams, SweepCandidate, TrainParams

    declared = {model.__name__: list(model.model_fields)
                for model in (TrainParams, PredictParams, SweepCandidate)}
    for flow_name, schema in _forms_people_fill().items():
        for name, definition in schema["definitions"].items():
            fields = definition["properties"]
            shuffled = dict(sorted(fields.items(), key=lambda item: (len(item[0]), item[0])))
            ordered = sorted(shuffled, key=lambda key: shuffled[key]["position"])
            assert ordered == declared[name], (flow_name, name)


def test_environment_defaults_are_set_once_per_entry_point():
    """The runs a worker starts get the same environment defaults as the petalflow command
    (deployment.yaml's job variables, one YAML anchor), and no product module sets them on its
    own (the entry points do)."""
    from petalflow.tasks.common import ENV_DEFAULTS

    spec = yaml.safe_load((REPO / "deployment.yaml").read_text())
    for dep in spec["deployments"]:
        assert dep["work_pool"]["job_variables"]["env"] == ENV_DEFAULTS, dep["name"]
    setters = [p.relative_to(REPO).as_posix() for folder in ("flows", "tasks", "petalflow")
               for p in (REPO / folder).rglob("*.py")
               if any(f'"{key}"' in p.read_text() for key in ENV_DEFAULTS)]
    assert setters == ["tasks/common.py"]
    docker = (REPO / "infra" / "Dockerfile.worker").read_text()  # the image's own entry point
    assert all(f"{key}={value}" in docker for key, value in ENV_DEFAULTS.items())


def test_k8s_gpu_job_template_renders_with_user_job_variables():
    from prefect.utilities.templating import apply_values

    template = json.loads((REPO / "infra" / "k8s" / "gpu-base-job-template.json").read_text())
    user = {"image": "registry.example/petalflow-worker:1.2", "gpu_count": 2,
            "gpu_type": "NVIDIA-A100-SXM4-80GB", "memory": "64Gi",
            "env": {"MLFLOW_TRACKING_URI": "https://mlflow.internal"}}
    schema = template["variables"]
    jsonschema.validate(user, schema)
    values = {k: v.get("default") for k, v in schema["properties"].items()}
    values.update(user)
    rendered = apply_values(template["job_configuration"], values)
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example/petalflow-worker:1.2"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["limits"]["memory"] == "64Gi"
    assert pod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-80GB"
    assert rendered["env"] == {"MLFLOW_TRACKING_URI": "https://mlflow.internal"}
    assert "{{" not in json.dumps(rendered)
    # A missing image is refused by the pool's variable schema.
    try:
        jsonschema.validate({"gpu_count": 1}, schema)
    except jsonschema.ValidationError as exc:
        assert "image" in str(exc)
    else:
        raise AssertionError("a job without an image must be refused")


def test_worker_image_agrees_with_the_readme_pool_and_installs_what_its_worker_needs():
    """Offline lint of infra/Dockerfile.worker's assumptions: it starts a worker for the pool
    the README creates, with the worker type's package installed (pinned), and it copies every
    folder the package maps."""
    import re
    import tomllib

    docker = (REPO / "infra" / "Dockerfile.worker").read_text()
    readme = (REPO / "README.md").read_text()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", docker, re.M).group(1))
    pool = cmd[cmd.index("--pool") + 1]
    kind = cmd[cmd.index("--type") + 1]
    assert f"prefect work-pool create {pool} --type {kind}" in " ".join(readme.split())
    assert kind == "kubernetes"
    install = re.search(r"pip install[^\n]*-e '?\.\[([a-z0-9,]+)\]'?", docker)
    assert install, "the image must install petalflow with the extra its worker needs"
    extras = install.group(1).split(",")
    needed = [r for e in extras for r in pyproject["project"]["optional-dependencies"][e]]
    assert any(r.startswith("prefect-kubernetes") for r in needed)
    constraints = (REPO / "constraints.txt").read_text().split()
    assert any(c.startswith("prefect-kubernetes==") for c in constraints)
    for folder in pyproject["tool"]["setuptools"]["package-dir"].values():
        assert re.search(rf"^COPY {folder} \./{folder}$", docker, re.M), folder
    template = json.loads((REPO / "infra" / "k8s" / "gpu-base-job-template.json").read_text())
    assert template["variables"]["properties"]["image"]


def test_stack_options_database_urls_and_worker_names(capsys):
    import pytest

    from petalflow.stack import Stack, main, worker_names

    with pytest.raises(SystemExit) as exited:
        main(["status", "--database", "mysql://db/x"])
    assert exited.value.code == 2
    assert "--database: 'mysql://db/x' is not sqlite, postgres or a postgresql:// URL" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # was taken as 1 without a word
        main(["up", "--gpu-workers", "0"])
    assert exited.value.code == 2
    assert ("--gpu-workers 0: at least 1 (training run on the gpu pool's workers; on a machine "
            "without a GPU the gpu worker trains on the CPU)") in capsys.readouterr().err
    given = Stack(database="postgresql://user:secret@db.internal:5432/")
    assert given.database_url("mlflow") == "postgresql://user:secret@db.internal:5432/mlflow"
    assert given.database_url("prefect", "asyncpg") == \
        "postgresql+asyncpg://user:secret@db.internal:5432/prefect"
    assert Stack().database_url("prefect") is None  # SQLite: the servers' own defaults
    assert worker_names(Stack(workers={"cpu": 2, "gpu": 3})) == [
        "worker-cpu", "worker-cpu-2", "worker-gpu", "worker-gpu-2", "worker-gpu-3"]


def test_mlflow_artifacts_uris_map_to_the_sqlite_stores_own_folder_only(tmp_path):
    """The plugin MLflow loads for mlflow-artifacts:/ (pyproject's entry point): a SQLite
    store's own artifacts folder (where the stack's server keeps them), MLflow's repository for
    a server, a store without that folder, or a path that would leave it."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    store = tmp_path / "mlflow"
    (store / "artifacts").mkdir(parents=True)
    (store / "mlflow.db").write_bytes(b"")
    sqlite = f"sqlite:///{store / 'mlflow.db'}"
    repo = get_artifact_repository("mlflow-artifacts:/1/models/m-1/artifacts",
                                   tracking_uri=sqlite)
    assert isinstance(repo, LocalArtifactRepository)
    assert Path(repo.artifact_dir) == store / "artifacts" / "1" / "models" / "m-1" / "artifacts"
    served = get_artifact_repository("mlflow-artifacts:/1/x",
                                     tracking_uri="http://127.0.0.1:5000")
    assert isinstance(served, MlflowArtifactsRepository)
    import pytest
    from mlflow.exceptions import MlflowException

    for uri, tracking in (("mlflow-artifacts:/../../etc", sqlite),
                          ("mlflow-artifacts:/1/x", f"sqlite:///{tmp_path / 'other.db'}")):
        with pytest.raises(MlflowException, match="must be a valid http or https URI"):
            get_artifact_repository(uri, tracking_uri=tracking)  # MLflow's refusal, as before


def test_a_moved_or_copied_sqlite_store_names_its_artifacts_where_they_are(tmp_path):
    """MLflow records absolute file: locations (an experiment's, each run's, logged model's and
    model version's): once the project folder was moved, every registered model failed to load
    ("MLflow: No such artifact: ''") and new runs wrote into the old place; a copy read and
    wrote the original's. Opening a store rewrites the locations of its own artifacts folder,
    once, all or nothing; an experiment kept elsewhere on purpose (another folder's name, or
    an "artifacts" folder holding none of its runs) and MLflow's Default are left alone."""
    import os
    import shutil

    from mlflow import MlflowClient

    from petalflow.mlflow_artifacts import relocate_artifacts
    from petalflow.tasks.registry import artifact_location, create_sqlite_store

    first = tmp_path / "first" / "mlflow"
    uri = f"sqlite:///{first / 'mlflow.db'}"
    create_sqlite_store(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    own = client.create_experiment("petalflow", artifact_location=artifact_location(uri))
    chosen = client.create_experiment("chosen", artifact_location=(tmp_path / "kept").as_uri())
    other = tmp_path / "elsewhere" / "artifacts"
    elsewhere = client.create_experiment("elsewhere", artifact_location=other.as_uri())
    (tmp_path / "note.txt").write_text("a model")
    runs = {}
    for exp in (own, chosen, elsewhere):
        run = client.create_run(exp)
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"), "model")
        runs[exp] = run.info.run_id
    client.create_registered_model("m")
    client.create_model_version("m", f"runs:/{runs[own]}/model", runs[own])
    before = {exp: client.get_run(run).info.artifact_uri for exp, run in runs.items()}
    assert before[own].startswith(first.as_uri() + "/artifacts/")

    moved = tmp_path / "moved" / "mlflow"
    moved.parent.mkdir()
    first.rename(moved)
    new_uri = f"sqlite:///{moved / 'mlflow.db'}"
    said = relocate_artifacts(new_uri)
    assert said == [(f"{first.as_uri()}/artifacts", f"{moved.as_uri()}/artifacts")]
    assert relocate_artifacts(new_uri) == []  # once per process and store
    client = MlflowClient(tracking_uri=new_uri, registry_uri=new_uri)
    assert client.get_experiment(own).artifact_location == f"{moved.as_uri()}/artifacts"
    run = client.get_run(runs[own])
    assert run.info.artifact_uri == before[own].replace(first.as_uri(), moved.as_uri())
    assert client.download_artifacts(runs[own], "model/note.txt", str(tmp_path))
    version = client.get_model_version("m", "1")
    assert version.source == f"runs:/{runs[own]}/model"  # a runs: URI follows the run
    for exp in (chosen, elsewhere):  # not this store's folder: as they were
        assert client.get_run(runs[exp]).info.artifact_uri == before[exp]
    assert not first.exists()  # nothing written at the old place

    # The same store seen at another path (a bind mount, here a hard link of its database
    # beside a copy of its files): left as it is, as the other path's processes read it.
    seen = tmp_path / "seen" / "mlflow"
    shutil.copytree(moved / "artifacts", seen / "artifacts")
    os.link(moved / "mlflow.db", seen / "mlflow.db")
    assert relocate_artifacts(f"sqlite:///{seen / 'mlflow.db'}") == []
    # A copy of the moved folder, the original still there: the copy names its own files.
    copy = tmp_path / "copy" / "mlflow"
    shutil.copytree(moved, copy)
    copy_uri = f"sqlite:///{copy / 'mlflow.db'}"
    assert relocate_artifacts(copy_uri) == [(f"{moved.as_uri()}/artifacts",
                                             f"{copy.as_uri()}/artifacts")]
    copied = MlflowClient(tracking_uri=copy_uri).get_run(runs[own]).info.artifact_uri
    assert copied.startswith(copy.as_uri() + "/artifacts/")


def test_a_new_sqlite_store_is_created_whole_or_not_at_all(tmp_path):
    """`petalflow train` creates the embedded store on a side thread as it starts. A command
    that ended while MLflow was creating the schema (its run failed at once on its data, a
    Ctrl-C, a kill) left a store every later command refused ("table jobs already exists").
    Here the creating process dies in the middle of MLflow's migrations: no store is left,
    the next command creates a whole one, and a leftover of a process gone over a minute ago
    is removed."""
    import os
    import subprocess
    import sys
    import time

    from mlflow import MlflowClient

    from petalflow.tasks.registry import create_sqlite_store

    db = tmp_path / "mlflow" / "mlflow.db"
    uri = f"sqlite:///{db}"
    # Dies as it records its 20th migration: that migration's tables are there (SQLite
    # commits DDL at once), its revision is not: reopened in place, MLflow ran it again.
    dies = ("import os\n"
            "from alembic.runtime import migration\n"
            "from petalflow.tasks.registry import store_opener\n"
            "record, done = migration.HeadMaintainer.update_to_step, []\n"
            "def dying(self, step):\n"
            "    done.append(step)\n"
            "    if len(done) == 20:\n"
            "        os._exit(9)\n"
            "    return record(self, step)\n"
            "migration.HeadMaintainer.update_to_step = dying\n"
            "store_opener()()\n")
    proc = subprocess.run([sys.executable, "-c", dies], env={**os.environ,
                          "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    assert not db.exists()
    [left] = db.parent.glob(".mlflow.db.*.creating")
    create_sqlite_store(uri)  # a minute has not passed: the leftover stays, harmless
    assert db.is_file() and left.exists()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert client.search_registered_models() == []
    client.create_registered_model("m")  # the registry's tables are there too
    db.unlink()
    os.utime(left, (time.time() - 120, time.time() - 120))
    create_sqlite_store(uri)
    assert db.is_file() and not left.exists()
    assert sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]
    # An existing store, or another URI, is MLflow's: nothing is created or touched.
    before = db.stat().st_mtime_ns
    create_sqlite_store(uri)
    create_sqlite_store("http://127.0.0.1:5000")
    assert db.stat().st_mtime_ns == before


def test_making_the_store_says_nothing(tmp_path):
    """The store is petalflow's to make: MLflow's "Creating initial MLflow database tables..."
    and "Updating database tables" lines came after a failed command's error (the side
    thread makes the store while the command fails on its data)."""
    import os
    import subprocess
    import sys

    db = tmp_path / "mlflow" / "mlflow.db"
    made = subprocess.run(
        [sys.executable, "-c", "import sys\n"
         "from petalflow.tasks.registry import create_sqlite_store\n"
         "create_sqlite_store(sys.argv[1])\n", f"sqlite:///{db}"],
        env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    assert db.is_file()
    assert "database tables" not in made.stderr + made.stdout, made.stderr


def test_stack_down_stops_the_workers_together_and_names_the_ones_it_killed(tmp_path):
    """`petalflow stack down` stopped one service after another, waiting up to 30 s for each
    to go, so two workers still finishing a run took a minute before the servers were even
    asked. The workers are now asked together, then the servers in turn (MLflow, Prefect, so
    nothing is left talking to a stopped server); one still running after the wait is killed
    and its name says so."""
    import subprocess
    import sys

    from petalflow.stack import Stack, _group_alive, down

    st = Stack(stack_dir=tmp_path / "stack")
    st.pids.mkdir(parents=True)
    script = ("import signal, sys, time\n"
              "def term(*_):\n"
              "    with open(sys.argv[1], 'a') as fh:\n"
              "        fh.write(f'{time.time()}\\n')\n"
              "    if sys.argv[2] == 'quits':\n"
              "        sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, term)\n"
              "print('ready', flush=True)\n"
              "while True:\n"
              "    time.sleep(0.05)\n")
    kinds = {"worker-cpu": "stubborn", "worker-gpu": "stubborn", "mlflow-server": "quits",
             "prefect-server": "quits"}
    pids = {}
    for name, kind in kinds.items():
        proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"{name}.term"),
                                 kind], start_new_session=True, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        (st.pids / f"{name}.pid").write_text(str(proc.pid))
        pids[name] = proc.pid
    assert down(st, timeout_s=2) == [
        "worker-cpu (killed: still running 2 s after SIGTERM)",
        "worker-gpu (killed: still running 2 s after SIGTERM)",
        "mlflow-server", "prefect-server"]
    assert not any(_group_alive(pid) for pid in pids.values())
    assert not list(st.pids.glob("*.pid"))
    asked = {name: float((tmp_path / f"{name}.term").read_text().split()[0]) for name in kinds}
    assert abs(asked["worker-cpu"] - asked["worker-gpu"]) < 1.0, asked  # together, not 2 s apart
    assert asked["mlflow-server"] >= max(asked["worker-cpu"], asked["worker-gpu"]) + 1.5, asked
    assert asked["prefect-server"] >= asked["mlflow-server"], asked
    assert down(st) == []  # nothing left to stop


def test_stack_up_refuses_a_port_another_program_holds_before_starting_anything(tmp_path,
                                                                               capsys):
    """`petalflow stack up` with MLflow's port held by another program started the Prefect
    server, then failed with a traceback ("RuntimeError: MLflow server exited; see …"),
    leaving that server running; had the port been another stack's MLflow server, its health
    check would have passed and this stack would have used that server. The ports are now
    checked first: refused, naming the option and a free port, and nothing is started."""
    import socket

    from petalflow.stack import main
    from tests.helpers import free_port

    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    stack_dir = tmp_path / "stack"
    try:
        assert main(["up", "--stack-dir", str(stack_dir), "--prefect-port", str(free_port()),
                     "--mlflow-port", str(port)]) == 2
    finally:
        held.close()
    err = capsys.readouterr().err
    assert err.startswith(f"petalflow stack up: error: port {port} on 127.0.0.1 (the MLflow "
                          "server's, --mlflow-port) is in use by another program: stop that "
                          "program, or give the server another port (--mlflow-port "), err
    assert err.rstrip().endswith(" is free)") and len(err.strip().splitlines()) == 1
    assert not stack_dir.exists()  # no log, no pid file: nothing was started
    same = free_port()
    assert main(["up", "--stack-dir", str(stack_dir), "--prefect-port", str(same),
                 "--mlflow-port", str(same)]) == 2
    assert (f"--prefect-port and --mlflow-port are both {same}: the two servers need a port "
            "each") in capsys.readouterr().err
    assert not stack_dir.exists()
    # `stack deploy` with no server there: said in a line (a CalledProcessError's traceback
    # before, naming no reason).
    assert main(["deploy", "--stack-dir", str(stack_dir), "--prefect-port", str(same)]) == 1
    assert capsys.readouterr().err == (
        f"petalflow stack deploy: error: no Prefect server answers at http://127.0.0.1:{same}/api"
        " (ConnectError): start the stack first (petalflow stack up), or give the port it runs "
        "on (--prefect-port)\n")


@pytest.mark.e2e
def test_a_stack_start_that_fails_or_is_interrupted_stops_what_it_had_started(tmp_path):
    """Real servers. Ctrl-C while `petalflow stack up` waits for the MLflow server: one line,
    exit status 130, and the Prefect and MLflow servers it had started are stopped (a
    traceback before, and both left running). A server that exits as it starts (its port
    taken after the check): the error quotes its log's line, and what the start had started
    is stopped, so the next `stack up` begins clean."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    from petalflow.stack import Stack, _bind_problem, status, up
    from tests.helpers import free_port

    prefect_port, mlflow_port = free_port(), free_port()
    stack_dir = tmp_path / "stack"
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("petalflow")), "stack", "up", "--stack-dir",
         str(stack_dir), "--prefect-port", str(prefect_port), "--mlflow-port",
         str(mlflow_port)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not (stack_dir / "pids" / "mlflow-server.pid").exists():  # Prefect is healthy
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert err == ("petalflow stack up: interrupted; stopped what this start had started: "
                   "mlflow-server, prefect-server\n"), err
    stack = Stack(stack_dir=stack_dir, prefect_port=prefect_port, mlflow_port=mlflow_port,
                  mlflow_dir=tmp_path / "mlflow", petalflow_home=tmp_path / "home")
    assert set(status(stack).values()) == {"stopped"} and not list(stack.pids.glob("*.pid"))
    assert _bind_problem("127.0.0.1", prefect_port) is None
    assert _bind_problem("127.0.0.1", mlflow_port) is None

    held = socket.socket()  # another program takes MLflow's port after the check
    held.bind(("127.0.0.1", mlflow_port))
    held.listen()
    try:
        with pytest.raises(RuntimeError) as failed:
            up(stack)
    finally:
        held.close()
    said = str(failed.value)
    assert said.startswith("MLflow server exited as it started: ERROR: [Errno 98] error while "
                           f"attempting to bind on address ('127.0.0.1', {mlflow_port}): "
                           "address already in use (its log: "), said
    assert failed.value.__notes__ == ["stopped what this start had started: prefect-server"]
    assert set(status(stack).values()) == {"stopped"} and not list(stack.pids.glob("*.pid"))
    assert _bind_problem("127.0.0.1", prefect_port) is None


def _stack_processes(stack_dir: Path) -> list[str]:
    """The command lines of the processes running with the stack folder's PREFECT_HOME: its
    servers and workers (and their children)."""
    from tests.helpers import running_processes

    home = f"PREFECT_HOME={stack_dir / 'prefect'}"
    return [cmd for _pid, cmd, env, _cwd in running_processes() if home in env]


def test_stack_commands_at_once_leave_one_stack_that_down_stops_whole(tmp_path):
    """Real servers. Two `petalflow stack up` on one stack folder at once (two terminals; a
    service manager and a person): each started a worker per pool and kept one pid file of the
    two, so `stack down` left a worker per pool running, polling for ever. Now the second says
    it waits for the first, then finds the stack up. `stack down` during a start stops that
    start first (SIGTERM: it ends as on Ctrl-C), then everything: no process is left."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers import free_port

    stack_dir = tmp_path / "stack"
    command = [str(Path(sys.executable).with_name("petalflow")), "stack"]
    ports = ["--stack-dir", str(stack_dir), "--prefect-port", str(free_port()),
             "--mlflow-port", str(free_port())]

    def start(action: str) -> subprocess.Popen:
        return subprocess.Popen([*command, action, *ports], cwd=tmp_path, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def wait_for(path: Path, proc: subprocess.Popen, text: str = None) -> None:
        deadline = time.time() + 120
        while not (path.exists() and (text is None or path.read_text() == text)):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)

    procs = []
    try:
        first = start("up")
        procs.append(first)
        wait_for(stack_dir / "pids" / "prefect-server.pid", first)  # starting
        second = start("up")
        procs.append(second)
        out1, err1 = first.communicate(timeout=300)
        out2, err2 = second.communicate(timeout=300)
        assert first.returncode == 0 and second.returncode == 0, (err1, err2)
        assert out1.startswith("Prefect UI") and out2.startswith("Prefect UI"), (out1, out2)
        workers = sorted(cmd.split("--pool ")[1].split()[0]
                         for cmd in _stack_processes(stack_dir) if " worker start " in cmd)
        assert workers == ["cpu", "gpu"], workers  # ["cpu", "cpu", "gpu", "gpu"] before
        assert err2.startswith(f"petalflow stack up: waiting for the `petalflow stack up` (pid "
                               f"{first.pid}) in progress on {stack_dir} to end\n"), err2

        third = start("up")  # a start in progress (all running already: it redeploys)
        procs.append(third)
        wait_for(stack_dir / "lock", third, f"the `petalflow stack up` (pid {third.pid})")
        down = subprocess.run([*command, "down", *ports], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        out3, err3 = third.communicate(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert down.returncode == 0, down.stderr
    assert down.stderr == (f"petalflow stack down: stopping the `petalflow stack up` (pid "
                           f"{third.pid}) in progress on {stack_dir} first\n"), down.stderr
    assert down.stdout.startswith("stopped: worker-cpu"), down.stdout
    assert third.returncode == 130 and err3.startswith("petalflow stack up: interrupted; "), err3
    assert _stack_processes(stack_dir) == []


def test_a_stack_start_that_fails_at_once_says_why_and_exits_1(tmp_path, capsys):
    """A database server that refuses the connection: the error in a line (createdb's own
    words), what the start left running (nothing), exit status 1; no traceback."""
    from petalflow.stack import main
    from tests.helpers import free_port

    closed = free_port()  # nothing listens there
    assert main(["up", "--stack-dir", str(tmp_path / "stack"), "--prefect-port",
                 str(free_port()), "--mlflow-port", str(free_port()), "--database",
                 f"postgresql://nobody@127.0.0.1:{closed}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("petalflow stack up: error: createdb prefect: createdb: error: "
                          f'connection to server at "127.0.0.1", port {closed} failed: '
                          "Connection refused"), err
    assert err.endswith("\nnothing this start began is left running\n") and "Traceback" not in err
