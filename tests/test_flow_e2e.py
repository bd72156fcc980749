"""The whole train-and-register flow: Prefect (test server), real HTTP download from a local
server, a tiny exported Hub backbone and MLflow on a temporary SQLite store."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from petalflow.tasks.params import TrainParams
from tests.helpers import (
    COLOURS, free_port, make_dataset, make_hub_tarball, make_random_label_dataset, make_tgz,
    prefect_events, serve_directory, write_image,
)

pytestmark = pytest.mark.e2e
MODEL = "petalflow-classifier"
# What the served model says of bytes that are no image (the README's words).
NOT_AN_IMAGE = ("undecodable image: not an image (its first bytes are those of no format the "
                "model reads: JPEG, PNG, GIF, BMP or WebP)")


def _params(url: str, archive: Path, backbone, **kw) -> TrainParams:
    base = dict(data_url=url, data_sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
                backbone=str(backbone), image_size=32, epochs=6, batch_size=8,
                learning_rate=0.05, min_accuracy=0.8, val_fraction=0.2, test_fraction=0.2)
    return TrainParams(**{**base, **kw})


def _serve_dataset(tmp: Path, builder, name: str, **kw):
    src = builder(tmp / f"{name}-src", **kw)
    served = tmp / "served"
    return make_tgz(src, served / f"{name}.tgz")


def _client():
    import mlflow

    from petalflow.tasks.registry import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.MlflowClient()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone, prefect_harness):
    """One successful flow run (with one corrupt image in the data) in its own workspace; the
    backbone, like the data, comes over HTTP (TF Hub's compressed-model format)."""
    from petalflow.flows.train_flow import train_and_register

    tmp = tmp_path_factory.mktemp("e2e")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("PETALFLOW_HOME", str(tmp / "home"))
        src = make_dataset(tmp / "src", per_class=12)
        (src / "red" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
        served = tmp / "served"
        archive = make_tgz(src, served / "photos.tgz")
        make_hub_tarball(tiny_backbone, served / "backbone.tar.gz")
        assert not (tmp / "mlflow").exists() and not (tmp / "home").exists()
        with serve_directory(served) as url:
            summary = train_and_register(_params(f"{url}/photos.tgz", archive,
                                                 f"{url}/backbone.tar.gz"))
        yield tmp, summary


def test_flow_registers_a_champion_and_reports_counts(trained):
    _tmp, summary = trained
    assert summary["model_name"] == MODEL and summary["model_version"] == "1"
    assert summary["alias"] == "champion"
    assert summary["test_metrics"]["test_accuracy"] >= 0.8
    ds = summary["dataset"]
    assert (ds["found"], ds["used"], ds["quarantined"]) == (37, 36, 1)
    assert ds["quarantine_reasons"] == {"red/corrupt.jpg": ds["quarantine_reasons"]["red/corrupt.jpg"]}
    assert ds["classes"] == sorted(COLOURS)
    # The backbone was fetched once into the shared TF Hub cache under PETALFLOW_HOME.
    assert len(list((_tmp / "home" / "tfhub").glob("*/saved_model.pb"))) == 1


def test_champion_pulled_by_alias_classifies_new_images(trained, tmp_path, monkeypatch):
    import base64

    import mlflow

    tmp, _summary = trained
    monkeypatch.chdir(tmp)
    _client()
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    images, truth = [], []
    for c, (name, rgb) in enumerate(sorted(COLOURS.items())):
        for i in range(3):  # images the model has never seen
            path = write_image(tmp_path / f"{name}{i}.png", rgb, size=(50, 40), fmt="PNG",
                               seed=10_000 + c * 10 + i)
            images.append(base64.b64encode(path.read_bytes()).decode())
            truth.append(name)
    out = model.predict(pd.DataFrame({"image": images}))
    assert out["label"].tolist() == truth
    assert (out["error"] == "").all()
    meta = model.metadata.metadata
    assert meta["class_names"] == sorted(COLOURS) and meta["image_size"] == 32


def test_mlflow_run_holds_metrics_artifacts_and_provenance(trained, monkeypatch):
    tmp, summary = trained
    monkeypatch.chdir(tmp)
    client = _client()
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == 6
    # The trained model's validation, beside the epochs' learning curve.
    validation = summary["training"]["validation"]
    assert run.data.metrics["final_val_accuracy"] == pytest.approx(validation["val_accuracy"])
    assert run.data.metrics["final_val_loss"] == pytest.approx(validation["val_loss"])
    assert run.data.tags["petalflow.dataset_fingerprint"] == summary["dataset"]["fingerprint"]
    archive = tmp / "served" / "photos.tgz"
    assert run.data.tags["petalflow.archive_sha256"] == hashlib.sha256(
        archive.read_bytes()).hexdigest()
    assert run.data.params["epochs"] == "6"
    assert run.data.metrics["time_download_s"] >= 0 and run.data.metrics["time_epochs_s"] > 0
    assert "time_start_up_s" not in run.data.metrics  # started in-process, not by the command
    names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/confusion.png", "evaluation/per_class.csv",
            "evaluation/confusion.csv"} <= names
    mv = client.get_model_version(MODEL, "1")
    assert mv.tags["dataset_fingerprint"] == summary["dataset"]["fingerprint"]
    assert json.loads(mv.tags["class_names"]) == sorted(COLOURS)
    assert mv.tags["code_version"]
    # MLflow's "Datasets used": each split's usable images, named after the archive, its
    # source the URL, and the run's own split (the corrupt image in none of them).
    inputs = {next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
              for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "training", "validation"]
    assert {d.name for d in inputs.values()} == {"photos"}
    assert {json.loads(d.source)["url"] for d in inputs.values()} == {run.data.params["data_url"]}
    rows = {c: json.loads(d.profile)["num_rows"] for c, d in inputs.items()}
    assert rows == {"training": summary["dataset"]["splits"]["train"],
                    "validation": summary["dataset"]["splits"]["val"],
                    "test": summary["test_metrics"]["test_images"]}
    assert sum(rows.values()) == summary["dataset"]["used"] == 36
    schema = json.loads(inputs["test"].schema)["mlflow_colspec"]
    assert [c["name"] for c in schema] == ["path", "label", "sha256"]
    # The run's and its logged model's source, as the MLflow UI shows them.
    import mlflow

    logged = mlflow.get_logged_model(mv.source.rsplit("/", 1)[1])
    assert run.data.tags["mlflow.source.name"] == logged.tags["mlflow.source.name"] == (
        "petalflow train")


def test_prefect_artifacts_show_progress_and_evaluation(trained):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["test-evaluation"]))
        )
        assert arts and "Accuracy" in arts[0].data
        progress = [a for a in client.read_artifacts() if a.type == "progress"]
        assert progress and progress[-1].data == 100.0


def test_predict_cli_writes_csv(trained, tmp_path, monkeypatch, capsys):
    from petalflow.flows.cli import main

    tmp, summary = trained
    monkeypatch.chdir(tmp)
    folder = tmp_path / "incoming"
    write_image(folder / "a.jpg", COLOURS["red"], seed=5)
    write_image(folder / "sub" / "b.png", COLOURS["blue"], fmt="PNG", seed=6)
    (folder / "broken.jpg").write_bytes(b"nope")
    (folder / "scan.tiff").write_bytes(b"II*\x00 a format the model does not read")
    (folder / "notes.txt").write_text("not an image: skipped, not a row")
    out = tmp_path / "pred.csv"
    assert not out.exists()
    # The README's form: the images as the command's arguments (or --input).
    assert main(["predict", str(folder), "--output", str(out)]) == 0
    # Which version classified them: the alias moves with every promotion.
    assert (f"classified 2 of 4 images (2 errors) with models:/{MODEL}@champion (version "
            f"{summary['model_version']}) -> {out}\n") in capsys.readouterr().out
    table = pd.read_csv(out, keep_default_na=False).set_index("path")
    assert len(table) == 4 and str(folder / "notes.txt") not in table.index
    assert table.loc[str(folder / "scan.tiff"), "error"] == (
        "unsupported image format TIFF (the model reads JPEG, PNG, GIF, BMP and WebP): convert "
        "the file first")
    assert list(table.columns) == ["label", "probability", "error", "prob_blue", "prob_green",
                                   "prob_red"]
    assert table.loc[str(folder / "a.jpg"), "label"] == "red"
    assert table.loc[str(folder / "sub" / "b.png"), "label"] == "blue"
    assert table.loc[str(folder / "broken.jpg"), "error"] == NOT_AN_IMAGE
    # Rows in error have no probabilities: empty cells (they were 0.0).
    for failed in ("broken.jpg", "scan.tiff"):
        assert table.loc[str(folder / failed), ["label", "probability", "prob_blue",
                                                "prob_green", "prob_red"]].tolist() == [""] * 5
    assert float(table.loc[str(folder / "a.jpg"), "probability"]) > 0.3


def test_an_alias_is_pinned_to_the_version_it_names_and_said(trained, tmp_path, monkeypatch):
    from petalflow.tasks.drift import training_params_of
    from petalflow.tasks.registry import (
        model_said, model_version_of, pinned_model_uri, pulled_version, run_of,
    )

    tmp, summary = trained
    monkeypatch.chdir(tmp)
    version = summary["model_version"]
    assert pinned_model_uri(f"models:/{MODEL}@champion") == f"models:/{MODEL}/{version}"
    for as_is in (f"models:/{MODEL}/{version}", "runs:/abc/model", str(tmp / "pulled")):
        assert pinned_model_uri(as_is) == as_is
    # MLflow's own "latest" (any case) too: it moves with every registration. What reads the
    # version behind it (the drift event's training parameters, the TFLite pull's run) failed
    # with "Parameter 'version' must be an integer, got 'latest'".
    for latest in (f"models:/{MODEL}/latest", f"models:/{MODEL}/Latest"):
        assert pinned_model_uri(latest) == f"models:/{MODEL}/{version}"
        assert str(model_version_of(latest).version) == version
        assert run_of(latest) == summary["mlflow_run_id"]
        assert training_params_of(latest)["epochs"] == 6
    # A drift-triggered retraining gets how the version was trained, not that run's decisions:
    # a champion trained with force retrained on every drift event, changed data or not.
    recorded = json.loads(model_version_of(f"models:/{MODEL}/{version}").tags["params"])
    assert {"force", "allow_dropped_classes"} <= set(recorded)
    assert set(training_params_of(f"models:/{MODEL}@champion")) == set(recorded) - {
        "force", "allow_dropped_classes"}
    # A stage (deprecated; petalflow sets none) that names no version: what to pass instead.
    from petalflow.tasks.errors import ModelNotFound

    with pytest.raises(ModelNotFound, match=(
            rf"^registered model {MODEL} has no version in the stage 'Production' .*"
            rf"Pass --model models:/{MODEL}/{version} ")):
        pinned_model_uri(f"models:/{MODEL}/Production")
    assert model_said(f"models:/{MODEL}@champion", f"models:/{MODEL}/7") == (
        f"models:/{MODEL}@champion (version 7)")
    assert model_said(f"models:/{MODEL}/7", f"models:/{MODEL}/7") == f"models:/{MODEL}/7"
    assert model_said("runs:/abc/model", None) == "runs:/abc/model"
    # A folder of one's own, or whose registered_model_meta does not say: just its path.
    assert pulled_version(tmp_path) is None and model_said(str(tmp_path), str(tmp_path)) == str(
        tmp_path)
    for text in ("::: not yaml", "model_name: only-a-name\n", "- a list\n"):
        (tmp_path / "registered_model_meta").write_text(text)
        assert pulled_version(tmp_path) is None, text


def test_retried_registration_makes_no_duplicate_version(trained, monkeypatch):
    from petalflow.tasks.registry import register_model

    tmp, summary = trained
    monkeypatch.chdir(tmp)
    workdir = Path(summary["workdir"])
    data_info = json.loads(next((tmp / "home" / "manifests").rglob("dataset.json")).read_text())
    cfg = TrainParams(**json.loads(_client().get_model_version(MODEL, "1").tags["params"]))
    again = register_model(summary["mlflow_run_id"], workdir / "export", cfg, data_info,
                           summary["test_metrics"])
    assert again["model_version"] == "1" and again["alias"] == "champion"
    assert len(_client().search_model_versions(f"name='{MODEL}'")) == 1


def test_aliases_follow_the_quality_gate(workspace, tiny_backbone, prefect_harness):
    """Other class names first (gate 0: champion), a learnable model with other classes replaces it
    (the class list changed: the gate decides), then a model failing the gate and a worse model
    on the champion's classes both become challenger while the champion stays."""
    from petalflow.flows.train_flow import train_and_register

    renamed = {f"other-{name}": rgb for name, rgb in COLOURS.items()}
    served = {
        "renamed": _serve_dataset(workspace, make_dataset, "renamed", per_class=12,
                                  colours=renamed),
        "noise": _serve_dataset(workspace, make_random_label_dataset, "noise", per_class=20),
        "good": _serve_dataset(workspace, make_dataset, "good", per_class=12),
    }
    with serve_directory(workspace / "served") as url:
        def run(name, **kw):
            return train_and_register(
                _params(f"{url}/{name}.tgz", served[name], tiny_backbone, **kw))

        first = run("renamed", min_accuracy=0.0)
        assert (first["model_version"], first["alias"]) == ("1", "champion")
        best = run("good")
        assert (best["model_version"], best["alias"]) == ("2", "champion")
        assert best["previous_champion"] == "1"
        # The same photos under other folder names: the reason says where they went.
        assert best["alias_reason"].startswith(
            "the class list changed from champion v1's (gone: other-blue, other-green, "
            "other-red; new: blue, green, red; photos moved: other-blue -> blue (all 12 "
            "photos), other-green -> green (all 12 photos), other-red -> red (all 12 photos)); "
            "promoted on the gate alone ("), best["alias_reason"]
        gated = run("noise", min_accuracy=0.9, seed=7)
        assert (gated["model_version"], gated["alias"]) == ("3", "challenger")
        assert "below --min-accuracy" in gated["alias_reason"]
        # Same classes as the champion: both are measured on this run's test split.
        worse = run("good", min_accuracy=0.0, learning_rate=1e-5, epochs=1)
        assert (worse["model_version"], worse["alias"]) == ("4", "challenger")
        assert "does not beat" in worse["alias_reason"]
        assert "this run's test split" in worse["alias_reason"]
    client = _client()
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "4"
    assert len(client.search_model_versions(f"name='{MODEL}'")) == 4


def test_a_model_that_only_answers_the_common_class_is_registered_but_not_promoted(
        workspace, tiny_backbone, prefect_harness):
    """Defect data: 24 "ok" photos, 6 "defect" ones that look exactly the same (so nothing can
    tell them apart). Trained on the plain loss, the model answers "ok" for every photo: ~0.83
    on the test split, far above --min-accuracy 0.5. The version is registered (nothing lost),
    as challenger, the reason and the model card say what the guess scores; no champion."""
    from PIL import PngImagePlugin

    from petalflow.flows.train_flow import train_and_register

    src = workspace / "defects"
    grey = np.full((20, 24, 3), 128, np.uint8)
    for label, n in (("ok", 24), ("defect", 6)):
        (src / label).mkdir(parents=True)
        for i in range(n):
            info = PngImagePlugin.PngInfo()
            info.add_text("id", f"{label}-{i}")  # same pixels, distinct files
            Image.fromarray(grey).save(src / label / f"{i:02d}.png", pnginfo=info)
    archive = make_tgz(src, workspace / "served" / "defects.tgz")
    with serve_directory(workspace / "served") as url:
        result = train_and_register(_params(f"{url}/defects.tgz", archive, tiny_backbone,
                                            min_accuracy=0.5, edge_export=False,
                                            balance_classes=False))
    test = result["test_metrics"]
    assert test["test_majority_accuracy"] > 0.5
    assert (result["model_version"], result["alias"]) == ("1", "challenger")
    assert result["alias_reason"].startswith(f"test accuracy {test['test_accuracy']:.4f} does "
                                             "not beat answering 'ok', the test split's most "
                                             "common class, for every image (")
    client = _client()
    assert str(client.get_model_version_by_alias(MODEL, "challenger").version) == "1"
    with pytest.raises(Exception, match="champion"):
        client.get_model_version_by_alias(MODEL, "champion")
    card = client.get_model_version(MODEL, "1").description
    assert (f"Answering 'ok' (the most common class) for every image would score "
            f"{test['test_majority_accuracy']:.4f}") in card
    # A test split this small (its 95 % interval wider than 0.2): the card shows the interval.
    assert test["test_accuracy_high"] - test["test_accuracy_low"] > 0.2
    assert (f"on {test['test_images']} held-out images (95 % interval "
            f"{test['test_accuracy_low']:.2f}–{test['test_accuracy_high']:.2f})") in card


def test_cli_train_on_a_url_that_gives_a_sign_in_page_says_so_with_exit_status_3(
        workspace, tiny_backbone):
    """What the README promises for a share link that answers with its sign-in page: one error
    line saying the URL gave a web page, a hint, exit status 3 (the source), no traceback."""
    served = workspace / "served-page"
    served.mkdir()
    (served / "photos.tgz").write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title>"
                                       "</head><body>Sign in to continue</body></html>\n")
    exe = Path(sys.executable).with_name("petalflow")
    with serve_directory(served) as url:
        proc = subprocess.run(
            [str(exe), "train", "--data-url", f"{url}/photos.tgz", "--backbone",
             str(tiny_backbone), "--image-size", "32"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "PREFECT_API_URL": ""},
        )
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert ("petalflow train: error: photos.tgz is a web page (HTML), not an archive: the URL "
            "answered with a page (a sign-in, a download confirmation or an error page?) "
            "instead of the file; use the URL that downloads the archive itself") in lines
    assert ("hint: --data-url must lead to the archive's bytes: for a share link, its "
            "direct-download form; open it in a browser to see the page.") in lines
    assert "Traceback" not in proc.stderr


def test_cli_train_runs_the_flow_end_to_end(workspace, tiny_backbone):
    """The README's command, as a subprocess: ephemeral Prefect, embedded MLflow, --summary-json."""
    archive = _serve_dataset(workspace, make_dataset, "cli", per_class=12)
    summary_path = workspace / "summary.json"
    exe = Path(sys.executable).with_name("petalflow")
    with serve_directory(workspace / "served") as url:
        proc = subprocess.run(
            [str(exe), "train", "--data-url", f"{url}/cli.tgz", "--data-sha256",
             hashlib.sha256(archive.read_bytes()).hexdigest(), "--backbone", str(tiny_backbone),
             "--image-size", "32", "--epochs", "6", "--batch-size", "8", "--learning-rate",
             "0.05", "--val-fraction", "0.2", "--test-fraction", "0.2", "--min-accuracy", "0.8",
             "--summary-json", str(summary_path)],
            capture_output=True, text=True, timeout=600, env={**os.environ, "PREFECT_API_URL": ""},
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A quiet console: TensorFlow's start-up banner and (without an NVIDIA device) the CUDA
    # probe's errors are filtered out; one line names the device, and the feature pass reports.
    console = proc.stdout + proc.stderr
    assert "oneDNN custom operations" not in console and "absl::InitializeLog" not in console
    assert "fully_quantize" not in console and "XNNPACK delegate" not in console
    assert "tf.lite.Interpreter is deprecated" not in console
    if not list(Path("/dev").glob("nvidia[0-9]*")):
        assert "cuInit" not in console and "training on CPU" in console
    assert "features (train):" in console
    # A model's first version: MLflow's own lines say it was created, not that it existed.
    assert "already exists" not in console and "Successfully registered model" in console
    # The README's line for average_weights' decision, with the summary's figures: on these
    # photos the tiny backbone's head is still learning at its last step, and keeps it.
    training = json.loads(summary_path.read_text())["training"]
    decision, validation = training["weight_average"], training["validation"]
    assert not decision["used"] and validation == decision["last_step"]
    assert (f"head: the last step's weights kept (average_weights): averaged over its last "
            f"{decision['steps']} training steps they scored val_loss={decision['val_loss']:.4f}"
            f", val_accuracy={decision['val_accuracy']:.4f}, the last step's "
            f"val_loss={validation['val_loss']:.4f}, val_accuracy="
            f"{validation['val_accuracy']:.4f}: the head was still learning") in console
    # Prefect's temporary server, launched by the command: said once, no UI links to it (it
    # has no UI), and every log line reached it before it stopped.
    assert console.count("Starting temporary server on http://127.0.0.1:") == 1
    assert console.count("Stopping temporary server on http://127.0.0.1:") == 1
    assert "View at" not in console and "Error logging to API" not in console
    summary = json.loads(summary_path.read_text())
    assert summary["alias"] == "champion", summary["alias_reason"]
    # Every overhead has a number: the per-phase table, start-up included for the command.
    assert set(summary["timings"]) == {"start-up", "backbone", "download", "scan", "tracking",
                                       "training hand-off", "features", "epochs", "export",
                                       "edge export", "evaluation", "registration", "total"}
    assert summary["timings"]["tracking"] > 0  # this run created the MLflow store
    assert summary["timings"]["total"] >= sum(
        v for k, v in summary["timings"].items() if k != "total") * 0.9
    assert summary["dataset"]["used"] == 36
    if not list(Path("/dev").glob("nvidia[0-9]*")):  # the README: on the CPU, through TFLite
        assert summary["training"]["features"]["engine"] == "tflite"
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["mlflow_run_id"] == summary[
        "mlflow_run_id"]
    assert (workspace / "mlflow" / "mlflow.db").exists()
    # Where the README says the files go: artifacts under mlflow/artifacts/, no ./mlruns.
    assert list((workspace / "mlflow" / "artifacts").rglob("MLmodel"))
    assert not (workspace / "mlruns").exists()

    # The project folder moved (renamed, out of Downloads): MLflow's records named the
    # artifacts where they were, and every command failed "MLflow: No such artifact: ''".
    # Now the next command says the store moved; the model classifies and trains on from
    # there, and nothing is written where it was.
    project = workspace / "moved"
    project.mkdir()
    (workspace / "mlflow").rename(project / "mlflow")
    image = next((workspace / "cli-src").rglob("*.jpg"))
    env = {**os.environ, "PREFECT_API_URL": "", "PETALFLOW_HOME": str(workspace / "home")}
    proc = subprocess.run([str(exe), "predict", str(image), "--output", "p.csv"], cwd=project,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"the MLflow store {project / 'mlflow'} was moved or copied: its records named its "
            f"artifacts at {(workspace / 'mlflow' / 'artifacts').as_uri()}; they now name them "
            f"where they are, {(project / 'mlflow' / 'artifacts').as_uri()}") in proc.stderr
    assert pd.read_csv(project / "p.csv")["error"].isna().all()
    with serve_directory(workspace / "served") as url:
        proc = subprocess.run(
            [str(exe), "train", "--data-url", f"{url}/cli.tgz", "--backbone", str(tiny_backbone),
             "--image-size", "32", "--epochs", "2", "--force", "--summary-json", "again.json"],
            cwd=project, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((project / "again.json").read_text())
    assert (project / "mlflow" / "artifacts" / again["mlflow_run_id"]).is_dir()
    assert "moved or copied" not in proc.stderr  # said once, by the first command
    assert not (workspace / "mlflow").exists()



def test_two_trainings_of_one_model_at_once_train_it_once(workspace, tiny_backbone):
    """The README's command in two terminals at once (deployed: the weekly schedule and a
    watch-data event, or Run clicked twice): both trained the same data, and the later one
    ended as challenger. Now a run waits while another one trains the model, saying which,
    then checks for itself: one trains, the other ends "nothing to do" on the champion the
    first registered. To make them overlap, a run (this test) holds the model's turn while
    both start."""
    import time

    from petalflow.tasks.common import holder_lock
    from petalflow.tasks.registry import training_lock_path

    _serve_dataset(workspace, make_dataset, "twice", per_class=12)
    exe = Path(sys.executable).with_name("petalflow")
    lock = training_lock_path(workspace / "home", MODEL)
    procs, consoles = [], [workspace / "a.log", workspace / "b.log"]
    with serve_directory(workspace / "served") as url, contextlib.ExitStack() as stack:
        stack.enter_context(holder_lock(lock, "flow run 'the-first-one'", lambda _: None))
        for name, console in zip("ab", consoles):
            out = stack.enter_context(open(console, "w"))
            procs.append(subprocess.Popen(
                [str(exe), "train", "--data-url", f"{url}/twice.tgz", "--backbone",
                 str(tiny_backbone), "--image-size", "32", "--epochs", "6", "--batch-size", "8",
                 "--learning-rate", "0.05", "--val-fraction", "0.2", "--test-fraction", "0.2",
                 "--min-accuracy", "0.8", "--summary-json", str(workspace / f"{name}.json")],
                stdout=out, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, "PREFECT_API_URL": "", "COLUMNS": "400"}))
        waiting = (f"model '{MODEL}': another training of it is running (flow run "
                   "'the-first-one'); this run waits for it to end")
        deadline = time.monotonic() + 400
        while not all(waiting in " ".join(c.read_text().split()) for c in consoles):
            assert all(p.poll() is None for p in procs), [c.read_text()[-3000:] for c in consoles]
            assert time.monotonic() < deadline, [c.read_text()[-3000:] for c in consoles]
            time.sleep(1)
        # The turn is released: one of them trains, the other waits for it in turn.
    for proc in procs:
        assert proc.wait(timeout=600) == 0, [c.read_text()[-3000:] for c in consoles]
    summaries = [json.loads((workspace / f"{name}.json").read_text()) for name in "ab"]
    [trained] = [s for s in summaries if s["status"] == "trained"]
    [again] = [s for s in summaries if s["status"] == "nothing to do"]
    assert trained["alias"] == "champion" and trained["model_version"] == "1"
    assert again["model_version"] == "1" and again["alias"] == "champion"
    assert again["alias_reason"] == "unchanged data and parameters; champion kept"
    # Its wait has a number, and it waited for the training, not only for this test.
    assert again["timings"]["queued"] > trained["timings"]["queued"] > 0
    console = " ".join(consoles[summaries.index(again)].read_text().split())
    assert "the other training ended; this run waited" in console
    assert "nothing to do: champion v1 of" in console
    assert len(_client().search_model_versions(f"name='{MODEL}'")) == 1
    assert lock.read_text() == ""


def test_ctrl_c_ends_the_train_command_in_one_line_and_the_next_run_reuses_its_work(
        workspace, tiny_backbone):
    """Ctrl-C in the terminal (SIGINT) while `petalflow train` runs: it printed Prefect's and
    Python's traceback (~90 lines ending "KeyboardInterrupt") and died of the signal. Now one
    line says it was interrupted and what is kept, exit status 130 (as a shell reports an
    interrupted command), and the same command again reuses the download and the scan. To
    interrupt it at a known point, a run (this test) holds the model's turn: the command has
    downloaded and scanned, and waits for it.

    The signal goes to the command's process group, as a terminal sends Ctrl-C (and `timeout`,
    systemd or a closed terminal send theirs): it reached the temporary Prefect server too,
    which stopped, and the command then retried its API calls for about four minutes before
    failing with "ConnectError: [Errno 111] Connection refused". SIGTERM the same way ends it
    with one line too, exit status 143 (it died of the signal, without a word)."""
    import signal
    import time

    from petalflow.tasks.common import holder_lock
    from petalflow.tasks.registry import training_lock_path

    _serve_dataset(workspace, make_dataset, "ctrlc", per_class=12)
    exe = Path(sys.executable).with_name("petalflow")
    lock = training_lock_path(workspace / "home", MODEL)
    env = {**os.environ, "PREFECT_API_URL": "", "COLUMNS": "400"}
    kept = (": the run ended as crashed; the same command again reuses what it had done (the "
            "download, the scan, computed features, finished epochs)")
    with serve_directory(workspace / "served") as url:
        command = [str(exe), "train", "--data-url", f"{url}/ctrlc.tgz", "--backbone",
                   str(tiny_backbone), "--image-size", "32", "--epochs", "6", "--batch-size",
                   "8", "--learning-rate", "0.05", "--val-fraction", "0.2", "--test-fraction",
                   "0.2", "--min-accuracy", "0.8"]
        for sent, status, said in ((signal.SIGINT, 130, "interrupted"),
                                   (signal.SIGTERM, 143, "terminated (SIGTERM)")):
            console = workspace / f"{sent.name}.log"
            with holder_lock(lock, "flow run 'the-first-one'", lambda _: None), \
                    open(console, "w") as out:
                proc = subprocess.Popen(  # with Ctrl-C's default action, as a terminal starts
                    command, stdout=out, stderr=subprocess.STDOUT, text=True, env=env,
                    start_new_session=True,  # its own process group, as a shell's job
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
                deadline = time.monotonic() + 400
                while "this run waits for it to end" not in " ".join(console.read_text().split()):
                    assert proc.poll() is None, console.read_text()[-3000:]
                    assert time.monotonic() < deadline, console.read_text()[-3000:]
                    time.sleep(0.5)
                os.killpg(proc.pid, sent)
                try:
                    assert proc.wait(timeout=60) == status, console.read_text()[-3000:]
                finally:
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
            text = console.read_text()
            assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
            assert "ConnectError" not in text, text[-3000:]
            assert text.rstrip().splitlines()[-1] == f"petalflow train: {said}{kept}"
        again = subprocess.run(command + ["--summary-json", str(workspace / "again.json")],
                               capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    said = " ".join((again.stdout + again.stderr).split())
    assert ": not modified (sha256" in said and "its manifest is reused" in said
    assert json.loads((workspace / "again.json").read_text())["alias"] == "champion"


def test_a_killed_train_command_has_its_mlflow_run_ended_killed_by_the_next_one(
        workspace, tiny_backbone):
    """`kill -9` (the out-of-memory killer's signal) ends `petalflow train` mid-training: no
    handler runs, and its MLflow run stayed RUNNING for ever in the MLflow UI. The next
    `petalflow train` of the model warns that the training before it was killed, ends that run
    KILLED saying why, then trains and registers."""
    import signal
    import time

    _serve_dataset(workspace, make_dataset, "killed", per_class=40)
    exe = Path(sys.executable).with_name("petalflow")
    env = {**os.environ, "PREFECT_API_URL": "", "COLUMNS": "400"}
    with serve_directory(workspace / "served") as url:
        command = [str(exe), "train", "--data-url", f"{url}/killed.tgz", "--backbone",
                   str(tiny_backbone), "--image-size", "32", "--batch-size", "8",
                   "--learning-rate", "0.05", "--val-fraction", "0.2", "--test-fraction", "0.2",
                   "--min-accuracy", "0"]
        console = workspace / "killed.log"
        with open(console, "w") as out:
            proc = subprocess.Popen(command + ["--epochs", "500", "--augment"], stdout=out,
                                    stderr=subprocess.STDOUT, text=True, env=env)
            try:
                deadline = time.monotonic() + 400
                while "epoch 2/500" not in console.read_text():
                    assert proc.poll() is None, console.read_text()[-3000:]
                    assert time.monotonic() < deadline, console.read_text()[-3000:]
                    time.sleep(0.2)
                os.kill(proc.pid, signal.SIGKILL)
                assert proc.wait(timeout=60) == -signal.SIGKILL
            finally:
                if proc.poll() is None:
                    proc.kill()
        (left,) = _client().search_runs(
            [_client().get_experiment_by_name("petalflow").experiment_id])
        assert left.info.status == "RUNNING"  # what the kill left
        again = subprocess.run(command + ["--epochs", "3", "--summary-json",
                                          str(workspace / "again.json")],
                               capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    said = " ".join((again.stdout + again.stderr).split())
    killed = re.search(r"model 'petalflow-classifier': the training before this one \((flow "
                       r"run '[^']+' \([0-9a-f-]+\), since [^)]+)\) ended without ending its "
                       r"turn: its process was killed \(the out-of-memory killer, its machine "
                       r"or worker gone\)", said)
    assert killed, said[-3000:]
    assert (f"the MLflow runs it left RUNNING are ended KILLED, saying why: "
            f"{left.info.run_id}") in said
    summary = json.loads((workspace / "again.json").read_text())
    assert summary["alias"] == "champion"
    ended = _client().get_run(left.info.run_id)
    assert ended.info.status == "KILLED", ended.info
    assert ended.data.tags["petalflow.failure"].startswith(
        "its run was killed before it ended (the out-of-memory killer, its "
        f"machine or worker gone: {killed.group(1)}); nothing of it was registered. Ended by "
        "flow run '"), ended.data.tags
    assert ended.data.tags["mlflow.note.content"].startswith("**Killed:** its run was killed")
    assert _client().get_run(summary["mlflow_run_id"]).info.status == "FINISHED"


def test_mlflow_models_serve_classifies_posted_images(trained, tmp_path):
    """`mlflow models serve -m models:/NAME@champion --env-manager local`, a real subprocess:
    MLflow's dataframe formats, and TensorFlow Serving's `instances`/`inputs` with binary data
    wrapped as `{"b64": ...}` (a client written for TF Serving; each such row was "not
    base64")."""
    import base64

    import httpx

    tmp, _summary = trained
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"}
    with _model_server(bin_dir / "mlflow", env, tmp, tmp_path / "serve.log", 180) as url:
        images = {
            "red": write_image(tmp_path / "r.jpg", COLOURS["red"], seed=31),
            "blue": write_image(tmp_path / "b.png", COLOURS["blue"], fmt="PNG", seed=32),
        }
        b64 = [base64.b64encode(p.read_bytes()).decode() for p in images.values()]
        b64.append(base64.b64encode(b"not an image").decode())
        split = {"dataframe_split": {"columns": ["image"], "data": [[v] for v in b64]}}
        records = {"dataframe_records": [{"image": v} for v in b64]}
        tf_serving_rows = {"instances": [{"image": {"b64": v}} for v in b64]}
        tf_serving_columns = {"inputs": {"image": [{"b64": v} for v in b64]}}
        for payload in (split, records, tf_serving_rows, tf_serving_columns):
            resp = httpx.post(f"{url}/invocations", json=payload, timeout=60)
            assert resp.status_code == 200, resp.text
            rows = resp.json()["predictions"]
            assert [r["label"] for r in rows] == ["red", "blue", ""]
            assert rows[2]["error"] == NOT_AN_IMAGE
            probs = [rows[0][f"prob_{c}"] for c in COLOURS]
            assert rows[0]["probability"] == pytest.approx(max(probs))
            assert abs(sum(rows[0][f"prob_{c}"] for c in COLOURS) - 1.0) < 1e-4


def test_predict_cli_json_top_k_glob_and_pull(trained, tmp_path, monkeypatch, capsys):
    from petalflow.flows.cli import main

    tmp, summary = trained
    monkeypatch.chdir(tmp)
    folder = tmp_path / "in"
    for i, name in enumerate(("red", "green")):
        write_image(folder / f"{name}.jpg", COLOURS[name], seed=40 + i)
    out = tmp_path / "p.json"
    assert main(["predict", "--input", str(folder / "*.jpg"), "--output", str(out),
                 "--format", "json", "--top-k", "2"]) == 0
    rows = {Path(r["path"]).stem: r for r in json.loads(out.read_text())}
    assert rows["red"]["label"] == rows["red"]["top1_label"] == "red"
    assert rows["green"]["top1_label"] == "green" and rows["green"]["top2_label"] != "green"
    assert rows["red"]["top1_probability"] >= rows["red"]["top2_probability"]
    # Named .parquet, without --format: Parquet, the same rows and columns.
    out_parquet = tmp_path / "p.parquet"
    assert main(["predict", "--input", str(folder), "--output", str(out_parquet),
                 "--top-k", "2"]) == 0
    table = pd.read_parquet(out_parquet).set_index("path")
    assert list(table.columns) == list(rows["red"])[1:]
    for stem, row in rows.items():
        assert table.loc[row["path"], "label"] == row["label"] == stem
        assert table.loc[row["path"], "probability"] == pytest.approx(row["probability"])

    dest = tmp_path / "offline"
    capsys.readouterr()
    assert main(["pull", "--dest", str(dest)]) == 0
    version = summary["model_version"]
    assert capsys.readouterr().out.endswith(
        f"saved models:/{MODEL}@champion (version {version}) to {dest}; use it offline with: "
        f"petalflow predict --model {dest} ...\n")
    model_dir = next(p.parent for p in dest.rglob("MLmodel"))
    # Offline: a tracking URI that cannot work proves the local folder needs no server.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    out_csv = tmp_path / "offline.csv"
    assert main(["predict", "--model", str(model_dir), "--input", str(folder), "--output",
                 str(out_csv)]) == 0
    assert (f"classified 2 of 2 images (0 errors) with {model_dir} (a copy of {MODEL} version "
            f"{version}) -> {out_csv}\n") in capsys.readouterr().out
    table = pd.read_csv(out_csv, keep_default_na=False)
    assert sorted(table["label"]) == ["green", "red"]


def test_a_model_pinned_to_other_package_versions_is_used_with_a_warning_naming_them(
        trained, tmp_path, monkeypatch, caplog):
    """A pulled model whose requirements.txt pins versions this environment lacks (another
    team's numpy, a package not installed here) still classifies; the log names each one."""
    import logging
    from importlib import metadata

    from petalflow.flows.cli import main

    tmp, _summary = trained
    monkeypatch.chdir(tmp)
    dest = tmp_path / "pulled"
    assert main(["pull", "--dest", str(dest)]) == 0
    model_dir = next(p.parent for p in dest.rglob("MLmodel"))
    requirements = model_dir / "requirements.txt"
    pins = requirements.read_text().splitlines()
    assert f"numpy=={metadata.version('numpy')}" in pins
    pins = [line for line in pins if not line.startswith("numpy")]
    requirements.write_text("\n".join(pins + ["numpy==1.0", "nosuch-package-xyz==2.0"]) + "\n")
    folder = tmp_path / "in"
    write_image(folder / "red.jpg", COLOURS["red"], seed=41)
    out_csv = tmp_path / "pinned.csv"
    caplog.set_level(logging.WARNING, logger="petalflow")
    assert main(["predict", "--model", str(model_dir), "--input", str(folder), "--output",
                 str(out_csv)]) == 0
    assert list(pd.read_csv(out_csv, keep_default_na=False)["label"]) == ["red"]
    warned = [r.getMessage() for r in caplog.records if "package versions" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert f"numpy (current: {metadata.version('numpy')}, required: numpy==1.0)" in warned[0]
    assert "nosuch-package-xyz (current: uninstalled, required: nosuch-package-xyz==2.0)" \
        in warned[0]
    for line in pins:  # what this environment satisfies is not named
        assert line.split("==")[0] + " (" not in warned[0]


def test_pull_into_a_folder_replaces_a_previous_pull_whole_and_refuses_other_files(
        trained, tmp_path, monkeypatch, capsys):
    """`petalflow pull --dest DIR` again (to update an offline copy): the folder holds the new
    model alone, none of the old files mixed in; a pull that fails leaves the previous copy as
    it was; a folder of the user's own files, or a file, is refused untouched."""
    from petalflow.flows.cli import main

    tmp, _summary = trained
    monkeypatch.chdir(tmp)
    dest = tmp_path / "offline"
    assert main(["pull", "--model", f"models:/{MODEL}/1", "--dest", str(dest)]) == 0
    assert (dest / "MLmodel").is_file()
    stale = dest / "code" / "from_an_older_version.py"  # a file the new version does not have
    stale.write_text("# stale")
    before = sorted(p.relative_to(dest) for p in dest.rglob("*"))
    assert main(["pull", "--model", f"models:/{MODEL}/99", "--dest", str(dest)]) == 6
    assert f"registered model {MODEL} has no version 99" in capsys.readouterr().err
    assert sorted(p.relative_to(dest) for p in dest.rglob("*")) == before
    assert main(["pull", "--dest", str(dest)]) == 0
    assert (dest / "MLmodel").is_file() and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["offline"]  # no staging folder left
    # The user's own file beside a pulled model: not a previous pull, refused untouched.
    (dest / "notes.md").write_text("mine")
    assert main(["pull", "--dest", str(dest)]) == 2
    assert f"--dest: {dest} holds other files (MLmodel, code, conda.yaml, ...)" in \
        capsys.readouterr().err
    assert (dest / "notes.md").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # "--dest ." would move the folder the shell stands in
    assert main(["pull", "--dest", "."]) == 2
    assert "--dest: . is the current folder or holds it: give a folder of its own, such as " \
        "./model" in capsys.readouterr().err
    assert main(["pull", "--dest", "model"]) == 0 and (empty / "model" / "MLmodel").is_file()

    photos = tmp_path / "photos"
    write_image(photos / "mine.jpg", COLOURS["red"], seed=5)
    assert main(["pull", "--dest", str(photos)]) == 2
    assert (f"petalflow pull: error: --dest: {photos} holds other files (mine.jpg, ...): give a "
            "new or empty folder, or one a previous pull filled (it is replaced)"
            ) in capsys.readouterr().err
    assert [p.name for p in photos.iterdir()] == ["mine.jpg"]
    assert main(["pull", "--dest", str(photos / "mine.jpg")]) == 2
    assert f"--dest: {photos / 'mine.jpg'} is a file, not a folder" in capsys.readouterr().err
    assert main(["pull", "--format", "tflite", "--dest", str(photos / "mine.jpg")]) == 2
    assert f"--dest: {photos / 'mine.jpg'} is a file, not a folder" in capsys.readouterr().err


def test_predict_timing_line_says_when_the_first_prediction_was_written(trained, tmp_path,
                                                                        monkeypatch, capsys):
    import re

    from petalflow.flows.cli import main

    tmp, _summary = trained
    monkeypatch.chdir(tmp)
    folder = tmp_path / "t"
    for i in range(5):
        write_image(folder / f"{i}.jpg", COLOURS["green"], seed=90 + i)
    assert main(["predict", "--input", str(folder), "--output", str(tmp_path / "t.csv"),
                 "--batch-size", "2", "--timing"]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("timing:")]
    assert len(line) == 1
    first, total = map(float, re.search(
        r"first prediction written ([0-9.]+) s after the command started; 5 images in "
        r"([0-9.]+) s", line[0]).groups())
    assert 0 < first <= total
    # As a command, counted from its process's start: here a process that waits 10 s before
    # its CLI runs (as the interpreter's start and the CLI's imports come before it; the
    # first prediction itself comes ~5 s after the CLI starts, so the wait is longer).
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    code = "import sys, time; time.sleep(10); from petalflow.flows.cli import main; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "predict", "--input", str(folder), "--output",
         str(tmp_path / "t2.csv"), "--timing"], cwd=tmp, capture_output=True, text=True,
        timeout=300, env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = float(re.search(r"first prediction written ([0-9.]+) s", proc.stdout)[1])
    assert 10.0 <= first < 60


def test_models_command_lists_versions(trained, monkeypatch, capsys):
    from petalflow.flows.cli import main

    tmp, _summary = trained
    monkeypatch.chdir(tmp)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "champion" in out and "test_accuracy" in out
    # The table's accuracy has the registration line's four digits (six before).
    accuracy = _summary["test_metrics"]["test_accuracy"]
    row = next(line for line in out.splitlines()
               if line.split()[:2] == ["1", "champion"])  # version 1's row of the table
    assert f" {accuracy:.4f} " in row and f"{accuracy:.6f}" not in out


def test_registered_model_carries_its_loader_and_pins_its_requirements(trained, monkeypatch):
    """The loader travels inside the model (code_paths: petalflow's own serving module, byte
    for byte), the requirements are pinned and do not name petalflow; no pickles; metadata is
    readable without TensorFlow."""
    import yaml

    tmp, _summary = trained
    monkeypatch.chdir(tmp)
    from petalflow.tasks import serving
    from petalflow.tasks.registry import pull_model

    path = pull_model(f"models:/{MODEL}@champion", tmp / "inspect")
    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "petalflow_serving" and pyfunc["code"] == "code"
    assert set(mlmodel["flavors"]) == {"python_function"}
    assert mlmodel["metadata"]["class_names"] == sorted(COLOURS)
    files = [p for p in path.rglob("*") if p.is_file()]
    assert [p.relative_to(path).as_posix() for p in files if p.suffix == ".py"] == [
        "code/petalflow_serving.py"]
    assert (path / "code" / "petalflow_serving.py").read_bytes() == Path(
        serving.__file__).read_bytes()
    assert not [p for p in files if p.suffix in {".pkl", ".pickle", ".cloudpickle"}]
    graph = b"".join(p.read_bytes() for p in files if p.suffix == ".pb")
    assert b"PyFunc" not in graph and b"Lambda" not in graph
    reqs = [r for r in (path / "requirements.txt").read_text().split() if r]
    assert {r.split("==")[0] for r in reqs} == {"mlflow", "tensorflow", "pandas", "numpy"}
    assert all("==" in r for r in reqs) and not any("petalflow" in r for r in reqs)


def test_versions_registered_before_the_loader_travelled_still_load(trained, tmp_path,
                                                                     monkeypatch):
    """The layout of earlier versions (loader_module tasks.serving, SavedModel in tfmodel/)
    keeps loading with petalflow installed, as `petalflow predict` does."""
    import shutil

    import yaml

    from petalflow.tasks.predict import load_model

    tmp, summary = trained
    old = tmp_path / "old-model"
    shutil.copytree(Path(summary["workdir"]) / "export", old / "tfmodel")
    (old / "MLmodel").write_text(yaml.safe_dump({
        "flavors": {"python_function": {"loader_module": "tasks.serving", "data": "tfmodel",
                                        "env": {"virtualenv": "python_env.yaml"},
                                        "python_version": "3.11.7"}},
        "mlflow_version": "3.17.2"}))
    images = [write_image(tmp_path / "r.jpg", COLOURS["red"], seed=77)]
    import base64

    model, loaded_from = load_model(str(old))
    assert loaded_from == str(old)
    out = model.predict(pd.DataFrame(
        {"image": [base64.b64encode(p.read_bytes()).decode() for p in images]}))
    assert out["label"].tolist() == ["red"]


def test_mlflow_package_is_not_shadowed_by_the_mlflow_folder():
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", "import mlflow; print(mlflow.__file__)"],
                         cwd=repo, capture_output=True, text=True, check=True).stdout
    assert "site-packages" in out


def test_registration_failing_after_upload_leaves_no_alias(trained, monkeypatch):
    """The version is created, then the registry call that follows fails: the version must not
    carry an alias, the champion stays, and the retried task finishes the job."""
    import mlflow

    from petalflow.tasks.registry import register_model

    tmp, summary = trained
    monkeypatch.chdir(tmp)
    data_info = json.loads(next((tmp / "home" / "manifests").rglob("dataset.json")).read_text())
    client = _client()
    cfg = TrainParams(**{**json.loads(client.get_model_version(MODEL, "1").tags["params"]),
                         "seed": 99})
    from petalflow.tasks.registry import start_run

    run_id = start_run(cfg, data_info)
    original = mlflow.MlflowClient.set_model_version_tag
    calls = []

    def flaky_tag(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionError("registry went away after the upload")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "set_model_version_tag", flaky_tag)
    export = Path(summary["workdir"]) / "export"
    with pytest.raises(ConnectionError):
        register_model(run_id, export, cfg, data_info, {"test_accuracy": 1.0})
    versions = client.search_model_versions(f"name='{MODEL}' and run_id='{run_id}'")
    assert len(versions) == 1
    new_version = str(versions[0].version)
    assert not client.get_model_version(MODEL, new_version).aliases
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    # The retry reuses that version (no duplicate) and only then decides the alias.
    again = register_model(run_id, export, cfg, data_info, {"test_accuracy": 1.0})
    assert again["model_version"] == new_version
    assert len(client.search_model_versions(f"name='{MODEL}' and run_id='{run_id}'")) == 1


def test_a_bare_environment_built_from_the_models_requirements_serves_it(trained, tmp_path):
    """Another team's environment: a fresh venv with only the registered version's own
    requirements.txt installed (no petalflow, from the package index), `mlflow models serve`
    of models:/NAME@champion from the tracking store, images posted over REST."""
    import base64

    import httpx

    from petalflow.tasks.registry import pull_model

    tmp, _summary = trained
    uri = f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}"
    reqs = pull_model(f"models:/{MODEL}@champion", tmp_path / "peek") / "requirements.txt"
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", str(bare)], check=True, timeout=120)
    pip = subprocess.run([str(bare / "bin" / "python"), "-m", "pip", "install", "--quiet",
                          "--disable-pip-version-check", "-r", str(reqs)],
                         capture_output=True, text=True, timeout=1200)
    assert pip.returncode == 0, pip.stderr[-3000:]
    outside = tmp_path / "elsewhere"  # not the repo: nothing of petalflow on sys.path
    outside.mkdir()
    probe = subprocess.run([str(bare / "bin" / "python"), "-c",
                            "import importlib.util as u; print([m for m in ('tasks', 'flows', "
                            "'petalflow') if u.find_spec(m)])"],
                           cwd=outside, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{bare / 'bin'}{os.pathsep}/usr/bin:/bin", MLFLOW_TRACKING_URI=uri)
    with _model_server(bare / "bin" / "mlflow", env, outside, tmp_path / "serve.log",
                       240) as url:
        red = write_image(tmp_path / "r.jpg", COLOURS["red"], seed=81)
        rows = httpx.post(f"{url}/invocations", timeout=120, json={"dataframe_records": [
            {"image": base64.b64encode(red.read_bytes()).decode()},
            {"image": base64.b64encode(b"not an image").decode()}]}).json()["predictions"]
        assert [r["label"] for r in rows] == ["red", ""]
        assert rows[1]["error"] == NOT_AN_IMAGE
        assert set(rows[0]) == {"label", "probability", "error", "prob_blue", "prob_green",
                                "prob_red"}


@contextlib.contextmanager
def _model_server(mlflow_exe: Path, env: dict, cwd: Path, log_path: Path, timeout_s: float):
    """`mlflow models serve -m models:/NAME@champion --env-manager local` on a free port, as a
    real subprocess; yields its URL once /ping answers, stops it afterwards."""
    import time

    import httpx

    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [str(mlflow_exe), "models", "serve", "-m", f"models:/{MODEL}@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.time() + timeout_s
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.time() < deadline, "model server did not become healthy"
                time.sleep(1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_every_version_carries_edge_models_that_pull_fetches(trained, tmp_path, monkeypatch,
                                                            capsys):
    """The run converts the model to TFLite (float16, int8), evaluates both on the test split
    (summary, version tags, model card) and `petalflow pull --format tflite` fetches one with
    its labels, which the stock interpreter runs to the SavedModel's label."""
    import numpy as np
    import tensorflow as tf

    from petalflow.flows.cli import main
    from petalflow.tasks.images import decode_image
    from petalflow.tasks.serving import ImageClassifier

    tmp, summary = trained
    monkeypatch.chdir(tmp)
    formats = [row["format"] for row in summary["edge"]]
    assert formats == ["SavedModel", "TFLite float16", "TFLite int8"]
    int8 = summary["edge"][2]
    assert int8["size_mb"] < summary["edge"][0]["size_mb"] and int8["latency_ms"] > 0
    # The SavedModel's latency is the evaluation's own measurement, made the same way.
    assert summary["edge"][0]["latency_ms"] == summary["test_metrics"]["serving_latency_ms"] > 0
    mv = _client().get_model_version(MODEL, summary["model_version"])
    assert mv.tags["edge_formats"] == "float16,int8"
    assert float(mv.tags["edge_int8_test_accuracy"]) == pytest.approx(int8["test_accuracy"],
                                                                      abs=1e-4)
    assert "Edge models (TensorFlow Lite)" in mv.description

    dest = tmp_path / "edge"
    assert main(["pull", "--format", "tflite", "--dest", str(dest)]) == 0
    printed = capsys.readouterr().out
    model_path = dest / "model_int8.tflite"
    assert (f"saved the int8 TFLite model of models:/{MODEL}@champion (version "
            f"{summary['model_version']}) to {model_path}") in printed
    labels = (dest / "labels.txt").read_text().splitlines()
    assert labels == sorted(COLOURS)
    contract = json.loads((dest / "edge.json").read_text())
    assert contract["input"]["shape"] == [1, 32, 32, 3]
    assert contract["input"]["from_a_file"].startswith("edge_input.py beside the model")
    from petalflow.tasks import edge_input

    assert (dest / "edge_input.py").read_bytes() == Path(edge_input.__file__).read_bytes()
    photo = write_image(tmp_path / "blue.jpg", COLOURS["blue"], seed=4242)
    interpreter = tf.lite.Interpreter(model_path=str(model_path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"],
                           decode_image(photo.read_bytes(), 32).numpy()[None])
    interpreter.invoke()
    probs = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]
    saved = ImageClassifier(str(next((tmp / "home" / "runs").rglob("export"))))
    assert labels[int(np.argmax(probs))] == saved.predict_bytes([photo.read_bytes()])["label"][0]
    assert main(["pull", "--format", "tflite", "--quantization", "float16", "--dest",
                 str(dest)]) == 0
    assert (dest / "model_float16.tflite").is_file()


def test_the_readmes_edge_snippet_runs_without_tensorflow(trained, tmp_path, monkeypatch):
    """Another team's device code: a fresh venv with only ai-edge-litert and Pillow (from the
    package index; no TensorFlow, no petalflow) runs the README's snippet on the pulled int8
    model and edge_input.py: it prints the SavedModel's label, and the model gets training's
    pixels (the same probabilities as TensorFlow's interpreter on training's decoding)."""
    import re

    import tensorflow as tf

    from petalflow.flows.cli import main
    from petalflow.tasks.images import decode_upright
    from petalflow.tasks.serving import ImageClassifier

    tmp, summary = trained
    monkeypatch.chdir(tmp)
    work = tmp_path / "device"
    work.mkdir()
    assert main(["pull", "--format", "tflite", "--dest", str(work / "edge-model")]) == 0
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S)
                   if "from edge_input import model_input" in block)
    (work / "snippet.py").write_text(snippet)
    photo = write_image(work / "photo.jpg", COLOURS["green"], size=(48, 40), seed=4343)

    venv = tmp_path / "litert"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                          "--disable-pip-version-check", "ai-edge-litert", "pillow"],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = ("import importlib.util as u, sys; sys.path.insert(0, 'edge-model'); "
             "import edge_input; print([m for m in ('tensorflow', 'petalflow', 'tasks') "
             "if u.find_spec(m) or m in sys.modules])")
    assert subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120).stdout.strip() == "[]"
    ran = subprocess.run([str(venv / "bin" / "python"), "snippet.py"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    saved = ImageClassifier(str(next((tmp / "home" / "runs").rglob("export"))))
    label = saved.predict_bytes([photo.read_bytes()])["label"][0]
    assert ran.stdout.strip() == label

    # The float16 model (the int8 one's output moves in 1/256 steps): the same probabilities
    # as TensorFlow's interpreter given training's decoding, from the same pixels.
    assert main(["pull", "--format", "tflite", "--quantization", "float16", "--dest",
                 str(work / "edge-model")]) == 0
    dump = ("import sys, numpy as np; sys.path.insert(0, 'edge-model'); "
            "from edge_input import model_input; "
            "from ai_edge_litert.interpreter import Interpreter; "
            "x = model_input('photo.jpg', 32); np.save('pixels.npy', x); "
            "i = Interpreter(model_path='edge-model/model_float16.tflite'); i.allocate_tensors(); "
            "i.set_tensor(i.get_input_details()[0]['index'], x); "
            "i.invoke(); print(i.get_tensor(i.get_output_details()[0]['index'])[0].tolist())")
    litert = subprocess.run([str(venv / "bin" / "python"), "-c", dump], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert litert.returncode == 0, litert.stderr[-3000:]
    training = decode_upright(tf.constant(photo.read_bytes()), 32).numpy()[None]
    assert np.array_equal(np.load(work / "pixels.npy"), training)
    interpreter = tf.lite.Interpreter(
        model_path=str(work / "edge-model" / "model_float16.tflite"))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], training)
    interpreter.invoke()
    expected = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]
    assert json.loads(litert.stdout) == expected.tolist()


def _grayscale_rotated(src: Path, dest: Path) -> Path:
    from PIL import Image

    for path in sorted(src.rglob("*.jpg")):
        out = dest / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("L").convert("RGB").rotate(90, expand=True).save(out)
    return dest


def test_batch_predict_measures_drift_and_announces_it_over_the_threshold(
        trained, tmp_path, monkeypatch, capsys):
    """New photos like the training ones: a drift score under the threshold, in the summary
    and the drift artifact, no event; a folder of new photos of one class too (compared with
    training photos of that class, not with the training mix). The same photos grayscale and
    rotated: over it, and petalflow.drift.detected carries the champion's training parameters
    for a retraining."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from petalflow.flows.cli import main
    from petalflow.flows.predict_flow import batch_predict
    from petalflow.tasks.params import PredictParams

    tmp, summary = trained
    monkeypatch.chdir(tmp)
    alike = make_dataset(tmp_path / "alike", per_class=7, seed=7)  # 21: enough for a verdict
    shifted = _grayscale_rotated(alike, tmp_path / "shifted")

    # Earlier tests' runs of `petalflow predict` (the same flow) may have announced drift too.
    since = datetime.datetime.now(datetime.timezone.utc).isoformat()
    calm = batch_predict(PredictParams(input=[str(alike)], output=str(tmp_path / "a.csv")))
    assert calm["drift"]["available"] and not calm["drift"]["drifted"]
    assert calm["drift"]["drift_score"] < calm["drift"]["threshold"]
    assert calm["drift"]["images"] == 21 and calm["drift_event"] is None
    assert prefect_events("petalflow.drift.detected", since) == []
    one_class = make_dataset(tmp_path / "one", per_class=21, seed=8,
                             colours={"red": COLOURS["red"]})
    reds = batch_predict(PredictParams(input=[str(one_class)], output=str(tmp_path / "r.csv")))
    assert reds["labels"] == {"red": 21}
    assert reds["drift"]["class_mix"] and not reds["drift"]["drifted"], reds["drift"]
    assert reds["drift_event"] is None and prefect_events("petalflow.drift.detected", since) == []

    # Three of the shifted photos: a score over the threshold, but too few for a verdict (a
    # few photos like the training ones score that high by chance): no event.
    few = [str(p) for p in sorted(shifted.rglob("*.jpg"))[:3]]
    small = batch_predict(PredictParams(input=few, output=str(tmp_path / "f.csv")))
    assert small["drift"]["images"] == 3 and small["drift"]["min_images"] == 20
    assert small["drift"]["drift_score"] > small["drift"]["threshold"]
    assert not small["drift"]["drifted"] and small["drift_event"] is None
    assert prefect_events("petalflow.drift.detected", since) == []

    alarm = batch_predict(PredictParams(input=[str(shifted)], output=str(tmp_path / "s.csv")))
    champion = f"models:/{MODEL}/{summary['model_version']}"
    assert alarm["model_uri"] == f"models:/{MODEL}@champion"
    assert alarm["model_version_uri"] == champion
    drift = alarm["drift"]
    assert drift["drifted"] and drift["drift_score"] > drift["threshold"]
    events = prefect_events("petalflow.drift.detected", since)
    assert [e["id"] for e in events] == [alarm["drift_event"]]
    payload = events[0]["payload"]
    assert events[0]["resource"]["prefect.resource.id"] == f"petalflow.model.{MODEL}"
    assert payload["drift"]["drift_score"] == pytest.approx(drift["drift_score"])
    assert payload["model_version_uri"] == champion  # whose parameters "params" holds
    assert payload["params"]["data_url"] == json.loads(
        _client().get_model_version(MODEL, summary["model_version"]).tags["params"])["data_url"]
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"drift-{MODEL}"])))
    texts = [a.data for a in arts]
    assert any(f"drift score **{drift['drift_score']:.3f}**" in t and f"what `models:/{MODEL}"
               f"@champion (version {summary['model_version']})` was trained on" in t
               for t in texts)
    assert any(f"drift score **{calm['drift']['drift_score']:.3f}**" in t for t in texts)
    assert any(f"drift score **{reds['drift']['drift_score']:.3f}**" in t
               and "this batch's own class mix" in t for t in texts)
    assert any(f"drift score **{small['drift']['drift_score']:.3f}** (threshold 0.25), no "
               "verdict: too few images to tell (it needs 20 or more)." in t for t in texts)

    # The command measures the same way and says it.
    assert main(["predict", "--input", str(shifted), "--output", str(tmp_path / "c.csv")]) == 0
    assert f"drift: score {drift['drift_score']:.3f}" in capsys.readouterr().out
    # ... and announces it the same way: it ran the batch-predict flow.
    assert len(prefect_events("petalflow.drift.detected", since, at_least=2)) == 2


def test_a_sweep_trains_each_candidate_and_registers_the_best(tmp_path, tiny_backbone,
                                                              other_backbone, monkeypatch,
                                                              prefect_harness):
    """Three candidates over two backbones, in this process: nested MLflow runs, a ranking
    (summary, table artifact, parent run), the best registered with its own backbone, features
    computed once per backbone; the same sweep again is "nothing to do"."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from petalflow.flows.train_flow import train_and_register

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PETALFLOW_HOME", str(tmp_path / "home"))
    archive = make_tgz(make_dataset(tmp_path / "src", per_class=8), tmp_path / "d.tgz")
    params = _params(str(archive), archive, tiny_backbone, model_name="swept", epochs=3,
                     edge_export=False, min_accuracy=0.0, sweep=[
                         {"learning_rate": 0.05},
                         {"learning_rate": 0.0001, "epochs": 1},
                         {"backbone": str(other_backbone)}])
    summary = train_and_register(params)
    ranking = summary["sweep"]
    assert sorted(r["candidate"] for r in ranking) == [1, 2, 3]
    assert all(r["rank"] and not r["error"] for r in ranking)
    accs = [r["val_accuracy"] for r in ranking]
    assert accs == sorted(accs, reverse=True)
    winner = params.candidate(ranking[0]["candidate"] - 1)
    assert ranking[0]["candidate"] != 2  # one epoch at a tiny learning rate does not win

    client = _client()
    version = client.get_model_version("swept", summary["model_version"])
    assert version.tags["backbone"] == winner.backbone
    assert TrainParams.model_validate_json(version.tags["params"]) == params  # the request
    children = client.search_runs(
        [client.get_run(summary["mlflow_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'")
    assert sorted(r.info.run_name for r in children) == ["candidate-1", "candidate-2",
                                                         "candidate-3"]
    assert all(r.info.status == "FINISHED" and "val_accuracy" in r.data.metrics
               for r in children)
    assert {r["mlflow_run_id"] for r in ranking} == {r.info.run_id for r in children}
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.data.tags["petalflow.sweep_winner"] == str(ranking[0]["candidate"])
    assert "test_accuracy" in parent.data.metrics  # the winner's test figure, on the parent
    with get_client(sync_client=True) as prefect:
        table = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["sweep-swept"])))
    assert table and table[0].type == "table"
    assert [row["candidate"] for row in json.loads(table[0].data)] == [
        r["candidate"] for r in ranking]

    # Candidates 1 and 2 share the tiny backbone: its features were computed once.
    caches = sorted(p.parent.name for p in (tmp_path / "home" / "features").rglob("val.npz"))
    assert len(caches) == 2
    reused = [json.loads(p.read_text())["features"]["reused"]
              for p in sorted((tmp_path / "home" / "runs").rglob("train.json"))]
    assert sorted(tuple(sorted(r)) for r in reused) == [(), (), ("train", "val")]
    # ... and frozen once: the second of them took the first's frozen copy (no SavedModel load)
    frozen = sorted((tmp_path / "home" / "features" / "frozen-backbones").iterdir())
    assert len(frozen) == 2  # one per backbone
    taken = [json.loads(p.read_text())["features"]["frozen_backbone"]
             for p in (tmp_path / "home" / "runs").rglob("train.json")]
    assert len(taken) == 3 and taken.count(None) == 2
    assert Path(next(t for t in taken if t)) in frozen
    # ... and each image's features are in its backbone's feature bank, where the README says
    banks = sorted((tmp_path / "home" / "features" / "feature-banks").iterdir())
    assert len(banks) == 2 and all(list(bank.glob("*.npz")) for bank in banks)

    again = train_and_register(params)
    assert again["status"] == "nothing to do"


def test_a_head_still_learning_at_its_last_epoch_is_said_to_need_more(
        workspace, tiny_backbone, prefect_harness, caplog):
    """Three epochs where the tiny backbone's features need many: the run's log warns, and the
    summary, the result artifact, train.json and the model card (the version's description)
    say the head had not finished learning."""
    import logging

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from petalflow.flows.train_flow import train_and_register

    archive = _serve_dataset(workspace, make_dataset, "learning", per_class=12)
    caplog.set_level(logging.WARNING)
    with serve_directory(workspace / "served") as url:
        summary = train_and_register(_params(f"{url}/learning.tgz", archive, tiny_backbone,
                                             epochs=3, learning_rate=0.3, min_accuracy=0.0,
                                             edge_export=False, model_name="learning"))
    advice = summary["training"]["advice"]
    assert advice.startswith("the validation loss was still falling at the last of the 3 "
                             "epochs (") and advice.endswith("would likely raise its accuracy")
    assert [r.levelname for r in caplog.records
            if r.getMessage() == f"training: {advice}"] == ["WARNING"]
    client = _client()
    assert f"## Training\n\nEpochs: {advice}." in client.get_model_version(
        "learning", summary["model_version"]).description
    recorded = client.download_artifacts(summary["mlflow_run_id"], "training/train.json",
                                         str(workspace / "recorded"))
    assert json.loads(Path(recorded).read_text())["advice"] == advice
    with get_client(sync_client=True) as prefect:
        result = prefect.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["train-result-learning"])))
    assert f"- Epochs: {advice}\n" in result[0].data


def test_training_handed_to_a_deployment_no_worker_takes_fails_saying_so_and_keeps_the_champion(
        workspace, tiny_backbone, prefect_harness, monkeypatch):
    """The training step handed to a deployment of a pool with no worker online (a gpu worker
    stopped, its machine down): before, the run waited for ever with the training run `Late`,
    saying nothing and holding its model's turn. Now its log says so at once, and after the
    limit it cancels the training run and fails saying why; the champion stays. A deployment
    the server does not have fails the run before anything is downloaded."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterDeploymentId, LogFilter, LogFilterFlowRunId,
    )

    from petalflow.flows.train_flow import train_and_register
    from petalflow.tasks import handoff
    from petalflow.tasks.errors import TrainingHandoffError

    archive = _serve_dataset(workspace, make_dataset, "good", per_class=12)
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="unmanned", type="process"))
        flow_id = client.create_flow_from_name("train-model")
        deployment_id = client.create_deployment(flow_id=flow_id, name="unmanned",
                                                 work_pool_name="unmanned")
    with serve_directory(workspace / "served") as url:
        def params(**kw):
            return _params(f"{url}/good.tgz", archive, tiny_backbone, **kw)

        with pytest.raises(TrainingHandoffError) as missing:
            train_and_register(params(training_deployment="train-model/unmaned"))
        assert str(missing.value).startswith(
            "training_deployment train-model/unmaned: no such deployment on the Prefect server "
            "this run reports to ("), missing.value
        assert "its deployments of the train-model flow: train-model/unmanned (pool " \
               "unmanned)" in str(missing.value)
        assert not (workspace / "home" / "downloads").exists()

        first = train_and_register(params())  # in this process
        assert (first["model_version"], first["alias"]) == ("1", "champion")
        monkeypatch.setattr(handoff, "NO_WORKER_LIMIT_S", 6)
        with pytest.raises(TrainingHandoffError) as unmanned:
            train_and_register(params(training_deployment="train-model/unmanned", force=True))
    text = str(unmanned.value)
    assert text.startswith("the training step, handed to train-model/unmanned (run "), text
    assert ("never started: no worker of pool 'unmanned' took it in 6 s (no worker of it is "
            "online); nothing was trained: start a worker of pool 'unmanned' where training "
            "should run (`prefect worker start --pool unmanned --limit 1`") in text
    assert text.endswith("nothing was registered: the champion is as it was")
    with get_client(sync_client=True) as client:
        (child,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id])))
        assert child.state.is_cancelled()  # it will not start when a worker comes
        assert child.state.message.startswith("no worker of pool 'unmanned' took it in 6 s")
        # The parent's log, as the UI shows it, said why it waited as soon as it did.
        parent = client.read_task_run(child.parent_task_run_id).flow_run_id
        only = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[parent]))
        for _ in range(50):  # the run's logs reach the server in batches
            said = [entry.message for entry in client.read_logs(log_filter=only)
                    if entry.message.startswith(f"training run {child.name} (train-model/"
                                                "unmanned) waits for a worker of pool "
                                                "'unmanned'")]
            if said:
                break
            time.sleep(0.2)
    assert said and "Without one within 6 s this run cancels it and fails" in said[0], said
    _failed_keeping_the_champion(f"TrainingHandoffError: {text}")


def _failed_keeping_the_champion(why: str) -> None:
    """The one FAILED MLflow run says ``why`` where the MLflow UI shows it (its description),
    and nothing was registered after version 1, the champion."""
    versions = _client().search_model_versions(f"name='{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    (failed,) = _client().search_runs(
        [_client().get_experiment_by_name("petalflow").experiment_id],
        "attributes.status = 'FAILED'")
    assert failed.data.tags["petalflow.failure"] == why
    assert failed.data.tags["mlflow.note.content"] == f"**Failed:** {why}"
    assert str(_client().get_model_version_by_alias(MODEL, "champion").version) == "1"


def test_a_training_longer_than_its_time_limit_is_stopped_and_keeps_the_champion(
        workspace, tiny_backbone, prefect_harness):
    """A training that does not end (a stalled GPU driver, a network disk that stopped
    answering) held its model's training turn for ever: every later run of the model, the
    weekly schedule's included, waited behind it. A training step now runs at most
    max_training_hours (here 2 s against 500 epochs): the run fails saying so, its MLflow run
    is FAILED with why, nothing is registered and the champion stays; the next run of the
    model trains."""
    from petalflow.flows.train_flow import train_and_register
    from petalflow.tasks.errors import TrainingTimeLimit

    archive = _serve_dataset(workspace, make_dataset, "good", per_class=12)
    with serve_directory(workspace / "served") as url:
        def params(**kw):
            return _params(f"{url}/good.tgz", archive, tiny_backbone, **kw)

        first = train_and_register(params())
        assert (first["model_version"], first["alias"]) == ("1", "champion")
        started = time.monotonic()
        with pytest.raises(TrainingTimeLimit) as stopped:
            train_and_register(params(epochs=500, force=True, max_training_hours=0.0005))
        took = time.monotonic() - started
        text = str(stopped.value)
        assert text.startswith("the training step ran longer than max_training_hours (0.0005 "
                               "hours = 2 s) allows and was stopped; nothing was registered: "
                               "the champion is as it was"), text
        assert "a larger max_training_hours (--max-training-hours)" in text
        assert took < 60, took  # stopped, not trained to its end
        _failed_keeping_the_champion(f"TrainingTimeLimit: {text}")
        # The model's turn was released with the run: the next one trains.
        again = train_and_register(params(epochs=7))
        assert again["model_version"] == "2", again


def _manned_training_deployment(client, name: str):
    """A train-model deployment ``name`` on a pool ``<name>-gpu`` with a worker online."""
    from prefect.client.schemas.actions import WorkPoolCreate

    client.create_work_pool(WorkPoolCreate(name=f"{name}-gpu", type="process"))
    client.send_worker_heartbeat(f"{name}-gpu", "a-worker")
    return client.create_deployment(flow_id=client.create_flow_from_name("train-model"),
                                    name=name, work_pool_name=f"{name}-gpu")


def test_a_handed_over_training_over_its_time_limit_is_cancelled_and_said(prefect_harness,
                                                                          monkeypatch):
    """Handed over to a training deployment, a training running longer than the run's
    max_training_hours is set Cancelling (its worker stops its process, hung or not) with a
    message saying why, and the run's error says so; one whose worker does not stop it (the
    worker gone or hung itself) is marked Cancelled after CANCEL_GRACE_S, so the waiting run
    ends all the same. (The worker's part is played through the API here, as a worker marks a
    run it stopped; test_deployments_e2e has a real one.)"""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Running

    from petalflow.tasks import handoff
    from petalflow.tasks.errors import TrainingTimeLimit

    monkeypatch.setattr(handoff, "CANCEL_GRACE_S", 2)
    with get_client(sync_client=True) as client:
        deployment = _manned_training_deployment(client, "slow")
        stops, ignores = (client.create_flow_run_from_deployment(deployment) for _ in range(2))
        for run in (stops, ignores):
            client.set_flow_run_state(run.id, Running(), force=True)

        def worker_stops_it():  # as a process worker does: kills it, marks it Cancelled
            while client.read_flow_run(stops.id).state.type != StateType.CANCELLING:
                threading.Event().wait(0.2)
            client.set_flow_run_state(stops.id, Cancelled(
                message="Flow run was cancelled successfully."), force=True)

        threading.Thread(target=worker_stops_it, daemon=True).start()
        started = time.monotonic()
        first, second = handoff.wait_for_training_runs(
            [stops.id, ignores.id], {"name": "train-model/slow", "pool": "slow-gpu"},
            poll_s=0.3, max_hours=1 / 3600)
        took = time.monotonic() - started
        told = [state.message for state in client.read_flow_run_states(stops.id)]
    assert 1 <= took < 20, took
    said = ("stopped: it ran longer than max_training_hours (0.000277778 hours = 1 s) allows: "
            "hung (a stalled GPU driver or network disk), or more data than the limit was set "
            "for; nothing it trained is registered")
    assert first.state.is_cancelled() and said in told, told
    assert second.state.is_cancelled()
    assert second.state.message == said + (" (its worker had not stopped it 2 s after it was "
                                           "cancelled)")
    error = handoff.ended_training_error(first, "train-model/slow", 1 / 3600)
    assert isinstance(error, TrainingTimeLimit)
    assert str(error).startswith(f"the training step, handed to train-model/slow (run "
                                 f"{first.name}), ran longer than max_training_hours "
                                 "(0.000277778 hours = 1 s) allows and was stopped"), error
    # One candidate of a sweep: its run goes on with the others, and may register one.
    candidate = handoff.ended_training_error(second, "train-model/slow", 1 / 3600,
                                             whole_run=False)
    assert isinstance(candidate, TrainingTimeLimit) and str(candidate) == (
        f"the training step, handed to train-model/slow (run {second.name}), ran longer than "
        "max_training_hours (0.000277778 hours = 1 s) allows and was stopped"), candidate
    # A training run cancelled for another reason (the UI's Cancel) is said as it ended.
    with get_client(sync_client=True) as client:
        elsewhere = client.create_flow_run_from_deployment(deployment)
        client.set_flow_run_state(elsewhere.id, Running(), force=True)
        client.set_flow_run_state(elsewhere.id, Cancelled(message="cancelled from the UI"),
                                  force=True)
        elsewhere = client.read_flow_run(elsewhere.id)
    other = handoff.ended_training_error(elsewhere, "train-model/slow", 1 / 3600)
    assert type(other) is RuntimeError and str(other) == (
        f"training run {elsewhere.name} (train-model/slow) ended Cancelled: cancelled from the "
        "UI"), other


def test_a_handed_over_training_stops_itself_once_its_run_has_ended_or_long_after_its_limit(
        prefect_harness, monkeypatch):
    """A training run handed over (``ends_with_its_parent``' thread) sets itself Cancelling,
    saying why, once the run that handed it over has ended (Crashed: killed outright, which
    cancels none of its subflow runs), and, when that run's end is never known (it shows
    Running, its machine gone), BACKSTOP_S after its max_training_hours. (test_deployments_e2e
    has the whole of it with a real worker and a killed run.)"""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelled, Crashed, Running

    from petalflow.tasks import handoff

    class Said:  # the run logger's part
        def __init__(self):
            self.lines = []

        def warning(self, message, *args):
            self.lines.append(message % args)

        def debug(self, message, *args):
            pass

    monkeypatch.setattr(handoff, "BACKSTOP_S", 1)
    with get_client(sync_client=True) as client:
        deployment = _manned_training_deployment(client, "orphan")
        parent, orphan, outlived = (client.create_flow_run_from_deployment(deployment)
                                    for _ in range(3))
        for run in (parent, orphan, outlived):
            client.set_flow_run_state(run.id, Running(), force=True)
        said = Said()
        started = time.monotonic()
        # The run that handed it over shows Running: stopped 1 s (BACKSTOP_S) after its limit.
        handoff._watch_parent(outlived.id, parent.id, 1 / 3600, 0.2, threading.Event(), said)
        took = time.monotonic() - started
        assert 2 <= took < 20, took
        assert client.read_flow_run(outlived.id).state.type == StateType.CANCELLING
        over = client.read_flow_run(outlived.id).state.message
        assert over == (
            "stopped: it ran longer than max_training_hours (0.000277778 hours = 1 s) allows: "
            "hung (a stalled GPU driver or network disk), or more data than the limit was set "
            f"for; nothing it trained is registered; the run that handed it over ({parent.name}, "
            "Running) had not stopped it 1 s after that"), over
        # That run killed (its worker marks it Crashed): stopped at the next look.
        client.set_flow_run_state(parent.id, Crashed(
            message="Flow run infrastructure exited with non-zero status code -9."), force=True)
        started = time.monotonic()
        handoff._watch_parent(orphan.id, parent.id, 24, 0.2, threading.Event(), said)
        assert time.monotonic() - started < 10
        state = client.read_flow_run(orphan.id).state
    assert state.type == StateType.CANCELLING
    assert state.message == (
        f"cancelled: the run that handed this training over ended before it ({parent.name} "
        "ended Crashed: Flow run infrastructure exited with non-zero status code -9.), so "
        "nothing it trains would be registered; it is stopped to free its worker"), state
    assert said.lines == [over, state.message]
    # A training that ends first ends the watch, which changes nothing.
    done = threading.Event()
    done.set()
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(outlived.id, Running(), force=True)
        handoff._watch_parent(outlived.id, parent.id, 24, 0.2, done, said)
        assert client.read_flow_run(outlived.id).state.type == StateType.RUNNING
        # One ended meanwhile (its worker marked it cancelled) stays as it is, unsaid.
        client.set_flow_run_state(outlived.id, Cancelled(message="by its worker"), force=True)
        handoff._watch_parent(outlived.id, parent.id, 24, 0.2, threading.Event(), said)
        assert client.read_flow_run(outlived.id).state.message == "by its worker"
    assert len(said.lines) == 2, said.lines


def test_a_training_deployment_on_the_runs_own_pool_trains_in_the_run(prefect_harness):
    """A run on pool P that hands its training to a deployment on P could wait for a slot it
    holds itself (two such runs on a pool of two slots waited for each other for ever): such a
    deployment trains in the run's process; one on another pool is handed to."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from petalflow.tasks.handoff import training_handoff

    with get_client(sync_client=True) as client:
        for pool in ("same-cpu", "other-gpu"):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        training = client.create_flow_from_name("train-model")
        for pool in ("same-cpu", "other-gpu"):
            client.create_deployment(flow_id=training, name=f"on-{pool}", work_pool_name=pool)
        parent = client.create_deployment(
            flow_id=client.create_flow_from_name("train-and-register"), name="train-on-cpu",
            work_pool_name="same-cpu")
        run = client.create_flow_run_from_deployment(parent)
    assert training_handoff("train-model/on-same-cpu", run.id) is None
    assert training_handoff("train-model/on-other-gpu", run.id) == {
        "name": "train-model/on-other-gpu", "pool": "other-gpu"}
    assert training_handoff(None, run.id) is None


def test_waiting_for_handed_over_trainings_says_why_and_gives_up_only_on_those_no_worker_takes(
        prefect_harness, monkeypatch, caplog):
    """A training run waiting behind a busy pool (a worker online) is said once and waited for;
    of a sweep's runs, one no worker takes is cancelled after the limit while the one already
    training is waited for to its end."""
    import logging
    import threading

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Completed, Running

    from petalflow.tasks import handoff

    caplog.set_level(logging.INFO, logger="petalflow")
    monkeypatch.setattr(handoff, "BUSY_NOTE_S", 1.0)
    monkeypatch.setattr(handoff, "NO_WORKER_LIMIT_S", 3)
    with get_client(sync_client=True) as client:
        training = client.create_flow_from_name("train-model")
        for pool in ("busy-gpu", "empty-gpu"):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        busy = client.create_deployment(flow_id=training, name="busy", work_pool_name="busy-gpu")
        empty = client.create_deployment(flow_id=training, name="empty",
                                         work_pool_name="empty-gpu")
        client.send_worker_heartbeat("busy-gpu", "a-worker-busy-with-another-run")
        queued = client.create_flow_run_from_deployment(busy)

        def finish_once_said():  # the other training ends; this one is taken and completes
            while not any("has waited" in r.getMessage() for r in caplog.records):
                threading.Event().wait(0.2)
            client.set_flow_run_state(queued.id, Completed(), force=True)

        threading.Thread(target=finish_once_said, daemon=True).start()
        (done,) = handoff.wait_for_training_runs(
            [queued.id], {"name": "train-model/busy", "pool": "busy-gpu"}, poll_s=0.3)
        assert done.state.is_completed()
        said = [r.getMessage() for r in caplog.records if "has waited" in r.getMessage()]
        assert len(said) == 1 and said[0].startswith(
            f"training run {queued.name} (train-model/busy) has waited "), said
        assert said[0].endswith("s for a free worker of pool 'busy-gpu': its workers are busy "
                                "with other runs (one training each)")
        assert not any("no worker of it is online" in r.getMessage() for r in caplog.records)

        training_one = client.create_flow_run_from_deployment(empty)
        client.set_flow_run_state(training_one.id, Running(), force=True)
        never_taken = client.create_flow_run_from_deployment(empty)

        def finish_once_cancelled():
            while not client.read_flow_run(never_taken.id).state.is_cancelled():
                threading.Event().wait(0.2)
            client.set_flow_run_state(training_one.id, Completed(), force=True)

        threading.Thread(target=finish_once_cancelled, daemon=True).start()
        first, second = handoff.wait_for_training_runs(
            [training_one.id, never_taken.id], {"name": "train-model/empty", "pool": "empty-gpu"},
            poll_s=0.3)
    assert first.state.is_completed()
    assert second.state.is_cancelled()
    assert second.state.message.startswith("no worker of pool 'empty-gpu' took it in ")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().split(",")[0] for r in warned] == [
        f"training run {never_taken.name} (train-model/empty) waits for a worker of pool "
        "'empty-gpu'"]


def test_handed_over_trainings_end_with_the_run_that_waits_for_them(prefect_harness,
                                                                    monkeypatch):
    """The run waiting for its handed-over trainings ends first (cancelled from the UI: its
    worker's SIGTERM; Ctrl-C; an error): before, the trainings went on (a hung one holding its
    GPU worker for ever) for a model nothing would register. Now a training already running is
    set Cancelling (its worker stops it) and one no worker took yet is Cancelled; both say why.
    Ones already ended stay as they ended."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Completed, Running

    from petalflow.tasks import handoff

    with get_client(sync_client=True) as client:
        deployment = _manned_training_deployment(client, "ending")
        running, waiting, done = (client.create_flow_run_from_deployment(deployment)
                                  for _ in range(3))
        client.set_flow_run_state(running.id, Running(), force=True)
        client.set_flow_run_state(done.id, Completed(), force=True)
        class Interrupted:  # Ctrl-C arrives during the wait's second pause (whatever
            monotonic = staticmethod(time.monotonic)  # SIGINT handler an earlier test left)
            pauses = 0

            @classmethod
            def sleep(cls, seconds: float) -> None:
                cls.pauses += 1
                if cls.pauses == 2:
                    raise KeyboardInterrupt
                time.sleep(seconds)

        monkeypatch.setattr(handoff, "time", Interrupted)
        with pytest.raises(KeyboardInterrupt):
            handoff.wait_for_training_runs(
                [running.id, waiting.id, done.id],
                {"name": "train-model/ending", "pool": "ending-gpu"}, poll_s=0.3)
        ended = {run.id: client.read_flow_run(run.id).state for run in (running, waiting, done)}
    assert ended[running.id].type == StateType.CANCELLING
    assert ended[waiting.id].type == StateType.CANCELLED
    for run in (running, waiting):
        assert ended[run.id].message == handoff.ENDED_FIRST
    assert ended[done.id].is_completed()
