"""Bad options are refused before any work starts, naming the option and what is allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pydantic import ValidationError

from petalflow.flows.cli import build_parser, main
from petalflow.tasks.params import TrainParams, run_key
from tests.helpers import COLOURS, write_image


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--epochs", "0"], "--epochs: Input should be greater than or equal to 1"),
        (["--epochs", "many"], "--epochs: Input should be a valid integer"),
        (["--batch-size", "-3"], "--batch-size"),
        (["--image-size", "7"], "--image-size: Input should be greater than or equal to 32"),
        (["--val-fraction", "0.6"], "--val-fraction: Input should be less than 0.5"),
        (["--val-fraction", "0.45", "--test-fraction", "0.45"], "at least 20%"),
        (["--data-sha256", "abc"], "--data-sha256: Value error, must be 64 hexadecimal digits"),
        (["--data-url", "ftp://example.org/x.tgz"], "--data-url: Value error, unsupported URL"),
        (["--data-url", "s3://bucket/photos.tgz"],
         "s3:// is not downloaded directly ('s3://bucket/photos.tgz'): give its https URL, "
         "presigned for a private object (aws s3 presign"),
        (["--data-url", "gs://bucket/photos.tgz"], "gcloud storage sign-url"),
        (["--backbone", "/no/such/savedmodel"], "--backbone: Value error"),
        (["--model-name", "bad name!"], "--model-name"),
        (["--min-accuracy", "1.5"], "--min-accuracy: Input should be less than or equal to 1"),
        (["--fine-tune-layers", "-1"], "--fine-tune-layers"),
        (["--learning-rate", "0"], "--learning-rate: Input should be greater than 0"),
        (["--learning-rate", "nan"], "--learning-rate: Input should be a finite number"),
        (["--min-improvement", "inf"], "--min-improvement: Input should be a finite number"),
        (["--follow-champion", "--epochs", "3", "--data-url", "other.tgz"],
         "follow_champion is on, so the data and the settings are those the champion was "
         "trained with: data_url, epochs would not be used; turn follow_champion off to train "
         "with them"),
    ],
)
def test_bad_train_options_are_refused_before_work(workspace, capsys, argv, needle):
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "petalflow train: error: invalid option(s)" in err and needle in err
    # Nothing was started: no download folder, no MLflow store.
    assert not (workspace / "home").exists() and not (workspace / "mlflow").exists()


def test_a_run_following_the_champion_trains_with_what_the_champion_recorded(
        tiny_backbone, tmp_path, monkeypatch):
    """follow_champion (retrain-weekly's and watch-data's): the data, the training settings
    and the gate are those the champion's version recorded (but for its sha256 pin); which
    model, the run's own decisions and where it trains stay the run's. What cannot be trained
    with here is refused naming the version, nothing guessed."""
    from petalflow.tasks.params import followed

    recorded = TrainParams(data_url="https://example.org/mine.tgz", backbone=str(tiny_backbone),
                           image_size=32, epochs=9, seed=7, augment=True, force=True,
                           min_accuracy=0.9, model_name="other",
                           data_sha256="a" * 64).model_dump(mode="json")
    run = TrainParams(follow_champion=True, model_name="mine", training_deployment="local")
    cfg = followed(run, {**recorded, "field_of_a_later_version": 1}, "the champion v4")
    assert (cfg.data_url, cfg.backbone, cfg.image_size, cfg.epochs, cfg.seed, cfg.augment) == (
        "https://example.org/mine.tgz", str(tiny_backbone), 32, 9, 7, True)
    assert cfg.min_accuracy == 0.9  # the gate the user trained that model with
    assert (cfg.model_name, cfg.force, cfg.training_deployment) == ("mine", False, "local")
    assert cfg.follow_champion is False  # what it trains is said in full: no second look-up
    assert cfg.data_sha256 is None  # the data behind the URL now: the model kept current
    # A field the champion's version predates keeps its default.
    assert followed(run, {"data_url": "https://example.org/mine.tgz"},
                    "the champion v1").epochs == 5
    with pytest.raises(ValueError) as caught:
        followed(run, {**recorded, "data_url": "https://***@example.org/mine.tgz"},
                 "the champion v4")
    assert str(caught.value).startswith(
        "follow_champion: the champion v4 of mine was trained with data_url "
        "'https://***@example.org/mine.tgz', which cannot be used here: this URL holds '***' "
        "where petalflow hid its credentials")
    assert str(caught.value).endswith("turn follow_champion off and give the data URL and "
                                      "settings to train with")
    with pytest.raises(ValueError, match=(
            r"the champion v4 of mine was trained with backbone 'https://\*\*\*@models.example."
            r"org/b.tar.gz', which cannot be used here: this URL holds '\*\*\*' where petalflow "
            r"hid its credentials when it recorded it .*: a record cannot download; give the URL "
            r"with its credentials, or keep them in the netrc file of the machine that trains")):
        followed(run, {**recorded, "backbone": "https://***@models.example.org/b.tar.gz"},
                 "the champion v4")
    with pytest.raises(ValueError, match=r"the champion v4 of mine was trained with backbone "
                       r"'/gone/backbone', which cannot be used here: '/gone/backbone' is "
                       r"neither a URL nor an existing SavedModel folder"):
        followed(run, {**recorded, "backbone": "/gone/backbone"}, "the champion v4")
    # A local path as typed where that training ran: relative to a folder this may not be.
    with pytest.raises(ValueError) as caught:
        followed(run, {**recorded, "data_url": "photos.zip"}, "the champion v4")
    assert str(caught.value) == (
        "follow_champion: the champion v4 of mine was trained on 'photos.zip', a path relative "
        f"to the folder that training ran in, and {Path.cwd()} (where this run's relative paths "
        "start) holds no 'photos.zip': run this from that folder, or turn follow_champion off "
        "and give the data URL and settings to train with")
    (tmp_path / "photos.zip").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert followed(run, {**recorded, "data_url": "photos.zip"},
                    "the champion v4").data_url == "photos.zip"


def test_a_backbone_urls_secrets_are_recorded_nowhere_and_name_the_same_training(tiny_backbone,
                                                                                 tmp_path):
    """A private backbone's URL (a password, a presigned query) is recorded without its secrets
    (MLflow's parameters and the version's ``params`` tag, a sweep's candidates too), and the
    same model fetched with another password or signed again is the same training (run key)
    and the same features (their cache's key)."""
    from petalflow.tasks.params import run_key
    from petalflow.tasks.registry import params_record, recorded_params
    from petalflow.tasks.train import feature_cache_dir

    def url(password: str, signed: str) -> str:
        return (f"https://bob:{password}@models.example.org/b.tar.gz?X-Amz-Date={signed}"
                "&X-Amz-Expires=3600&X-Amz-Signature=" + password[::-1])

    signings = (("hunter2", "20261206T010000Z"), ("swordfish", "20261207T090000Z"))
    first, later = (TrainParams(data_url="https://example.org/p.tgz", backbone=url(p, d),
                                sweep=[{"epochs": 3}, {"backbone": url(p, d), "epochs": 4}])
                    for p, d in signings)
    recorded = recorded_params(first)
    shown = ("https://***@models.example.org/b.tar.gz?X-Amz-Date=20261206T010000Z"
             "&X-Amz-Expires=3600&X-Amz-Signature=***")
    assert recorded["backbone"] == recorded["sweep"][1]["backbone"] == shown
    assert recorded["sweep"][0] == first.model_dump()["sweep"][0]
    for secret in ("hunter2", "2retnuh"):
        assert secret not in params_record(first) + json.dumps(recorded, default=str)
    assert run_key(first, "f" * 16) == run_key(later, "f" * 16)
    assert run_key(first, "f" * 16) != run_key(first.model_copy(update={"backbone": str(
        tiny_backbone)}), "f" * 16)
    copy = str(tiny_backbone)
    assert (feature_cache_dir(tmp_path, first, "f", copy)
            == feature_cache_dir(tmp_path, later, "f", copy))
    with pytest.raises(ValidationError, match="a record cannot download"):
        TrainParams(backbone=shown)


def test_urls_and_paths_pasted_with_their_quotes_are_taken_without_them(tmp_path, tiny_backbone):
    """Copied from a shell command into the UI's form (or quoted twice in a script): one pair
    of matching quotes around a URL or path is not part of it; it was "unsupported URL scheme
    in '"https://…'" and "not a folder" before."""
    from petalflow.tasks.params import PredictParams

    params = TrainParams(data_url=' "https://example.org/photos.tgz" ',
                         backbone=f"'{tiny_backbone}'")
    assert params.data_url == "https://example.org/photos.tgz"
    assert params.backbone == str(tiny_backbone)
    assert TrainParams(data_url="'~/photos'").data_url == "~/photos"
    photos = tmp_path / "photos"
    write_image(photos / "a.jpg", COLOURS["red"])
    predict = PredictParams(input=[f'"{photos}"'], output=f'"{tmp_path / "p.csv"}"',
                            model_uri='"models:/m@champion"')
    assert predict.input == [str(photos)]
    assert str(photos) in PredictParams(input_folder=f"'{photos}'", output="p.csv").input
    assert predict.output == str(tmp_path / "p.csv")
    assert predict.model_uri == "models:/m@champion"
    with pytest.raises(ValueError, match="must be an http"):
        TrainParams(data_url='""')
    # In angle brackets, as a chat or an e-mail quotes a link.
    assert TrainParams(data_url="<https://example.org/photos.tgz>").data_url == (
        "https://example.org/photos.tgz")


@pytest.mark.parametrize("typed, meant", [
    ("http:/127.0.0.1:8761/photos.tgz", "http://127.0.0.1:8761/photos.tgz"),
    ("https:example.org/photos.tgz", "https://example.org/photos.tgz"),
    ("HTTPS:///example.org/photos.tgz", "HTTPS://example.org/photos.tgz"),
    ("http//example.org/photos.tgz", "http://example.org/photos.tgz"),
])
def test_a_url_with_its_slashes_mistyped_is_refused_saying_what_it_means(typed, meant,
                                                                          tmp_path,
                                                                          monkeypatch):
    """"http:/host/photos.tgz" (one slash lost in typing) was taken as a local path and the
    run failed after its start-up with "dataset source … does not exist"; three slashes
    reached the server as no host. Refused in the form and the command line, with the URL it
    means, for the data and the backbone; a local folder of that name is still a path."""
    monkeypatch.chdir(tmp_path)
    for field in ("data_url", "backbone"):
        with pytest.raises(ValueError) as refused:
            TrainParams(**{field: typed})
        assert (f"{typed!r} is not a well-formed URL: a web address begins http:// or "
                f"https:// (a colon, two slashes): {meant}") in str(refused.value)
    if typed.startswith("http//"):  # a folder of that name is a path, as before
        write_image(tmp_path / "http" / "example.org" / "red" / "a.jpg", COLOURS["red"])
        assert TrainParams(data_url="http//example.org").data_url == "http//example.org"


def test_a_folder_as_the_summary_file_is_refused_before_work(workspace, capsys):
    """Found only after training (IsADirectoryError writing the summary) before."""
    assert main(["train", "--summary-json", str(workspace)]) == 2
    assert (f"--summary-json: {workspace} is a folder: give a file name in it, such as "
            f"{workspace / 'summary.json'}") in capsys.readouterr().err
    assert not (workspace / "home").exists() and not (workspace / "mlflow").exists()


def test_a_backbone_given_by_its_saved_model_pb_or_as_keras_weights(tmp_path, tiny_backbone):
    """Pointing --backbone at the SavedModel's saved_model.pb (what a file dialog or tab
    completion gives) takes its folder; a Keras weights file (.h5, .keras) is named as such,
    and a downloaded archive of a SavedModel is to be extracted."""
    from tests.helpers import make_hub_tarball

    pb = tiny_backbone / "saved_model.pb"
    assert TrainParams(backbone=str(pb)).backbone == str(tiny_backbone)
    weights = tmp_path / "mobilenet_v2_weights_0.35_224_no_top.h5"
    weights.write_bytes(b"\x89HDF\r\n\x1a\n")
    with pytest.raises(ValueError) as refused:
        TrainParams(backbone=str(weights))
    assert (f"{str(weights)!r} is a file, not a SavedModel folder: a Keras weights file (.h5, "
            ".keras) is no TF Hub backbone; give the folder that holds saved_model.pb") in str(
                refused.value)
    with pytest.raises(ValueError, match="is a file, not a SavedModel folder: extract an "
                       "archive of one first; give the folder that holds saved_model.pb"):
        TrainParams(backbone=str(make_hub_tarball(tiny_backbone, tmp_path / "backbone.tgz")))


def test_a_backbone_url_is_one_tf_hub_fetches_and_a_file_url_is_its_folder(workspace,
                                                                          tiny_backbone, capsys):
    """A file manager's "copy link" of a SavedModel folder (file:///…) was taken as a URL and
    failed once the run had started ("is not a TF Hub SavedModel (file:/…: no saved_model.pb in
    it)", exit 5) though it is one; an s3:// or ftp:// URL failed there too ("File system
    scheme 's3' not implemented"). Now a file URL is the folder it names, and a scheme TF Hub
    does not fetch is refused as the options are read (exit 2), an object store's with how to
    presign it; gs:// (TF Hub's own) and HTTPS:// in capitals are taken."""
    assert TrainParams(backbone=tiny_backbone.as_uri()).backbone == str(tiny_backbone)
    assert TrainParams(backbone=(tiny_backbone / "saved_model.pb").as_uri()).backbone == str(
        tiny_backbone)
    assert TrainParams(backbone="gs://models/m.tar.gz").backbone == "gs://models/m.tar.gz"
    assert TrainParams(backbone="HTTPS://Models.example.org/m.tar.gz").backbone == (
        "https://Models.example.org/m.tar.gz")
    empty = workspace / "empty"
    empty.mkdir()
    assert main(["train", "--backbone", "s3://models/m.tar.gz", "--data-url", str(empty)]) == 2
    assert ("--backbone: Value error, s3:// is not downloaded directly ('s3://models/m.tar.gz'): "
            "give its https URL, presigned for a private object (aws s3 presign "
            "s3://BUCKET/KEY --expires-in 604800), or a path where it is mounted"
            ) in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unsupported URL scheme in 'ftp://host/m.tar.gz'; "
                       r"allowed: http://, https://, gs://, file://, or a local path"):
        TrainParams(backbone="ftp://host/m.tar.gz")
    with pytest.raises(ValueError, match=r"'file://models/m' names the host 'models', not a "
                       "file: a file URL takes three slashes"):
        TrainParams(backbone="file://models/m")


def test_a_backbone_folder_near_a_saved_model_names_it_before_any_work(workspace, tiny_backbone,
                                                                       capsys):
    """The folder above backbones (a TF Hub download extracted into NAME/1/, a folder of
    several), a SavedModel's own variables/ folder, or a folder of none, is refused as the
    options are read (exit 2), naming the SavedModel folders near it: before, the run started,
    fetched the data and failed with "no saved_model.pb in …" (exit 5)."""
    import shutil

    models = workspace / "models"
    shutil.copytree(tiny_backbone, models / "mobilenet" / "1")
    shutil.copytree(tiny_backbone, models / "efficientnet")
    with pytest.raises(ValueError) as refused:
        TrainParams(backbone=str(models))
    assert (f"{str(models)!r} is no SavedModel folder: no saved_model.pb in it; the SavedModel "
            f"folders inside it: {models / 'efficientnet'}, {models / 'mobilenet' / '1'}: give "
            "one of them") in str(refused.value)
    with pytest.raises(ValueError) as refused:
        TrainParams(backbone=str(models / "mobilenet"))
    assert (f"no saved_model.pb in it; the SavedModel folder inside it: "
            f"{models / 'mobilenet' / '1'}: give that") in str(refused.value)
    assert TrainParams(backbone=str(models / "mobilenet" / "1")).backbone == str(
        models / "mobilenet" / "1")

    variables = models / "efficientnet" / "variables"
    assert variables.is_dir()
    empty = workspace / "empty"
    empty.mkdir()
    assert main(["train", "--backbone", str(variables), "--data-url", str(empty)]) == 2
    err = capsys.readouterr().err
    assert (f"--backbone: Value error, {str(variables)!r} is no SavedModel folder: no "
            f"saved_model.pb in it; it is inside the SavedModel folder {models / 'efficientnet'}: "
            "give that") in err
    assert main(["train", "--backbone", str(empty), "--data-url", str(empty)]) == 2
    assert (f"{str(empty)!r} is no SavedModel folder: no saved_model.pb in it, nor in its "
            "subfolders") in capsys.readouterr().err


def test_unknown_option_and_bad_boolean(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--epoch", "3"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --epoch" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "predict", "pull", "models", "stack"])
def test_every_command_prints_its_help(command, capsys):
    """Options and their help come from the parameter models' descriptions: any of them (a
    literal % sign among them) must still print. ``stack``'s says what it runs in whole
    sentences and shows its commands, and every option says what it is."""
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--" in out
    # Every default is the value a run gets (a list field's too, made by its factory).
    assert "PydanticUndefined" not in out
    if command == "train":
        assert "(default: []) A JSON list" in " ".join(out.split())
    if command == "stack":
        said = " ".join(out.split())
        assert ("the ``cpu`` and ``gpu`` process work pools with one worker each, and the "
                "deployments of deployment.yaml.") in said
        assert "petalflow stack down # stop all cleanly" in said
    # Every option says what it is (pull's and models' --model-name said nothing). An option
    # without help is a line of its own not followed by an indented help line.
    lines = out.split("options:")[1].splitlines() + [""]
    unexplained = [line.strip() for line, after in zip(lines, lines[1:])
                   if line.startswith("  --") and "  " not in line.strip()
                   and not after.startswith(" " * 10)]
    assert not unexplained, f"options without help: {unexplained}"


def test_balance_classes_is_on_unless_turned_off(workspace, monkeypatch):
    from petalflow.flows import cli

    seen = []

    def fake_flow(params, return_state=False):  # stands in for the flow: parsing only
        from prefect.states import Completed

        seen.append(params)
        return Completed(data={"ok": True})

    monkeypatch.setattr("petalflow.flows.train_flow.train_and_register", fake_flow)
    assert cli.main(["train", "--data-sha256", "A" * 64]) == 0
    assert cli.main(["train", "--no-balance-classes", "--data-sha256", "A" * 64]) == 0
    assert [p.balance_classes for p in seen] == [True, False]


def test_augment_flag_and_defaults_parse(workspace, monkeypatch):
    from petalflow.flows import cli

    seen = {}

    def fake_flow(params, return_state=False):  # stands in for the flow: parsing only
        from prefect.states import Completed

        seen["params"] = params
        return Completed(data={"ok": True})

    monkeypatch.setattr("petalflow.flows.train_flow.train_and_register", fake_flow)
    assert cli.main(["train", "--augment", "--epochs", "3", "--data-sha256", "A" * 64]) == 0
    assert seen["params"] == TrainParams(augment=True, epochs=3, data_sha256="a" * 64)


def test_predict_refuses_missing_inputs_before_loading_a_model(workspace, capsys):
    out = workspace / "p.csv"
    assert main(["predict", "--output", str(out)]) == 2
    assert ("no images given: name the image files, folders or patterns to classify, e.g. "
            "petalflow predict photos/ --output predictions.csv (or --input photos/)"
            in capsys.readouterr().err)
    assert main(["predict", "--input", str(workspace / "nothing*.jpg"), "--output", str(out)]) == 2
    assert "--input" in capsys.readouterr().err
    assert main(["predict", "--input", str(workspace), "--output",
                 str(workspace / "no" / "dir.csv")]) == 2
    assert not out.exists()
    capsys.readouterr()
    # An image's URL: said to be one ("not a file, folder or matching pattern" left it open).
    assert main(["predict", "--input", "https://example.org/photos/rose.jpg", "--output",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "images are read from files, not URLs: 'https://example.org/photos/rose.jpg'" in err
    assert "curl -O" in err and not out.exists()
    # Relative paths that are not there: where relative paths start is said (a deployment's
    # run starts from its worker's working folder, which whoever typed them in the UI does not
    # see).
    assert main(["predict", "--input", "incoming", "--output", "p.csv"]) == 2
    assert (f"not a file, folder or matching pattern: 'incoming' (relative paths start from "
            f"{os.getcwd()})") in capsys.readouterr().err
    assert main(["predict", "--input", str(workspace), "--output", "out/p.csv"]) == 2
    assert (f"folder 'out' does not exist (relative paths start from {os.getcwd()})"
            in capsys.readouterr().err)
    assert main(["predict", "--input", str(workspace / "none"), "--output", str(out)]) == 2
    assert "relative paths" not in capsys.readouterr().err
    # A camera's IMG_0001.JPG under a pattern typed in lower case: said, with what to give.
    camera = workspace / "camera"
    camera.mkdir()
    for name in ("IMG_0001.JPG", "IMG_0002.JPG", "notes.txt"):
        (camera / name).write_bytes(b"")
    assert main(["predict", "--input", "camera/*.jpg", "--output", str(out)]) == 2
    assert ("not a file, folder or matching pattern: 'camera/*.jpg' (relative paths start "
            f"from {os.getcwd()}); a pattern is case-sensitive, and 2 names in 'camera' match "
            "'camera/*.jpg' in another case ('IMG_0001.JPG', 'IMG_0002.JPG'): write the pattern "
            "in their case, or give the folder 'camera' (its images are found whatever the case "
            "of their names)") in capsys.readouterr().err
    assert main(["predict", "--input", "camera/*.png", "--output", str(out)]) == 2
    assert "case-sensitive" not in capsys.readouterr().err and not out.exists()
    # A file where the folder should be: said to be a file, not "does not exist".
    (workspace / "notes.txt").write_text("not a folder")
    assert main(["predict", "--input", str(workspace), "--output", "notes.txt/p.csv"]) == 2
    assert ("'notes.txt' is a file, not a folder: give a file name in an existing folder"
            in capsys.readouterr().err)


def test_predict_refuses_a_model_folder_that_is_no_mlflow_model_naming_what_it_is(
        workspace, capsys):
    """--model given a folder: MLflow said 'Could not find an "MLmodel" configuration file'
    after the run had started, with a hint about MLFLOW_TRACKING_URI. Refused at once, exit 2,
    saying what the folder is and what to give; nothing written."""
    from tests.helpers import write_image

    write_image(workspace / "in" / "a.jpg", (200, 30, 30), seed=1)
    out = workspace / "p.csv"
    hub = workspace / "hub"  # a TF Hub backbone, not a trained model
    hub.mkdir()
    (hub / "saved_model.pb").write_bytes(b"")
    pulled = workspace / "pulled"  # `petalflow pull` of a runs:/ URI: the model one folder down
    (pulled / "model").mkdir(parents=True)
    (pulled / "model" / "MLmodel").write_text("flavors: {}\n")
    cases = {
        str(workspace): "not an MLflow model folder (no MLmodel file in it): give a folder "
                        "`petalflow pull` saved, or a model URI such as models:/NAME@champion",
        str(workspace / "nope"): "no such folder: give a model folder (`petalflow pull --dest "
                                 "DIR` saves one) or a model URI such as models:/NAME@champion",
        # A name is not a URI; a relative folder starts from the working folder.
        "petalflow-classifier": f"no such folder (relative paths start from {os.getcwd()}): "
                                "give a model folder",
        str(hub): "a TensorFlow SavedModel, not an MLflow model",
        (hub / "saved_model.pb").as_uri(): "a file, not a folder",
        str(pulled): f"no MLmodel file in this folder; the model is in {pulled / 'model'}: "
                     "give that folder",
    }
    for model, message in cases.items():
        assert main(["predict", "--model", model, "--input", str(workspace / "in"),
                     "--output", str(out)]) == 2, model
        err = capsys.readouterr().err
        assert f"--model: Value error, {message}" in err, err
        assert f"(got {model!r})" in err and "Traceback" not in err
    assert not out.exists() and not (workspace / "mlflow").exists()
    # A folder that is a model passes the check (models:/ and other URIs are MLflow's).
    from petalflow.tasks.params import PredictParams

    for model in (str(pulled / "model"), (pulled / "model").as_uri(), "models:/m@champion",
                  "runs:/abc/model", "s3://bucket/model"):
        assert PredictParams(model_uri=model, input=[str(workspace / "in")],
                             output=str(out)).model_uri == model
    assert PredictParams(model_uri=" ", input=[str(workspace / "in")],
                         output=str(out)).model_uri is None


def test_a_model_uri_mlflow_reads_as_another_thing_is_refused_saying_what_to_give(
        workspace, capsys):
    """`--model models:/NAME` (no version or alias) is a logged model's id to MLflow 3: predict
    failed after the run had started with "no model named '' is registered"; an http(s) URL of
    a model's archive reached MLflow's artifact-proxy client ("ValueError: not enough values
    to unpack", exit 1); a model on a host that does not answer said "gaierror: [Errno -2]
    Name or service not known" (exit 1). Now the first two are refused as the options are
    read (exit 2; `pull` too), and the last says which model could not be fetched (exit 6)."""
    from petalflow.flows.cli import EXIT_REGISTRY
    from petalflow.tasks.params import PredictParams
    from tests.helpers import free_port, write_image

    write_image(workspace / "in" / "a.jpg", (200, 30, 30), seed=1)
    out = workspace / "p.csv"
    cases = {
        "models:/flowers": "'models:/flowers' names no version or alias of the registered model "
                           "'flowers': give models:/flowers@champion (its champion), "
                           "models:/flowers/latest or models:/flowers/N (version N)",
        "models:/flowers/": "'models:/flowers/' is cut short: give models:/NAME@ALIAS or "
                            "models:/NAME/VERSION",
        "https://example.org/model.tar.gz": "'https://example.org/model.tar.gz' is a web "
                                            "address, not an MLflow model URI: for a model on "
                                            "another MLflow server, set MLFLOW_TRACKING_URI",
    }
    for model, message in cases.items():
        assert main(["predict", "--model", model, "--input", str(workspace / "in"),
                     "--output", str(out)]) == 2, model
        assert f"--model: Value error, {message}" in capsys.readouterr().err
        assert main(["pull", "--model", model, "--dest", str(workspace / "m")]) == 2, model
        assert f"--model: {message}" in capsys.readouterr().err
    for model in ("models:/m-0123456789abcdef0123456789abcdef", "models:/a/b/3",
                  "http://h:5000/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/model"):
        assert PredictParams(model_uri=model, input=[str(workspace / "in")],
                             output=str(out)).model_uri == model
    gone = f"ftp://127.0.0.1:{free_port()}/models/flowers"
    assert main(["predict", "--model", gone, "--input", str(workspace / "in"),
                 "--output", str(out)]) == EXIT_REGISTRY
    err = capsys.readouterr().err
    assert (f"error: cannot fetch the model {gone}: [Errno 111] Connection refused; check the "
            "URI, or download the model and give its folder\nhint: offline, or behind a "
            "proxy?") in err, err
    assert not out.exists() and not (workspace / "m").exists()


def test_predict_on_a_folder_of_files_without_image_names_says_how_to_classify_them(
        workspace, capsys):
    """Images saved without an extension (a web API's downloads, a content-addressed store):
    "no image files found" left the user guessing; the error says how folders are searched,
    what was left out and how to classify those files."""
    folder = workspace / "downloads"
    folder.mkdir()
    for name in ("img1", "img2", "img3"):
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / ".hidden").write_bytes(b"x")
    assert main(["predict", "--input", str(folder), "--output", str(workspace / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert ("petalflow predict: error: --input: no image files found: a folder's images are "
            "found by their names (.avif, .bmp, .gif, .heic, .heif, .jfif, .jpe, .jpeg, .jpg, "
            f".jxl, .png, .tif, .tiff, .webp); {folder} holds 3 other files (img1, img2, img3): "
            "rename them, or give them as files (--input FILE...)") in err
    # The same folder named in a list file (--input @FILE): the same explanation.
    (workspace / "list.txt").write_text(f"{folder}\n")
    assert main(["predict", "--input", f"@{workspace / 'list.txt'}", "--output",
                 str(workspace / "p.csv")]) == 2
    assert f"{folder} holds 3 other files (img1, img2, img3)" in capsys.readouterr().err


def test_predict_with_a_model_that_does_not_exist_says_so_and_writes_nothing(
        workspace, capsys, prefect_harness):
    from petalflow.tasks.registry import configure_mlflow
    from tests.helpers import write_image

    configure_mlflow()  # a store where other models were trained
    write_image(workspace / "in" / "a.jpg", (200, 30, 30), seed=1)
    out = workspace / "p.csv"
    assert main(["predict", "--input", str(workspace / "in"), "--output", str(out),
                 "--model-name", "nobody-trained-this"]) == 6
    err = capsys.readouterr().err
    store = f"sqlite:///{(workspace / 'mlflow' / 'mlflow.db').resolve()}"
    assert (f"petalflow predict: error: no model is registered in {store}: `petalflow train` "
            "registers one, or point MLFLOW_TRACKING_URI at the store that holds "
            "'nobody-trained-this'") in err
    assert "MLFLOW_TRACKING_URI" in err and "Traceback" not in err
    assert list(workspace.glob("p.csv*")) == []


def test_reading_models_in_a_folder_without_a_store_says_where_they_are_and_creates_none(
        workspace, capsys):
    """predict, pull and models run in another folder than train (MLFLOW_TRACKING_URI
    unset) opened ./mlflow/mlflow.db there, created it empty and said the model was not
    registered, leaving an empty store behind. They say there is no store here, what to do,
    and create nothing."""
    from tests.helpers import write_image

    write_image(workspace / "in" / "a.jpg", (200, 30, 30), seed=1)
    commands = (["predict", "--input", str(workspace / "in"), "--output", "p.csv"],
                ["pull", "--dest", "pulled"], ["models"])
    for argv in commands:
        assert main(argv) == 6, argv
        err = capsys.readouterr().err
        assert f"petalflow {argv[0]}: error: no MLflow store here: " \
               f"{workspace.resolve() / 'mlflow' / 'mlflow.db'} does not exist" in err
        assert "hint: run the command in the folder `petalflow train` ran in" in err
        assert "MLFLOW_TRACKING_URI" in err and "Traceback" not in err
    assert sorted(p.name for p in workspace.iterdir()) == ["in"]  # no store, no output


def test_a_sqlite_tracking_uri_naming_no_store_is_refused_and_creates_none(
        workspace, capsys, monkeypatch):
    """The README's `export MLFLOW_TRACKING_URI=sqlite:///mlflow/mlflow.db`, then predict,
    pull or models in another folder (the path is relative): MLflow created an empty store
    there (mlflow/mlflow.db, ~1 MB) and the command said no model was registered in it. It now
    says there is no store at that path, where a relative one starts from and how to name it
    from anywhere, and creates nothing; an absolute URI to a store that exists is used."""
    from tests.helpers import write_image

    write_image(workspace / "in" / "a.jpg", (200, 30, 30), seed=1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow/mlflow.db")
    commands = (["predict", "--input", str(workspace / "in"), "--output", "p.csv"],
                ["pull", "--dest", "pulled"], ["models"])
    for argv in commands:
        assert main(argv) == 6, argv
        err = capsys.readouterr().err
        assert (f"petalflow {argv[0]}: error: no MLflow store at "
                f"{workspace.resolve() / 'mlflow' / 'mlflow.db'} (MLFLOW_TRACKING_URI="
                "sqlite:///mlflow/mlflow.db; its relative path starts from "
                f"{workspace}), and none was created there; an absolute URI names the "
                "store from any folder: sqlite:////path/to/mlflow/mlflow.db\n") in err
        assert "Traceback" not in err
    assert sorted(p.name for p in workspace.iterdir()) == ["in"]  # no store, no output
    elsewhere = workspace / "elsewhere" / "gone.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    assert main(["models"]) == 6
    assert (f"no MLflow store at {elsewhere} (MLFLOW_TRACKING_URI=sqlite:///{elsewhere}), and "
            "none was created there") in capsys.readouterr().err
    assert not (workspace / "elsewhere").exists()


def test_a_tracking_uri_copied_from_the_mlflow_ui_or_without_http_names_the_server_meant(
        workspace, capsys, monkeypatch):
    """MLFLOW_TRACKING_URI copied from the browser's address bar on the MLflow UI
    (http://host:5000/#/models): MLflow's calls went to the UI's page and `petalflow models`
    failed quoting its HTML; a server's host:port without http:// was read by MLflow as a file
    store's folder ("The filesystem tracking backend … is in maintenance mode"). Each command
    a person runs now says the address meant, at once, and creates nothing."""
    import http.server

    from tests.helpers import base_url, serve_handler, write_image

    class Ui(http.server.BaseHTTPRequestHandler):  # the MLflow UI's page on every path
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802 - http.server API
            page = b"<!doctype html><html><title>MLflow</title></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

    write_image(workspace / "in" / "a.jpg", (200, 30, 30), seed=1)
    commands = (["predict", "--input", str(workspace / "in"), "--output", "p.csv"],
                ["pull", "--dest", "pulled"], ["models"],
                ["train", "--data-url", str(workspace / "in")])
    with serve_handler(Ui) as server:
        server_url = base_url(server)
        hostport = server_url.split("://")[1]
        for uri, said in (
                (f"{server_url}/#/models/flowers", f"is the address of a page of the MLflow UI "
                 f"(the part from '#' names the page): give the server's own address, "
                 f"{server_url}/"),
                (hostport, "has no scheme, so MLflow would read it as a folder of files: the "
                 f"server's address is http://{hostport}")):
            monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
            for argv in commands:
                assert main(argv) == 6, argv
                err = capsys.readouterr().err
                assert f"petalflow {argv[0]}: error: MLFLOW_TRACKING_URI={uri} {said}\n" in err
                assert "html" not in err and "Traceback" not in err
    assert sorted(p.name for p in workspace.iterdir()) == ["in"]  # no store, no output


def test_an_https_mlflow_server_whose_certificate_is_not_trusted_is_named_at_once(
        workspace, capsys, monkeypatch):
    """Another team's MLflow server over HTTPS with their organisation's own certificate
    authority: MLflow's client retried each call 7 times (8 minutes for `petalflow models`
    by hand, then a wall of urllib3 text), and the run's tasks would have retried that as
    network trouble. Now one request the way MLflow's client makes it says at once which host
    is not trusted and which setting trusts it; with the setting, MLflow's calls go ahead."""
    import requests

    from petalflow.tasks import registry
    from tests.helpers import self_signed_certificate, serve_directory

    cert, key = self_signed_certificate(workspace / "tls")
    (workspace / "site").mkdir()
    for name in ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS",
                 "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    with serve_directory(workspace / "site", tls=(cert, key)) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        host = url.split("//")[1]
        for argv in (["models"], ["pull", "--dest", "pulled"]):
            assert main(argv) == 6, argv
            err = capsys.readouterr().err
            assert f"petalflow {argv[0]}: error: MLflow: the certificate of {host} is not " \
                   "trusted (self-signed certificate): " in err, err
            assert "set MLFLOW_TRACKING_SERVER_CERT_PATH to the authority's certificate" in err
            assert f"(tracking server {url})" in err
            assert "Traceback" not in err and "Retrying" not in err
        # Not network trouble that may pass: no task retries it.
        try:
            requests.get(url, timeout=10)
        except requests.exceptions.SSLError as exc:
            assert not registry.is_transient_io_error(exc)
        else:
            raise AssertionError("the self-signed server was trusted")
        # Trusted: the check lets MLflow's client go ahead (the file server is no MLflow).
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
        assert registry.configure_mlflow() == url
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")  # MLflow's own opt-out
        assert registry.configure_mlflow() == url


def test_an_https_uri_of_a_plain_http_mlflow_server_is_named_at_once(workspace, capsys,
                                                                      monkeypatch):
    """MLFLOW_TRACKING_URI=https://… of a server that speaks plain HTTP (MLflow's own server
    does unless put behind a proxy): MLflow's client retried each call 7 times and the tasks
    counted it as network trouble. Now at once: the server did not answer in TLS, and the
    http:// URI (exit 6)."""
    import requests

    from petalflow.tasks import registry
    from tests.helpers import serve_directory

    (workspace / "site").mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_INSECURE_TLS", raising=False)
    with serve_directory(workspace / "site") as url:
        host = url.split("//")[1]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://{host}")
        for argv in (["models"], ["pull", "--dest", "pulled"]):
            assert main(argv) == 6, argv
            err = capsys.readouterr().err
            assert (f"petalflow {argv[0]}: error: MLflow: the server at {host} did not answer "
                    "in TLS (WRONG_VERSION_NUMBER: an https:// URL of a server that speaks "
                    "plain HTTP, or a port that is not the web server's): a plain-HTTP "
                    f"server's URL begins http://, http://{host} (tracking server "
                    f"https://{host})") in err, err
            assert "Traceback" not in err and "Retrying" not in err
        assert not (workspace / "pulled").exists()
        try:
            requests.get(f"https://{host}", timeout=10)
        except requests.exceptions.SSLError as exc:
            assert not registry.is_transient_io_error(exc)
        else:
            raise AssertionError("a plain-HTTP server answered in TLS")


def test_an_mlflow_server_that_does_not_answer_is_named_at_once(workspace, capsys,
                                                                monkeypatch, tiny_backbone):
    """MLFLOW_TRACKING_URI set to a server that is not running (not started yet, a typo in
    the port): MLflow's client retried each call 7 times, so `petalflow models` said so after
    8 minutes 15 s (by hand) in urllib3's words, and `train` would have retried that in its
    tasks. The commands a person runs now ask the server once, at once, and say which server
    did not answer and what to do; nothing is written."""
    from petalflow.temporary_server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    photos = workspace / "in"
    write_image(photos / "a.jpg", (200, 30, 30), seed=1)
    commands = (["models"], ["pull", "--dest", "pulled"],
                ["predict", "--input", str(photos), "--output", "p.csv"],
                ["train", "--data-url", str(photos), "--backbone", str(tiny_backbone),
                 "--image-size", "32"])
    for argv in commands:
        assert main(argv) == 6, argv
        err = capsys.readouterr().err
        assert f"petalflow {argv[0]}: error: the MLflow tracking server at {url} " \
               "(MLFLOW_TRACKING_URI) could not be reached: ConnectionRefusedError: [Errno " \
               "111] Connection refused" in err, err
        assert "hint: start it (`petalflow stack up`), or fix MLFLOW_TRACKING_URI; " \
               "unset, the embedded store under mlflow/ is used" in err
        assert "Retrying" not in err and "Traceback" not in err
    assert sorted(p.name for p in workspace.iterdir()) == ["in"]  # no output, no store


def test_a_prefect_server_that_does_not_answer_is_named_with_what_to_do(
        workspace, capsys, monkeypatch, tiny_backbone):
    """PREFECT_API_URL set to a server that is stopped, to an address that is no Prefect API,
    or to an https server whose certificate is not trusted: each said "RuntimeError: Failed
    to reach API at …" and "run again with --verbose for the traceback". Now the command says
    which server, why (from the error it was raised from) and what to do. The UI's address
    copied from the browser, or the API's without http://, said "404 Not Found for url
    '…/dashboard/admin/version'" or "Request URL is missing an 'http://' or 'https://'
    protocol": now the address meant."""
    import subprocess
    import sys

    from petalflow.temporary_server import free_port
    from tests.helpers import self_signed_certificate, serve_directory

    monkeypatch.delenv("PREFECT_API_SSL_CERT_FILE", raising=False)
    exe = Path(sys.executable).with_name("petalflow")

    def train(api_url: str) -> str:  # as a user runs it, in a process of its own
        proc = subprocess.run(
            [str(exe), "train", "--data-url", str(workspace), "--backbone", str(tiny_backbone),
             "--image-size", "32"], env={**os.environ, "PREFECT_API_URL": api_url},
            capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]
        return proc.stderr

    stopped = f"http://127.0.0.1:{free_port()}/api"
    err = train(stopped)
    assert f"petalflow train: error: the Prefect server at {stopped}/ (PREFECT_API_URL) could " \
           "not be reached: " in err
    assert "RuntimeError" not in err and "--verbose" not in err
    assert "hint: start it (`petalflow stack up`), or fix PREFECT_API_URL (the server's " \
           "address and /api); unset, the command runs in a temporary local server" in err

    cert, key = self_signed_certificate(workspace / "tls")
    (workspace / "site").mkdir()
    with serve_directory(workspace / "site", tls=(cert, key)) as url:
        err = train(f"{url}/api")
        host = url.split("//")[1]
        assert f"the Prefect server at {url}/api/ (PREFECT_API_URL) could not be reached: the " \
               f"certificate of {host} is not trusted (self-signed certificate): " in err
        assert "set PREFECT_API_SSL_CERT_FILE to the authority's certificate" in err
    # https:// of a server that speaks plain HTTP (Prefect's own server does): said so, with
    # the http:// URL.
    with serve_directory(workspace / "site") as url:
        host = url.split("//")[1]
        err = train(f"https://{host}/api")
        assert f"the Prefect server at https://{host}/api/ (PREFECT_API_URL) could not be " \
               f"reached: the server at {host} did not answer in TLS (" in err, err
        assert f"a plain-HTTP server's URL begins http://, http://{host}/api/" in err
        # The Prefect UI's address copied from the browser (its dashboard), and the API's
        # address without http://: said as such, with the address meant.
        err = train(f"{url}/dashboard")
        assert (f"error: PREFECT_API_URL={url}/dashboard/ is no Prefect API (it answered 404 "
                f"to {url}/dashboard/admin/version): a Prefect server's API is at /api, "
                f"{url}/api\n") in err, err
        err = train(f"{host}/api")
        assert f"error: PREFECT_API_URL={host}/api/ has no scheme: give http://{host}/api\n" \
            in err, err


def test_a_model_without_that_alias_or_version_is_explained_not_a_traceback(workspace, capsys):
    """A registered model whose versions all stayed challengers has no champion: predict and
    pull (which default to the champion) say so, list the versions and what to pass; an
    unknown version the same; an unknown model name the names the store holds. One message
    and a hint each, exit status 6, no traceback."""
    from mlflow import MlflowClient

    from petalflow.tasks.registry import configure_mlflow

    configure_mlflow()
    client = MlflowClient()
    client.create_registered_model("m")
    for accuracy in ("0.4000", "0.4500"):
        version = client.create_model_version("m", source=str(workspace)).version
        client.set_model_version_tag("m", version, "test_accuracy", accuracy)
    client.set_registered_model_alias("m", "challenger", "2")
    store = f"sqlite:///{(workspace / 'mlflow' / 'mlflow.db').resolve()}"
    cases = [
        (["pull", "--model-name", "m", "--dest", str(workspace / "pulled")],
         "registered model m has no version with the alias 'champion' (a version takes it "
         "only by passing the quality gate, --min-accuracy); its versions: v2 (challenger, "
         "test accuracy 0.4500), v1 (test accuracy 0.4000). Pass --model models:/m/2 to use "
         "one of them."),
        (["pull", "--model", "models:/m/7", "--format", "tflite", "--dest",
          str(workspace / "pulled")],
         "registered model m has no version 7; its versions: v2 (challenger, test accuracy "
         "0.4500), v1 (test accuracy 0.4000). Pass --model models:/m/2 to use one of them."),
        (["pull", "--model-name", "nobody", "--dest", str(workspace / "pulled")],
         f"no model named 'nobody' is registered in {store}; it holds m: use that name, or "
         "point MLFLOW_TRACKING_URI at the store that holds 'nobody'"),
        (["pull", "--model", "models:/nobody@champion", "--dest", str(workspace / "pulled")],
         f"no model named 'nobody' is registered in {store}; it holds m: use that name"),
    ]
    for argv, message in cases:
        assert main(argv) == 6, argv
        err = capsys.readouterr().err
        assert f"petalflow pull: error: {message}" in err, err
        assert "Traceback" not in err and err.count("hint:") == 1
    assert not (workspace / "pulled").exists() or not any((workspace / "pulled").iterdir())
    assert main(["models", "--model-name", "nobody"]) == 1
    assert capsys.readouterr().out == (f"no model named 'nobody' is registered in {store}; it "
                                       "holds m: use that name, or point MLFLOW_TRACKING_URI "
                                       "at the store that holds 'nobody'\n")


def test_predict_without_a_champion_names_the_versions_and_writes_nothing(
        workspace, capsys, prefect_harness):
    from mlflow import MlflowClient

    from petalflow.tasks.registry import configure_mlflow
    from tests.helpers import write_image

    configure_mlflow()
    client = MlflowClient()
    client.create_registered_model("m")
    client.create_model_version("m", source=str(workspace))
    write_image(workspace / "in" / "a.jpg", (200, 30, 30), seed=1)
    out = workspace / "p.csv"
    assert main(["predict", "--input", str(workspace / "in"), "--output", str(out),
                 "--model-name", "m"]) == 6
    err = capsys.readouterr().err
    assert ("petalflow predict: error: registered model m has no version with the alias "
            "'champion'") in err
    assert "its versions: v1. Pass --model models:/m/1 to use one of them." in err
    assert "Traceback" not in err
    assert list(workspace.glob("p.csv*")) == []


def test_default_flowers_url_is_pinned_at_run_time_not_in_the_form_default():
    """The UI's run form starts from the dump of TrainParams(): nothing dataset-specific may be
    filled in there, or a user who types their own URL submits the flowers digest with it."""
    from petalflow.tasks.params import DEFAULT_DATA_URL, KNOWN_ARCHIVE_SHA256, expected_sha256

    pinned = KNOWN_ARCHIVE_SHA256[DEFAULT_DATA_URL]
    assert TrainParams().model_dump(mode="json")["data_sha256"] is None
    assert expected_sha256(TrainParams()) == pinned
    assert expected_sha256(TrainParams(data_sha256="")) == pinned
    assert expected_sha256(TrainParams(data_sha256="B" * 64)) == "b" * 64  # the user's wins
    # What the form submits after the user changed only the URL: no digest is applied.
    typed = {**TrainParams().model_dump(mode="json"), "data_url": "https://example.org/o.tgz"}
    assert expected_sha256(TrainParams(**typed)) is None


def test_a_digest_pasted_as_checksum_tools_print_it_is_taken(tmp_path):
    """What `sha256sum`, `shasum -a 256 --tag`, `openssl dgst -sha256` and registries print is
    what users paste into --data-sha256 (or the form's field): the digest is taken from it; a
    line with another algorithm's digest or two digests is still refused."""
    import hashlib
    import subprocess

    archive = tmp_path / "photos.tgz"
    archive.write_bytes(b"some archive bytes")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    printed = subprocess.run(["sha256sum", str(archive)], capture_output=True, text=True,
                             check=True).stdout
    for pasted in (printed, printed.replace("  ", " *"), f"sha256:{digest}",
                   f"SHA256 (photos.tgz) = {digest}", f"SHA2-256(photos.tgz)= {digest}",
                   f"SHA256(photos.tgz)= {digest.upper()}\n"):
        assert TrainParams(data_sha256=pasted).data_sha256 == digest, pasted
    for wrong in (f"md5:{digest}", f"{digest}  a.tgz\n{digest}  b.tgz", "sha512:" + "a" * 128,
                  f"{digest}0"):
        with pytest.raises(ValueError, match="must be 64 hexadecimal digits"):
            TrainParams(data_sha256=wrong)


def test_known_failures_get_one_message_a_hint_and_their_exit_status():
    from petalflow.flows.cli import (
        EXIT_BACKBONE, EXIT_DATA, EXIT_REGISTRY, EXIT_SOURCE, explain_failure,
    )
    from petalflow.tasks.errors import (
        BackboneError, ChecksumMismatch, DatasetError, DownloadError, TransientError,
        WebPageNotArchive,
    )

    offline = explain_failure(TransientError("network error downloading https://x/y.tgz"))
    assert offline.code == EXIT_SOURCE and "--data-url" in offline.hint
    assert "--backbone" in offline.hint
    assert explain_failure(DownloadError("HTTP 404 from u")).code == EXIT_SOURCE
    pinned = explain_failure(ChecksumMismatch("sha256 of u is a, expected b"))
    assert pinned.code == EXIT_SOURCE and "--data-sha256" in pinned.hint
    hub = explain_failure(TransientError("network error fetching backbone https://tfhub.dev/x"))
    assert hub.code == EXIT_BACKBONE
    assert explain_failure(BackboneError("not a SavedModel")).code == EXIT_BACKBONE
    assert explain_failure(DatasetError("need at least 2 classes")).code == EXIT_DATA
    from petalflow.tasks.errors import DatasetChanged, UnusableImages

    changed = explain_failure(DatasetChanged("the dataset changed during the run: …"))
    assert changed.code == EXIT_DATA and "let watch-data start the runs" in changed.hint
    assert "layout" not in changed.hint  # the layout is right; the data moved under the run

    tiffs = explain_failure(UnusableImages("need at least 2 classes with usable images, found "
                                           "0 (none): the 12 image files in a, b were "
                                           "quarantined: unsupported image format TIFF"))
    assert tiffs.code == EXIT_DATA and "for the reason above" in tiffs.hint
    assert "convert them to JPEG or PNG" in tiffs.hint
    assert "layout" not in tiffs.hint  # the layout is right
    from petalflow.tasks.errors import ArchiveError, DamagedArchive

    damaged = explain_failure(DamagedArchive("archive p.zip is damaged (Bad CRC-32 for file "
                                             "'p/a/1.jpg'): ..."))
    assert damaged.code == EXIT_DATA and "unzip -t" in damaged.hint
    assert "layout" not in damaged.hint  # the layout is not what is wrong
    assert "layout" in explain_failure(ArchiveError("archive member '/etc/x' has an absolute "
                                                    "path")).hint
    page = explain_failure(WebPageNotArchive("photos.tgz is a web page (HTML), not an archive"))
    assert page.code == EXIT_SOURCE and "direct-download form" in page.hint
    from petalflow.flows.cli import EXIT_FAILED
    from petalflow.temporary_server import ServerError

    server = explain_failure(ServerError("Prefect's temporary server did not answer within 20 s"))
    assert server.code == EXIT_FAILED and str(server).startswith("Prefect's temporary server")
    assert "PREFECT_API_URL" in server.hint
    import mlflow

    assert explain_failure(mlflow.exceptions.MlflowException("refused")).code == EXIT_REGISTRY


def test_cli_failure_prints_one_message_and_no_traceback(workspace, tiny_backbone):
    """A dataset URL that answers 404: exit status 3, the error once, a hint, no traceback;
    the embedded MLflow store exists (created while the command started)."""
    import subprocess
    import sys

    from tests.helpers import serve_directory

    (workspace / "served").mkdir()
    exe = Path(sys.executable).with_name("petalflow")
    with serve_directory(workspace / "served") as url:
        proc = subprocess.run(
            [str(exe), "train", "--data-url", f"{url}/missing.tgz", "--backbone",
             str(tiny_backbone), "--image-size", "32"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "PREFECT_API_URL": ""})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.count("petalflow train: error: HTTP 404") == 1
    assert "hint: check --data-url" in proc.stderr
    # The embedded store is made as the command starts (README), before any data is fetched.
    assert (workspace / "mlflow" / "mlflow.db").is_file()


def test_a_sweep_candidates_image_size_the_backbone_refuses_names_it_before_any_download(
        workspace, tiny_backbone):
    """`petalflow train --sweep` with a candidate whose image_size the backbone does not take:
    exit 5 within seconds, the message names that candidate (the user typed no --image-size
    of that value), a hint, no traceback, and the data behind the URL is not fetched."""
    import subprocess
    import sys

    from tests.helpers import make_dataset, make_tgz, serve_directory

    served = workspace / "served"
    served.mkdir()
    make_tgz(make_dataset(workspace / "photos"), served / "data.tgz")
    exe = Path(sys.executable).with_name("petalflow")
    with serve_directory(served) as url:
        proc = subprocess.run(
            [str(exe), "train", "--data-url", f"{url}/data.tgz", "--backbone",
             str(tiny_backbone), "--image-size", "32",
             "--sweep", '[{"learning_rate": 0.01}, {"image_size": 64}]'],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "PREFECT_API_URL": ""})
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.count(
        f"petalflow train: error: backbone {tiny_backbone} takes 32x32 images but sweep[1] "
        "sets image_size 64; give it image_size 32") == 1
    assert "--image-size is" not in proc.stderr
    assert "hint: the backbone decides the image size; give the size it takes." in proc.stderr
    downloads = workspace / "home" / "downloads"
    assert not downloads.exists() or not any(downloads.rglob("*.tgz*"))


def test_extraction_limit_is_a_size_in_human_units(workspace, capsys):
    from petalflow.tasks.params import parse_size

    assert TrainParams().model_dump(mode="json")["max_extract_size"] == "20 GiB"  # the form
    assert TrainParams().max_extract_bytes == 20 * 1024**3
    assert TrainParams(max_extract_size="500MB").max_extract_bytes == 500_000_000
    assert TrainParams(max_extract_size="1.5 TiB").max_extract_bytes == int(1.5 * 2**40)
    assert parse_size("1048576") == 1048576
    # As `du -h`, `df -h` and `ls -lh` print sizes (powers of 1024), and Kubernetes writes them.
    assert [parse_size(v) for v in ("20G", "500M", "1.5T", "64K", "20Gi", "512Mi")] == [
        20 * 2**30, 500 * 2**20, int(1.5 * 2**40), 64 * 2**10, 20 * 2**30, 512 * 2**20]
    assert main(["train", "--max-extract-size", "lots"]) == 2
    err = capsys.readouterr().err
    assert "--max-extract-size" in err and "20 GiB, 500 MB" in err


def test_training_hand_off_is_an_explicit_parameter():
    from petalflow.tasks.params import training_target

    assert training_target(TrainParams(), from_deployment=True) == "train-model/train-gpu"
    assert training_target(TrainParams(), from_deployment=False) is None
    local = TrainParams(training_deployment="local")
    assert training_target(local, from_deployment=True) is None
    named = TrainParams(training_deployment="train-model/train-big-gpu")
    assert training_target(named, from_deployment=False) == "train-model/train-big-gpu"
    with pytest.raises(ValidationError, match="deployment name"):
        TrainParams(training_deployment="gpu please")
    # The training step is a run of train-model: another flow's deployment cannot take it.
    with pytest.raises(ValidationError, match="train-and-register/train is a deployment of the "
                       "train-and-register flow; the training step is a run of the train-model "
                       "flow"):
        TrainParams(training_deployment="train-and-register/train")
    # A deployment's own name, or the name as the UI lists it, names train-model's deployment.
    for typed in ("train-big-gpu", " train-model / train-big-gpu "):
        assert TrainParams(training_deployment=typed).training_deployment == \
            "train-model/train-big-gpu"
    # Where training runs does not change what is trained: same run key, same checkpoints.
    assert run_key(local, "f") == run_key(TrainParams(), "f")


def test_predict_options_are_generated_from_the_flows_parameter_model(workspace, monkeypatch,
                                                                      prefect_harness):
    """`petalflow predict` runs the batch-predict flow with the PredictParams its options
    make (the model the flow and the UI form use)."""
    from petalflow.flows import cli
    from petalflow.flows.predict_flow import PredictParams as FlowParams
    from petalflow.tasks.params import PredictParams

    assert FlowParams is PredictParams
    (workspace / "a.jpg").write_bytes(b"not really")
    seen = {}

    def fake_job(params, on_batch=None):
        from prefect.runtime import flow_run

        seen["params"], seen["flow"] = params, flow_run.flow_name
        on_batch(1, 1)
        return {"images": 1, "errors": 0, "drift": None, "labels": {}, "inputs": params.input,
                "output": params.output, "model_uri": params.model_uri}

    monkeypatch.setattr("petalflow.tasks.predict.predict_images", fake_job)
    store = f"sqlite:///{workspace / 'mlflow.db'}"
    from petalflow.tasks.registry import create_sqlite_store

    create_sqlite_store(store)  # a store (the fake job never opens it)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    out = workspace / "p.json"
    assert cli.main(["predict", "--model", "models:/m/1", "--input", str(workspace / "a.jpg"),
                     "--output", str(out), "--format", "json", "--top-k", "2"]) == 0
    assert seen["params"] == PredictParams(model_uri="models:/m/1",
                                           input=[str(workspace / "a.jpg")], output=str(out),
                                           format="json", top_k=2)
    assert seen["flow"] == "batch-predict"
    # The images also as the command's arguments (README), with --input or without.
    (workspace / "b.jpg").write_bytes(b"not really")
    assert cli.main(["predict", str(workspace / "a.jpg"), "--output", str(out),
                     "--input", str(workspace / "b.jpg"), "--model", "models:/m/1"]) == 0
    assert seen["params"].input == [str(workspace / "a.jpg"), str(workspace / "b.jpg")]
    assert cli.main(["predict", str(workspace / "a.jpg"), "--output", str(out),
                     str(workspace / "b.jpg"), "--model", "models:/m/1"]) == 0
    assert seen["params"].input == [str(workspace / "a.jpg"), str(workspace / "b.jpg")]
    # What batch-predict took before ``input`` still validates the same way.
    legacy = PredictParams(input_folder=str(workspace), output=str(out))
    assert legacy.input == [str(workspace)]


def test_predict_on_thousands_of_files_named_by_the_shell(workspace, monkeypatch, capsys,
                                                          prefect_harness):
    """`petalflow predict --input photos/*.jpg`: the shell names every file. Past ~7,000 of
    them (paths of 75 characters) the run's parameters were larger than Prefect takes for a
    flow run (512 KiB), and the command failed at its start with "PrefectHTTPStatusError:
    Client error '422 Unprocessable Entity' …" (by hand: 21,000 files, 1.6 MB). The command
    now hands the flow such a list in a file (``--input @LIST``, removed after the run), and
    every file is classified; a list of one's own works the same way, its missing files named
    before any work."""
    from petalflow.flows import cli
    from petalflow.tasks.predict import iter_inputs

    folder = workspace / "uploads-from-the-warehouse-camera-number-seven-2026-11-28"
    folder.mkdir()
    (folder / "base.jpg").write_bytes(b"not really")
    names = []
    for i in range(8000):
        os.link(folder / "base.jpg", folder / f"IMG_{i:06d}.jpg")
        names.append(str(folder / f"IMG_{i:06d}.jpg"))
    assert len(json.dumps(names)) > 512 * 1024
    seen = {}

    def fake_job(params, on_batch=None):
        seen["params"], seen["files"] = params, [str(f) for f in iter_inputs(params.input)]
        seen["list_there"] = Path(params.input[0][1:]).is_file()
        on_batch(1, 1)
        return {"images": len(seen["files"]), "errors": 0, "drift": None, "labels": {},
                "inputs": params.input, "output": params.output, "model_uri": "models:/m/1"}

    monkeypatch.setattr("petalflow.tasks.predict.predict_images", fake_job)
    store = f"sqlite:///{workspace / 'mlflow.db'}"
    from petalflow.tasks.registry import create_sqlite_store

    create_sqlite_store(store)  # a store (the fake job never opens it)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    out = workspace / "p.csv"
    assert cli.main(["predict", "--model", "models:/m/1", "--input", *names,
                     "--output", str(out)]) == 0
    assert seen["files"] == names and seen["list_there"]
    [listed] = seen["params"].input
    assert listed.startswith("@") and not Path(listed[1:]).exists()  # removed after the run
    # A list of one's own: one path per line, blank lines and # comments skipped.
    own = workspace / "todo.txt"
    own.write_text(f"# picked by hand\n{names[5]}\n\n{names[7]}\n")
    assert cli.main(["predict", "--model", "models:/m/1", "--input", f"@{own}",
                     "--output", str(out)]) == 0
    assert seen["files"] == [names[5], names[7]]
    # Saved by Windows Notepad: a byte-order mark before the first path, CRLF line ends.
    own.write_bytes(f"{names[5]}\r\n{names[7]}\r\n".encode("utf-8-sig"))
    assert cli.main(["predict", "--model", "models:/m/1", "--input", f"@{own}",
                     "--output", str(out)]) == 0
    assert seen["files"] == [names[5], names[7]]
    # A folder or pattern whose name begins with "@" is that folder or pattern.
    (workspace / "@2x").mkdir()
    os.link(folder / "base.jpg", workspace / "@2x" / "icon.jpg")
    assert cli.main(["predict", "--model", "models:/m/1", "--input", "@2x/*.jpg",
                     "--output", str(out)]) == 0
    assert seen["files"] == ["@2x/icon.jpg"]
    capsys.readouterr()
    own.write_text(f"{names[5]}\n{folder / 'IMG_999999.jpg'}\n")
    assert cli.main(["predict", "--model", "models:/m/1", "--input", f"@{own}",
                     "--output", str(out)]) == 2
    assert ("  --input: Value error, not a file, folder or matching pattern: "
            f"{str(folder / 'IMG_999999.jpg')!r} (got ['@{own}'])") in capsys.readouterr().err
    assert cli.main(["predict", "--model", "models:/m/1", "--input", f"@{workspace / 'no.txt'}",
                     "--output", str(out)]) == 2
    assert ("--input: Value error, no such list file (@FILE: a text file naming one image "
            f"file, folder or pattern per line): '{workspace / 'no.txt'}'"
            ) in capsys.readouterr().err
    # Thousands named, some missing: the error is one line, not the list.
    (folder / "IMG_000003.jpg").unlink()
    (folder / "IMG_000004.jpg").unlink()
    assert cli.main(["predict", "--model", "models:/m/1", "--input", *names, "--output",
                     str(out)]) == 2
    err = capsys.readouterr().err
    assert (f"not a file, folder or matching pattern: {names[3]!r}, {names[4]!r} (got "
            f"{names[:5]!r} and 7995 more)") in err and len(err) < 2000


def test_predict_writes_the_format_its_output_is_named_for(workspace, capsys):
    """`--output preds.json` wrote CSV into the .json file; `--output -` wrote a file named
    "-". The format follows the output's name unless --format says otherwise (.json: a JSON
    array, .jsonl/.ndjson: one object per line, anything else CSV); "-" is refused."""
    from petalflow.tasks.params import PredictParams
    from petalflow.tasks.predict import _Writer

    (workspace / "a.jpg").write_bytes(b"x")

    def fmt(output, **kw):
        return PredictParams(input=[str(workspace)], output=str(workspace / output), **kw).format

    assert [fmt(n) for n in ("p.csv", "p.json", "p.JSON", "p.jsonl", "p.ndjson", "p.txt", "p")] \
        == ["csv", "json", "json", "jsonl", "jsonl", "csv", "csv"]
    assert fmt("p.json", format="csv") == "csv"  # said explicitly: as said
    assert PredictParams(input=[str(workspace)], output="p.json").model_dump()["format"] == "json"
    frame = pd.DataFrame({"label": ["a", "b"], "probability": [0.9, 0.8]})
    for name in ("p.json", "p.jsonl", "p.csv"):
        writer = _Writer(workspace / name, fmt(name))
        writer.write(frame)
        writer.close()
    assert json.loads((workspace / "p.json").read_text()) == frame.to_dict(orient="records")
    assert [json.loads(line) for line in (workspace / "p.jsonl").read_text().splitlines()] \
        == frame.to_dict(orient="records")
    assert pd.read_csv(workspace / "p.csv").equals(frame)
    assert main(["predict", "--input", str(workspace), "--output", "-"]) == 2
    err = capsys.readouterr().err
    assert ("--output: Value error, '-' (standard output) is not supported: give a file, such as "
            "'predictions.csv'") in err
    assert not (workspace / "-").exists()


def test_predict_writes_tsv_and_parquet_and_refuses_a_spreadsheet_name(workspace, capsys):
    """`--output preds.parquet` wrote CSV into the .parquet file, and preds.tsv comma-separated
    values. Parquet gets one row group per batch, every batch in the first one's column types
    (a later batch's columns may come as other dtypes); a spreadsheet's name is refused before
    any work, as a CSV named .xlsx is a file Excel refuses to open."""
    import pyarrow.parquet as pq

    from petalflow.tasks.params import PredictParams
    from petalflow.tasks.predict import _Writer

    (workspace / "a.jpg").write_bytes(b"x")

    def fmt(output, **kw):
        return PredictParams(input=[str(workspace)], output=str(workspace / output), **kw).format

    assert [fmt(n) for n in ("p.tsv", "p.TSV", "p.parquet", "p.pq")] == \
        ["tsv", "tsv", "parquet", "parquet"]
    assert fmt("p.parquet", format="csv") == "csv"
    first = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": ["rose", ""],
                          "probability": np.array([0.9, 0.0], np.float32),
                          "error": ["", "undecodable image"]})
    later = pd.DataFrame({"path": pd.Series(["c.jpg"], dtype=object),
                          "label": pd.Series(["tulip"], dtype=object),
                          "probability": [1.0], "error": pd.Series([""], dtype=object)})
    for name in ("p.parquet", "p.tsv"):
        writer = _Writer(workspace / name, fmt(name))
        writer.write(first)
        writer.write(later)
        writer.close()
    table = pq.read_table(workspace / "p.parquet")
    assert pq.ParquetFile(workspace / "p.parquet").metadata.num_row_groups == 2
    assert table.column("path").to_pylist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert table.column("error").to_pylist() == ["", "undecodable image", ""]
    assert table.column("probability").to_pylist() == pytest.approx([0.9, 0.0, 1.0])
    assert str(table.schema.field("probability").type) == "float"  # float32, as written first
    lines = (workspace / "p.tsv").read_text().splitlines()
    assert lines[0] == "path\tlabel\tprobability\terror"
    assert lines[2] == "b.jpg\t\t0.0\tundecodable image"
    for name, suffix in (("p.xlsx", ".xlsx"), ("p.XLS", ".xls"), ("p.ods", ".ods"),
                         ("p.xlsx.gz", ".xlsx")):
        out = workspace / name
        assert main(["predict", "--input", str(workspace), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert (f"--output: Value error, a {suffix} spreadsheet is not written "
                "(CSV, TSV, JSON or Parquet are): name the file .csv") in err
        assert not out.exists() and not (workspace / "home").exists()


def test_predict_output_named_gz_is_gzip_and_other_compressions_are_refused(workspace, capsys):
    """preds.csv.gz held plain CSV (anything else was CSV, uncompressed whatever its name):
    NAME.<format>.gz is that format, gzip-compressed; .bz2, .xz,
    .zip... are refused rather than filled with uncompressed bytes, and so is .parquet.gz."""
    import gzip

    from petalflow.tasks.params import PredictParams
    from petalflow.tasks.predict import _Writer

    (workspace / "a.jpg").write_bytes(b"x")

    def fmt(output, **kw):
        return PredictParams(input=[str(workspace)], output=str(workspace / output), **kw).format

    assert [fmt(n) for n in ("p.csv.gz", "p.JSONL.gz", "p.json.gz", "p.tsv.gz", "p.gz")] == \
        ["csv", "jsonl", "json", "tsv", "csv"]
    frame = pd.DataFrame({"label": ["a", "b"], "probability": [0.9, 0.8]})
    for name in ("p.csv.gz", "p.jsonl.gz"):
        writer = _Writer(workspace / name, fmt(name))
        writer.write(frame.iloc[:1])
        writer.fh.flush()  # as predict_files does after every batch
        writer.write(frame.iloc[1:])
        writer.close()
    with gzip.open(workspace / "p.csv.gz", "rt", newline="") as fh:  # gzip itself
        assert fh.read() == "label,probability\r\na,0.9\r\nb,0.8\r\n"
    assert pd.read_csv(workspace / "p.csv.gz").equals(frame)
    with open(workspace / "p.csv.gz", "rb") as fh:  # the name gunzip -N gives it back
        assert fh.read(10 + len(b"p.csv\0"))[10:] == b"p.csv\0"
    assert pd.read_json(workspace / "p.jsonl.gz", lines=True).equals(frame)
    for name, needle in (
            ("p.csv.bz2", "--output: Value error, .bz2 compression is not written: name the "
                          "file .gz (e.g. predictions.csv.gz) for gzip"),
            ("p.zip", "--output: Value error, .zip compression is not written"),
            ("p.parquet.gz", "--output: Value error, Parquet is compressed already: name the "
                             "file .parquet")):
        out = workspace / name
        assert main(["predict", "--input", str(workspace), "--output", str(out)]) == 2
        assert needle in capsys.readouterr().err
        assert not out.exists() and not (workspace / "home").exists()


def test_predict_refuses_bad_options_naming_them(workspace, capsys):
    out = workspace / "p.csv"
    assert main(["predict", "--input", str(workspace), "--output", str(out),
                 "--top-k", "-1"]) == 2
    assert "--top-k" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse refuses a choice not offered
        main(["predict", "--input", str(workspace), "--output", str(out), "--format", "xml"])
    assert exited.value.code == 2
    assert "--format: invalid choice: 'xml'" in capsys.readouterr().err
    assert not out.exists()
    # An existing folder as the output: refused before any image is classified.
    assert main(["predict", "--input", str(workspace), "--output", str(workspace)]) == 2
    assert (f"  --output: Value error, {str(workspace)!r} is a folder: give a file name in it, "
            f"such as {str(workspace / 'predictions.csv')!r}") in capsys.readouterr().err


def test_an_interrupted_predict_says_whether_its_output_was_written(workspace, monkeypatch,
                                                                     capsys):
    """Ctrl-C during `petalflow predict`: one line, exit status 130, saying whether the output
    was written (it is written whole or not at all), not Python's traceback; during `petalflow
    train` before its run started, that."""
    from petalflow.flows import cli

    (workspace / "a.jpg").write_bytes(b"not really")
    out = workspace / "p.csv"
    out.write_text("an older table, left as it was\n")
    os.utime(out, (0, 0))

    def interrupted(write: bool):
        def cmd(args):
            args.output_path = str(out)
            if write:
                out.write_text("label\n")
            raise KeyboardInterrupt

        return cmd

    monkeypatch.setattr(cli, "cmd_predict", interrupted(False))
    assert cli.main(["predict", str(workspace / "a.jpg"), "--output", str(out)]) == 130
    err = capsys.readouterr().err
    assert err == (f"petalflow predict: interrupted: nothing was written to {out} (no part of "
                   "a file either)\n")
    monkeypatch.setattr(cli, "cmd_predict", interrupted(True))
    assert cli.main(["predict", str(workspace / "a.jpg"), "--output", str(out)]) == 130
    assert capsys.readouterr().err == (
        f"petalflow predict: interrupted: {out} was written whole before it\n")
    # A train command interrupted before its flow run started (the e2e test interrupts one
    # whose run has started) says only that.
    def train_interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_train", train_interrupted)
    assert cli.main(["train"]) == 130
    assert capsys.readouterr().err == "petalflow train: interrupted before its run started\n"


def test_ctrl_c_after_a_failed_command_said_its_error_ends_the_wait_for_the_store(
        workspace, monkeypatch, capsys):
    """A train that fails at once (its data) said its error, then waited a second or two for
    the side thread making the MLflow store: Ctrl-C there, as a person presses it when the
    prompt does not come back, gave Python's traceback and exit status 1. It now ends the wait,
    with the failure's status and only its error said."""
    from petalflow.flows import cli
    from petalflow.tasks import registry
    from petalflow.tasks.errors import DatasetError

    def fails_on_its_data(args):
        raise DatasetError("need at least 2 classes with usable images, found 0 (none)")

    waited = []

    def interrupted_wait(timeout_s):
        waited.append(timeout_s)
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_train", fails_on_its_data)
    monkeypatch.setattr(registry, "wait_for_store", interrupted_wait)
    assert cli.main(["train"]) == cli.EXIT_DATA
    assert waited, "the command did not wait for the store"
    err = capsys.readouterr().err
    assert err.startswith("petalflow train: error: need at least 2 classes with usable images, "
                          "found 0 (none)\nhint: ")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_the_prediction_line_counts_one_image_and_one_error_in_the_singular():
    from petalflow.tasks.report import prediction_line

    summary = {"images": 4, "errors": 1, "model_uri": "models:/m@champion",
               "model_version_uri": "models:/m/2", "output": "/abs/p.csv"}
    assert prediction_line(summary, "p.csv") == (
        "classified 3 of 4 images (1 error) with models:/m@champion (version 2) -> p.csv")
    assert prediction_line({**summary, "images": 1, "errors": 0}) == (
        "classified 1 of 1 image (0 errors) with models:/m@champion (version 2) -> /abs/p.csv")


def test_one_image_is_counted_in_the_singular_in_the_drift_line_and_the_artifact():
    """`petalflow predict a.jpg` printed "drift: score … on 1 images"; the batch-predict
    artifact began "1 images from …", with "1 errors"."""
    from petalflow.tasks.drift import drift_line, drift_markdown
    from petalflow.tasks.report import prediction_markdown

    drift = {"available": True, "images": 1, "min_images": 20, "drift_score": 0.6,
             "threshold": 0.25, "feature_drift": 0.0, "image_drift": 0.6, "drifted": False}
    assert " on 1 image: too few images to tell" in drift_line(drift)
    assert drift_markdown({"drift": drift, "inputs": ["a.jpg"], "model_uri": "models:/m/1"}
                          ).startswith("# Drift\n\n1 image from ")
    summary = {"images": 1, "errors": 1, "inputs": ["a.jpg"], "labels": {},
               "model_uri": "models:/m/1", "output": "/abs/p.csv", "drift": None}
    assert "\n\n1 image from " in prediction_markdown(summary)
    assert ": 0 classified, 1 error. Output: " in prediction_markdown(summary)
    assert " on 2 images: " in drift_line({**drift, "images": 2})


def test_model_and_experiment_names_are_taken_without_the_spaces_a_paste_brings(
        tmp_path, workspace, capsys):
    """A model name pasted into the UI's form or a command with a space after it was refused
    by train ("must start with a letter or digit…", not saying why) and not found by predict,
    models and pull; an experiment name with spaces around it made an experiment of its own."""
    from petalflow.tasks.params import PredictParams

    params = TrainParams(model_name="flowers ", experiment_name=" flowers-exp ")
    assert (params.model_name, params.experiment_name) == ("flowers", "flowers-exp")
    assert TrainParams(model_name="'flowers'").model_name == "flowers"
    with pytest.raises(ValueError, match="experiment_name\n  Value error, must name an MLflow"):
        TrainParams(experiment_name="  ")
    image = write_image(tmp_path / "a.jpg", COLOURS["red"])
    assert PredictParams(input=[str(image)], output=str(tmp_path / "p.csv"),
                         model_name=" Team Model ").model_name == "Team Model"
    with pytest.raises(ValueError, match="model_name\n  Value error, must name a registered"):
        PredictParams(input=[str(image)], output=str(tmp_path / "p.csv"), model_name=" ")
    parser = build_parser()
    assert parser.parse_args(["models", "--model-name", "flowers "]).model_name == "flowers"
    assert parser.parse_args(["pull", "--model-name", " flowers", "--dest", "m"]
                             ).model_name == "flowers"
    assert parser.parse_args(["pull", "--model", "'models:/flowers/2' ", "--dest", "m"]
                             ).model == "models:/flowers/2"


def test_drift_event_and_artifact_name_the_model_even_with_dots():
    from petalflow.tasks.drift import model_name_of, model_resource
    from petalflow.tasks.report import artifact_key

    assert model_name_of("models:/team.flowers-v2@champion") == "team.flowers-v2"
    assert model_name_of("models:/team.flowers-v2/3") == "team.flowers-v2"
    assert model_name_of("/tmp/pulled-model") == "local"
    assert model_resource("models:/a.b/1") == "petalflow.model.a.b"
    assert artifact_key("drift", "team.flowers-v2") == "drift-team-flowers-v2"


def test_a_prediction_job_of_many_named_files_fits_its_event_and_artifacts():
    """`petalflow predict --input photos/*.jpg`: the shell names every file (30,000 here).
    The drift event's payload listed each: over Prefect's event size limit (1.5 MB) emitting
    it raised EventTooLarge and the job failed after classifying every image; the drift and
    prediction artifacts listed each too. They now name the first few and how many."""
    from prefect.events import Event
    from prefect.settings import get_current_settings

    from petalflow.tasks.drift import EVENT, drift_markdown, drift_payload
    from petalflow.tasks.report import prediction_markdown

    inputs = [f"/data/incoming/2026-11-28/camera-07/IMG_{i:06d}.jpg" for i in range(30000)]
    drift = {"available": True, "drift_score": 0.4, "threshold": 0.25, "feature_drift": 0.4,
             "image_drift": 0.1, "images": 256, "min_images": 20, "drifted": True}
    summary = {"model_uri": "models:/m@champion", "model_version_uri": "models:/m/3",
               "inputs": inputs, "output": "p.csv", "drift": drift, "images": 30000,
               "errors": 0, "labels": {"a": 30000}}
    payload = drift_payload(summary, {"data_url": "https://host/p.tgz"})
    assert payload["inputs"] == inputs[:20] and payload["inputs_count"] == 30000
    event = Event(event=EVENT, resource={"prefect.resource.id": "petalflow.model.m"},
                  payload=payload)
    assert event.size_bytes < get_current_settings().server.events.maximum_size_bytes / 100
    shown = ("`/data/incoming/2026-11-28/camera-07/IMG_000000.jpg`, "
             "`/data/incoming/2026-11-28/camera-07/IMG_000001.jpg`, "
             "`/data/incoming/2026-11-28/camera-07/IMG_000002.jpg` and 29997 more")
    for markdown in (drift_markdown(summary), prediction_markdown(summary)):
        assert shown in markdown and len(markdown) < 2000


def test_a_drift_event_whose_retraining_will_be_refused_says_so():
    """A version trained from a private URL records it without its credentials; the
    retraining its drift event starts is refused for it: the predict run says so first."""
    from petalflow.tasks.drift import refused_retraining

    said = refused_retraining({"data_url": "https://***@host/p.tgz", "epochs": 5})
    assert said == (
        "the retraining this drift event starts will be refused: the version's data URL was "
        "recorded without its credentials (https://***@host/p.tgz); set data_url in the train "
        "deployment's own parameters and drop the drift trigger's parameters (README)")
    assert refused_retraining({"data_url": "https://host/p.tgz?sig=***"}) is not None
    assert refused_retraining({"data_url": "https://host/p.tgz"}) is None
    assert refused_retraining(None) is None


def test_a_models_requirements_are_checked_against_this_environment(tmp_path):
    """What ``petalflow predict`` warns about when loading a model: the pins this environment
    does not satisfy, packages it lacks; not options, paths, comments or other platforms'."""
    from importlib import metadata

    from petalflow.tasks.predict import requirement_mismatches

    numpy, pandas = metadata.version("numpy"), metadata.version("pandas")
    path = tmp_path / "requirements.txt"
    path.write_text("\n".join([
        "# pinned by the training", f"numpy=={numpy}", "pandas==0.1.0  # too old",
        f"pandas>={pandas}", "nosuch-package-xyz==1.2", "-r other.txt", "./local/wheel.whl",
        "tensorflow==1.0; sys_platform == 'nosuch'", "", "mlflow[auth]>=1",
    ]) + "\n")
    assert requirement_mismatches(path) == [
        f"pandas (current: {pandas}, required: pandas==0.1.0)",
        "nosuch-package-xyz (current: uninstalled, required: nosuch-package-xyz==1.2)",
    ]
    assert requirement_mismatches(tmp_path / "missing.txt") == []


def test_predict_batches_start_small_then_take_the_batch_size():
    """The first batch is small (its rows are written while the model warms up), then
    --batch-size at a time; every file is in exactly one batch, in order."""
    from petalflow.tasks.predict import FIRST_BATCH, batch_bounds

    assert batch_bounds(0, 64) == []
    assert batch_bounds(5, 64) == [(0, 5)]
    bounds = batch_bounds(200, 64)
    assert bounds[0] == (0, FIRST_BATCH) and FIRST_BATCH < 64
    assert all(stop - start == 64 for start, stop in bounds[1:-1])
    assert [i for start, stop in bounds for i in range(start, stop)] == list(range(200))
    assert batch_bounds(5, 2) == [(0, 2), (2, 4), (4, 5)]


def test_train_opens_the_mlflow_store_while_it_starts_and_the_run_waits_for_it(workspace):
    """``petalflow train``'s side thread opens MLflow's store after its imports (the embedded
    SQLite store is created then, schema and all); until it has, the run's first MLflow call
    waits: two first uses at once would both create the schema."""
    import sqlite3
    import threading

    from petalflow.flows.cli import _warm_imports
    from petalflow.tasks.registry import configure_mlflow, store_opener

    opener = store_opener()
    assert opener is not None
    release = threading.Event()

    def open_when_released():
        release.wait()
        opener()

    _warm_imports("mlflow", then=open_when_released)
    run = threading.Thread(target=configure_mlflow, daemon=True)
    run.start()
    database = workspace / "mlflow" / "mlflow.db"
    try:
        run.join(1.0)
        assert run.is_alive(), "configure_mlflow went ahead of the store's opening"
        assert not database.exists()
    finally:
        release.set()  # the side thread holds the import lock until it has run
    run.join(120)
    assert not run.is_alive()
    with sqlite3.connect(database) as db:
        tables = {name for (name,) in db.execute("select name from sqlite_master")}
    assert {"alembic_version", "experiments", "runs", "registered_models",
            "model_versions"} <= tables


def test_the_early_store_opening_leaves_errors_and_other_stores_to_the_run(
        workspace, monkeypatch):
    """An error while opening the store early is not raised there: the run's first MLflow call
    raises it (once: a task's retry opens the store itself), instead of waiting for MLflow's
    own retries a second time; a tracking server (http) is not opened early; the side thread
    runs its follow-up even when an import fails."""
    import threading

    import mlflow

    from petalflow.flows.cli import _warm_imports
    from petalflow.tasks.registry import configure_mlflow, store_opener

    opener = store_opener()

    def refused(*args, **kwargs):
        raise ConnectionError("database refused the connection")

    with monkeypatch.context() as m:
        m.setattr(mlflow, "MlflowClient", refused)
        opener()  # does not raise
    with pytest.raises(ConnectionError, match="database refused the connection"):
        configure_mlflow()
    configure_mlflow()  # the retry: opens the store itself
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert store_opener() is None
    done = threading.Event()
    _warm_imports("petalflow_no_such_module", then=done.set)
    assert done.wait(60)


def test_the_runs_first_imports_of_tensorflow_and_mlflow_wait_for_the_side_thread(
        workspace, tmp_path, monkeypatch):
    """``petalflow train``'s flow starts while its side thread still imports MLflow, TensorFlow
    and TF Hub; the flow's first import of a package the side thread is importing waits until
    that import is done. (A TensorFlow submodule imported meanwhile on the flow's thread, the
    backbone's check, took the two threads' module locks in opposite orders: "partially
    initialized module 'tensorflow.core.protobuf.meta_graph_pb2' ... (most likely due to a
    circular import)", and the run failed at its first task, once in 18 commands here.)"""
    import sys

    from petalflow.flows.cli import _warm_imports
    from petalflow.tasks import common, dataset, model, registry

    (tmp_path / "petalflow_slow_package.py").write_text(
        "import time\ntime.sleep(0.5)\nDONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "petalflow_slow_package", raising=False)
    _warm_imports("petalflow_slow_package")
    common.imports_settled("petalflow_slow_package")
    assert sys.modules["petalflow_slow_package"].DONE  # whole, not partly initialised
    common.imports_settled("petalflow_never_imported")  # nothing importing it: at once
    # Where the run first imports them: the backbone's check, the scan's decoding, MLflow's
    # set-up, tf-keras.
    waited = []
    for module in (model, dataset, registry):
        monkeypatch.setattr(module, "imports_settled", waited.append)
    (tmp_path / "saved_model.pb").write_bytes(b"")
    assert model.serving_signature(tmp_path) is None
    assert dataset.check_decodable([]) == []
    registry.configure_mlflow()
    model.keras()
    assert waited == ["tensorflow", "tensorflow", "mlflow", "tensorflow_hub"]


def test_start_up_defers_full_collections_then_freezes_what_the_imports_made():
    """The console script's collector set-up: while it starts, no automatic full collection
    (young objects still collected); afterwards what exists is frozen out of later scans and
    the threshold is Python's again; the start-up's garbage is collected, not frozen. A
    process that never deferred is left alone."""
    import gc
    import weakref

    from petalflow.tasks.common import defer_full_collections, freeze_start_up

    gc.collect()
    threshold = gc.get_threshold()
    frozen = gc.get_freeze_count()
    freeze_start_up()  # not deferred: nothing happens
    assert gc.get_freeze_count() == frozen and gc.get_threshold() == threshold
    try:
        defer_full_collections()
        young, middle, full = gc.get_threshold()
        assert (young, middle) == threshold[:2] and full > 10**6
        defer_full_collections()  # twice: still one threshold to restore

        class Node:
            pass

        garbage = Node()
        garbage.cycle = garbage
        gone = weakref.ref(garbage)
        del garbage
        freeze_start_up()
        assert gone() is None, "a reference cycle of the start-up was frozen, not collected"
        assert gc.get_threshold() == threshold
        assert gc.get_freeze_count() > frozen
        freeze_start_up()  # once only
        assert gc.get_threshold() == threshold
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_the_command_never_imports_prefects_server_module(workspace):
    """Without a Prefect API the command launches Prefect's temporary server as a process of its
    own: its own process never imports the server module (~1.4 s of imports and ~50 MiB that
    Prefect's launcher needs in-process). The run here fails at once (no such model), after the
    run stack's imports and the server's start."""
    import json
    import subprocess
    import sys

    from tests.helpers import write_image

    write_image(workspace / "in" / "a.jpg", (200, 30, 30), seed=1)
    code = ("import json, sys; from petalflow.flows.cli import main; "
            "rc = main(['predict', '--input', 'in', '--output', 'p.csv', '--model-name', 'nobody']); "
            "print(json.dumps([rc, [m for m in ('petalflow.flows.predict_flow', "
            "'prefect.flow_engine', 'prefect.task_engine', 'prefect.server.api.server') "
            "if m in sys.modules]]))")
    store = f"sqlite:///{workspace / 'mlflow.db'}"  # a store, where no such model is registered
    from petalflow.tasks.registry import create_sqlite_store

    create_sqlite_store(store)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=workspace, env={**os.environ, "PREFECT_API_URL": "",
                                             "MLFLOW_TRACKING_URI": store}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rc, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert rc == 6, out.stderr[-3000:]  # the registry's "not found", from inside the run
    assert "Starting temporary server on http://127.0.0.1:" in out.stderr
    assert loaded == ["petalflow.flows.predict_flow", "prefect.flow_engine",
                      "prefect.task_engine"]


def test_the_code_version_is_asked_of_git_once_per_process(monkeypatch):
    """The run's and the version's ``code_version`` tag: git runs (two commands) on the first
    call only, which ``petalflow train`` makes at its start, while the process is small."""
    import subprocess

    from petalflow.tasks import common

    calls = []
    real_run = subprocess.run

    def counted(cmd, *args, **kwargs):
        calls.append(cmd[:2])
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", counted)
    common.code_version.cache_clear()
    try:
        first = common.code_version()
        assert common.code_version() == first and first
        assert calls == [["git", "rev-parse"], ["git", "status"]]
    finally:
        common.code_version.cache_clear()


def test_hundreds_of_class_names_fit_the_runs_tag():
    """A run tag holds at most 8,000 characters (PostgreSQL stores refuse more): the class list
    is the tag when it fits, else its count and as many names as fit."""
    import json

    from petalflow.tasks.registry import RUN_TAG_CHARS, class_names_tag

    few = ["daisy", "éclair"]
    assert json.loads(class_names_tag(few)) == few
    many = [f"{i:03d}.A_rather_long_species_name_number_{i}" for i in range(400)]
    tag = class_names_tag(many)
    assert len(tag) <= RUN_TAG_CHARS < len(json.dumps(many))
    assert tag.startswith('400 classes (the full list is in the model\'s metadata): ["000.')
    assert tag.endswith("…")


def test_the_command_counts_its_time_from_its_process_start():
    """The start-up phase and predict's first prediction count from when the process started,
    not from when the CLI's main ran (after the interpreter's start and the CLI's imports)."""
    import subprocess
    import sys

    code = ("import time; time.sleep(0.6); from petalflow.tasks.timing import "
            "process_started_at; print(time.time() - process_started_at())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    elapsed = float(out.stdout)
    if sys.platform.startswith("linux"):
        assert 0.6 <= elapsed < 5, elapsed
    else:  # no /proc: counted from the call
        assert elapsed < 0.1


def test_predict_takes_file_urls_for_its_images_and_output(workspace, capsys):
    """A file:/// URL (what a file manager's "copy link" gives) was refused as a URL to
    download, though --data-url and --model take it: read as the path it names, for the
    images and the output; file://in.jpg (a host, no path) is refused saying so."""
    from urllib.parse import quote

    from petalflow.tasks.params import PredictParams
    from tests.helpers import write_image

    folder = workspace / "my photos"
    write_image(folder / "a.jpg", (200, 30, 30), seed=1)
    url = "file://" + quote(str(folder))
    params = PredictParams(input=[url, f"file://localhost{quote(str(folder))}/*.jpg"],
                           output="file://" + quote(str(workspace / "p.csv")))
    assert params.input == [str(folder), str(folder / "*.jpg")]
    assert params.output == str(workspace / "p.csv") and params.format == "csv"
    assert PredictParams(input_folder=url, output="p.csv").input == [str(folder)]  # old name
    # "~/p.csv" typed into the form (no shell expands it) is in the home folder, as images are.
    home = workspace / "home-of-the-user"
    home.mkdir()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HOME", str(home))
        assert PredictParams(input=[url], output="~/p.csv").output == str(home / "p.csv")
    out = workspace / "q.csv"
    assert main(["predict", "--input", "file://a.jpg", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'file://a.jpg' names the host 'a.jpg', not a file" in err and not out.exists()


@pytest.mark.parametrize("name", ["p.csv", "p.csv.gz", "p.parquet", "p.json"])
def test_a_prediction_job_that_fails_midway_leaves_no_file_nor_part(tmp_path, monkeypatch,
                                                                     name):
    """The model fails on the second batch (a worker's memory, a broken file system): neither
    the output nor its .part is left, whatever the format (a gzip stream's file under it
    closed too), and the error is the model's, alone: no "Exception ignored in" of a Parquet
    writer left open on the discarded file follows it on stderr."""
    import gc
    import sys

    from petalflow.tasks import predict

    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)

    class FailsSecondTime:
        calls = 0

        def predict(self, frame):
            FailsSecondTime.calls += 1
            if FailsSecondTime.calls == 2:
                raise RuntimeError("the model's own failure")
            n = len(frame)
            return pd.DataFrame({"label": ["red"] * n, "probability": [0.9] * n,
                                 "error": [""] * n})

    monkeypatch.setattr(predict, "load_model", lambda uri: (FailsSecondTime(), uri))
    files = []
    for i in range(predict.FIRST_BATCH + 3):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(b"x")
    out = tmp_path / name
    fmt = {"p.parquet": "parquet", "p.json": "json"}.get(name, "csv")
    with pytest.raises(RuntimeError, match="the model's own failure"):
        predict.predict_files("models:/m/1", files, out, batch_size=64, fmt=fmt)
    assert FailsSecondTime.calls == 2
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".jpg")) == []
    gc.collect()
    assert [f"{u.exc_type.__name__}: {u.exc_value} in {u.object}" for u in ignored] == []


@pytest.mark.parametrize("name", ["p.csv", "p.csv.gz", "p.parquet"])
def test_an_output_that_cannot_be_created_is_said_before_the_model_loads(tmp_path, monkeypatch,
                                                                         name):
    """--output in a folder where no file can be created (here /proc, refused to everyone,
    root included): the job stops before the model's load, naming the user's file, not the
    .part file Python would name; the CLI says it with what was left (nothing)."""
    from petalflow.flows.cli import explain_failure
    from petalflow.tasks import predict
    from petalflow.tasks.errors import OutputNotWritable

    loads = []
    monkeypatch.setattr(predict, "load_model", lambda uri: loads.append(uri))
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    out = Path("/proc") / name
    fmt = "parquet" if name.endswith(".parquet") else "csv"
    with pytest.raises(OutputNotWritable) as caught:
        predict.predict_files("models:/m/1", [image], out, fmt=fmt)
    assert str(caught.value) == (f"cannot write the predictions file '{out}' (No such file or "
                                 "directory): give a file in a folder you can write to")
    assert loads == [] and not out.with_name(name + ".part").exists()
    failed = explain_failure(caught.value)
    assert (str(failed), failed.hint) == (str(caught.value), "nothing was classified, and no "
                                          "file was left there.")


def test_a_model_that_fails_to_load_leaves_no_file_nor_part(tmp_path, monkeypatch):
    """The output is opened before the model's load: a load that fails (a version deleted
    meanwhile, a broken model) removes it again, and the error is the load's."""
    from petalflow.tasks import predict

    def fails(uri):
        raise RuntimeError("the load's own failure")

    monkeypatch.setattr(predict, "load_model", fails)
    image = tmp_path / "a.jpg"
    image.write_bytes(b"x")
    with pytest.raises(RuntimeError, match="the load's own failure"):
        predict.predict_files("models:/m/1", [image], tmp_path / "p.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg"]


def test_text_outputs_write_probabilities_with_the_digits_float32_has(tmp_path):
    """A CSV's and a JSON file's probabilities read 0.94918954, not float64's
    0.9491895437240601 (digits the model's float32 does not have); the same numbers, as float32;
    Parquet keeps float32."""
    from petalflow.tasks.predict import _Writer

    frame = pd.DataFrame({"label": ["b", ""], "probability": np.float32([0.9491895437240601, 0]),
                          "error": ["", "undecodable image"],
                          "prob_a": np.float32([0.050810456, 0]),
                          "prob_b": np.float32([0.9491895437240601, 0])})
    for fmt in ("csv", "json", "parquet"):
        writer = _Writer(tmp_path / f"p.{fmt}", fmt)
        writer.write(frame)
        writer.close()
    text = (tmp_path / "p.csv").read_text()
    assert text.splitlines()[1] == "b,0.94918954,,0.050810456,0.94918954"
    assert '"probability": 0.94918954' in (tmp_path / "p.json").read_text()
    for read in (pd.read_csv(tmp_path / "p.csv", keep_default_na=False),
                 pd.read_json(tmp_path / "p.json")):
        assert read["prob_b"].astype(np.float32).tolist() == frame["prob_b"].tolist()
    assert pd.read_parquet(tmp_path / "p.parquet")["prob_b"].dtype == np.float32


def test_a_row_in_error_has_no_probabilities_in_any_format(tmp_path):
    """An image that could not be classified had probability 0.0 and a 0.0 in every prob_
    column, a distribution summing to 0 that a mean over the column counted. Its cells are
    now empty: blank in a CSV or TSV (pandas reads NaN), null in JSON, JSON lines and
    Parquet; the other rows are as they were."""
    from petalflow.tasks.predict import _Writer

    frame = pd.DataFrame({"label": ["b", ""], "probability": np.float32([0.75, np.nan]),
                          "error": ["", "undecodable image"],
                          "prob_a": np.float32([0.25, np.nan]),
                          "prob_b": np.float32([0.75, np.nan])})
    for fmt in ("csv", "tsv", "json", "jsonl", "parquet"):
        writer = _Writer(tmp_path / f"p.{fmt}", fmt)
        writer.write(frame)
        writer.close()
    assert (tmp_path / "p.csv").read_text().splitlines()[1:] == [
        "b,0.75,,0.25,0.75", ",,undecodable image,,"]
    assert (tmp_path / "p.tsv").read_text().splitlines()[2] == "\t\tundecodable image\t\t"
    bad = {"label": "", "probability": None, "error": "undecodable image", "prob_a": None,
           "prob_b": None}
    assert json.loads((tmp_path / "p.json").read_text())[1] == bad
    assert json.loads((tmp_path / "p.jsonl").read_text().splitlines()[1]) == bad
    for read in (pd.read_csv(tmp_path / "p.csv", keep_default_na=False, na_values=[""]),
                 pd.read_parquet(tmp_path / "p.parquet")):
        assert read["probability"].mean() == pytest.approx(0.75)
        assert read[["probability", "prob_a", "prob_b"]].iloc[1].isna().all()


def test_top_k_probabilities_are_in_the_models_own_type():
    """The top<i>_probability columns came out float64 beside float32 prob_ columns (as the
    model gives them): a Parquet file's probabilities were of two types. Now the prob_
    columns' type; a row in error gets an empty label and no probability (NaN: an empty cell,
    null; it got 0)."""
    from petalflow.tasks.predict import add_top_k

    frame = pd.DataFrame({"label": ["b", "", "a"], "probability": np.float32([0.7, np.nan, 0.6]),
                          "error": ["", "undecodable image", ""],
                          "prob_a": np.float32([0.1, np.nan, 0.6]),
                          "prob_b": np.float32([0.7, np.nan, 0.3]),
                          "prob_c": np.float32([0.2, np.nan, 0.1])})
    out = add_top_k(frame, 2)
    assert [out[f"top{i}_probability"].dtype for i in (1, 2)] == [np.float32, np.float32]
    assert out["top1_label"].tolist() == ["b", "", "a"]
    assert out["top2_label"].tolist() == ["c", "", "b"]
    for i, best in ((1, [0.7, 0.6]), (2, [0.2, 0.3])):
        probabilities = out[f"top{i}_probability"]
        assert probabilities[[0, 2]].tolist() == np.float32(best).tolist()
        assert np.isnan(probabilities[1])


def test_a_command_ending_while_a_side_thread_is_in_tensorflow_ends_at_once_with_its_status(
        tmp_path):
    """Ctrl-C (or SIGTERM) while `petalflow predict` loads its model on a side thread: as
    Python shut down it unwound that thread inside TensorFlow's C++ code, which aborted the
    process after its last line ("FATAL: exception not rethrown", SIGABRT instead of 130), in
    about one try of eight in that second. Such an end now leaves the process at once, its
    status and output kept; without such a thread the command returns as before."""
    from petalflow.tasks.common import MODEL_PRELOAD_THREAD

    script = (
        "import sys, threading, time\n"
        "from petalflow.flows.cli import end_before_side_threads\n"
        "end_before_side_threads(5)\n"  # no side thread: returns
        "print('returned', flush=True)\n"
        f"threading.Thread(target=time.sleep, args=(600,), name={MODEL_PRELOAD_THREAD!r},\n"
        "                 daemon=True).start()\n"
        "print('last line')\n"  # buffered (a pipe): flushed before the end
        "end_before_side_threads(130)\n"
        "print('not reached')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # not the side thread's 600 s
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["returned", "last line"]


def test_a_pipe_given_as_data_or_images_is_refused_before_anything_starts(workspace,
                                                                           tiny_backbone):
    """`petalflow train --data-url <(curl -s URL)` and `petalflow predict <(curl -s URL)` (a
    shell's process substitution: a pipe named /dev/fd/63), `cat x | petalflow predict
    /dev/stdin`: training failed after its start-up with `FileNotFoundError: [Errno 2] No such
    file or directory: '/proc/N/fd/pipe:[M]'` (exit 1, "run again with --verbose"), predict
    said "no image files found: a folder's images are found by their names". A pipe can be read
    once; the runs read an archive or an image more than once (and a schedule reads the data
    again where it was recorded): refused as such, exit 2, nothing created."""
    import shlex

    from tests.helpers import make_dataset, make_tgz

    exe = shlex.quote(str(Path(sys.executable).with_name("petalflow")))
    archive = make_tgz(make_dataset(workspace / "src", per_class=2), workspace / "p.tgz")
    image = next((workspace / "src").rglob("*.jpg"))
    commands = {
        "train": f"{exe} train --data-url <(cat {archive}) --backbone {tiny_backbone}",
        "predict": f"{exe} predict <(cat {image}) --output p.csv",
        "stdin": f"cat {image} | {exe} predict /dev/stdin --output p.csv",
    }
    for name, command in commands.items():
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                              timeout=120, cwd=workspace)
        assert done.returncode == 2, (name, done.stderr)
        what = "an archive file or a folder" if name == "train" else "an image file"
        assert (f"is a pipe (what a shell's <(command) or `| ... /dev/stdin` gives), not {what}"
                in done.stderr), (name, done.stderr)
        assert "save it to a file first (curl -o " in done.stderr
    assert not (workspace / "home").exists() and not (workspace / "p.csv").exists()
    assert not (workspace / "mlflow").exists()
