"""Training, freezing, fine-tuning, resuming and the exported serving model (tiny backbone)."""

from __future__ import annotations

import base64
import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from petalflow.tasks.dataset import prepare_dataset
from petalflow.tasks.params import TrainParams
from petalflow.tasks.train import RUN_ENDED, train_model
from tests.helpers import COLOURS, make_dataset, write_image

# What the served model says of a row it could not decode, by what the bytes show (the
# README's words; its error kind, "undecodable image", first).
NOT_AN_IMAGE = ("undecodable image: not an image (its first bytes are those of no format the "
                "model reads: JPEG, PNG, GIF, BMP or WebP)")
CUT_SHORT = ("undecodable image: {} cut short (the file ends before its image data does: a copy "
             "or download that did not finish?)")
ANIMATED_WEBP = ("undecodable image: animated WebP (the model reads still images; TensorFlow "
                 "cannot decode an animated WebP): save one frame as a still WebP, PNG or JPEG "
                 "first")


@pytest.fixture(scope="module")
def data_info(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data")
    root = make_dataset(tmp / "photos", per_class=12)
    return prepare_dataset(root, tmp / "manifest", 0.2, 0.2, seed=0)


def _cfg(backbone, **kw) -> TrainParams:
    base = dict(backbone=str(backbone), image_size=32, epochs=6, batch_size=8,
                learning_rate=0.05, seed=0)
    return TrainParams(**{**base, **kw})


def _variables(saved_model_dir) -> dict:
    """name -> value of a SavedModel's variables."""
    import tensorflow as tf

    return {v.name: v.numpy() for v in tf.saved_model.load(str(saved_model_dir)).variables}


def _backbone_vars_after(workdir, backbone_dir) -> dict:
    """name -> value of the backbone's variables as training left them: its last checkpoint
    restored into a fresh copy of the backbone (the export holds the weights as constants)."""
    import tensorflow as tf

    from petalflow.tasks.model import variables_only, load_backbone

    layer = load_backbone(str(backbone_dir), trainable=True)
    latest = tf.train.latest_checkpoint(str(workdir / "checkpoints"))
    status = tf.train.Checkpoint(backbone=variables_only(layer)).restore(latest).expect_partial()
    status.assert_existing_objects_matched()
    return {v.name: v.numpy() for v in layer.variables}


@pytest.mark.parametrize("augment", [False, True])
def test_backbone_stays_frozen(tmp_path, tiny_backbone, data_info, augment):
    """Without fine-tuning the backbone's weights are its own: the checkpoints leave them out
    (they never change) and the export's features are the unchanged backbone's."""
    import tensorflow as tf

    from petalflow.tasks.dataset import split_files
    from petalflow.tasks.images import decode_image
    from petalflow.tasks.model import load_backbone

    record = train_model(data_info, _cfg(tiny_backbone, augment=augment), tmp_path / "w")
    saved = {name for name, _ in tf.train.list_variables(
        tf.train.latest_checkpoint(str(tmp_path / "w" / "checkpoints")))}
    assert any(name.startswith("head/") for name in saved)
    assert not any(name.startswith("backbone/") for name in saved)
    raw = [Path(p).read_bytes() for p in split_files(data_info, "test")[0]]
    expected = load_backbone(str(tiny_backbone))(
        tf.stack([decode_image(r, 32) for r in raw]), training=False).numpy()
    exported = tf.saved_model.load(record["export_dir"]).signatures["embed_bytes"](
        image_bytes=tf.constant(raw))["features"].numpy()
    np.testing.assert_allclose(exported, expected, atol=1e-4)
    assert record["history"]["loss"][-1] < record["history"]["loss"][0]


def _probabilities(export_dir, data_info, split: str = "test") -> np.ndarray:
    import tensorflow as tf

    from petalflow.tasks.dataset import split_files

    raw = [Path(p).read_bytes() for p in split_files(data_info, split)[0]]
    out = tf.saved_model.load(str(export_dir)).signatures["classify_bytes"](
        image_bytes=tf.constant(raw))
    return np.stack([out[f"prob_{c}"].numpy() for c in data_info["classes"]], axis=1)


def test_later_trainings_take_the_frozen_backbone_instead_of_loading_it(
        tmp_path, tiny_backbone, data_info, monkeypatch):
    """The first training with a backbone saves it frozen beside the feature caches; the next
    ones (other parameters, other data) take that copy and never load the SavedModel, and
    their model is the one a training that loaded it makes. Fine-tuning loads it (it trains
    it); a damaged copy is replaced. The first one, and the one replacing the damaged copy,
    freeze it from its serving signature, not loading it as a TF Hub layer either."""
    import petalflow.tasks.model as model

    loads, from_signature = [], []
    load_backbone, real_from_signature = model.load_backbone, model.frozen_from_signature

    def counted(*args, **kwargs):
        loads.append(args)
        return load_backbone(*args, **kwargs)

    def counted_signature(*args, **kwargs):
        from_signature.append(args)
        return real_from_signature(*args, **kwargs)

    monkeypatch.setattr(model, "load_backbone", counted)
    monkeypatch.setattr(model, "frozen_from_signature", counted_signature)
    first = train_model(data_info, _cfg(tiny_backbone), tmp_path / "w1")
    assert first["features"]["frozen_backbone"] is None
    assert loads == [] and len(from_signature) == 1
    saved = list((tmp_path / "frozen-backbones").iterdir())
    assert len(saved) == 1 and {f.name for f in saved[0].iterdir()} == {
        model.FROZEN_GRAPH, model.FROZEN_SIGNATURE}

    again = train_model(data_info, _cfg(tiny_backbone), tmp_path / "w2")
    assert loads == [] and again["features"]["frozen_backbone"] == str(saved[0])
    assert len(from_signature) == 1
    np.testing.assert_array_equal(_probabilities(again["export_dir"], data_info),
                                  _probabilities(first["export_dir"], data_info))
    other = train_model(data_info, _cfg(tiny_backbone, epochs=3, learning_rate=0.02),
                        tmp_path / "w3")
    assert loads == [] and other["features"]["frozen_backbone"] == str(saved[0])

    tuned = train_model(data_info, _cfg(tiny_backbone, epochs=1, fine_tune_layers=1,
                                        fine_tune_epochs=1), tmp_path / "w4")
    assert len(loads) == 1 and tuned["features"]["frozen_backbone"] is None

    (saved[0] / model.FROZEN_GRAPH).write_bytes(b"not a graph")
    repaired = train_model(data_info, _cfg(tiny_backbone, epochs=2), tmp_path / "w5")
    assert len(loads) == 1 and len(from_signature) == 2
    assert repaired["features"]["frozen_backbone"] is None
    assert model.load_frozen(saved[0]) is not None  # written again


def test_a_plain_backbone_is_frozen_from_its_serving_signature(tiny_backbone, any_size_backbone):
    """A feature-vector SavedModel's serving signature, read as a graph with only the
    functions it calls and its variables made constants, computes what its TF Hub layer
    frozen computes (MobileNetV2 0.35: 0.9 s instead of ~2.7 s, 633 functions restored of
    which the signature calls 2), in inference mode (the tiny backbone's BatchNorm statistics
    are not 0 and 1), with a known feature width; also for a backbone of any input size."""
    import tensorflow as tf

    from petalflow.tasks.model import frozen_backbone, frozen_from_signature, load_backbone

    images = tf.constant(np.random.default_rng(0).random((5, 32, 32, 3)), tf.float32)
    for backbone in (tiny_backbone, any_size_backbone):
        fast = frozen_from_signature(backbone, 32)
        assert fast is not None and fast.outputs[0].shape.as_list() == [None, 16]
        assert fast.inputs[0].shape.as_list() == [None, 32, 32, 3]
        layer = load_backbone(str(backbone))
        want = layer(images, training=False).numpy()
        np.testing.assert_allclose(fast(images)[0].numpy(), want, atol=1e-5)
        np.testing.assert_allclose(fast(images)[0].numpy(),
                                   frozen_backbone(layer, 32)(images)[0].numpy(), atol=1e-5)
        training_mode = tf.saved_model.load(str(backbone))(images, training=True).numpy()
        assert np.abs(training_mode - want).max() > 1e-3


def test_freezing_from_the_signature_logs_no_tensorflow_warning(tiny_backbone, monkeypatch):
    """Every first training's log showed "WARNING | tensorflow - ... extract_sub_graph (from
    tensorflow.python.framework.graph_util_impl) is deprecated": TensorFlow's own helper
    calling a deprecated one, nothing the user can act on."""
    import logging

    from tensorflow.python.util import deprecation

    from petalflow.tasks.model import frozen_from_signature

    monkeypatch.setattr(deprecation, "_PRINTED_WARNING", {})  # as in a fresh process
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logging.getLogger("tensorflow").addHandler(handler)
    try:
        assert frozen_from_signature(tiny_backbone, 32) is not None
    finally:
        logging.getLogger("tensorflow").removeHandler(handler)
    assert [r.getMessage() for r in records] == []


def test_a_backbone_without_a_plain_serving_signature_is_loaded_as_a_tf_hub_layer(
        tmp_path, tiny_backbone, data_info, caplog):
    """A SavedModel whose serving signature is not images -> features (here: two outputs)
    or that has none is not frozen from it: the training loads it as a TF Hub layer, as
    before, and its model computes the same as one from the plain backbone."""
    import tensorflow as tf

    from petalflow.tasks.model import frozen_from_signature

    model = tf.saved_model.load(str(tiny_backbone))
    spec = tf.TensorSpec([None, 32, 32, 3], tf.float32)
    both = tf.function(lambda x: {"features": model(x, training=False),
                                  "mean": tf.reduce_mean(x, axis=[1, 2])}, input_signature=[spec])
    two_outputs = tmp_path / "two_outputs"
    tf.saved_model.save(model, str(two_outputs), signatures={"serving_default": both})
    unnamed = tmp_path / "other_signature"
    tf.saved_model.save(model, str(unnamed), signatures={"features": both})
    assert frozen_from_signature(two_outputs, 32) is None
    assert frozen_from_signature(unnamed, 32) is None
    assert frozen_from_signature(tiny_backbone, 64) is None  # it declares 32 x 32 images

    with caplog.at_level("INFO"):
        plain = train_model(data_info, _cfg(tiny_backbone, edge_export=False), tmp_path / "a")
    assert "backbone: frozen from its serving signature" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        loaded = train_model(data_info, _cfg(two_outputs, edge_export=False), tmp_path / "b")
    assert "training on" in caplog.text  # (its log is captured)
    assert "frozen from its serving signature" not in caplog.text
    np.testing.assert_allclose(_probabilities(loaded["export_dir"], data_info),
                               _probabilities(plain["export_dir"], data_info), atol=1e-4)


def test_a_frozen_copy_that_cannot_be_saved_costs_a_warning_not_the_training(
        tmp_path, tiny_backbone, data_info, monkeypatch, caplog):
    """A full or read-only disk where the frozen backbone would go: the training completes
    (its model exported), says why in the log, and the next one loads the backbone again."""
    import errno
    import logging

    import petalflow.tasks.model as model

    def no_space(fn, folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(model, "save_frozen", no_space)
    with caplog.at_level(logging.WARNING, logger="petalflow"):
        record = train_model(data_info, _cfg(tiny_backbone, epochs=1, edge_export=False),
                             tmp_path / "w")
    assert Path(record["export_dir"], "saved_model.pb").is_file()
    assert "the frozen backbone was not saved" in caplog.text
    assert "No space left on device" in caplog.text
    assert not (tmp_path / "frozen-backbones").exists()


def test_fine_tuning_changes_only_the_top_layers(tmp_path, tiny_backbone, data_info):
    before = _variables(tiny_backbone)
    cfg = _cfg(tiny_backbone, epochs=2, fine_tune_layers=1, fine_tune_epochs=2,
               fine_tune_learning_rate=0.05)
    record = train_model(data_info, cfg, tmp_path / "w")
    assert record["fine_tuned_layers"] == ["top_dense"]
    after = _backbone_vars_after(tmp_path / "w", tiny_backbone)
    assert set(after) == set(before)
    changed = {n for n in before if not np.allclose(before[n], after[n])}
    assert changed and all(n.startswith("top_dense/") for n in changed)
    # BatchNorm statistics stay put: BN runs in inference mode during fine-tuning.
    for name in before:
        if "moving_" in name:
            np.testing.assert_allclose(after[name], before[name], err_msg=name)
    # Its drift reference describes the fine-tuned backbone's features, as the served model
    # computes them (not the features cached before fine-tuning).
    import json

    from petalflow.tasks.serving import DRIFT_REFERENCE, ImageClassifier
    from petalflow.tasks.dataset import split_files

    export = tmp_path / "w" / "export"
    reference = json.loads((export / DRIFT_REFERENCE).read_text())
    paths, _ = split_files(data_info, "train")
    features, ok = ImageClassifier(str(export)).features([Path(p).read_bytes() for p in paths])
    assert ok.all() and reference["images"] == len(paths)
    np.testing.assert_allclose(reference["features"]["mean"], features.mean(axis=0), atol=1e-4)


def test_more_fine_tune_layers_than_the_backbone_has_tunes_all_and_says_so(
        tmp_path, tiny_backbone, data_info, caplog):
    import logging

    cfg = _cfg(tiny_backbone, epochs=1, fine_tune_layers=1000, fine_tune_epochs=1)
    with caplog.at_level(logging.WARNING, logger="petalflow"):
        record = train_model(data_info, cfg, tmp_path / "w")
    layers = record["fine_tuned_layers"]
    assert len(layers) >= 2 and layers[-1] == "top_dense"
    assert (f"fine_tune_layers is 1000, and the backbone has {len(layers)} layers with "
            f"weights: all {len(layers)} are fine-tuned") in caplog.text


def test_the_backbone_is_freed_before_the_export(tmp_path, tiny_backbone, data_info,
                                                 monkeypatch):
    """Once every feature is computed by the TFLite engine, the loaded backbone is garbage
    before the head's epochs (with many images the step's peak can be there: the features
    held for fitting); the feature engine too before the serving export runs (they would
    otherwise add their memory to the export's peak); the export and the record are unchanged.
    (The frozen-backbone training; with fine-tuning, Keras's model of backbone and head can
    keep it: ARCHITECTURE.md.)"""
    import gc
    import weakref

    import petalflow.tasks.edge as edge
    import petalflow.tasks.model as model

    loaded, alive_at_export = [], []
    real_load, real_export = model.load_backbone, model.export_serving_model

    def load(*args, **kwargs):
        layer = real_load(*args, **kwargs)
        loaded.append(weakref.ref(layer))
        return layer

    def export(*args, **kwargs):
        gc.collect()
        alive_at_export.append([ref() is not None for ref in loaded])
        return real_export(*args, **kwargs)

    alive_at_epoch, alive_at_conversion = [], []

    def epoch_end(epoch, total, metrics):
        gc.collect()
        alive_at_epoch.append([ref() is not None for ref in loaded])

    real_converter = edge.tflite_converter

    def converter(*args, **kwargs):
        gc.collect()
        alive_at_conversion.append([ref() is not None for ref in loaded])
        return real_converter(*args, **kwargs)

    monkeypatch.setattr(model, "load_backbone", load)
    monkeypatch.setattr(model, "export_serving_model", export)
    monkeypatch.setattr(edge, "tflite_converter", converter)
    # A backbone that is not frozen from its serving signature is loaded as a TF Hub layer.
    monkeypatch.setattr(model, "frozen_from_signature", lambda *args: None)
    record = train_model(data_info, _cfg(tiny_backbone, epochs=1, edge_export=False),
                         tmp_path / "w", on_epoch_end=epoch_end,
                         features_dir=tmp_path / "features")
    # Let go of once frozen: before the conversion, the features pass's peak.
    assert alive_at_conversion == [[False]]
    assert alive_at_epoch == [[False]]
    assert alive_at_export == [[False]]
    assert record["features"]["engine"] == "tflite"
    assert (tmp_path / "w" / "export" / "saved_model.pb").is_file()


def test_a_training_on_grown_data_computes_only_the_new_images_features(tmp_path,
                                                                        tiny_backbone):
    """Scheduled retraining on data that grew: the dataset's fingerprint changed, so its
    feature caches were new and every image went through the backbone again (at 8x the
    flowers, ~40 s of a ~50 s run). Features are also kept by image content: a training on
    the grown data computes the new images' only, and gets the same features as from scratch."""
    import shutil

    from petalflow.tasks.dataset import split_shas
    from petalflow.tasks.train import FEATURE_BANKS, feature_bank_dir, feature_cache_dir

    cfg = _cfg(tiny_backbone, epochs=1, edge_export=False)
    first = make_dataset(tmp_path / "first", per_class=10)
    grown = tmp_path / "grown"
    shutil.copytree(first, grown)
    for c, name in enumerate(sorted(COLOURS)):
        for i in range(3):
            write_image(grown / name / f"new{i}.jpg", COLOURS[name], seed=5000 + 10 * c + i)
    info_first = prepare_dataset(first, tmp_path / "m1", 0.2, 0.2, seed=0)
    info_grown = prepare_dataset(grown, tmp_path / "m2", 0.2, 0.2, seed=0)

    def features_of(info, root):
        return feature_cache_dir(root, cfg, info["fingerprint"], str(tiny_backbone))

    def fitted(info):  # the images whose features a training computes: train and val
        return split_shas(info, "train") + split_shas(info, "val")

    record = train_model(info_first, cfg, tmp_path / "a",
                         features_dir=features_of(info_first, tmp_path / "features"))
    assert (record["features"]["from_earlier"], record["features"]["computed"]) == (
        0, len(fitted(info_first)))
    # The grown data's train and val: the first data's images (wherever the new split put
    # them) come from the bank, unless they were the first training's test photos.
    seen = set(fitted(info_first))
    old = sum(sha in seen for sha in fitted(info_grown))
    assert 0 < len(fitted(info_grown)) - old < old
    record = train_model(info_grown, cfg, tmp_path / "b",
                         features_dir=features_of(info_grown, tmp_path / "features"))
    assert record["features"]["reused"] == []  # new caches: the data changed
    assert (record["features"]["from_earlier"], record["features"]["computed"]) == (
        old, len(fitted(info_grown)) - old)
    # A damaged segment (a disk that filled up) costs its features, not the training.
    bank = feature_bank_dir(tmp_path / "scratch" / FEATURE_BANKS, cfg, None)  # as trained
    bank.mkdir(parents=True)
    (bank / "damaged.npz").write_bytes(b"PK\x03\x04")
    scratch = train_model(info_grown, cfg, tmp_path / "c",
                          features_dir=features_of(info_grown, tmp_path / "scratch"))
    assert (scratch["features"]["from_earlier"], scratch["features"]["computed"]) == (
        0, len(fitted(info_grown)))
    for split in ("val", "train"):
        with np.load(Path(record["features"]["dir"]) / f"{split}.npz") as got, \
                np.load(Path(scratch["features"]["dir"]) / f"{split}.npz") as want:
            assert list(got["paths"]) == list(want["paths"])
            np.testing.assert_allclose(got["features"], want["features"], atol=1e-5)


def test_the_backbone_is_frozen_once_unless_fine_tuning_changed_it(tmp_path, tiny_backbone,
                                                                   data_info, monkeypatch):
    """The export's network reuses the backbone the TFLite feature engine froze (freezing
    MobileNetV2 0.35 takes ~1 s): one freeze per training, none when an earlier training's
    frozen copy is there. When every feature came from the cache and there is no frozen copy,
    the export freezes it; after fine-tuning it freezes the changed backbone again."""
    import shutil

    import petalflow.tasks.model as model

    frozen = []  # freezes of the backbone: as a TF Hub layer, or from its serving signature
    real, real_from_signature = model.frozen_backbone, model.frozen_from_signature

    def counted(*args, **kwargs):
        frozen.append(1)
        return real(*args, **kwargs)

    def counted_signature(*args, **kwargs):
        frozen.append(1)
        return real_from_signature(*args, **kwargs)

    monkeypatch.setattr(model, "frozen_backbone", counted)
    monkeypatch.setattr(model, "frozen_from_signature", counted_signature)
    features = tmp_path / "features"
    record = train_model(data_info, _cfg(tiny_backbone, epochs=1, edge_export=False),
                         tmp_path / "a", features_dir=features)
    assert record["features"]["engine"] == "tflite" and len(frozen) == 1
    record = train_model(data_info, _cfg(tiny_backbone, epochs=1, edge_export=False,
                                         learning_rate=0.01), tmp_path / "b",
                         features_dir=features)
    assert record["features"]["reused"] == ["val", "train"] and len(frozen) == 1
    shutil.rmtree(tmp_path / "frozen-backbones")
    record = train_model(data_info, _cfg(tiny_backbone, epochs=1, edge_export=False,
                                         learning_rate=0.02), tmp_path / "b2",
                         features_dir=features)
    assert record["features"]["reused"] == ["val", "train"] and len(frozen) == 2
    tuned = _cfg(tiny_backbone, epochs=1, fine_tune_layers=1, fine_tune_epochs=1,
                 fine_tune_learning_rate=0.05, edge_export=False)
    # (its features computed afresh: no feature bank of the runs above beside them)
    train_model(data_info, tuned, tmp_path / "c", features_dir=tmp_path / "ft" / "features")
    assert len(frozen) == 4


class Interrupt(Exception):
    pass


def test_interrupted_training_resumes_from_last_checkpoint(tmp_path, tiny_backbone, data_info):
    cfg = _cfg(tiny_backbone, epochs=5)
    workdir = tmp_path / "w"
    seen = []

    def crash_after_two(epoch, total, metrics):
        seen.append(epoch)
        if epoch == 2:
            raise Interrupt("simulated kill")

    with pytest.raises(Interrupt):
        train_model(data_info, cfg, workdir, on_epoch_end=crash_after_two)
    assert not (workdir / "export").exists()
    # A checkpoint being written when the process died: files without an index entry.
    (workdir / "checkpoints" / "ckpt-3.index").write_bytes(b"half")
    (workdir / "checkpoints" / "ckpt-3.data-00000-of-00001").write_bytes(b"garbage")

    resumed = []
    record = train_model(data_info, cfg, workdir, on_epoch_end=lambda e, t, m: resumed.append(e))
    assert record["resumed_from_epoch"] == 2
    assert resumed == [3, 4, 5]
    assert len(record["history"]["loss"]) == 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone, data_info):
    return train_model(data_info, _cfg(tiny_backbone), tmp_path_factory.mktemp("w"))


@pytest.fixture(scope="module")
def exported(trained):
    return trained["export_dir"]


def test_export_computes_what_the_trained_keras_model_computes(trained, tiny_backbone,
                                                              data_info):
    """The export holds the network frozen (weights as constants, no variables): its
    probabilities and features are the backbone's (frozen: its own weights) + the trained
    head's, restored from the run's last checkpoint, on the same decoded test images."""
    from pathlib import Path

    import tensorflow as tf

    from petalflow.tasks.dataset import split_files
    from petalflow.tasks.images import decode_image
    from petalflow.tasks.model import build_head, load_backbone

    backbone = load_backbone(str(tiny_backbone))
    head = build_head(int(backbone(tf.zeros([1, 32, 32, 3])).shape[-1]),
                      len(data_info["classes"]))
    workdir = Path(trained["export_dir"]).parent
    # A head still learning at its last step keeps that step's weights (average_weights; the
    # averaged head's export: test_the_trained_models_validation_is_recorded_…).
    assert not trained["weight_average"]["used"]
    status = tf.train.Checkpoint(head=head).restore(
        tf.train.latest_checkpoint(str(workdir / "checkpoints"))).expect_partial()
    status.assert_existing_objects_matched()
    paths, _ = split_files(data_info, "test")
    raw = [Path(p).read_bytes() for p in paths]
    images = tf.stack([decode_image(r, 32) for r in raw])
    features = backbone(images, training=False).numpy()
    probs = head(features, training=False).numpy()

    stored = {name for name, _ in tf.train.list_variables(
        str(Path(trained["export_dir"]) / "variables" / "variables"))}
    assert stored == {"_CHECKPOINTABLE_OBJECT_GRAPH", "class_names/.ATTRIBUTES/VARIABLE_VALUE"}
    loaded = tf.saved_model.load(trained["export_dir"])
    out = loaded.signatures["classify_bytes"](image_bytes=tf.constant(raw))
    got = np.stack([out[f"prob_{c}"].numpy() for c in data_info["classes"]], axis=1)
    np.testing.assert_allclose(got, probs, atol=1e-5)
    embedded = loaded.signatures["embed_bytes"](image_bytes=tf.constant(raw))
    np.testing.assert_allclose(embedded["features"].numpy(), features, atol=1e-4)


def test_edge_models_run_in_the_stock_interpreter_and_agree_with_the_savedmodel(
        trained, data_info):
    """Both TFLite models, run with tf.lite.Interpreter on the test images as their contract
    (edge.json) says and the README shows (PIL's upright image, TensorFlow's resize), give the
    SavedModel's labels; labels.txt is in class order."""
    import json
    from pathlib import Path

    import tensorflow as tf

    from petalflow.tasks.dataset import split_files
    from petalflow.tasks.evaluate import evaluate_edge_models
    from petalflow.tasks.serving import ImageClassifier

    edge = Path(trained["edge_dir"])
    contract = json.loads((edge / "edge.json").read_text())
    assert (edge / "labels.txt").read_text().split("\n")[:-1] == data_info["classes"]
    assert contract["input"]["shape"] == [1, 32, 32, 3]
    paths, y = split_files(data_info, "test")
    saved = ImageClassifier(trained["export_dir"]).predict(
        pd.DataFrame({"image": [_b64(Path(p).read_bytes()) for p in paths]}))
    labels = contract["labels"]
    for fmt in ("float16", "int8"):
        interpreter = tf.lite.Interpreter(model_path=str(edge / f"model_{fmt}.tflite"))
        interpreter.allocate_tensors()
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        assert list(inp["shape"]) == contract["input"]["shape"] and inp["dtype"] == np.float32
        predicted = []
        for path in paths:
            photo = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
            image = tf.image.resize(np.asarray(photo), (32, 32)) / 255
            interpreter.set_tensor(inp["index"], image.numpy()[None])
            interpreter.invoke()
            predicted.append(labels[int(np.argmax(interpreter.get_tensor(out["index"])))])
        assert predicted == list(saved["label"]), fmt
    figures = evaluate_edge_models(edge, Path(trained["export_dir"]), data_info, 32)
    truth = [data_info["classes"][i] for i in y]
    for fmt in ("float16", "int8"):
        result = figures["models"][fmt]
        expected = np.mean([p == t for p, t in zip(list(saved["label"]), truth)])
        assert result["test_accuracy"] == pytest.approx(expected)
        assert result["size_bytes"] == (edge / f"model_{fmt}.tflite").stat().st_size
        assert result["latency_ms"] > 0
    assert figures["models"]["int8"]["size_bytes"] < figures["models"]["float16"]["size_bytes"]


def test_readme_edge_snippet_names_classes_whose_names_hold_spaces(trained, data_info, tmp_path,
                                                                  capsys, monkeypatch):
    """The README's Python for an edge model, run as written (with TensorFlow's interpreter,
    which its comment offers; test_flow_e2e runs it with ai-edge-litert), on a pulled model
    whose classes hold spaces and accents (Fruits-360's "Apple Braeburn"): it prints the whole
    name of the SavedModel's label for the photo."""
    import re
    import shutil
    import sys
    from pathlib import Path

    from petalflow.tasks.edge import write_labels
    from petalflow.tasks.serving import ImageClassifier

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Edge models (TensorFlow Lite)", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    litert = "from ai_edge_litert.interpreter import Interpreter"
    assert litert in snippet
    snippet = snippet.replace(litert, "import tensorflow as tf; Interpreter = tf.lite.Interpreter")
    names = ["deep blue", "gr\u00fcn green", "red"]  # the tiny model's classes, renamed
    edge = tmp_path / "edge-model"
    shutil.copytree(trained["edge_dir"], edge)
    write_labels(edge, names)
    photo = write_image(tmp_path / "photo.jpg", COLOURS["green"], seed=77)
    saved = ImageClassifier(trained["export_dir"]).predict_bytes([photo.read_bytes()])
    assert len(data_info["classes"]) == len(names)
    expected = names[data_info["classes"].index(saved["label"][0])]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the snippet puts edge-model/ first
    monkeypatch.delitem(sys.modules, "edge_input", raising=False)
    capsys.readouterr()
    exec(compile(snippet, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == expected
    assert sys.modules["edge_input"].__file__ == str(edge / "edge_input.py")
    monkeypatch.delitem(sys.modules, "edge_input")


def test_the_served_model_loads_and_predicts_in_a_process_that_never_imports_keras(
        trained, tmp_path):
    """The model's loader (``petalflow predict``'s too) imports TensorFlow without the Keras
    TensorFlow imports for its own sake: 0.55 s before predict's first prediction with tf-keras;
    1.7 s and 165 MiB with Keras 3, the Keras of an environment built from the model's
    requirements. In a fresh process, with either Keras, the loader hook gives this process's
    label and no Keras module is imported until asked for; then Keras imports as usual; a Keras
    model saved with its optimizer loads where Keras was never imported."""
    import json
    import os
    import subprocess
    import sys

    from petalflow.tasks.serving import ImageClassifier

    photo = write_image(tmp_path / "photo.jpg", COLOURS["red"], seed=78)
    expected = ImageClassifier(trained["export_dir"]).predict_bytes([photo.read_bytes()])
    keras_saved = tmp_path / "keras-with-optimizer"
    script = f"""
import json, os, sys
import numpy as np
from petalflow.tasks.serving import _load_pyfunc
model = _load_pyfunc({trained["export_dir"]!r})  # what MLflow calls
label = model.predict_bytes([open({str(photo)!r}, "rb").read()])["label"][0]
before = sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "tf_keras"))
import tensorflow as tf
keras = tf.keras  # tf-keras or Keras 3, as TF_USE_LEGACY_KERAS says
m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
m.compile(optimizer="adam", loss="mse")
m.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)
if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
    tf.saved_model.save(m, {str(keras_saved)!r})
print(json.dumps({{"label": label, "keras_before": before,
                  "optimizer": type(m.optimizer).__name__, "keras": keras.__name__}}))
"""
    base = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    for legacy, keras_name in (("1", "tf_keras"), (None, "keras")):
        env = {**base, "TF_CPP_MIN_LOG_LEVEL": "2", **({"TF_USE_LEGACY_KERAS": legacy}
                                                       if legacy else {})}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["label"] == expected["label"][0]
        assert got["keras_before"] == [], legacy
        assert got["optimizer"] == "Adam" and got["keras"].startswith(keras_name), got
    # A SavedModel holding Keras objects (an optimizer) loads where Keras was never imported.
    reload = f"""
import sys
from petalflow.tasks.serving import import_tensorflow_without_keras
tf = import_tensorflow_without_keras()
loaded = tf.saved_model.load({str(keras_saved)!r})
out = loaded.signatures["serving_default"](tf.ones([1, 3]))
print(list(out.values())[0].shape, any(m.split(".")[0] in ("keras", "tf_keras")
                                        for m in sys.modules))
"""
    env = {**base, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", reload], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "(1, 2) False"


def test_augmentation_trains_on_cached_augmented_copies_of_the_features(tmp_path, tiny_backbone,
                                                                         data_info):
    """--augment with a frozen backbone: an augmented copy of the training split's features is
    computed once, cached beside the plain ones, and reused by the next run."""
    from petalflow.tasks.train import AUGMENTED_VIEWS, augmented_view_file

    cache = tmp_path / "features"
    cfg = _cfg(tiny_backbone, epochs=2, augment=True, edge_export=False)
    first = train_model(data_info, cfg, tmp_path / "a", features_dir=cache)
    assert AUGMENTED_VIEWS == 1
    names = [augmented_view_file(cfg.seed, 0)]
    assert augmented_view_file(cfg.seed, 1) != names[0]  # a second copy would be its own file
    plain = np.load(cache / "train.npz")
    copy = np.load(cache / names[0])
    assert list(copy["paths"]) == list(plain["paths"])  # row i is the same photo
    np.testing.assert_array_equal(copy["labels"], plain["labels"])
    assert not np.allclose(copy["features"], plain["features"])  # but augmented
    assert sorted(cache.glob("train-augmented-*.npz")) == [cache / names[0]]
    assert first["features"]["reused"] == []

    again = train_model(data_info, cfg, tmp_path / "b", features_dir=cache)
    assert sorted(again["features"]["reused"]) == sorted(
        ["val", "train", *(n.removesuffix(".npz") for n in names)])
    plain_only = train_model(data_info, _cfg(tiny_backbone, epochs=2, edge_export=False),
                             tmp_path / "c", features_dir=cache)
    assert sorted(plain_only["features"]["reused"]) == ["train", "val"]


def test_augmented_images_follow_from_the_seed_and_the_batch_alone(data_info):
    """The augmented pass tf.data runs with parallel calls equals augmenting each batch in order,
    one at a time, and comes out the same every time: the same data, seed and settings train
    the same model (stateful random ops gave each batch whichever draws came next)."""
    from petalflow.tasks.dataset import split_files
    from petalflow.tasks.inputs import augment_batch, image_dataset

    paths, labels = split_files(data_info, "train")
    plain = [b for b in image_dataset(paths, None, 32, 4)]
    assert len(plain) >= 4
    reference = np.concatenate([augment_batch(b, 7, i).numpy() for i, b in enumerate(plain)])
    for _ in range(2):
        got = np.concatenate([b.numpy() for b in image_dataset(paths, None, 32, 4, augment=True,
                                                                seed=7)])
        np.testing.assert_array_equal(got, reference)
    assert not np.allclose(reference, np.concatenate([b.numpy() for b in plain]))
    other = np.concatenate([augment_batch(b, 8, i).numpy() for i, b in enumerate(plain)])
    assert not np.allclose(reference, other)  # another seed, other draws
    with_labels = list(image_dataset(paths, labels, 32, 4, augment=True, seed=7))
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in with_labels]), reference)
    np.testing.assert_array_equal(np.concatenate([y.numpy() for _, y in with_labels]), labels)


def test_the_input_pipelines_run_without_tf_data_autotuning(data_info, monkeypatch):
    """Every pipeline petalflow iterates runs with tf.data's autotuning off: the images of the
    features, the training and the edge evaluation, the scan's decoding check, the drift
    statistics. With it on, the end of a pass often sat idle for about a second
    (``common.without_autotuning``)."""
    import tensorflow as tf

    from petalflow.tasks import dataset
    from petalflow.tasks.dataset import split_files
    from petalflow.tasks.inputs import image_dataset
    from petalflow.tasks.serving import file_statistics

    paths, labels = split_files(data_info, "train")
    for ds in (image_dataset(paths, None, 32, 4),
               image_dataset(paths, labels, 32, 4, shuffle=True, augment=True)):
        assert ds.options().autotune.enabled is False
    iterated = []
    real_iter = tf.data.Dataset.__iter__

    def spy(self):
        iterated.append(self.options().autotune.enabled)
        return real_iter(self)

    monkeypatch.setattr(tf.data.Dataset, "__iter__", spy)
    assert dataset.check_decodable(paths[:3]) == [None] * 3
    assert file_statistics(paths[:3]).shape[0] == 3
    assert iterated == [False, False]


def test_edge_export_can_be_turned_off(tmp_path, tiny_backbone, data_info):
    record = train_model(data_info, _cfg(tiny_backbone, epochs=1, edge_export=False), tmp_path)
    assert record["edge_dir"] is None and not (tmp_path / "edge").exists()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _image(fmt, rgb=(220, 40, 40), mode="RGB", size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, rgb)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(buf, fmt)
    return buf.getvalue()


def test_exported_model_classifies_bytes_and_reports_bad_rows(exported):
    from petalflow.tasks.serving import ERROR_NOT_BASE64, ImageClassifier

    model = ImageClassifier(exported)
    assert model.class_names == sorted(COLOURS)
    images = {
        "red jpeg": _image("JPEG", COLOURS["red"]),
        "green png rgba": _image("PNG", COLOURS["green"], mode="RGBA"),
        "blue gif": _image("GIF", COLOURS["blue"]),
        "blue bmp": _image("BMP", COLOURS["blue"], size=(500, 300)),
        "green webp": _image("WEBP", COLOURS["green"]),
        "garbage": b"this is not an image",
        "red png gray": _image("PNG", COLOURS["red"], mode="L"),
    }
    frame = model.predict(pd.DataFrame({"image": [_b64(v) for v in images.values()]}))
    assert list(frame.columns) == ["label", "probability", "error", "prob_blue", "prob_green",
                                   "prob_red"]
    got = dict(zip(images, frame.to_dict("records")))
    assert got["red jpeg"]["label"] == "red" and got["red jpeg"]["error"] == ""
    assert got["green png rgba"]["label"] == "green"
    assert got["blue gif"]["label"] == "blue"
    assert got["blue bmp"]["label"] == "blue"
    assert got["green webp"]["label"] == "green"
    assert got["garbage"]["label"] == "" and got["garbage"]["error"] == NOT_AN_IMAGE
    assert got["red png gray"]["error"] == ""  # grayscale converted, classified
    ok = frame[frame["error"] == ""]
    np.testing.assert_allclose(ok[["prob_blue", "prob_green", "prob_red"]].sum(axis=1), 1.0,
                               rtol=1e-5)
    np.testing.assert_allclose(ok["probability"],
                               ok[["prob_blue", "prob_green", "prob_red"]].max(axis=1))
    # Raw bytes and base64 go through the same graph.
    raw = model.predict_bytes([images["red jpeg"], b"", images["blue gif"]])
    assert raw["label"].tolist() == ["red", "", "blue"]
    # A batch of nothing but bad rows still answers, row by row.
    bad = model.predict(pd.DataFrame({"image": ["@@not base64@@", _b64(b"nope")]}))
    assert bad["error"].tolist() == [ERROR_NOT_BASE64, NOT_AN_IMAGE]
    # TensorFlow Serving's {"b64": ...}: as a dict, its repr (what MLflow's server hands
    # over) or its JSON.
    wrapped = model.predict(pd.DataFrame({"image": [
        {"b64": _b64(images["red jpeg"])}, str({"b64": _b64(images["blue gif"])}),
        json.dumps({"b64": _b64(images["green webp"])}), str({"b64": "@@"})]}))
    assert wrapped["label"].tolist() == ["red", "blue", "green", ""]
    assert wrapped["error"].tolist()[3] == ERROR_NOT_BASE64


def test_an_image_too_large_to_decode_safely_is_refused_from_its_header(exported):
    """A 9,000 x 8,000 PNG (72 MP, 0.1 MB of file, 216 MB decoded; a 20,000 x 20,000 one of
    0.3 MB decodes to 1.2 GB, and over ~700 MP TensorFlow calls it undecodable) is refused
    with its size, by base64 and bytes alike, never decoded; the training scan quarantines the
    same ones (one limit)."""
    from petalflow.tasks import dataset, serving

    assert serving.MAX_PIXELS == dataset.MAX_PIXELS
    buf = io.BytesIO()
    Image.new("L", (9000, 8000)).save(buf, "PNG")
    huge = buf.getvalue()
    model = serving.ImageClassifier(exported)
    says = "image too large (9000x8000 pixels, limit 64000000): downscale it first"
    frame = model.predict(pd.DataFrame({"image": [_b64(huge), _b64(_image("PNG"))]}))
    assert frame["error"].tolist() == [says, ""] and frame["label"].tolist() == ["", "red"]
    raw = model.predict_bytes([huge, _image("JPEG")])
    assert raw["error"].tolist() == [says, ""] and raw["label"].tolist() == ["", "red"]
    table, features = model.predict_with_features([_image("JPEG"), huge])
    assert table["error"].tolist() == ["", says] and not features[1].any()
    assert model.features([huge])[1].tolist() == [False]


def test_a_colour_palette_bmp_gets_an_error_row_not_a_prediction_made_on_its_indices(exported):
    """TensorFlow reads an 8-bit BMP's palette indices as grey levels: a colour-palette BMP
    was classified silently on another picture (and a 1-bit one was "undecodable image"). Both
    get a row saying what they are; a grey 8-bit BMP (a grey ramp: read right) and a 24-bit
    one are classified, by base64 and bytes alike."""
    import tensorflow as tf

    from petalflow.tasks.serving import ImageClassifier

    photo = Image.fromarray(np.random.default_rng(5).integers(0, 255, (24, 24, 3), np.uint8))
    files = {}
    for name, image in (("palette", photo.quantize(64)), ("one-bit", photo.convert("1")),
                        ("grey", photo.convert("L")), ("rgb", photo)):
        buf = io.BytesIO()
        image.save(buf, "BMP")
        files[name] = buf.getvalue()
    decoded = tf.io.decode_image(files["palette"], channels=3).numpy()
    assert np.abs(decoded.astype(int) - np.asarray(photo.quantize(64).convert("RGB"))).max() > 50
    model = ImageClassifier(exported)
    frame = model.predict(pd.DataFrame({"image": [_b64(b) for b in files.values()]}))
    assert frame["error"].tolist() == [
        "8-bit colour-palette BMP: the model reads 24/32-bit and 8-bit grey BMPs; save it as "
        "a 24-bit BMP or a PNG first",
        "1-bit colour-palette BMP: the model reads 24/32-bit and 8-bit grey BMPs; save it as "
        "a 24-bit BMP or a PNG first", "", ""]
    assert frame["label"].tolist()[:2] == ["", ""] and all(frame["label"].tolist()[2:])
    raw = model.predict_bytes(list(files.values()))
    assert raw["error"].tolist() == frame["error"].tolist()


def test_header_size_reads_each_format_without_decoding():
    from petalflow.tasks.serving import header_size
    from tests.helpers import phone_jpeg

    for fmt, kw in (("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}), ("GIF", {}),
                    ("BMP", {}), ("WEBP", {}), ("WEBP", {"lossless": True})):
        buf = io.BytesIO()
        Image.new("RGB", (300, 200), (10, 200, 30)).save(buf, fmt, **kw)
        assert header_size(buf.getvalue()) == (300, 200), (fmt, kw)
    # A JPEG whose frame header comes after a 60 kB EXIF block and a colour profile.
    buf = io.BytesIO()
    Image.new("RGB", (320, 240)).save(buf, "JPEG", exif=b"Exif\x00\x00" + bytes(60_000),
                                      icc_profile=bytes(30_000))
    assert header_size(buf.getvalue()) == (320, 240)
    # A phone's photo stored sideways (EXIF orientation 6): the stored size, 80 x 120.
    assert header_size(phone_jpeg(Image.new("RGB", (120, 80)), 6)) == (80, 120)
    assert header_size(buf.getvalue()[:500]) is None  # cut before its frame header
    assert header_size(b"this is not an image") is None and header_size(b"") is None


def test_the_served_model_sees_a_sideways_stored_phone_photo_upright(exported):
    """A phone's portrait photo (stored sideways, EXIF Orientation 6) gets the features and
    probabilities of the same photo stored upright, as training saw its photos; the stored
    pixels without the tag would be another picture to it."""
    import tensorflow as tf

    from tests.helpers import phone_jpeg, quadrants

    served = tf.saved_model.load(str(exported))
    rows = [phone_jpeg(quadrants(), None), phone_jpeg(quadrants(), 6),
            phone_jpeg(quadrants().transpose(Image.Transpose.ROTATE_90), None)]
    out = served.classify_bytes(tf.constant(rows))
    features = out["features"].numpy()
    assert out["error"].numpy().tolist() == [b""] * 3
    scale = np.abs(features[0]).max()
    assert scale > 0
    # The same pixels (quality 100, no chroma subsampling, 16-pixel aligned: the same JPEG
    # blocks either way): the same features to rounding; sideways ones differ by ~12 %.
    assert np.abs(features[1] - features[0]).max() < 0.001 * scale
    assert np.abs(features[2] - features[0]).max() > 0.05 * scale
    probs = [out[f"prob_{c}"].numpy() for c in sorted(COLOURS)]
    np.testing.assert_allclose([p[1] for p in probs], [p[0] for p in probs], atol=1e-4)


def test_training_sees_sideways_stored_phone_photos_upright(tmp_path, tiny_backbone):
    """Photos a phone stored sideways (EXIF Orientation 6) get, in training's feature caches,
    the features of the same photos stored upright: training reads EXIF when the scan found
    turned photos."""
    from tests.helpers import phone_jpeg, quadrants

    root = make_dataset(tmp_path / "photos", per_class=6)
    for i, size in enumerate([(64, 32), (64, 48), (80, 32), (96, 32)]):
        (root / "red" / f"upright{i}.jpg").write_bytes(phone_jpeg(quadrants(size), None))
        (root / "red" / f"phone{i}.jpg").write_bytes(phone_jpeg(quadrants(size), 6))
    info = prepare_dataset(root, tmp_path / "manifest", 0.2, 0.2, seed=0)
    assert info["counts"]["turned"] == 4
    train_model(info, _cfg(tiny_backbone, epochs=1, edge_export=False), tmp_path / "w",
                features_dir=tmp_path / "features")
    rows = {}
    for cache in (tmp_path / "features").glob("*.npz"):
        with np.load(cache) as data:
            rows.update({Path(p).name: f for p, f in zip(data["paths"], data["features"])})
    pairs = [i for i in range(4) if f"upright{i}.jpg" in rows and f"phone{i}.jpg" in rows]
    assert pairs  # the split put at least one pair in train/val (fixed seed)
    for i in pairs:
        upright, phone = rows[f"upright{i}.jpg"], rows[f"phone{i}.jpg"]
        assert np.abs(phone - upright).max() <= 0.001 * np.abs(upright).max(), i


def test_a_large_request_runs_in_bounded_calls_with_the_same_rows(exported, monkeypatch):
    """Rows go to the SavedModel CALL_ROWS at a time (its memory grows with the rows of one
    call); the table is the one a single call gives, in order, on the request's index."""
    from petalflow.tasks import serving

    model = serving.ImageClassifier(exported)
    values = [_b64(_image("JPEG", COLOURS[c])) for c in ("red", "green", "blue", "red")]
    values.insert(2, _b64(b"not an image"))
    request = pd.DataFrame({"image": values}, index=[10, 11, 12, 13, 14])
    whole = model.predict(request)
    calls = []
    real = model._serve_b64
    monkeypatch.setattr(model, "_serve_b64", lambda image: calls.append(len(image)) or real(image))
    monkeypatch.setattr(serving, "CALL_ROWS", 2)
    chunked = model.predict(request)
    assert calls == [2, 2, 1]
    pd.testing.assert_frame_equal(chunked, whole)
    assert chunked.index.tolist() == [10, 11, 12, 13, 14]
    assert chunked["error"].tolist() == ["", "", NOT_AN_IMAGE, "", ""]
    raw = [serving._b64decode(v) for v in values]
    pd.testing.assert_frame_equal(model.predict_bytes(raw), whole.reset_index(drop=True))


def test_no_python_objects_are_stored_in_the_export(exported):
    from pathlib import Path

    files = [p for p in Path(exported).rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in {".pkl", ".pickle", ".h5", ".keras"}]
    blob = b"".join(p.read_bytes() for p in files if p.suffix == ".pb")
    assert b"Lambda" not in blob and b"PyFunc" not in blob and b"EagerPyFunc" not in blob


def _killed_after(last_epoch: int):
    """An epoch hook that stops training like a kill once ``last_epoch`` is checkpointed."""
    def hook(epoch, total, metrics):
        if epoch == last_epoch:
            raise Interrupt("simulated kill")

    return hook


def test_new_run_after_a_killed_one_starts_from_its_checkpoints(tmp_path, tiny_backbone,
                                                                data_info):
    import fcntl

    cfg = _cfg(tiny_backbone, epochs=4)
    key_dir = tmp_path / "runs" / "key"
    with pytest.raises(Interrupt):
        train_model(data_info, cfg, key_dir / "run-a", on_epoch_end=_killed_after(2))
    # A sibling that is still training (lock held) is never taken over.
    busy = key_dir / "run-busy"
    (busy / "checkpoints").mkdir(parents=True)
    (busy / "checkpoints" / "checkpoint").write_text("x")
    with open(busy / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        record = train_model(data_info, cfg, key_dir / "run-b")
    (busy / "train.json").write_text("{}")  # the busy attempt finished meanwhile
    assert record["seeded_from"] == str(key_dir / "run-a")
    assert record["resumed_from_epoch"] == 2
    assert (key_dir / "run-b" / "train.json").exists()
    # The killed attempt has seeded run-b: it seeds nothing else, the next attempt starts fresh.
    again = train_model(data_info, cfg, key_dir / "run-c")
    assert again["seeded_from"] is None and again["resumed_from_epoch"] == 0
    # Its run ended, then was retried (same folder): needed again until that run ends.
    (key_dir / "run-c" / RUN_ENDED).touch()
    train_model(data_info, cfg, key_dir / "run-c")
    assert not (key_dir / "run-c" / RUN_ENDED).exists()


def test_forced_retrain_does_not_resume_a_killed_attempt(tmp_path, tiny_backbone, data_info):
    cfg = _cfg(tiny_backbone, epochs=3)
    key_dir = tmp_path / "runs" / "key"
    with pytest.raises(Interrupt):
        train_model(data_info, cfg, key_dir / "run-a", on_epoch_end=_killed_after(1))
    fresh = train_model(data_info, cfg, key_dir / "run-b", resume_killed=False)
    assert fresh["seeded_from"] is None and fresh["resumed_from_epoch"] == 0
    # The killed attempt was not consumed: a normal rerun still resumes from it.
    resumed = train_model(data_info, cfg, key_dir / "run-c")
    assert resumed["seeded_from"] == str(key_dir / "run-a") and resumed["resumed_from_epoch"] == 1


def _shifted(path, size=(40, 30)) -> bytes:
    """The same photo made grayscale and rotated a quarter turn."""
    buf = io.BytesIO()
    Image.open(path).convert("L").convert("RGB").rotate(90, expand=True).save(buf, "PNG")
    return buf.getvalue()


def test_drift_is_low_on_training_like_images_and_high_on_shifted_ones(trained, data_info):
    """The version carries its drift reference: photos like the training split score under
    the threshold, the same photos grayscale and rotated score over it; bad rows are left out."""
    from pathlib import Path

    from petalflow.tasks.dataset import split_files
    from petalflow.tasks.serving import DRIFT_THRESHOLD, ImageClassifier

    model = ImageClassifier(trained["export_dir"])
    assert model.drift_reference["images"] > 0
    paths = split_files(data_info, "train")[0] + split_files(data_info, "test")[0]
    alike = model.drift([Path(p).read_bytes() for p in paths] + [b"not an image"])
    assert alike["images"] == len(paths)
    assert alike["drift_score"] < DRIFT_THRESHOLD and not alike["drifted"]
    shifted = model.drift([_shifted(p) for p in paths])
    assert shifted["drift_score"] > DRIFT_THRESHOLD and shifted["drifted"]
    assert shifted["image_drift"] > alike["image_drift"]
    # Over the pyfunc interface (what `mlflow models serve` answers): one row.
    frame = model.predict(pd.DataFrame({"image": [_b64(_shifted(p)) for p in paths]}),
                          params={"output": "drift"})
    assert len(frame) == 1 and bool(frame["drifted"].iloc[0])


def test_a_few_photos_get_a_drift_score_but_no_verdict(trained, data_info):
    """One to a few photos' mean moves far by chance (photos like the training ones went over
    the threshold in a third to over half of such samples): a batch under the version's
    minimum gets its score and "too few images to tell", not "drifted"; the same shifted
    photos, enough of them, are drifted."""
    from pathlib import Path

    from petalflow.tasks.dataset import split_files
    from petalflow.tasks.drift import drift_line, drift_markdown
    from petalflow.tasks.serving import DRIFT_MIN_IMAGES, DRIFT_THRESHOLD, ImageClassifier

    model = ImageClassifier(trained["export_dir"])
    assert model.drift_reference["min_images"] == DRIFT_MIN_IMAGES == 20
    paths = split_files(data_info, "train")[0] + split_files(data_info, "test")[0]
    shifted = [_shifted(p) for p in paths[:DRIFT_MIN_IMAGES]]
    few = model.drift(shifted[:3])
    assert few["images"] == 3 and few["min_images"] == DRIFT_MIN_IMAGES
    assert few["drift_score"] > DRIFT_THRESHOLD and not few["drifted"]
    assert drift_line({"available": True, **few}).endswith(
        "on 3 images: too few images to tell (a verdict needs 20 or more; the score of a few "
        "photos is mostly chance)")
    assert "no verdict: too few images to tell (it needs 20 or more)" in drift_markdown(
        {"drift": {"available": True, **few}, "inputs": ["in"], "model_uri": "m"})
    enough = model.drift(shifted)
    assert enough["images"] == DRIFT_MIN_IMAGES and enough["drifted"]
    assert drift_line({"available": True, **enough}).endswith(
        "on 20 images: DRIFTED: these images do not look like the training data")
    assert model.drift([Path(p).read_bytes() for p in paths[:DRIFT_MIN_IMAGES]])[
        "drifted"] is False
    # Over the pyfunc interface (what `mlflow models serve` answers) the row says so too.
    frame = model.predict(pd.DataFrame({"image": [_b64(b) for b in shifted[:3]]}),
                          params={"output": "drift"})
    assert frame[["images", "min_images", "drifted"]].iloc[0].tolist() == [3, 20, False]


def test_photos_of_one_class_are_like_the_training_data(tiny_backbone, tmp_path):
    """A batch of new photos all of one class (a folder of roses) was "drifted": its mean is
    that class's, not the training split's mix (on the flowers, held-out photos of one class
    went over the threshold in 13-87 % of samples of 50). The version's reference describes
    each class, and the batch is compared with training images of the class mix it is
    classified as: such photos are like the training data, over every interface; the same
    photos grayscale and rotated are still drifted."""
    from petalflow.tasks import predict
    from petalflow.tasks.serving import DRIFT_THRESHOLD, ImageClassifier, drift_scores

    # Its own model: with 8 training photos per class (``trained``), a class's mean in the
    # reference is too uncertain for a test on 3 image statistics of plain-colour images.
    info = prepare_dataset(make_dataset(tmp_path / "photos", per_class=40), tmp_path / "m",
                           0.2, 0.2, seed=0)
    model = ImageClassifier(train_model(info, _cfg(tiny_backbone), tmp_path / "w")["export_dir"])
    assert model.drift_reference["classes"]["counts"] == [24, 24, 24]  # the training split
    files = [write_image(tmp_path / "red" / f"{i:03d}.jpg", COLOURS["red"], seed=5000 + i)
             for i in range(24)]
    photos = [f.read_bytes() for f in files]
    # What the training split's mix alone would say (the measure before).
    frame, features = model.predict_with_features(photos)
    assert (frame["label"] == "red").all()
    before = drift_scores(model.drift_reference, features, image_statistics_of(photos))
    assert before["drifted"] and before["drift_score"] > 2 * DRIFT_THRESHOLD, before

    alike = model.drift(photos)
    assert alike["class_mix"] and alike["images"] == 24
    assert alike["drift_score"] < DRIFT_THRESHOLD and not alike["drifted"], alike
    shifted = model.drift([_shifted(f) for f in files])
    assert shifted["class_mix"] and shifted["drifted"], shifted
    # Over the pyfunc interface (what `mlflow models serve` answers) ...
    row = model.predict(pd.DataFrame({"image": [_b64(b) for b in photos]}),
                        params={"output": "drift"}).iloc[0]
    assert bool(row["class_mix"]) and not bool(row["drifted"])
    assert row["drift_score"] == pytest.approx(alike["drift_score"], abs=1e-6)
    # ... and in a prediction job (`petalflow predict`, `batch-predict`): the same figures,
    # the class mix taken from the classification pass.
    # The job's sample is read file by file as its statistics are computed, never held whole
    # (256 phone photos took ~0.5 GB).
    sample = [(f, x, p) for f, x, p in zip(files, features, model.probabilities(frame))]
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(predict, "read_files", None)
        job = predict.drift_of_sample(model, sample)
    assert job["available"] and job["class_mix"] and not job["drifted"]
    assert job["drift_score"] == pytest.approx(alike["drift_score"], abs=1e-6)
    # Versions whose loader predates reading the files: their bytes, the same figures; a
    # loader that predates the class mix keeps its own measure.
    bytes_only = type("BytesLoader", (), {"drift_of_classified": model.drift_of_classified})()
    assert predict.drift_of_sample(bytes_only, sample)["drift_score"] == pytest.approx(
        alike["drift_score"], abs=1e-6)
    earlier = type("EarlierLoader", (), {"drift_of_features": model.drift_of_features})()
    assert predict.drift_of_sample(earlier, sample)["drift_score"] == pytest.approx(
        before["drift_score"], abs=1e-6)


def image_statistics_of(photos):
    from petalflow.tasks.serving import image_statistics

    return image_statistics(photos)


def test_drift_compares_a_batch_with_training_images_of_its_class_mix():
    """Two classes of different features and image statistics. A batch of one class, or in
    another mix than the training split's, classified as such, scores like a batch in the
    training mix; the same class moved, or photos of a third kind the model takes for one of
    its classes, are drifted. Without probabilities (or a reference without classes) the
    batch is compared with the training split as a whole, as before."""
    from petalflow.tasks.serving import DRIFT_THRESHOLD, drift_reference, drift_scores

    rng = np.random.default_rng(0)
    centre = {0: rng.normal(0, 1, 64), 1: rng.normal(0, 1, 64), 2: rng.normal(0, 1, 64)}
    shade = {0: np.full(6, 0.3), 1: np.full(6, 0.7), 2: np.full(6, 0.5)}

    def draw(c, n):
        return (centre[c] + rng.normal(0, 0.5, (n, 64)), shade[c] + rng.normal(0, 0.05, (n, 6)))

    (f0, s0), (f1, s1) = draw(0, 250), draw(1, 250)
    labels = np.repeat([0, 1], 250)
    reference = drift_reference(np.concatenate([f0, f1]), np.concatenate([s0, s1]), labels, 2)
    assert reference["classes"]["counts"] == [250, 250]
    one_hot = {c: np.eye(2)[np.full(50, c)] for c in (0, 1)}

    for c in (0, 1):
        f, s = draw(c, 50)
        assert drift_scores(reference, f, s)["drifted"]  # against the training mix: "drifted"
        alike = drift_scores(reference, f, s, one_hot[c])
        assert alike["class_mix"] and alike["drift_score"] < DRIFT_THRESHOLD / 2, alike
    (fa, sa), (fb, sb) = draw(0, 40), draw(1, 10)
    mixed = drift_scores(reference, np.concatenate([fa, fb]), np.concatenate([sa, sb]),
                         np.concatenate([one_hot[0][:40], one_hot[1][:10]]))
    assert mixed["drift_score"] < DRIFT_THRESHOLD / 2, mixed
    f, s = draw(0, 50)
    assert drift_scores(reference, f + 0.5, s, one_hot[0])["drifted"]  # the class moved
    assert drift_scores(reference, f, s * 0.5, one_hot[0])["drifted"]  # darker
    f, s = draw(2, 50)  # another kind of photo, taken for class 0
    assert drift_scores(reference, f, s, one_hot[0])["drifted"]
    # A reference without classes (versions registered before) ignores the probabilities.
    plain = drift_reference(np.concatenate([f0, f1]), np.concatenate([s0, s1]))
    f, s = draw(0, 50)
    got = drift_scores(plain, f, s, one_hot[0])
    assert not got["class_mix"] and got == {**drift_scores(plain, f, s), "class_mix": False}


def test_drift_compares_image_sizes_as_the_model_sees_them():
    """Width and height are compared as log2(min(side, S) / S) for a model of input size S,
    and only a fall counts: phone-size photos of what the model was trained on at 320 x 240
    scored 68.9 on image statistics ("drifted", features 0.06, same accuracy); now 0. Photos
    smaller than the training ones (thumbnails: the model sees them upscaled, blurred) still
    drift. A version registered before (no ``resolution_of``) compares pixels, as it did."""
    from petalflow.tasks.serving import (
        DRIFT_THRESHOLD, IMAGE_STATS, drift_reference, drift_scores, resolution_of,
    )

    assert IMAGE_STATS[:2] == ("width", "height")
    sides = np.array([[448, 224, 1, 0.5, 0.2, 0.3], [112, 56, 2, 0.5, 0.2, 0.3]], np.float64)
    np.testing.assert_allclose(resolution_of(sides, {"resolution_of": 224})[:, :2],
                               [[0, 0], [-1, -2]])
    np.testing.assert_array_equal(resolution_of(sides, {}), sides)  # versions before

    rng = np.random.default_rng(0)

    def photos(n, width, height):  # sizes spread as a real dataset's are
        w = width * rng.uniform(0.6, 1.1, n)
        h = height * rng.uniform(0.6, 1.1, n)
        return np.column_stack([w, h, w / h, rng.normal(0.45, 0.05, (n, 3))])

    features = rng.normal(0, 1, (500, 64))
    training = photos(500, 320, 240)
    reference = drift_reference(features, training, image_size=224)
    assert reference["image_stats"]["resolution_of"] == 224
    same = rng.normal(0, 1, (50, 64))  # the model sees the same kind of picture
    phone = drift_scores(reference, same, photos(50, 4032, 3024))
    assert phone["image_drift"] == 0.0 and not phone["drifted"], phone
    thumbs = drift_scores(reference, same, photos(50, 80, 60))
    assert thumbs["image_drift"] > DRIFT_THRESHOLD and thumbs["drifted"], thumbs
    darker = photos(50, 4032, 3024)
    darker[:, 3] *= 0.5
    assert drift_scores(reference, same, darker)["drifted"]  # the other statistics as before
    # Sides a quarter smaller than the training photos' (standardised by at least
    # RESOLUTION_SPREAD, an octave) are not drift; a training split all at or above the input
    # size (no spread in its sides) still tells thumbnails.
    assert not drift_scores(reference, same, photos(50, 240, 180))["drifted"]
    large = drift_reference(features, photos(500, 1600, 1200), image_size=224)
    assert large["image_stats"]["std"][:2] == [0.0, 0.0]
    assert drift_scores(large, same, photos(50, 80, 60))["drifted"]
    assert drift_scores(large, same, photos(50, 4032, 3024))["image_drift"] == 0.0
    before = drift_reference(features, training)  # a version registered before
    assert "resolution_of" not in before["image_stats"]
    assert drift_scores(before, same, photos(50, 4032, 3024))["image_drift"] > 10


def _pyfunc_model(export_dir, dest: Path):
    """The export packaged as registration packages it (``registry.pyfunc_arguments``), saved
    to a folder and loaded back."""
    import mlflow

    from petalflow.tasks.registry import pyfunc_arguments
    from petalflow.tasks.serving import read_metadata

    (dest / "code").mkdir(parents=True)
    mlflow.pyfunc.save_model(str(dest / "model"), **pyfunc_arguments(
        Path(export_dir), read_metadata(Path(export_dir))["class_names"], dest / "code"))
    return mlflow.pyfunc.load_model(str(dest / "model"))


@pytest.mark.filterwarnings("ignore:An input example was not provided")
def test_a_prediction_job_takes_drift_features_from_its_classification_pass(
        trained, data_info, tmp_path, monkeypatch):
    """A version whose classification pass gives the backbone's features: the job writes the
    same rows and reports the same drift as the pyfunc model and its drift measure (what
    earlier versions are still run through), without running the backbone a second time."""
    from petalflow.tasks import predict
    from petalflow.tasks.dataset import split_files

    model = _pyfunc_model(trained["export_dir"], tmp_path / "mlflow")
    raw = model.get_raw_model()
    assert predict.classifier_with_features(model) is raw and raw.gives_features
    paths = [Path(p) for p in split_files(data_info, "train")[0] + split_files(data_info, "test")[0]]
    assert len(paths) < predict.DRIFT_SAMPLE  # the sample is every classified image
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    files = paths[:5] + [tmp_path / "bad.jpg"] + paths[5:]
    monkeypatch.setattr(predict, "load_model", lambda uri: (model, uri))

    def no_second_pass(self, images):
        raise AssertionError("the backbone ran again for drift")

    with monkeypatch.context() as patched:
        patched.setattr(type(raw), "features", no_second_pass)
        fused = predict.predict_files("m", files, tmp_path / "fused.csv", batch_size=16,
                                      drift=True)
    # Earlier loaders have no get_raw_model: their pyfunc predict, then their drift measure.
    monkeypatch.delattr(type(raw), "get_raw_model")
    assert predict.classifier_with_features(model) is None
    before = predict.predict_files("m", files, tmp_path / "before.csv", batch_size=16,
                                   drift=True)

    assert fused["drift"]["available"] and before["drift"]["available"]
    assert fused["drift"]["images"] == before["drift"]["images"] == len(paths)
    for key in ("drift_score", "feature_drift", "image_drift"):
        assert fused["drift"][key] == pytest.approx(before["drift"][key], rel=1e-4, abs=1e-6)
    assert fused["drift"]["drifted"] == before["drift"]["drifted"]
    assert (fused["images"], fused["errors"], fused["labels"]) == \
        (before["images"], before["errors"], before["labels"]) == (len(files), 1, before["labels"])
    got, want = pd.read_csv(tmp_path / "fused.csv"), pd.read_csv(tmp_path / "before.csv")
    assert list(got.columns) == list(want.columns)
    assert got["label"].fillna("").tolist() == want["label"].fillna("").tolist()
    assert got["error"].fillna("").tolist()[5] == NOT_AN_IMAGE
    probs = [c for c in got.columns if c.startswith("prob")]
    np.testing.assert_allclose(got[probs].to_numpy(), want[probs].to_numpy(), atol=1e-6)


def test_a_backbone_tflite_cannot_quantize_costs_only_that_edge_model(tmp_path, tiny_backbone,
                                                                      data_info, monkeypatch):
    """Training, the float16 model and the figures survive an int8 conversion failure; the
    reason is recorded where the figures would be (edge.json, summary row, version tag)."""
    import json
    from pathlib import Path

    import tensorflow as tf

    from petalflow.tasks.edge import edge_summary
    from petalflow.tasks.evaluate import evaluate_edge_models
    from petalflow.tasks.registry import edge_tags

    real = tf.compat.v1.lite.TFLiteConverter.convert

    def convert(self):
        if self.representative_dataset is not None:
            raise RuntimeError("op 'FancyOp' has no int8 kernel")
        return real(self)

    monkeypatch.setattr(tf.compat.v1.lite.TFLiteConverter, "convert", convert)
    record = train_model(data_info, _cfg(tiny_backbone, epochs=1), tmp_path)
    edge = Path(record["edge_dir"])
    assert (edge / "model_float16.tflite").is_file() and not (edge / "model_int8.tflite").exists()
    assert "FancyOp" in json.loads((edge / "edge.json").read_text())["models"]["int8"]["error"]
    figures = evaluate_edge_models(edge, Path(record["export_dir"]), data_info, 32)
    assert 0.0 <= figures["models"]["float16"]["test_accuracy"] <= 1.0
    rows = {row["format"]: row for row in edge_summary(figures, 0.9)}
    assert "FancyOp" in rows["TFLite int8"]["error"] and rows["TFLite float16"]["size_mb"] > 0
    tags = edge_tags(figures)
    assert tags["edge_formats"] == "float16" and "FancyOp" in tags["edge_int8_error"]
    assert "edge_float16_test_accuracy" in tags and "edge_int8_test_accuracy" not in tags


def _decoded_images(data_info, n: int) -> np.ndarray:
    from petalflow.tasks.dataset import split_files
    from petalflow.tasks.inputs import image_dataset

    paths, _ = split_files(data_info, "train")
    return np.concatenate([b.numpy() for b in image_dataset(paths[:n], None, 32, 8)])


def test_cpu_training_computes_features_through_tflite_as_tensorflow_would(
        tmp_path, tiny_backbone, data_info):
    """On the CPU the frozen backbone's features come from a TFLite copy of it: the same
    numbers TensorFlow computes (batches that are not a multiple of TFLite's batch included),
    and what a training records as its engine."""
    import tensorflow as tf

    from petalflow.tasks.features import TFLITE_BATCH, FeatureExtractor
    from petalflow.tasks.model import load_backbone

    backbone = load_backbone(str(tiny_backbone))
    images = _decoded_images(data_info, TFLITE_BATCH + 3)
    extract = FeatureExtractor(backbone, 32)
    assert extract.kind is None  # nothing converted before the first batch
    got = np.concatenate([extract(images[:5]), extract(images[5:])])
    assert extract.kind == "tflite"
    want = backbone(tf.constant(images), training=False).numpy()
    extract.close()  # the engine and the backbone are dropped: no silent reconversion
    with pytest.raises(RuntimeError, match="closed"):
        extract(images[:1])
    assert got.shape == want.shape == (TFLITE_BATCH + 3, 16)
    np.testing.assert_allclose(got, want, atol=1e-5)

    record = train_model(data_info, _cfg(tiny_backbone, epochs=1, edge_export=False),
                         tmp_path / "w", features_dir=tmp_path / "features")
    assert record["features"]["engine"] == "tflite"
    cached = train_model(data_info, _cfg(tiny_backbone, epochs=1, edge_export=False),
                         tmp_path / "w2", features_dir=tmp_path / "features")
    assert cached["features"]["reused"] == ["val", "train"]
    assert cached["features"]["engine"] is None  # all from the cache: nothing converted


def test_features_held_where_a_tensor_can_share_them_are_not_copied_into_one():
    """``shared_tensor`` hands TensorFlow the features' own memory (a buffer aligned as its
    tensors need, ``aligned_empty``/``aligned``); anything else is given back as it is, for
    Keras to convert as before."""
    import tensorflow as tf

    from petalflow.tasks.features import (
        TENSOR_ALIGNMENT, aligned, aligned_empty, shared_tensor,
    )

    features = aligned_empty(5, 3)
    assert features.shape == (5, 3) and features.dtype == np.float32
    assert features.ctypes.data % TENSOR_ALIGNMENT == 0
    features[...] = np.arange(15, dtype=np.float32).reshape(5, 3)
    tensor = shared_tensor(features)
    assert isinstance(tensor, tf.Tensor) and tensor.dtype == tf.float32
    features[2, 1] = 99.0  # the tensor reads the array's memory: not a copy
    assert tensor.numpy()[2, 1] == 99.0
    assert aligned(features) is features

    raw = np.empty(16 + TENSOR_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % TENSOR_ALIGNMENT + 4  # 4 bytes off: not aligned
    misaligned = raw[start:start + 12].view(np.float32).reshape(1, 3)
    misaligned[...] = [1.0, 2.0, 3.0]
    assert shared_tensor(misaligned) is misaligned  # converted by Keras, as before
    copy = aligned(misaligned)
    assert copy.ctypes.data % TENSOR_ALIGNMENT == 0
    np.testing.assert_array_equal(copy, misaligned)
    wider = np.ones((2, 3))  # float64
    assert shared_tensor(wider) is wider and aligned(wider) is wider
    flat = np.ones(3, np.float32)  # no features array: as it is
    assert aligned(flat) is flat


def test_the_head_is_fitted_on_the_features_memory_computed_cached_or_augmented(
        tmp_path, tiny_backbone, data_info, monkeypatch):
    """``Model.fit`` converts NumPy input into a tensor, a copy of every training feature (with
    many images the training step's peak). The head's fit is given a tensor over the
    features' own memory: computed, read from the cache, and joined to augmented copies."""
    import tensorflow as tf

    import petalflow.tasks.train as train_module
    from petalflow.tasks.features import shared_tensor

    given = []

    def spy(array):
        tensor = shared_tensor(array)
        given.append((isinstance(tensor, tf.Tensor), tuple(tensor.shape), array.shape))
        return tensor

    monkeypatch.setattr(train_module, "shared_tensor", spy)
    features = tmp_path / "features"
    computed = train_model(data_info, _cfg(tiny_backbone, epochs=1, edge_export=False),
                           tmp_path / "w1", features_dir=features)
    cached = train_model(data_info, _cfg(tiny_backbone, epochs=1, edge_export=False,
                                         learning_rate=0.01), tmp_path / "w2",
                         features_dir=features)
    augmented = train_model(data_info, _cfg(tiny_backbone, epochs=1, edge_export=False,
                                            augment=True), tmp_path / "w3",
                            features_dir=features)
    assert computed["features"]["reused"] == []
    assert cached["features"]["reused"] == ["val", "train"]
    assert "train" in augmented["features"]["reused"]
    assert [(is_tensor, shape == array_shape) for is_tensor, shape, array_shape in given] == [
        (True, True)] * 3
    assert given[2][2][0] == 2 * given[0][2][0]  # the plain features and one augmented copy


@pytest.mark.parametrize("released", [False, True])
def test_a_backbone_tflite_cannot_convert_gets_its_features_from_tensorflow(
        tmp_path, tiny_backbone, data_info, caplog, released):
    """A backbone with an operation TFLite has no kernel for (here a Python function) still
    trains: its features come from TensorFlow, and the log says why; a backbone the
    extractor let go of once frozen (a training without fine-tuning) runs as its frozen
    function."""
    import logging

    import tensorflow as tf

    from petalflow.tasks.features import FeatureExtractor
    from petalflow.tasks.model import keras, load_backbone

    hub_layer = load_backbone(str(tiny_backbone))

    class PyFuncBackbone(keras().layers.Layer):
        def call(self, images, training=False):
            features = hub_layer(images, training=False)
            out = tf.numpy_function(lambda x: np.maximum(x, 0.0), [features], tf.float32)
            return tf.reshape(out, tf.shape(features))

    images = _decoded_images(data_info, 6)
    extract = FeatureExtractor(PyFuncBackbone(), 32, release_when_frozen=released)
    with caplog.at_level(logging.WARNING):
        got = extract(images)
    assert extract.kind == "tensorflow"
    assert (extract._backbone is None) == released  # noqa: SLF001
    assert "does not convert to TensorFlow Lite" in caplog.text
    np.testing.assert_allclose(got, hub_layer(tf.constant(images)).numpy(), atol=1e-6)


def test_the_frozen_backbone_keeps_no_pass_through_operations(tiny_backbone, data_info):
    """Freezing a TF Hub backbone leaves chains of Identity and NoOp operations behind (the
    variable reads'); the frozen function every export and conversion builds on has none
    but its outputs', and computes what the backbone computes."""
    import tensorflow as tf

    from petalflow.tasks.model import frozen_backbone, load_backbone

    backbone = load_backbone(str(tiny_backbone))
    frozen = frozen_backbone(backbone, 32)
    ops = [op.type for op in frozen.graph.get_operations()]
    assert "NoOp" not in ops and ops.count("Identity") == len(frozen.outputs) == 1
    assert frozen.inputs[0].shape.as_list() == [None, 32, 32, 3]
    images = tf.constant(_decoded_images(data_info, 3))
    np.testing.assert_allclose(frozen(images)[0].numpy(),
                               backbone(images, training=False).numpy(), atol=1e-5)


def test_feature_width_comes_from_what_the_backbone_declares(tiny_backbone, monkeypatch):
    """The head's input width is read from the backbone's SavedModel (no call of it); a layer
    that declares none is run once, and a backbone whose output is not a vector is refused."""
    import tensorflow as tf

    from petalflow.tasks.model import feature_dim, keras, load_backbone

    backbone = load_backbone(str(tiny_backbone))
    calls = []
    monkeypatch.setattr(type(backbone), "call",
                        lambda self, *a, **k: calls.append(1) or tf.zeros([1, 99]))
    assert feature_dim(backbone, 32) == 16 and calls == []
    monkeypatch.undo()

    class Undeclared(keras().layers.Layer):
        def call(self, images, training=False):
            return tf.reduce_mean(images, axis=[1, 2])

    assert feature_dim(Undeclared(), 32) == 3

    class Maps(keras().layers.Layer):
        def call(self, images, training=False):
            return images

    with pytest.raises(ValueError, match="feature vector"):
        feature_dim(Maps(), 32)


def test_drift_image_statistics_of_each_format_and_of_files(tmp_path):
    """Width, height, aspect, brightness, contrast and saturation per image: lossless formats
    give the exact figures of their pixels (RGBA and gray converted to RGB), a JPEG its own
    size; bytes and the same files give the same rows; no image gives no row."""
    from petalflow.tasks.serving import IMAGE_STATS, file_statistics, image_statistics

    rgb = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    encoded = {}
    for fmt in ("PNG", "BMP"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, fmt)
        encoded[fmt] = buf.getvalue()
    encoded["JPEG"] = _image("JPEG", size=(64, 48))
    stats = image_statistics(list(encoded.values()))
    assert stats.shape == (3, len(IMAGE_STATS))
    x = rgb.astype(np.float64) / 255
    want = [40, 30, 40 / 30, x.mean(), x.mean(axis=2).std(), (x.max(axis=2) - x.min(axis=2)).mean()]
    np.testing.assert_allclose(stats[0], want, rtol=1e-5)
    np.testing.assert_allclose(stats[1], want, rtol=1e-5)
    assert stats[2][:3].tolist() == [64, 48, 64 / 48]
    paths = []
    for fmt, data in encoded.items():
        paths.append(tmp_path / f"image.{fmt.lower()}")
        paths[-1].write_bytes(data)
    np.testing.assert_array_equal(file_statistics([str(p) for p in paths]), stats)
    assert image_statistics([]).shape == file_statistics([]).shape == (0, len(IMAGE_STATS))


def test_drift_statistics_of_a_big_lossless_image_come_from_a_sample_of_its_pixels():
    """A big PNG (a scan, a screenshot, a 50 MP export) had its statistics computed in float
    over every pixel: `petalflow predict` on 16 such images took 17-18 s and 3.7 GiB instead
    of 8.4-8.8 s and 1.6 GiB without the drift measure (13.0-13.4 s, 2.0 GiB now). Over
    STATS_PIXELS (1 MP) they come from every s-th pixel of every s-th row (s = 2 for 6 MP),
    within 1 % of the whole image's figures; the size stays the file's."""
    from petalflow.tasks.serving import STATS_PIXELS, image_statistics

    assert STATS_PIXELS == 1_000_000
    rng = np.random.default_rng(0)
    rgb = np.repeat(np.repeat(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), 10, 0), 10, 1)
    rgb = np.clip(rgb.astype(int) + rng.integers(-20, 21, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", compress_level=1)
    stats = image_statistics([buf.getvalue()])[0]

    def figures(x):
        x = x.astype(np.float64) / 255
        return [x.mean(), x.mean(axis=2).std(), (x.max(axis=2) - x.min(axis=2)).mean()]

    assert stats[:3].tolist() == [3000, 2000, 1.5]
    np.testing.assert_allclose(stats[3:], figures(rgb[::2, ::2]), rtol=1e-5)
    np.testing.assert_allclose(stats[3:], figures(rgb), rtol=1e-2)


def _sparse_features(rng, n: int, active: np.ndarray) -> np.ndarray:
    """Features shaped like a ReLU backbone's pooled outputs: each dimension zero in part of
    the images (MobileNetV2 0.35 on the flowers: 3-89 %), otherwise a small positive value."""
    on = rng.random((n, len(active))) < active
    return np.where(on, rng.exponential(0.4, on.shape), 0.0).astype(np.float32)


def test_feature_drift_does_not_depend_on_how_few_images_the_reference_has():
    """A model trained on few photos has a reference of few images; many of its features are
    then zero in nearly all of them, and their near-0 spread made photos like the training ones
    score as drifted (before: median 0.29, up to 11.7 with 30 reference images). Now a batch
    like the training data stays under the threshold and a shifted one scores about the same
    over it whether the reference holds 30 images or 500."""
    from petalflow.tasks.serving import DRIFT_THRESHOLD, drift_reference, drift_scores

    active = np.random.default_rng(0).uniform(0.1, 0.95, 256)
    moved = active.copy()
    moved[:64] = 1.0 - active[:64]  # a quarter of the features fire as often as others did not
    median = {}
    for m in (30, 500):
        alike, shifted = [], []
        for seed in range(1, 21):
            rng = np.random.default_rng(seed)
            stats = rng.normal(0.5, 0.1, (m + 200, 6))
            reference = drift_reference(_sparse_features(rng, m, active), stats[:m])
            alike.append(drift_scores(reference, _sparse_features(rng, 100, active),
                                      stats[m:m + 100])["feature_drift"])
            shifted.append(drift_scores(reference, _sparse_features(rng, 100, moved),
                                        stats[m + 100:])["feature_drift"])
        assert max(alike) < DRIFT_THRESHOLD, (m, alike)
        assert min(shifted) > DRIFT_THRESHOLD, (m, shifted)
        median[m] = float(np.median(shifted))
    assert abs(median[30] - median[500]) < 0.15 * median[500], median


def test_the_evaluation_report_lists_the_top_confusions_of_many_classes():
    """The evaluation's markdown (report.md, its Prefect artifact) carries the whole confusion
    matrix up to 20 classes; beyond, the most frequent confusions, largest first (a 400-class
    matrix was ~0.7 MB of markdown)."""
    from petalflow.tasks.evaluate import classification_tables, markdown_report

    def report(n: int, y_true, y_pred) -> str:
        names = [f"c{i:02d}" for i in range(n)]
        metrics, per_class, confusion = classification_tables(np.array(y_true),
                                                              np.array(y_pred), names)
        return markdown_report(metrics, per_class, confusion)

    few = report(3, [0, 1, 2, 2], [0, 1, 2, 0])
    assert "| true \\ predicted | c00 | c01 | c02 |\n|---|---|---|---|\n| c00 | 1 | 0 | 0 |" in few
    n = 25
    y_true = list(range(n)) * 2 + [3, 3, 3, 7]
    y_pred = list(range(n)) * 2 + [4, 4, 4, 1]
    many = report(n, y_true, y_pred)
    assert ("25 classes: the whole matrix is in confusion.csv and confusion.png; here, the 2 "
            "most frequent confusions.\n\n| true | predicted as | images |\n|---|---|---|\n"
            "| c03 | c04 | 3 |\n| c07 | c01 | 1 |") in many
    assert "true \\ predicted" not in many
    assert "no test image was classified as another class" in report(
        n, list(range(n)), list(range(n)))


def test_a_changed_class_list_says_which_classes_went_and_came(caplog):
    """A retraining whose data lost a class (an upload that missed a folder) was promoted on
    the gate alone; its reason listed the champion's classes only, and a user with 40 of them
    had to find the missing one by eye. Now the reason names what went and what came, and such
    a version (some of the champion's classes kept, others gone) is held back unless
    allow_dropped_classes; added classes, or none of the champion's (another problem under the
    same name), are promoted on the gate alone."""
    from petalflow.tasks.evaluate import class_change, compare_with_champion
    from petalflow.tasks.registry import CHALLENGER, CHAMPION, decide_alias

    assert class_change(["daisy", "roses", "tulips"], ["daisy", "tulips"]) == "gone: roses"
    assert class_change(["a", "b"], ["a", "b", "c"]) == "new: c"
    assert class_change(["a", "b"], ["a", "c"]) == "gone: b; new: c"
    assert class_change(None, ["a"]) == "its classes unknown"
    many = [f"c{i:02d}" for i in range(14)]
    assert class_change(many, []) == "gone: " + ", ".join(many[:10]) + " and 4 more"
    champion = {"version": "3", "class_names": ["daisy", "roses", "tulips"]}

    def compare(classes, allow=False):
        caplog.clear()
        return compare_with_champion(champion, {"classes": classes,
                                                "counts": {"splits": {"test": 9}}},
                                     None, "w", allow_dropped=allow)

    with caplog.at_level("WARNING", logger="petalflow"):
        held = compare(["daisy", "tulips"])
        # The run's log warns before anything is registered.
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [(
            "WARNING", "classes the champion (v3) predicts are not in the data any more: roses; "
            "this run's version does not replace it (allow_dropped_classes lets it)")]
        allowed = compare(["daisy", "tulips"], allow=True)
        assert [r.getMessage() for r in caplog.records] == [
            "classes the champion (v3) predicts are not in the data any more: roses; once this "
            "version is promoted, @champion no longer predicts them"]
        renamed = compare(["a", "b"])
        added = compare(["daisy", "roses", "sunflowers", "tulips"])
        assert caplog.records == []
    reason = ("champion v3 predicts classes this data lacks (gone: roses): not promoted, so "
              "@champion keeps predicting them; put their folders back, or train with "
              "allow_dropped_classes (--allow-dropped-classes) to promote a version without them")
    assert held == {"champion_version": "3", "champion_accuracy": None, "held": reason,
                    "basis": "the class list changed from champion v3's (gone: roses); not "
                             "promoted while it lacks classes the champion predicts"}
    assert decide_alias(0.9, 0.5, None, basis=held["basis"], held=held["held"]) == (
        CHALLENGER, reason + " (test accuracy 0.9000 >= 0.5)")
    # The gate still comes first: a version below it is said to be so.
    assert "below --min-accuracy" in decide_alias(0.4, 0.5, None, held=held["held"])[1]
    assert allowed == {"champion_version": "3", "champion_accuracy": None,
                       "basis": "the class list changed from champion v3's (gone: roses); "
                                "promoted on the gate alone (allow_dropped_classes)"}
    assert decide_alias(0.9, 0.5, None, basis=allowed["basis"]) == (
        CHAMPION, allowed["basis"] + " (0.9000 >= 0.5)")
    assert "held" not in renamed and renamed["basis"] == (
        "the class list changed from champion v3's (gone: daisy, roses, tulips; new: a, b); "
        "promoted on the gate alone")
    assert "held" not in added and added["basis"] == (
        "the class list changed from champion v3's (new: sunflowers); promoted on the gate alone")


def test_a_class_whose_photos_are_in_another_folder_now_is_said_to_be_moved(caplog):
    """A class folder renamed ("roses" to "rose") got the advice of a lost folder: "put their
    folders back". The photos of a class that went are looked up (by sha256) in the new data:
    when more than half lie in one class, the log, the reason and the class change say so,
    and what to do: renamed or merged, allow_dropped_classes; the others still "put back"."""
    from petalflow.tasks.evaluate import class_list_changed, moved_classes

    def rows(**classes):
        return pd.DataFrame([(sha, label) for label, shas in classes.items() for sha in shas],
                            columns=["sha256", "label"])

    before = rows(daisy=["d1", "d2"], roses=["r1", "r2", "r3"], tulips=["t1", "t2", "t3", "t4"],
                  lilies=["l1", "l2"])
    # roses renamed; tulips' photos mostly merged into daisy; lilies split half and half.
    after = rows(daisy=["d1", "d2", "t1", "t2", "t3", "l1"], rose=["r1", "r2", "r3", "r3"],
                 iris=["t4", "l2"])
    gone = ["lilies", "roses", "tulips", "orchids"]
    assert moved_classes(before, after, gone) == {"roses": ("rose", 3, 3),
                                                  "tulips": ("daisy", 3, 4)}
    champion = {"version": "3", "class_names": ["daisy", "roses", "tulips"]}
    with caplog.at_level("WARNING", logger="petalflow"):
        renamed = class_list_changed(champion, ["daisy", "rose", "tulips"], False,
                                     {"roses": ("rose", 3, 3)})
    assert [r.getMessage() for r in caplog.records] == [
        "classes the champion (v3) predicts are not in the data any more: roses; photos moved: "
        "roses -> rose (all 3 photos); this run's version does not replace it "
        "(allow_dropped_classes lets it)"]
    assert renamed["held"] == (
        "champion v3 predicts classes this data lacks (gone: roses): not promoted, so @champion "
        "keeps predicting them; their photos are in other class folders now, roses -> rose "
        "(all 3 photos): if you renamed or merged those folders, train with "
        "allow_dropped_classes (--allow-dropped-classes) to promote a version with the classes "
        "as they are now, or put the folders back as they were")
    assert renamed["basis"] == ("the class list changed from champion v3's (gone: roses; new: "
                                "rose; photos moved: roses -> rose (all 3 photos)); not promoted "
                                "while it lacks classes the champion predicts")
    some = class_list_changed(champion, ["daisy", "rose"], False, {"roses": ("rose", 3, 3)})
    assert some["held"].endswith(
        "(gone: roses, tulips): not promoted, so @champion keeps predicting them; the photos of "
        "some are in other class folders now, roses -> rose (all 3 photos); put the others' "
        "folders back (tulips), or train with allow_dropped_classes (--allow-dropped-classes) "
        "to promote a version without them"), some["held"]
    allowed = class_list_changed(champion, ["daisy", "rose"], True,
                                 {"roses": ("rose", 3, 3), "tulips": ("daisy", 3, 4)})
    assert allowed == {"champion_version": "3", "champion_accuracy": None, "basis": (
        "the class list changed from champion v3's (gone: roses, tulips; new: rose; photos "
        "moved: roses -> rose (all 3 photos), tulips -> daisy (3 of its 4 photos)); promoted on "
        "the gate alone (allow_dropped_classes)")}


def test_a_champion_is_not_credited_with_the_images_it_was_trained_on(tmp_path, caplog):
    """A run with another seed tests on images the champion was trained on: a champion that
    knows its 40 training images and half of the 20 others scored 0.83 against a challenger's
    0.75 on all 60 and kept its alias. On the 20 it was not trained on it scores 0.50 against
    the challenger's 0.75: promoted, the reason naming the images. When every test image was
    a training image there is no like-for-like figure: held, saying what to do."""
    import pandas as pd

    from petalflow.tasks.evaluate import unseen_comparison
    from petalflow.tasks.registry import CHALLENGER, CHAMPION, decide_alias

    shas = [f"{i:064x}" for i in range(60)]
    learned = frozenset(shas[:40])

    def predictions(name: str, right) -> Path:
        rows = pd.DataFrame({"path": [f"{s[-4:]}.jpg" for s in shas], "sha256": shas,
                             "true_label": "a", "label": ["a" if right(i) else "b"
                                                          for i in range(60)]})
        rows.to_csv(tmp_path / name, index=False)
        return tmp_path / name

    challenger = predictions("new.csv", lambda i: i % 4 != 0)  # 0.75 everywhere
    champion = predictions("old.csv", lambda i: i < 40 or i % 2 == 0)  # 50/60 = 0.83
    with caplog.at_level("WARNING", logger="petalflow"):
        result = unseen_comparison(challenger, champion, learned, "1")
    basis = "the 20 of this run's 60 test images that champion v1 was not trained on"
    assert result == {"champion_accuracy": 0.5, "accuracy": 0.75, "compared_images": 20,
                      "basis": basis}
    assert [r.getMessage() for r in caplog.records] == [
        "this run splits the data otherwise than champion v1's training did: another seed or "
        "test_fraction, or fewer photos: 40 of this run's 60 test images were its training "
        "images, so the two models are compared on the other 20; too few to tell two models "
        "apart: train with the champion's seed and test_fraction to compare them on a whole "
        "test split"]
    assert decide_alias(0.75, 0.5, 50 / 60) == (
        CHALLENGER, "test accuracy 0.7500 does not beat the champion's 0.8333")  # as before
    assert decide_alias(0.75, 0.5, result["champion_accuracy"], basis=result["basis"],
                        compared=result["accuracy"]) == (
        CHAMPION, f"test accuracy 0.7500 beats the champion's 0.5000 on {basis}")

    # No test image was a training image: nothing to change (the whole split's figures).
    assert unseen_comparison(challenger, champion, frozenset({"0" * 63 + "z"}), "1") == {}
    none_left = unseen_comparison(challenger, champion, frozenset(shas), "1")
    assert none_left["champion_accuracy"] is None and none_left["compared_images"] == 0
    alias, reason = decide_alias(0.75, 0.5, None, basis=none_left["basis"],
                                 held=none_left["held"])
    assert (alias, reason) == (CHALLENGER, (
        "no like-for-like figure: all 60 test images were champion v1's training images (this "
        "run splits the data otherwise than champion v1's training did: another seed or "
        "test_fraction, or fewer photos); not promoted, the champion is kept; train with its "
        "seed and test_fraction to compare them (test accuracy 0.7500 >= 0.5)"))


def test_the_images_a_champion_was_trained_on_come_from_its_runs_manifest(workspace):
    """The train split's usable images of the run's `dataset/manifest.csv`; a run without
    one, or with a file of other columns there, is "unknown" (None), not a failed run."""
    from petalflow.tasks.registry import learned_images, mlflow_client

    client = mlflow_client()
    experiment = client.create_experiment("e")
    manifest = workspace / "m" / "manifest.csv"
    manifest.parent.mkdir()
    pd.DataFrame({"path": ["a/1.jpg", "a/2.jpg", "b/3.jpg", "b/4.jpg", "b/5.jpg"],
                  "sha256": ["s1", "s2", "s3", "s4", "s5"],
                  "status": ["ok", "ok", "quarantined", "ok", "ok"],
                  "split": ["train", "test", "", "val", "train"]}).to_csv(manifest, index=False)
    runs = [client.create_run(experiment).info.run_id for _ in range(3)]
    client.log_artifact(runs[0], str(manifest), "dataset")
    assert learned_images(runs[0], workspace / "d0") == frozenset({"s1", "s5"})
    assert learned_images(runs[1], workspace / "d1") is None
    manifest.write_text("path,label\na/1.jpg,a\n")
    client.log_artifact(runs[2], str(manifest), "dataset")
    assert learned_images(runs[2], workspace / "d2") is None


def test_the_test_accuracy_comes_with_its_interval_and_a_small_split_is_said_to_be_one():
    """A 58-photo dataset was judged on 9 test images ("1.0000 >= 0.5", champion) with nothing
    saying that one image is 0.11 of accuracy. The metrics hold the 95 % (Wilson) interval,
    the report and the model card show it, and a split whose interval is wider than 0.2 gets
    a warning; the flowers' 225 test images do not."""
    from petalflow.tasks.evaluate import (
        accuracy_interval, classification_tables, few_test_images, interval_words,
        markdown_report,
    )

    low, high = accuracy_interval(8, 9)
    assert (round(low, 3), round(high, 3)) == (0.565, 0.980)
    low, high = accuracy_interval(194, 225)
    assert (round(low, 2), round(high, 2)) == (0.81, 0.90)
    assert accuracy_interval(0, 0) == (0.0, 1.0)
    assert accuracy_interval(5, 5)[1] == 1.0 and accuracy_interval(0, 5)[0] == 0.0
    names = ["a", "b", "c"]
    y_true = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    y_pred = y_true.copy()
    y_pred[0] = 1
    metrics, per_class, confusion = classification_tables(y_true, y_pred, names)
    assert interval_words(metrics) == " (95 % interval 0.56–0.98)"
    assert ("Accuracy **0.8889** on 9 held-out images (95 % interval 0.56–0.98); macro F1"
            in markdown_report(metrics, per_class, confusion))
    assert few_test_images(metrics) == (
        "the test split holds 9 images: its accuracy 0.8889 says only that the model's lies in "
        "0.56–0.98 (95 %), and the quality gate and the champion decision rest on it; more "
        "photos per class, or a larger --test-fraction, make them firmer")
    many, _, _ = classification_tables(np.repeat([0, 1, 2], 75),
                                       np.r_[np.repeat([0, 1, 2], 75)[:194], [1] * 31], names)
    assert many["test_images"] == 225 and few_test_images(many) is None
    assert interval_words({"test_accuracy": 0.9}) == ""  # a summary from before


def test_a_model_no_better_than_answering_the_most_common_class_is_not_promoted():
    """On a test split of 18 "ok" photos and 1 "defect", a model that answers "ok" to all 19
    scores 0.9474: far above --min-accuracy 0.5, and it has learned nothing. The gate asks it to
    beat that guess; the report says what the guess scores."""
    from petalflow.tasks.evaluate import (
        classification_tables, majority_baseline, markdown_report,
    )
    from petalflow.tasks.registry import CHALLENGER, CHAMPION, decide_alias

    names = ["defect", "ok"]
    y_true = np.array([0] + [1] * 18)
    metrics, per_class, confusion = classification_tables(y_true, np.ones(19, int), names)
    majority = majority_baseline(per_class)
    assert majority == {"class": "ok", "accuracy": 18 / 19}
    assert metrics["test_majority_accuracy"] == 18 / 19
    assert ("Answering 'ok' (the most common class) for every image would score 0.9474: the "
            "quality gate promotes only a model that beats it.") in markdown_report(
                metrics, per_class, confusion)

    alias, reason = decide_alias(metrics["test_accuracy"], 0.5, None, majority=majority)
    assert alias == CHALLENGER
    assert reason == ("test accuracy 0.9474 does not beat answering 'ok', the test split's most "
                      "common class, for every image (0.9474): the model is no better than "
                      "that guess")
    # Beating a champion that guessed too is not enough either.
    assert decide_alias(18 / 19, 0.5, 17 / 19, majority=majority)[0] == CHALLENGER
    # One more photo right (the defect found): it beats the guess.
    assert decide_alias(1.0, 0.5, None, majority=majority) == (
        CHAMPION, "first model to pass the gate (1.0000 >= 0.5)")
    # Below --min-accuracy says that first.
    assert "below --min-accuracy 0.99" in decide_alias(18 / 19, 0.99, None,
                                                       majority=majority)[1]
    # Balanced classes: the guess scores 1/k, so a tie on the first class is broken by order.
    _, balanced, _ = classification_tables(np.array([0, 1, 2]), np.array([0, 1, 2]), names + ["x"])
    assert majority_baseline(balanced) == {"class": "defect", "accuracy": 1 / 3}


def test_confusion_image_is_drawn_without_matplotlib(tmp_path):
    """The evaluation's confusion matrix PNG: a cell per (true, predicted) pair, white for 0 to
    dark blue for the largest count, class names beside it; drawn without importing matplotlib
    (its ~37 MiB stayed for the rest of the train command)."""
    import subprocess
    import sys

    names = ["daisy", "éclair", "a class name far longer than forty characters, cut"]
    counts = [[5, 0, 1], [0, 7, 0], [2, 0, 9]]
    out = tmp_path / "confusion.png"
    code = (
        "import sys, pandas as pd\n"
        "from pathlib import Path\n"
        "from petalflow.tasks.evaluate import plot_confusion\n"
        f"plot_confusion(pd.DataFrame({counts!r}, index={names!r}, columns={names!r}), "
        f"Path({str(out)!r}))\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    from petalflow.tasks.evaluate import CELL

    img = Image.open(out).convert("RGB")
    px = np.asarray(img)
    # The grid's top-right corner: the last column's cells end 12 px from the right edge.
    right = img.width - 12
    left = right - 3 * CELL
    cell = lambda i, j: tuple(int(v) for v in px[12 + i * CELL + 3, left + j * CELL + 3])  # noqa: E731
    assert cell(2, 2) == (8, 48, 107)  # the largest count: darkest
    assert cell(0, 1) == (247, 251, 255)  # zero: lightest
    assert sum(cell(0, 0)) < sum(cell(0, 2)) < sum(cell(0, 1))  # 5 darker than 1 than 0
    assert (px[:, : left - 4] < 128).any()  # class names drawn left of the grid

    # Hundreds of classes: smaller cells (no counts), an image of bounded size.
    from petalflow.tasks.evaluate import GRID_PIXELS, plot_confusion

    many = [f"class {i}" for i in range(400)]
    plot_confusion(pd.DataFrame(np.eye(400, dtype=int) * 3, index=many, columns=many),
                   tmp_path / "many.png")
    big = Image.open(tmp_path / "many.png")
    assert GRID_PIXELS <= big.width < GRID_PIXELS + 400 and big.height < GRID_PIXELS + 400


def test_class_weights_make_every_class_weigh_the_same():
    from petalflow.tasks.train import class_weights

    assert class_weights(np.array([0, 0, 0, 1, 2, 2]), 3) == {0: 0.666667, 1: 2.0, 2: 1.0}
    assert class_weights(np.array([0, 1, 2, 0, 1, 2]), 3) == {0: 1.0, 1: 1.0, 2: 1.0}
    # A class without training images gets no weight (the others share the total).
    assert class_weights(np.array([0, 0, 2]), 3) == {0: 0.75, 2: 1.5}


def test_training_weighs_a_rare_class_up_unless_told_not_to(tmp_path, tiny_backbone):
    """red has 4 times fewer photos than green and blue: training weighs its images 4 times
    as much (the weights in train.json are the ones given to Keras), or not at all when
    ``balance_classes`` is off."""
    root = make_dataset(tmp_path / "photos", per_class=20)
    for extra in sorted((root / "red").glob("*.jpg"))[5:]:
        extra.unlink()
    info = prepare_dataset(root, tmp_path / "manifest", 0.2, 0.2, seed=0)
    from petalflow.tasks.dataset import split_files

    counts = np.bincount(split_files(info, "train")[1], minlength=3)
    weighted = train_model(info, _cfg(tiny_backbone, epochs=1, edge_export=False),
                           tmp_path / "a", features_dir=tmp_path / "features")
    want = {name: round(counts.sum() / (3 * counts[i]), 6)
            for i, name in enumerate(info["classes"])}
    assert weighted["class_weights"] == want
    assert want["red"] > 2.5 * want["green"]
    plain = train_model(info, _cfg(tiny_backbone, epochs=1, edge_export=False,
                                   balance_classes=False),
                        tmp_path / "b", features_dir=tmp_path / "features")
    assert plain["class_weights"] is None


def test_a_file_name_that_is_not_utf8_is_classified_and_written_escaped(
        trained, data_info, tmp_path, monkeypatch):
    """A photo named on a Latin-1 system (b"ph\\xe9to.jpg") in the folder to classify: the
    job classifies it like its copy with a plain name and writes its path with the byte
    escaped, instead of failing the whole job on an encoding error."""
    import os

    from petalflow.tasks import predict
    from petalflow.tasks.dataset import split_files

    model = _pyfunc_model(trained["export_dir"], tmp_path / "mlflow")
    monkeypatch.setattr(predict, "load_model", lambda uri: (model, uri))
    photo = Path(split_files(data_info, "test")[0][0]).read_bytes()
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "plain.jpg").write_bytes(photo)
    with open(os.fsencode(folder) + b"/ph\xe9to.jpg", "wb") as fh:
        fh.write(photo)
    files = list(predict.iter_inputs([str(folder)]))
    result = predict.predict_files("m", files, tmp_path / "out.csv", batch_size=16, drift=True)
    assert (result["images"], result["errors"]) == (2, 0)
    got = pd.read_csv(tmp_path / "out.csv")
    assert got["path"].tolist() == [f"{folder}/ph\\xe9to.jpg", f"{folder}/plain.jpg"]
    assert got["label"].nunique() == 1 and got["probability"].nunique() == 1


def test_a_link_to_a_missing_photo_is_a_row_saying_it_cannot_be_read(
        trained, data_info, tmp_path, monkeypatch):
    """A folder managed by git-annex or DVC holds links whose content was never fetched: the
    job lists them with "unreadable file: ..." (as the scan quarantines such a file) instead
    of leaving them out unmentioned; an empty .jpg stays an undecodable image."""
    from petalflow.tasks import predict
    from petalflow.tasks.dataset import split_files

    model = _pyfunc_model(trained["export_dir"], tmp_path / "mlflow")
    monkeypatch.setattr(predict, "load_model", lambda uri: (model, uri))
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(Path(split_files(data_info, "test")[0][0]).read_bytes())
    (folder / "b.jpg").symlink_to(tmp_path / "annex" / "never-fetched.jpg")
    (folder / "c.jpg").write_bytes(b"")
    files = list(predict.iter_inputs([str(folder)]))
    # Named, or matched by a pattern, the link is listed too.
    assert list(predict.iter_inputs([str(folder / "b.jpg")])) == [folder / "b.jpg"]
    assert list(predict.iter_inputs([str(folder / "b*")])) == [folder / "b.jpg"]
    result = predict.predict_files("m", files, tmp_path / "out.csv", batch_size=16)
    assert (result["images"], result["errors"]) == (3, 2)
    got = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert got["path"].tolist() == [f"{folder}/{n}.jpg" for n in "abc"]
    assert got["error"].tolist() == ["", "unreadable file: No such file or directory",
                                     "undecodable image: empty file (0 bytes)"]


def test_a_prediction_job_on_a_folder_without_image_names_says_why_its_table_is_empty(
        trained, tmp_path, monkeypatch, caplog):
    """batch-predict deployed on a schedule: a folder of images saved without an extension
    gives an empty table, and the run's log says why (as `petalflow predict` refuses it)."""
    import logging

    from petalflow.tasks import predict
    from petalflow.tasks.params import PredictParams

    model = _pyfunc_model(trained["export_dir"], tmp_path / "mlflow")
    monkeypatch.setattr(predict, "load_model", lambda uri: (model, uri))
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "photo1").write_bytes(b"\xff\xd8\xff")
    with caplog.at_level(logging.WARNING, logger="petalflow"):
        result = predict.predict_images(PredictParams(
            model_uri="models:/m/1", input=[str(folder)], output=str(tmp_path / "out.csv")))
    assert result["images"] == 0
    assert "no image files found: a folder's images are found by their names" in caplog.text
    assert f"{folder} holds 1 other file (photo1): rename them" in caplog.text


def test_the_registered_model_takes_a_files_bytes_and_names_a_path_or_pixels(
        trained, data_info, tmp_path):
    """Another team's Python code hands the registered model (pyfunc, as
    `mlflow.pyfunc.load_model` gives it) what it has at hand in the 'image' column. The file's
    bytes as they are (bytes, bytearray, a uint8 vector; in a DataFrame or a dict of lists) are
    classified as their base64 is (they were refused as "not base64" before). A file path says
    it is not base64 and what the column takes; an image already decoded — a numpy array of
    pixels (a 64x64x3 array was taken for a list of 64 rows before), a PIL image — is one row
    saying what it is and what to send instead; the rows beside them are classified, one row
    per input."""
    from petalflow.tasks.dataset import split_files

    model = _pyfunc_model(trained["export_dir"], tmp_path / "mlflow")
    path = split_files(data_info, "test")[0][0]
    photo = Path(path).read_bytes()
    encoded = base64.b64encode(photo).decode()
    expected = model.predict(pd.DataFrame({"image": [encoded]}))
    assert expected["error"].tolist() == [""]
    as_array = np.frombuffer(photo, np.uint8)  # np.fromfile's; cv2.imencode's is [n, 1]
    for given in (pd.DataFrame({"image": [photo, bytearray(photo), encoded.encode()]}),
                  {"image": [photo, photo, photo]},
                  pd.DataFrame({"image": [as_array, as_array.reshape(-1, 1), photo]})):
        got = model.predict(given)
        assert got["error"].tolist() == [""] * 3
        assert got["label"].tolist() == expected["label"].tolist() * 3
        assert got["probability"].tolist() == pytest.approx(
            expected["probability"].tolist() * 3)
    not_base64 = ("not base64: the 'image' column takes each image file's bytes base64-encoded "
                  "(from Python, the bytes as they are also do), not a path")
    picture = Image.open(io.BytesIO(photo))
    pixels = np.asarray(picture.convert("RGB").resize((64, 48)))
    got = model.predict(pd.DataFrame({"image": [
        path, encoded, base64.b64encode(b"plain text").decode(), pixels, picture, photo,
        pixels[..., 0].tolist()]}))
    decoded = "not an image file: the 'image' column takes each image file's bytes, base64-encoded"
    assert got["error"].tolist() == [
        not_base64, "", NOT_AN_IMAGE,
        f"decoded pixels (48x64x3 uint8), {decoded}; encode the pixels as a PNG first",
        f"a PIL image ({picture.mode} {picture.width}x{picture.height}), {decoded}; "
        "save it as a PNG or JPEG first",
        "", f"decoded pixels (48x64 int64), {decoded}; encode the pixels as a PNG first"]
    assert got["label"].tolist() == ["", expected["label"][0], "", "", "", expected["label"][0],
                                     ""]
    # A missing cell (None, NaN, empty; pandas' NA in a "string" column) says so rather than
    # "undecodable image" ("not base64" for NA before).
    missing = model.predict(pd.DataFrame({"image": [None, float("nan"), " ", encoded]}))
    assert missing["error"].tolist() == ["empty: no image in this row"] * 3 + [""]
    typed = model.predict(pd.DataFrame({"image": pd.array([encoded, None], dtype="string")}))
    assert typed["error"].tolist() == ["", "empty: no image in this row"]
    # The model itself (`get_raw_model()`) given a dict or a list of files' bytes: each file
    # whole (a BMP whose last pixels are black ends in NULs, which a numpy array of bytes
    # drops: "undecodable image" before).
    dark_top = np.full((40, 40, 3), 200, np.uint8)
    dark_top[:2] = 0
    bmp = io.BytesIO()
    Image.fromarray(dark_top).save(bmp, "BMP")
    assert bmp.getvalue().endswith(b"\0\0\0\0")
    inner = model.get_raw_model()
    for given in ({"image": [bmp.getvalue(), photo]}, [bmp.getvalue(), photo]):
        assert inner.predict(given)["error"].tolist() == ["", ""]


def test_a_python_dict_of_image_lists_gives_a_row_per_image(trained, data_info, tmp_path):
    """Another team's Python code calls the registered model as MLflow's REST ``inputs`` format
    reads: ``model.predict({"image": [b64, b64, …]})``. MLflow's schema enforcement makes that
    one row holding the list, which was answered with one "not base64" row for the whole
    batch; each image now gets its own row, as the REST call and a DataFrame give."""
    import base64

    from petalflow.tasks.dataset import split_files

    model = _pyfunc_model(trained["export_dir"], tmp_path / "mlflow")
    paths = split_files(data_info, "test")[0][:3]
    encoded = [base64.b64encode(Path(path).read_bytes()).decode() for path in paths]
    expected = model.predict(pd.DataFrame({"image": encoded}))
    assert (expected["error"] == "").all()
    for given in ({"image": encoded}, {"image": tuple(encoded)},
                  {"image": [{"b64": value} for value in encoded]}):
        got = model.predict(given)
        assert got["label"].tolist() == expected["label"].tolist(), given
        assert got["probability"].tolist() == pytest.approx(expected["probability"].tolist())
    one = model.predict({"image": [encoded[0]]})
    assert one["label"].tolist() == expected["label"].tolist()[:1]
    assert model.predict({"image": []}).empty


def test_the_model_names_an_image_format_it_cannot_read(trained, data_info, tmp_path,
                                                        monkeypatch):
    """An iPhone's HEIC photo (often named .jpg after a transfer), an AVIF, a TIFF scan, a
    Live Photo's video: each row names the format and says to convert the file (an archive
    of photos: to extract it), over the
    registered model (pyfunc, base64) and in `petalflow predict`'s CSV, instead of "undecodable
    image" (which now means a damaged file of a readable format)."""
    import base64

    from petalflow.tasks.dataset import split_files

    tiff = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tiff, "TIFF")
    files = {
        "photo.jpg": Path(split_files(data_info, "test")[0][0]).read_bytes(),
        "IMG_0001.jpg": b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(200),
        "pic.avif": b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf" + bytes(200),
        "scan.tif": tiff.getvalue(),
        "IMG_0002.mov": b"\0\0\0\x14ftypqt  \0\0\0\0qt  " + bytes(200),
        "cut.jpg": b"\xff\xd8\xff\xe0" + bytes(40),
    }
    # An archive of photos given as an image (`petalflow predict --input photos.zip`, a zip
    # posted to the served model): it says so (before: "undecodable image").
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("photos/a.jpg", files["photo.jpg"])
    tarred = io.BytesIO()
    with tarfile.open(fileobj=tarred, mode="w") as tar:
        info = tarfile.TarInfo("photos/a.jpg")
        info.size = len(files["photo.jpg"])
        tar.addfile(info, io.BytesIO(files["photo.jpg"]))
    files.update({"photos.zip": zipped.getvalue(), "photos.tar": tarred.getvalue(),
                  "photos.tgz": gzip.compress(tarred.getvalue()),
                  "photos.7z": b"7z\xbc\xaf\x27\x1c" + bytes(40)})

    def unsupported(fmt):
        return (f"unsupported image format {fmt} (the model reads JPEG, PNG, GIF, BMP and "
                "WebP): convert the file first")

    def archive(fmt):
        return f"a {fmt} archive, not an image: extract it and classify the images it holds"
    expected = ["", unsupported("HEIC/HEIF"), unsupported("AVIF"), unsupported("TIFF"),
                unsupported("MP4/QuickTime video"), CUT_SHORT.format("JPEG"), archive("zip"),
                archive("tar"), archive("gzip (.tgz, .gz)"), archive("7-Zip")]
    model = _pyfunc_model(trained["export_dir"], tmp_path / "mlflow")
    got = model.predict(pd.DataFrame({"image": [base64.b64encode(b).decode()
                                                for b in files.values()]}))
    assert got["error"].tolist() == expected
    assert _errors_of_files(model, files, tmp_path, monkeypatch) == ((10, 9), expected)


def _errors_of_files(model, files: dict, tmp_path, monkeypatch) -> tuple:
    """``files`` (name -> bytes) written into a folder and classified by ``model`` as
    `petalflow predict` does: ((images, errors) of its result, each row's error, in order)."""
    from petalflow.tasks import predict

    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    monkeypatch.setattr(predict, "load_model", lambda uri: (model, uri))
    result = predict.predict_files("m", [folder / n for n in files], tmp_path / "out.csv")
    got = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    return (result["images"], result["errors"]), got["error"].tolist()


def test_a_large_file_that_is_no_image_is_not_read_into_memory(trained, tmp_path, monkeypatch):
    """`petalflow predict --input 'share/*'` (a glob) or a file named on the command line may
    be a video, an archive or a disk image of gigabytes: each was read whole into memory (a
    batch of them, all at once) to be told it is no image. Only its first bytes are read, and
    its row says what it is as before; an image is read whole, whatever its name."""
    from petalflow.tasks import predict

    folder = tmp_path / "share"
    folder.mkdir()
    gigabytes = 3 << 30
    starts = {"holiday.mov": b"\0\0\0\x14ftypqt  \0\0\0\0qt  ",
              "photos.zip": b"PK\x03\x04\x14\0\0\0\x08\0",
              "disk.img": b"\0" * 16}
    for name, start in starts.items():
        with open(folder / name, "wb") as fh:  # sparse: 3 GiB on the file system, no blocks
            fh.write(start)
            fh.truncate(gigabytes)
    photo = write_image(folder / "rose.jpg", (200, 30, 30), size=(64, 64), noise=40)
    disguised = folder / "scan.dat"  # a PNG under another name is an image: read whole
    write_image(tmp_path / "p.png", (30, 200, 30), fmt="PNG", size=(64, 64), noise=40)
    disguised.write_bytes((tmp_path / "p.png").read_bytes())
    names = sorted(starts) + ["rose.jpg", "scan.dat"]
    data, unread = predict.read_files([folder / n for n in names])
    assert [len(d) for d in data[:3]] == [predict.NOT_IMAGE_BYTES] * 3
    assert data[3] == photo.read_bytes() and data[4] == disguised.read_bytes()
    assert unread == [""] * 5
    model = _pyfunc_model(trained["export_dir"], tmp_path / "mlflow")
    monkeypatch.setattr(predict, "load_model", lambda uri: (model, uri))
    result = predict.predict_files("m", [folder / n for n in names], tmp_path / "out.csv")
    assert (result["images"], result["errors"]) == (5, 3)
    got = pd.read_csv(tmp_path / "out.csv", keep_default_na=False).set_index("path")["error"]
    assert got.to_dict() == {
        str(folder / "disk.img"): NOT_AN_IMAGE,
        str(folder / "holiday.mov"): ("unsupported image format MP4/QuickTime video (the model "
                                      "reads JPEG, PNG, GIF, BMP and WebP): convert the file "
                                      "first"),
        str(folder / "photos.zip"): ("a zip archive, not an image: extract it and classify the "
                                     "images it holds"),
        str(folder / "rose.jpg"): "", str(folder / "scan.dat"): ""}


def test_a_webp_with_a_transparent_background_is_classified(trained, data_info, tmp_path,
                                                            monkeypatch):
    """A product photo or a web page's image saved as WebP with an alpha channel: the served
    model answered "undecodable image" (TensorFlow refuses such a WebP 3 channels) and its
    drift statistics could not be read. It is classified as the same photo without its alpha
    is (as a PNG's alpha is dropped), over the pyfunc model and `petalflow predict` with
    drift; an animated WebP stays an error, saying why."""
    import base64

    from petalflow.tasks import predict
    from petalflow.tasks.dataset import split_files

    with Image.open(split_files(data_info, "test")[0][0]) as im:
        rgb = im.convert("RGB")
    alpha = rgb.copy()  # nearly opaque (an opaque alpha channel is not stored)
    alpha.putalpha(Image.new("L", rgb.size, 254))
    corner = rgb.copy()  # a transparent corner
    corner.putalpha(Image.new("L", rgb.size, 255))
    corner.paste((0, 0, 0, 0), (0, 0, 8, 8))
    encoded = {}
    for name, image, options in (("plain.png", rgb, {}), ("clear.webp", alpha, {"lossless": True}),
                                 ("clear_lossy.webp", corner, {"quality": 90})):
        buffer = io.BytesIO()
        image.save(buffer, "PNG" if name.endswith(".png") else "WEBP", **options)
        encoded[name] = buffer.getvalue()
    assert all(encoded[n][12:16] in (b"VP8X", b"VP8L") for n in ("clear.webp",
                                                                  "clear_lossy.webp"))
    frames = io.BytesIO()
    rgb.save(frames, "WEBP", save_all=True, append_images=[rgb.rotate(90)])
    encoded["moving.webp"] = frames.getvalue()
    model = _pyfunc_model(trained["export_dir"], tmp_path / "mlflow")
    got = model.predict(pd.DataFrame({"image": [base64.b64encode(b).decode()
                                                for b in encoded.values()]}))
    assert got["error"].tolist()[:3] == ["", "", ""]
    assert got["error"].tolist()[3] == ANIMATED_WEBP
    assert got["label"].tolist()[1] == got["label"].tolist()[0]  # lossless: the same pixels
    assert got["probability"].tolist()[1] == pytest.approx(got["probability"].tolist()[0])
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in encoded.items():
        (folder / name).write_bytes(data)
    monkeypatch.setattr(predict, "load_model", lambda uri: (model, uri))
    result = predict.predict_files("m", sorted(folder.iterdir()), tmp_path / "out.csv",
                                   drift=True)
    assert (result["images"], result["errors"]) == (4, 1)
    assert result["drift"]["available"] and result["drift"]["images"] == 3
    got = pd.read_csv(tmp_path / "out.csv", keep_default_na=False).set_index("path")["error"]
    assert got[str(folder / "moving.webp")] == ANIMATED_WEBP


def test_a_row_the_model_cannot_decode_says_what_its_bytes_show(trained, data_info, tmp_path,
                                                               monkeypatch):
    """Every image the decoder refused answered "undecodable image", whether it was an empty
    file, a text file named .jpg, an error page saved as a photo, a copy cut short or an
    animated WebP (TensorFlow's own words
    for that one, "WebP Animation must be 4 channel RGBA", read as if an RGBA file would do):
    the user could not tell which to fix how. The row now says what its bytes show, after
    "undecodable image" (the error's kind, first), as the training scan says it; an image
    damaged inside, which its bytes do not explain, keeps the bare words. Over the pyfunc
    model, raw bytes and `petalflow predict`'s files alike."""
    import base64

    from petalflow.tasks.dataset import split_files

    photo = Path(split_files(data_info, "test")[0][0]).read_bytes()
    png = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(png, "PNG")
    sos = photo.index(b"\xff\xda")
    frames = io.BytesIO()
    still = Image.open(io.BytesIO(photo)).convert("RGB")
    still.save(frames, "WEBP", save_all=True, append_images=[still.rotate(90)])
    files = {
        "photo.jpg": photo,
        # a phone's motion photo: the JPEG whole, then its video; classified
        "motion.jpg": photo + b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4,
        "empty.jpg": b"",
        "notes.jpg": b"this is not an image\n",
        # a download that got an error page, saved under the photo's name
        "page.jpg": b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head></html>",
        "cut.jpg": photo[: len(photo) * 2 // 3],
        "cut.png": png.getvalue()[:-300],
        "padded_cut.jpg": photo[: len(photo) // 2] + bytes(100),  # zeros after: still cut
        "moving.webp": frames.getvalue(),
        # its header damaged (no image data after it), its end marker there: nothing its
        # bytes tell
        "damaged.jpg": photo[: sos - 10] + b"\xff\xd9",
    }
    expected = ["", "", "undecodable image: empty file (0 bytes)", NOT_AN_IMAGE,
                "undecodable image: a web page (HTML), not an image: a download that got an "
                "error or sign-in page instead?", CUT_SHORT.format("JPEG"),
                CUT_SHORT.format("PNG"), CUT_SHORT.format("JPEG"), ANIMATED_WEBP,
                "undecodable image"]
    model = _pyfunc_model(trained["export_dir"], tmp_path / "mlflow")
    raw = model.get_raw_model()
    assert raw.predict_bytes(list(files.values()))["error"].tolist() == expected
    features = raw.predict_with_features(list(files.values()))[0]
    assert features["error"].tolist() == expected
    # base64 rows: an empty one is a missing cell, as before
    got = model.predict(pd.DataFrame({"image": [base64.b64encode(b).decode()
                                                for b in files.values()]}))
    assert got["error"].tolist() == expected[:2] + ["empty: no image in this row"] + expected[3:]
    assert _errors_of_files(model, files, tmp_path, monkeypatch) == ((10, 8), expected)


def test_the_validation_loss_says_when_the_head_needed_more_or_fewer_epochs():
    """``epochs_advice`` on validation losses measured on real data (BENCHMARKS.md, "How many
    epochs"): the flowers' default 5 epochs say nothing; 15 overfit after epoch 3; 150 classes
    of 4 training photos were still learning at their fifth epoch."""
    from petalflow.tasks.train import epochs_advice

    flowers = [0.4431, 0.3725, 0.3670, 0.3710, 0.3777, 0.3744, 0.3757, 0.3814, 0.3829, 0.3964,
               0.4060, 0.3940, 0.4059, 0.4075, 0.4079]
    assert epochs_advice(flowers[:5], 5) is None
    assert epochs_advice(flowers, 15) == (
        "the validation loss was lowest at epoch 3 of 15 (0.3670) and 0.4079 at the last: the "
        "head overfitted after epoch 3; about 3 epochs would likely do as well or better")
    many_classes = [4.3725, 3.5052, 3.1117, 2.8661, 2.6959]
    assert epochs_advice(many_classes, 5) == (
        "the validation loss was still falling at the last of the 5 epochs (2.8661 -> 2.6959): "
        "the head had not finished learning; more epochs than 5 (epochs on cached features "
        "cost little) would likely raise its accuracy")
    # 60 epochs on 120 classes of 9 training photos: the loss creeps down by 2 % at the last
    # epoch (0.1092 -> 0.1068), its last 12 epochs at 0.04 of its average fall per epoch, the
    # accuracy flat since epoch 23 (0.996): finished, nothing to say (before: "more epochs than
    # 60 would likely raise its accuracy", and at 500 the same).
    long_run = [4.857, 4.372, 3.881, 3.559, 3.018, 2.73, 2.453, 2.117, 1.848, 1.676, 1.473,
                1.37, 1.183, 1.049, 0.946, 0.873, 0.769, 0.687, 0.642, 0.591, 0.532, 0.484,
                0.459, 0.442, 0.402, 0.397, 0.349, 0.351, 0.319, 0.287, 0.289, 0.272, 0.255,
                0.243, 0.225, 0.231, 0.224, 0.209, 0.211, 0.186, 0.194, 0.179, 0.17, 0.161,
                0.16, 0.158, 0.148, 0.148, 0.146, 0.139, 0.137, 0.132, 0.121, 0.128, 0.122,
                0.118, 0.112, 0.12, 0.1092, 0.1068]
    assert epochs_advice(long_run, 60) is None
    assert epochs_advice(long_run[:5], 5).startswith(  # its first 5 epochs: still learning
        "the validation loss was still falling at the last of the 5 epochs (3.5590 -> 3.0180)")
    # 20 epochs still falling steadily: said; slowing, over the last 4, to a sixth of the
    # average fall per epoch (6 % at the last one): said; to a seventeenth: finished.
    for still_learning in ([2.0 - 0.05 * i for i in range(20)],
                           [2.0] + [0.5 - 0.015 * i for i in range(19)]):
        assert epochs_advice(still_learning, 20).startswith(
            "the validation loss was still falling at the last of the 20 epochs")
    assert epochs_advice([2.0] + [0.2 - 0.006 * i for i in range(19)], 20) is None
    # A last epoch barely lower (1 %), or higher but by less than a tenth: nothing to say.
    assert epochs_advice([1.2, 1.0, 0.99], 3) is None
    assert epochs_advice([1.0, 0.9, 0.95, 0.98], 4) is None
    # The lowest one epoch before the last is noise, not overfitting.
    assert epochs_advice([1.0, 0.9, 0.5, 0.6], 4) is None
    # One epoch, a history shorter than the epochs (a resumed training), a NaN loss.
    assert epochs_advice([1.0], 1) is None
    assert epochs_advice(many_classes[2:], 5) is None
    assert epochs_advice([1.0, float("nan"), 0.5], 3) is None


def test_a_training_whose_validation_loss_still_falls_records_the_advice(
        tmp_path, tiny_backbone, data_info):
    """Three epochs where the tiny backbone's features need many: the head is still learning,
    and the training's record (train.json; the summary's ``training``) says so; fine-tuned,
    the head's epochs are not all its training, and it says nothing."""
    record = train_model(data_info, _cfg(tiny_backbone, epochs=3, learning_rate=0.3,
                                         edge_export=False),
                         tmp_path / "a", features_dir=tmp_path / "features")
    losses = record["history"]["val_loss"]
    assert losses[2] < 0.98 * losses[1]
    assert record["advice"].startswith("the validation loss was still falling at the last of "
                                       f"the 3 epochs ({losses[1]:.4f} -> {losses[2]:.4f})")
    assert json.loads((tmp_path / "a" / "train.json").read_text())["advice"] == record["advice"]
    tuned = train_model(data_info, _cfg(tiny_backbone, epochs=3, learning_rate=0.3,
                                        fine_tune_layers=1, fine_tune_epochs=1,
                                        edge_export=False),
                        tmp_path / "b", features_dir=tmp_path / "features")
    assert tuned["history"]["val_loss"][:3] == pytest.approx(losses, rel=1e-3)
    assert tuned["advice"] is None


def test_averaging_starts_after_the_first_60_percent_of_the_heads_steps():
    from petalflow.tasks.train import averaging_start

    assert averaging_start(5, 33) == 99  # the last 2 of 5 epochs: steps 100-165
    assert averaging_start(10, 10) == 60
    assert averaging_start(1, 1) == 0  # one step: it is the average
    assert averaging_start(1, 2) == 1  # at least the last step


def test_the_head_is_the_mean_of_its_weights_after_each_step_of_its_last_epochs():
    """``WeightAverage``: after fitting, ``apply`` puts into the head the mean of the weights
    it had after each of the steps after ``averaging_start`` (recorded here step by step),
    when that mean's validation loss is not higher than the last step's weights'; else the
    head keeps the last step's weights exactly. It decides once: a second ``apply`` changes
    nothing."""
    from petalflow.tasks.model import build_head, keras
    from petalflow.tasks.train import WeightAverage, averaging_start

    k = keras()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    start = averaging_start(5, 5)
    assert start == 15
    for averaged_loss, used in ((0.4, True), (0.6, False)):
        head = build_head(6, 2, seed=1)
        head.compile(optimizer=k.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
        average = WeightAverage(head)
        steps, seen = [], []

        class Record(k.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                steps.append([w.numpy().copy() for w in head.trainable_weights])

        def validate():  # the last step's weights score 0.5, the average averaged_loss
            seen.append([w.numpy().copy() for w in head.trainable_weights])
            return {"val_loss": 0.5 if len(seen) == 1 else averaged_loss, "val_accuracy": 0.9}

        head.fit(x, y, batch_size=8, epochs=5, shuffle=True, verbose=0,
                 callbacks=[average.callback(5, 5), Record()])
        assert len(steps) == 25
        mean = [np.mean([s[i] for s in steps[start:]], axis=0) for i in range(2)]
        assert not np.allclose(mean[0], steps[-1][0])
        decision = average.apply(validate)
        assert decision == {"used": used, "steps": 10, "val_loss": averaged_loss,
                            "val_accuracy": 0.9, "last_step": {"val_loss": 0.5,
                                                               "val_accuracy": 0.9}}
        for got, want in zip(seen[0], steps[-1]):  # the last step's weights, then the mean
            np.testing.assert_array_equal(got, want)
        for got, want in zip(seen[1], mean):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for got, want in zip(head.trainable_weights, mean if used else steps[-1]):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
        assert average.apply(validate) is None and len(seen) == 2


@pytest.fixture(scope="module")
def noisy_data_info(tmp_path_factory):
    """Colour classes with every third photo in the next class's folder: the head's loss
    stops falling and its last steps' weights scatter around where it settles."""
    import shutil

    tmp = tmp_path_factory.mktemp("noisy")
    root = make_dataset(tmp / "photos", per_class=20)
    names = sorted(p.name for p in root.iterdir())
    for c, name in enumerate(names):
        for f in sorted((root / name).iterdir())[::3]:
            shutil.move(f, root / names[(c + 1) % len(names)] / f"moved-{name}-{f.name}")
    return prepare_dataset(root, tmp / "manifest", 0.2, 0.2, seed=0)


def test_the_trained_models_validation_is_recorded_and_a_kill_after_the_last_epoch_loses_nothing(
        tmp_path, tiny_backbone, noisy_data_info):
    """On data whose head settles early (labels partly wrong, a high learning rate) the
    averaged head scores a lower validation loss and is the model: the record's
    ``validation`` (the sweep ranks candidates on it) is the exported model's, while the
    epochs' figures are the last step's; a training killed after its last epoch's checkpoint,
    before the average was decided, exports the same model when resumed. Without
    ``average_weights`` the head is the last step's."""
    from petalflow.tasks.dataset import split_files

    data_info = noisy_data_info
    cfg = _cfg(tiny_backbone, epochs=20, batch_size=4, learning_rate=1.0, edge_export=False)
    whole = train_model(data_info, cfg, tmp_path / "runs" / "a", features_dir=tmp_path / "f")
    labels = np.asarray(split_files(data_info, "val")[1])
    probs = _probabilities(whole["export_dir"], data_info, "val")
    loss = float(np.mean(-np.log(probs[np.arange(len(labels)), labels])))
    decision = whole["weight_average"]
    assert decision["used"] and decision["steps"] > 0
    assert decision["val_loss"] < decision["last_step"]["val_loss"]
    assert whole["validation"]["val_loss"] == pytest.approx(loss, rel=1e-4)
    assert whole["validation"]["val_loss"] == pytest.approx(decision["val_loss"], rel=1e-5)
    assert whole["validation"]["val_accuracy"] == pytest.approx(
        float(np.mean(probs.argmax(1) == labels)))
    assert whole["history"]["val_loss"][-1] == pytest.approx(
        decision["last_step"]["val_loss"], rel=1e-5)

    key = tmp_path / "runs" / "b"
    with pytest.raises(Interrupt):
        train_model(data_info, cfg, key / "run-1", on_epoch_end=_killed_after(20),
                    features_dir=tmp_path / "f")
    resumed = train_model(data_info, cfg, key / "run-2", features_dir=tmp_path / "f")
    assert resumed["resumed_from_epoch"] == 20
    np.testing.assert_allclose(_probabilities(resumed["export_dir"], data_info, "val"), probs,
                               atol=1e-6)
    assert resumed["validation"] == pytest.approx(whole["validation"], rel=1e-5)

    plain = train_model(data_info, cfg.model_copy(update={"average_weights": False}),
                        tmp_path / "runs" / "c", features_dir=tmp_path / "f")
    assert plain["weight_average"] is None
    assert plain["history"]["loss"] == pytest.approx(whole["history"]["loss"], rel=1e-5)
    assert plain["validation"]["val_loss"] == pytest.approx(plain["history"]["val_loss"][-1],
                                                            rel=1e-5)
    assert not np.allclose(_probabilities(plain["export_dir"], data_info, "val"), probs,
                           atol=1e-4)


def test_a_head_still_learning_keeps_its_last_steps_weights(tmp_path, tiny_backbone,
                                                           data_info):
    """Colour classes the tiny backbone separates slowly: the head's loss still falls at its
    last step, its average over the last steps lags behind it (a higher validation loss),
    so the model keeps the last step's weights: the same model as ``--no-average-weights``."""
    cfg = _cfg(tiny_backbone, edge_export=False)
    run = train_model(data_info, cfg, tmp_path / "a", features_dir=tmp_path / "f")
    decision = run["weight_average"]
    assert not decision["used"] and decision["steps"] > 0
    assert decision["val_loss"] > decision["last_step"]["val_loss"]
    assert run["validation"]["val_loss"] == pytest.approx(decision["last_step"]["val_loss"],
                                                          rel=1e-5)
    plain = train_model(data_info, cfg.model_copy(update={"average_weights": False}),
                        tmp_path / "b", features_dir=tmp_path / "f")
    np.testing.assert_allclose(_probabilities(run["export_dir"], data_info),
                               _probabilities(plain["export_dir"], data_info), atol=1e-6)


def test_a_training_resumed_after_its_last_epoch_logs_no_checkpoint_warnings(
        tmp_path, tiny_backbone, data_info, caplog):
    """A command stopped after the last epoch's checkpoint (during the export, say): the same
    command again resumes there, runs no training step, so the optimizers' slot variables the
    checkpoint holds are never created, and TensorFlow logged ~50 warnings ("Value in
    checkpoint could not be found in the restored object: (root).tune_opt._variables.7") into
    the run's log. Nothing is missing: the model is whole. The resume expects that."""
    import gc

    cfg = _cfg(tiny_backbone, epochs=2, fine_tune_layers=2, fine_tune_epochs=1,
               edge_export=False)
    key = tmp_path / "runs" / "k"
    with pytest.raises(Interrupt):
        train_model(data_info, cfg, key / "run-1", on_epoch_end=_killed_after(3),
                    features_dir=tmp_path / "f")
    with caplog.at_level("WARNING", logger="tensorflow"):
        resumed = train_model(data_info, cfg, key / "run-2", features_dir=tmp_path / "f")
        gc.collect()
    assert resumed["resumed_from_epoch"] == 3
    assert Path(resumed["export_dir"], "saved_model.pb").is_file()
    assert "checkpoint" not in caplog.text, caplog.text[:2000]


def test_photos_gone_or_changed_since_the_scan_fail_the_run_saying_so(tmp_path, tiny_backbone,
                                                                      exported):
    """A folder source someone curates while a run reads it (a photo removed, another rewritten
    by a sync client after the scan): the training failed with TensorFlow's NotFoundError
    about one file ("…/daisy/x.jpg; No such file or directory", exit status 1). The training
    and the evaluation now fail with DatasetChanged naming what is gone and what changed; a
    failure with the data as scanned is raised as it was."""
    from petalflow.tasks.dataset import load_manifest, unchanged_data
    from petalflow.tasks.errors import DatasetChanged
    from petalflow.tasks.evaluate import evaluate_model

    root = make_dataset(tmp_path / "photos", per_class=12)
    info = prepare_dataset(root, tmp_path / "manifest", 0.2, 0.2, seed=0)
    with pytest.raises(ValueError, match="not about the data"), unchanged_data(info):
        raise ValueError("not about the data")
    used = load_manifest(Path(info["manifest"]))
    used = used[used["status"] == "ok"]
    train = used[used["split"] == "train"]["path"].tolist()
    kept = {rel: (root / rel).read_bytes() for rel in train[:2]}
    (root / train[0]).unlink()
    with open(root / train[1], "r+b") as photo:
        photo.truncate(40)
    with pytest.raises(DatasetChanged) as failed:
        train_model(info, _cfg(tiny_backbone, edge_export=False), tmp_path / "run",
                    features_dir=tmp_path / "features")
    assert str(failed.value) == (
        f"the dataset changed during the run: of the files it scanned in {root}, 1 file is gone "
        f"({train[0]}) and 1 file changed ({train[1]}), removed, moved or rewritten while the "
        "run read them; run again: the next run scans the data as it is then")

    for rel, data in kept.items():  # the training photos as scanned; test photos gone
        (root / rel).write_bytes(data)
    test = used[used["split"] == "test"]["path"].tolist()
    for rel in test[:5]:
        (root / rel).unlink()
    with pytest.raises(DatasetChanged, match=r"in \S+, 5 files are gone \([^)]* and 2 more\), "
                       "removed"):
        evaluate_model(Path(exported), info, tmp_path / "evaluation")
