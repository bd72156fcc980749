"""Sweeps: the parameter model's candidates, the CLI option, ranking, the shared feature cache."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from petalflow.tasks.params import TrainParams, run_key


def test_sweep_candidates_are_the_run_with_each_candidates_changes(tiny_backbone):
    base = TrainParams(epochs=3, backbone=str(tiny_backbone), image_size=32)
    assert base.candidates() == [base]
    swept = TrainParams(epochs=3, backbone=str(tiny_backbone), image_size=32,
                        sweep=[{"learning_rate": 0.01}, {"augment": True, "epochs": 1}])
    first, second = swept.candidates()
    assert first == TrainParams(epochs=3, backbone=str(tiny_backbone), image_size=32,
                                learning_rate=0.01)
    assert (second.augment, second.epochs, second.learning_rate) == (True, 1, base.learning_rate)
    assert first.sweep == [] and second.sweep == []
    # Each candidate is its own training (own checkpoints); the request has its own key too.
    keys = {run_key(p, "f") for p in (base, swept, first, second)}
    assert len(keys) == 4


def test_a_bad_sweep_candidate_is_refused_naming_it(tiny_backbone):
    with pytest.raises(ValidationError, match=r"sweep\[1\]\.backbone: .*neither a URL nor"):
        TrainParams(sweep=[{"learning_rate": 0.01}, {"backbone": "/no/such/model"}])
    with pytest.raises(ValidationError, match=r"sweep\[0\] changes nothing"):
        TrainParams(sweep=[{}])
    with pytest.raises(ValidationError, match=r"sweep\[1\] repeats"):
        TrainParams(sweep=[{"epochs": 2}, {"epochs": 2}])
    with pytest.raises(ValidationError, match="learning_rate"):
        TrainParams(sweep=[{"learning_rate": -1}])
    with pytest.raises(ValidationError, match="extra"):
        TrainParams(sweep=[{"model_name": "other"}])  # not a training field


def test_an_image_size_the_backbone_refuses_is_blamed_on_who_set_it(tiny_backbone,
                                                                      other_backbone):
    """A sweep candidate's image_size the backbone does not take names that candidate, not
    --image-size (which the user may not have typed at all); the run's own size still names
    --image-size, also when a candidate sets the same size."""
    from petalflow.tasks.errors import BackboneError
    from petalflow.tasks.model import check_image_size, serving_signature
    from petalflow.tasks.params import image_size_set_by

    tiny, other = str(tiny_backbone), str(other_backbone)
    swept = TrainParams(backbone=tiny, image_size=32, sweep=[
        {"image_size": 48}, {"learning_rate": 0.01}, {"image_size": 48, "epochs": 2},
        {"backbone": other, "image_size": 48}, {"backbone": other}])
    def set_by(params: TrainParams) -> dict:
        return image_size_set_by(params, params.candidates())

    assert set_by(swept) == {
        (tiny, 48): ["sweep[0]", "sweep[2]"], (other, 48): ["sweep[3]"],
        (tiny, 32): [],  # the run's own (sweep[1])
        (other, 32): []}  # the run's own (sweep[4])
    # A handle as typed (quoted, its saved_model.pb) is the one the flow fetches.
    pasted = TrainParams(backbone=tiny, image_size=32, sweep=[
        {"backbone": f"'{other}/saved_model.pb'", "image_size": 48}])
    assert set_by(pasted) == {(other, 48): ["sweep[0]"]}
    assert set_by(TrainParams(backbone=tiny, image_size=48)) == {(tiny, 48): []}
    both = TrainParams(backbone=tiny, image_size=48, sweep=[{"image_size": 48, "epochs": 2},
                                                             {"epochs": 3}])
    assert set_by(both) == {(tiny, 48): []}

    signature = serving_signature(tiny_backbone)
    with pytest.raises(BackboneError) as many:
        check_image_size(signature, tiny, 48, ["sweep[0]", "sweep[2]"])
    assert str(many.value) == (
        f"backbone {tiny} takes 32x32 images but sweep[0], sweep[2] set image_size 48; give "
        "them image_size 32 (the Sweep field in the run form), or none to use --image-size")
    with pytest.raises(BackboneError, match=r"but sweep\[3\] sets image_size 48; give it "):
        check_image_size(signature, other, 48, ["sweep[3]"])
    with pytest.raises(BackboneError, match=r"but --image-size is 48; set --image-size 32"):
        check_image_size(signature, tiny, 48, [])
    check_image_size(signature, tiny, 32, ["sweep[0]"])  # a size it takes: nothing to say


def test_cli_takes_the_sweep_as_json():
    from petalflow.flows.cli import UsageError, build_parser, params_from_args

    def parse(*argv):
        return params_from_args(TrainParams, build_parser().parse_args(["train", *argv]))

    params = parse("--sweep", '[{"learning_rate": 0.01}, {"augment": true}]')
    assert [c.changes() for c in params.sweep] == [{"learning_rate": 0.01}, {"augment": True}]
    with pytest.raises(UsageError, match="--sweep: not JSON"):
        parse("--sweep", "learning_rate=0.01")
    with pytest.raises(UsageError, match=r"--sweep\[0\]\.epochs: Input should be greater"):
        parse("--sweep", '[{"epochs": 0}]')


def test_a_sweep_given_as_a_grid_is_every_combination():
    """The form sweep tools take ({"field": [values]}): its candidates, first field slowest,
    validated one by one like a list's; an empty field or more than 16 candidates refused."""
    from petalflow.flows.cli import UsageError, build_parser, params_from_args

    def parse(*argv):
        return params_from_args(TrainParams, build_parser().parse_args(["train", *argv]))

    params = parse("--sweep", '{"learning_rate": [0.01, 0.003], "augment": [true, false], '
                              '"epochs": 3}')
    assert [c.changes() for c in params.sweep] == [
        {"learning_rate": 0.01, "augment": True, "epochs": 3},
        {"learning_rate": 0.01, "augment": False, "epochs": 3},
        {"learning_rate": 0.003, "augment": True, "epochs": 3},
        {"learning_rate": 0.003, "augment": False, "epochs": 3}]
    # What the run records and hands on (MLflow params, events, train-gpu runs) is the list.
    dumped = params.model_dump(mode="json")["sweep"]
    assert dumped[3] == {**dict.fromkeys(dumped[3]), "learning_rate": 0.003, "augment": False,
                         "epochs": 3}
    assert TrainParams.model_validate({"sweep": dumped}).sweep == params.sweep
    assert TrainParams(sweep={}).sweep == []
    with pytest.raises(UsageError, match=r"--sweep: .*the grid makes 3 x 3 x 2 = 18 candidates, "
                                         r"more than 16"):
        parse("--sweep", '{"learning_rate": [0.1, 0.01, 0.001], "epochs": [1, 2, 3], '
                         '"augment": [true, false]}')
    with pytest.raises(UsageError, match="--sweep: .*the grid gives epochs no values"):
        parse("--sweep", '{"learning_rate": [0.1], "epochs": []}')
    with pytest.raises(UsageError, match=r"--sweep\[1\]\.learning_rate: Input should be greater"):
        parse("--sweep", '{"learning_rate": [0.1, -1]}')
    with pytest.raises(UsageError, match=r"sweep\[1\] repeats an earlier candidate"):
        parse("--sweep", '{"epochs": [2, 2]}')


def test_candidates_rank_by_validation_accuracy_and_failures_go_last():
    from petalflow.tasks.sweep import rank_candidates

    def rec(acc, loss):
        return {"history": {"val_accuracy": [0.1, acc], "val_loss": [2.0, loss]}, "epochs": 2,
                "seconds": 1.0}

    rows = rank_candidates([{"learning_rate": 0.1}, {"epochs": 3}, {"augment": True},
                            {"learning_rate": 0.01}],
                           [rec(0.8, 0.5), {"error": "training run x ended Crashed"},
                            rec(0.9, 0.7), rec(0.9, 0.4)], ["a", "b", "c", "d"])
    assert [r["candidate"] for r in rows] == [4, 3, 1, 2]  # tie on accuracy: lower loss first
    assert [r["rank"] for r in rows] == [1, 2, 3, None]
    assert rows[0]["changes"] == "learning_rate=0.01" and rows[0]["mlflow_run_id"] == "d"
    assert rows[-1]["error"] == "training run x ended Crashed"
    with pytest.raises(RuntimeError, match="every sweep candidate failed: candidate 1: boom"):
        rank_candidates([{"epochs": 1}], [{"error": "boom"}], ["a"])


def test_candidates_rank_by_the_trained_models_validation_not_the_last_epochs():
    """With ``average_weights`` the model is the averaged head, whose validation figures
    (``validation``) are not the last epoch's (the last step's head): the ranking and its
    rows take the model's; a record without them (a fine-tuned one's are its last epoch's)
    falls back to the history."""
    from petalflow.tasks.sweep import rank_candidates

    rows = rank_candidates(
        [{"epochs": 3}, {"epochs": 4}],
        [{"history": {"val_accuracy": [0.9], "val_loss": [0.3]},
          "validation": {"val_accuracy": 0.7, "val_loss": 0.6}},
         {"history": {"val_accuracy": [0.8], "val_loss": [0.5]}}], ["a", "b"])
    assert [(r["candidate"], r["val_accuracy"], r["val_loss"]) for r in rows] == [
        (2, 0.8, 0.5), (1, 0.7, 0.6)]


def test_the_same_count_of_correct_images_ties_in_float32_and_float64():
    """10 of 12 validation images right: Keras's float32 metric (a fine-tuned candidate) reads
    0.8333333134651184, a head on cached features 0.8333333333333334. They tie, and the lower
    validation loss ranks first (the fine-tuned one ranked last of four such ties before)."""
    import numpy as np

    from petalflow.tasks.sweep import rank_candidates

    keras_acc = float(np.float32(10) / np.float32(12))
    assert keras_acc < 10 / 12
    rows = rank_candidates(
        [{"augment": True}, {"fine_tune_layers": 10}, {"epochs": 9}],
        [{"history": {"val_accuracy": [10 / 12], "val_loss": [0.42]}},
         {"history": {"val_accuracy": [keras_acc], "val_loss": [0.40]}},
         {"history": {"val_accuracy": [11 / 12], "val_loss": [0.90]}}], ["a", "b", "c"])
    assert [r["candidate"] for r in rows] == [3, 2, 1]


def test_feature_cache_is_keyed_by_what_features_depend_on(tmp_path, tiny_backbone,
                                                          any_size_backbone):
    from petalflow.tasks.train import feature_cache_dir

    base = TrainParams(backbone=str(tiny_backbone), image_size=32)

    def where(params, fingerprint="f", backbone=tiny_backbone):
        return feature_cache_dir(tmp_path, params, fingerprint, str(backbone))

    same = [TrainParams(backbone=str(tiny_backbone), image_size=32, **change) for change in (
        {"learning_rate": 0.1}, {"epochs": 9}, {"augment": True}, {"batch_size": 8},
        {"model_name": "x"}, {"fine_tune_layers": 2})]
    assert {where(p) for p in same} == {where(base)}
    different = [where(base, "g"), where(TrainParams(backbone=str(tiny_backbone),
                                                     image_size=48)),
                 where(TrainParams(backbone=str(any_size_backbone), image_size=32),
                       backbone=any_size_backbone),
                 where(TrainParams(backbone=str(tiny_backbone), image_size=32, seed=1))]
    assert len({where(base), *different}) == 5
    json.dumps(str(where(base)))  # a plain path: it travels in the TrainingJob


def test_features_of_another_image_decoder_are_not_reused(tmp_path, tiny_backbone,
                                                          monkeypatch):
    """Features computed before the decoder changed what it returns (EXIF orientation) are
    not taken for the new decoder's."""
    from petalflow.tasks import images
    from petalflow.tasks.train import feature_cache_dir

    params = TrainParams(backbone=str(tiny_backbone), image_size=32)
    now = feature_cache_dir(tmp_path, params, "f", str(tiny_backbone))
    monkeypatch.setattr(images, "DECODER", "before-exif-orientation")
    assert feature_cache_dir(tmp_path, params, "f", str(tiny_backbone)) != now
