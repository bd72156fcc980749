"""Train the head (and optionally fine-tune the top of the backbone), resumably.

Inputs are the dataset description written by ``tasks.dataset.prepare_dataset`` and the run's
TrainParams; outputs are files in ``workdir`` (one per run, under a folder per run key):
per-epoch checkpoints (``checkpoints/``), the exported serving SavedModel (``export/``) and
``train.json`` (history, device, epochs; written last, it marks the attempt finished). Cached
backbone features live beside, in ``<run key>/features/``. A retried run (same workdir) resumes
from its last complete checkpoint, and a new run after a killed one starts from the killed
attempt's checkpoints instead of starting over.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from prefect import task
from pydantic import BaseModel, ConfigDict

from petalflow.tasks.dataset import (
    DatasetInfo, load_manifest, reads_exif, split_files, split_shas, unchanged_data,
)
from petalflow.tasks.common import (
    file_lock, log, redact_url, release_memory, remove_set_aside, set_aside, write_json,
)
from petalflow.tasks.features import aligned, aligned_empty, shared_tensor
from petalflow.tasks.params import TrainParams
from petalflow.tasks.space import disk_full_said

EpochHook = Callable[[int, int, dict], None]


class TrainingJob(BaseModel):
    """The training step's one parameter: what the train flow hands the ``train-model`` flow,
    in this process or as a ``train-gpu`` deployment run on another machine, so only
    locations and plain data (JSON) cross the boundary."""

    model_config = ConfigDict(extra="forbid")

    dataset: DatasetInfo  # the scanned, split dataset (``prepare_dataset``)
    params: TrainParams
    workdir: str  # this attempt's folder under the shared PETALFLOW_HOME; train.json lands here
    run_id: str  # the MLflow run that per-epoch metrics go to
    backbone_path: Optional[str] = None  # local copy of params.backbone (``fetch_backbone``)
    progress_artifact_id: Optional[str] = None  # the started run's progress artifact
    # Where backbone features are cached (``feature_cache_dir``): shared by every training on
    # the same data, split and backbone. None: beside the run key's attempts.
    features_dir: Optional[str] = None


def feature_cache_dir(root: Path, params: TrainParams, fingerprint: str,
                      backbone_path: Optional[str]) -> Path:
    """The folder under ``root`` for features of this data, split, backbone, image size and
    image decoder (``images.DECODER``): what the features depend on, and nothing else (epochs,
    learning rate, augmentation or the head do not change them), so runs and sweep candidates
    that differ only there share it.
    The backbone is identified by its handle and, for a local copy, by the hash of its graph and
    variable index (a folder replaced in place gets a new cache)."""
    import hashlib

    from petalflow.tasks.images import DECODER

    blob = json.dumps({**_backbone_identity(params.backbone, backbone_path),
                       "image_size": params.image_size, "fingerprint": fingerprint,
                       "split": [params.val_fraction, params.test_fraction, params.seed],
                       "decoder": DECODER},
                      sort_keys=True)
    return Path(root) / hashlib.sha256(blob.encode()).hexdigest()[:16]


def _backbone_identity(handle: str, backbone_path: Optional[str]) -> dict:
    """What identifies a backbone in a cache's key: its handle (a URL without the credentials
    or the signing time it may carry, ``common.source_url``: the same model fetched with another
    password or signed again is the same backbone) and the hashes of its local copy's graph and
    variable index (None: no local copy)."""
    from petalflow.tasks.common import sha256_file, source_url

    files = {}
    if backbone_path:
        for name in ("saved_model.pb", "variables/variables.index"):
            path = Path(backbone_path) / name
            files[name] = sha256_file(path) if path.is_file() else None
    return {"backbone": source_url(handle), "files": files}


FROZEN_BACKBONES = "frozen-backbones"  # beside the feature caches


def local_backbone(params: TrainParams, backbone_path: Optional[str]) -> Optional[str]:
    """The backbone's local SavedModel folder: its fetched copy (``fetch_backbone``), else the
    handle itself when it is a folder; None for a URL not fetched."""
    return backbone_path or (params.backbone if Path(params.backbone).is_dir() else None)


def frozen_backbone_dir(root: Path, params: TrainParams, backbone_path: Optional[str]) -> Path:
    """The folder under ``root`` for the backbone frozen at this image size
    (``model.save_frozen``): what it depends on — the backbone (handle; graph and variable
    index of its local copy, or of the handle's own folder) and the image size — and the
    version of TensorFlow, which wrote it."""
    import hashlib

    import tensorflow as tf

    blob = json.dumps({**_backbone_identity(params.backbone,
                                            local_backbone(params, backbone_path)),
                       "image_size": params.image_size, "tensorflow": tf.__version__},
                      sort_keys=True)
    return Path(root) / hashlib.sha256(blob.encode()).hexdigest()[:16]


def configure_device() -> str:
    """Use the GPU when one is visible (memory growth on), else the CPU; return its name."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised in this process: keep its settings
            pass
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"GPU:0 ({details.get('device_name', 'unknown')})"
    return "CPU"


def use_mixed_precision() -> bool:
    """float16 compute for the head on GPUs with tensor cores (compute capability >= 7.0).

    The Hub backbone runs its saved float32 graph either way; on the CPU nothing changes."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability and capability >= (7, 0):
            return True
    return False


def _atomic_save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: no half file left taking its space
        tmp.unlink(missing_ok=True)
        raise


PROGRESS_EVERY_S = 5.0


# Augmentation of a frozen backbone's training: the head trains on the plain features plus
# this many augmented copies of the training split, each computed once (one features pass) and
# cached, instead of re-decoding and re-running the backbone on fresh augmentations every epoch.
# Chosen by measurement (``bench/augment_views.py``, BENCHMARKS.md, target 2; flowers, 5 head
# seeds) on splits other than the one accuracies are reported on (split seeds 1-3, validation
# and test photos): 0.859 with no copy, 0.864 with 1, 0.865 with 2 (within the noise of one,
# for one more features pass); a mirrored copy 0.864, a mirrored + an augmented copy 0.864.
AUGMENTED_VIEWS = 1


# ``average_weights``: the head's weights are the running mean of those after each training step
# of its last AVERAGED_SHARE of epochs (the last 2 of 5), not the last step's alone, unless its
# validation loss is higher than the last step's weights' (``WeightAverage.apply``). Chosen by
# measurement (BENCHMARKS.md, "Weight averaging of the head"; flowers, splits 1-6, 5 head seeds):
# the mean over the last 20 %, 40 %, 60 % of the steps 0.8670, 0.8690, 0.8685 against 0.8616
# for the last step's weights (with an augmented copy 0.8706, 0.8701, 0.8707 against 0.8672).
AVERAGED_SHARE = 0.4


def averaging_start(epochs: int, steps_per_epoch: int, share: float = AVERAGED_SHARE) -> int:
    """How many of the head's ``epochs * steps_per_epoch`` training steps come before the
    averaged last ``share`` of them: the steps after it (at least the last one) are averaged."""
    total = epochs * steps_per_epoch
    return max(0, min(total - 1, int(round(total * (1 - share)))))


class WeightAverage:
    """The running mean of ``head``'s trainable weights over the training steps after
    ``averaging_start``, kept in variables a checkpoint saves (``state``), so a resumed
    training averages on where it stopped. ``callback`` updates it after each step; ``apply``
    puts the average into the head, once."""

    def __init__(self, head):
        import tensorflow as tf

        self.weights = list(head.trainable_weights)
        self.state = tf.Module()
        self.state.average = [tf.Variable(w, trainable=False) for w in self.weights]
        self.state.count = tf.Variable(0, dtype=tf.int64, trainable=False)  # steps averaged
        self.state.applied = tf.Variable(False, trainable=False)

    def callback(self, epochs: int, steps_per_epoch: int, share: float = AVERAGED_SHARE):
        from petalflow.tasks.model import keras

        start = averaging_start(epochs, steps_per_epoch, share)
        state, weights = self.state, self.weights

        class Average(keras().callbacks.Callback):
            epoch = 0
            _supports_tf_logs = True  # the step's logs are not read: not turned into numbers

            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_end(self, batch, logs=None):
                n = self.epoch * steps_per_epoch + batch + 1 - start
                if n > 0:
                    for average, weight in zip(state.average, weights):
                        average.assign_add((weight - average) / n)
                    state.count.assign(n)

        return Average()

    def apply(self, validate: Callable[[], dict]) -> Optional[dict]:
        """Put the average into the head, unless its validation loss (``validate``: the head's
        ``val_loss`` and ``val_accuracy``) is higher than the last step's weights': a head
        still learning fast is behind its last step on average. Once: a resumed training
        that finds it decided leaves the head, fine-tuned since perhaps, alone (None).
        Returns the decision: ``used``, the averaged head's figures, the last step's
        (``last_step``) and the steps averaged."""
        if bool(self.state.applied.numpy()) or int(self.state.count.numpy()) == 0:
            return None
        last_step = validate()
        as_trained = [w.numpy() for w in self.weights]
        for weight, average in zip(self.weights, self.state.average):
            weight.assign(average)
        averaged = validate()
        used = averaged["val_loss"] <= last_step["val_loss"]
        if not used:
            for weight, value in zip(self.weights, as_trained):
                weight.assign(value)
        self.state.applied.assign(True)
        return {"used": bool(used), "steps": int(self.state.count.numpy()), **averaged,
                "last_step": last_step}


def augmented_view_file(seed: int, view: int) -> str:
    """The cache file of one augmented copy of the training split: its seed and the
    augmentation's settings are in the name (the folder already names data and backbone)."""
    import hashlib

    from petalflow.tasks.inputs import CONTRAST, ROTATION, ZOOM

    # "stateless": copies made before the draws followed from seed and batch (inputs.py) differ
    settings = hashlib.sha256(repr((ROTATION, ZOOM, CONTRAST, "stateless")).encode()
                              ).hexdigest()[:8]
    return f"train-augmented-{settings}-s{seed}-v{view}.npz"


def augmented_copy(extract, paths, labels, cfg: TrainParams, features_dir: Path,
                   view: int, exif: bool = True) -> tuple:
    """(features, whether they came from the cache, cache name) of augmented copy ``view`` of
    ``paths``: its file (``augmented_view_file``) and its augmentation seed both follow from
    ``cfg.seed`` and ``view``."""
    name = augmented_view_file(cfg.seed, view)
    features, _, hit, _ = cached_features(extract, paths, labels, cfg, features_dir / name,
                                          augment_seed=(cfg.seed * 1000 + view + 1) % 2**31,
                                          exif=exif)
    return features, hit, name.removesuffix(".npz")


def cached_features(extract, paths, labels, cfg: TrainParams, cache: Path,
                    augment_seed: Optional[int] = None, exif: bool = True,
                    bank: Optional[Path] = None, shas: Optional[list] = None) -> tuple:
    """(features [n, dim], labels, whether they came from the cache, how many came from the
    feature bank) for ``paths``, computed by ``extract`` (``tasks.features.FeatureExtractor``:
    image batch -> features) once and cached in ``cache`` (.npz); with ``augment_seed``, of
    the images randomly augmented (``augment_batch``) with that seed. ``exif``: as
    ``inputs.image_dataset``. With ``bank`` (``feature_bank_dir``) and the files' ``shas``,
    the plain features of images computed by earlier trainings (other data, other splits) are
    taken from the bank and only the others computed (then added to it).
    While computing, a progress line every few seconds (images done, images/s)."""
    # One process computes, the others (concurrent sweep candidates) wait and read.
    with file_lock(cache.with_name(cache.name + ".lock")):
        if cache.exists():
            with np.load(cache) as data:
                if list(data["paths"]) == list(paths):
                    log("features (%s): %d images from the cache %s", cache.stem, len(paths),
                        cache.parent)
                    return data["features"], data["labels"], True, 0
        if bank is None or shas is None or augment_seed is not None:
            features = _compute_features(extract, paths, cfg, cache.stem, augment_seed, exif)
            banked = 0
        else:
            features, banked = _features_with_bank(extract, paths, shas, cfg, cache.stem, bank,
                                                   exif)
        cache.parent.mkdir(parents=True, exist_ok=True)
        _atomic_save_npz(cache, features=features, labels=labels, paths=np.array(paths))
        return features, labels, False, banked


# Beside the feature caches: each image's plain features by its content (sha256), for one
# backbone, image size and decoder (what one image's features depend on), in segments of the
# images one training computed for one split. Data that grew or changed gets new caches (its
# fingerprint changed) but computes only its new images' features (``cached_features``); rows
# of images no data holds any more go once they are most of a bank (``compact_feature_banks``).
FEATURE_BANKS = "feature-banks"
FEATURE_CACHE_DATA = "data.json"  # in a feature cache: the fingerprint of the data it holds


def mark_feature_cache(features_dir: Path, fingerprint: str) -> None:
    """Say which data ``features_dir`` (``feature_cache_dir``) holds features of, before any
    is written (``prune_feature_caches`` reads it)."""
    marker = Path(features_dir) / FEATURE_CACHE_DATA
    if not marker.is_file():
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"fingerprint": fingerprint})


def prune_feature_caches(root: Path, fingerprints: set) -> list[tuple[str, int]]:
    """Remove the feature caches under ``root`` of data whose fingerprint is not in
    ``fingerprints`` (the data of the manifests still on disk: superseded versions of a
    dataset), unless a training is computing or reading one (its locks). The feature banks
    keep every image's features: the same data back costs no backbone pass. Caches written
    before they were marked stay. Returns (name, bytes) of each one removed."""
    import contextlib

    if not Path(root).is_dir():
        return []
    removed = []
    remove_set_aside(root)  # a removal a killed process left half done
    for cache in sorted(Path(root).iterdir()):
        marker = cache / FEATURE_CACHE_DATA
        if cache.name.startswith(".") or not marker.is_file():
            continue
        try:
            if json.loads(marker.read_text()).get("fingerprint") in fingerprints:
                continue
            with contextlib.ExitStack() as held:
                if not all(held.enter_context(file_lock(lock, wait=False))
                           for lock in sorted(cache.glob("*.lock"))):
                    continue  # a training computes or reads it now
                size = set_aside(cache)
        except (OSError, ValueError, AttributeError) as exc:  # never fails the run
            log("features: could not remove %s (%s)", cache, exc, level=30)
            continue
        removed.append((cache.name, size))
    remove_set_aside(root)
    return removed


def feature_bank_dir(root: Path, params: TrainParams, backbone_path: Optional[str]) -> Path:
    """The feature bank under ``root`` of ``params``' backbone, image size and decoder."""
    import hashlib

    from petalflow.tasks.images import DECODER

    blob = json.dumps({**_backbone_identity(params.backbone, backbone_path),
                       "image_size": params.image_size, "decoder": DECODER}, sort_keys=True)
    return Path(root) / hashlib.sha256(blob.encode()).hexdigest()[:16]


def _features_with_bank(extract, paths, shas, cfg: TrainParams, name: str, bank: Path,
                        exif: bool) -> tuple[np.ndarray, int]:
    """(features of ``paths``, how many came from ``bank``): the bank's rows for the
    ``shas`` it holds, the others computed and added to it as a new segment."""
    import uuid

    wanted = {sha: i for i, sha in enumerate(shas)}
    found: dict[str, np.ndarray] = {}
    with file_lock(bank / BANK_LOCK) if bank.is_dir() else contextlib.nullcontext():
        for segment in _bank_segments(bank):  # not compacted meanwhile (the lock)
            try:
                with np.load(segment) as data:
                    for sha, row in zip(data["shas"], data["features"]):
                        if sha in wanted:
                            found[str(sha)] = row
            except Exception as exc:  # noqa: BLE001 - a damaged segment costs its features only
                log("features: skipping the damaged bank segment %s (%s)", segment, exc,
                    level=30)
    missing = [i for i, sha in enumerate(shas) if sha not in found]
    computed = (_compute_features(extract, [paths[i] for i in missing], cfg, name, None, exif)
                if missing else None)
    if found:
        dim = computed.shape[1] if computed is not None else len(next(iter(found.values())))
        features = aligned_empty(len(paths), dim)
        for sha, row in found.items():
            features[wanted[sha]] = row
        if missing:
            features[missing] = computed
    else:  # nothing banked yet: no second array of the split's features
        features = computed
    if missing:
        bank.mkdir(parents=True, exist_ok=True)
        _atomic_save_npz(bank / f"{uuid.uuid4().hex}.npz", features=computed,
                         shas=np.array([shas[i] for i in missing]))
    if found:
        log("features (%s): %d images from earlier trainings (%s), %d computed", name,
            len(paths) - len(missing), bank, len(missing))
    return features, len(paths) - len(missing)


BANK_LOCK = ".lock"  # held by a training reading a bank's segments and by its compaction
# A bank is rewritten as one segment of the rows current data needs (``compact_feature_banks``)
# once more than half its rows are of images no current data holds (data that rolls: new
# photos in, old ones out), or once it has more than this many segments (a training adds one
# per split whose features it computed).
BANK_SEGMENTS = 16


def _bank_segments(bank: Path) -> list[Path]:
    """The complete segments of ``bank`` (not those being written)."""
    return [p for p in sorted(bank.glob("*.npz")) if ".tmp." not in p.name] \
        if bank.is_dir() else []


def compact_feature_banks(root: Path, current: set) -> list[tuple[str, int, int]]:
    """Rewrite each feature bank under ``root`` (``FEATURE_BANKS``) whose rows are mostly of
    images not in ``current`` (the sha256 of the data the manifests on disk describe), or
    that has more than ``BANK_SEGMENTS`` segments, as one segment of its rows of ``current``
    images (each once): with scheduled retraining on rolling data a bank grew with the data's
    history, and every training read all of it. A bank a training is reading (its lock) is
    left for a later run, and so is every bank when nothing is ``current``. Returns (bank,
    rows removed, bytes freed) of each one rewritten; never fails the run."""
    if not current or not Path(root).is_dir():
        return []
    done = []
    for bank in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        try:
            with file_lock(bank / BANK_LOCK, wait=False) as held:
                result = _compact_bank(bank, current) if held else None
        except (OSError, ValueError) as exc:
            log("features: could not compact the feature bank %s (%s)", bank, exc, level=30)
            continue
        if result is not None:
            done.append((bank.name, *result))
    return done


def _compact_bank(bank: Path, current: set) -> Optional[tuple[int, int]]:
    """(rows removed, bytes freed) when ``bank`` (locked) needed compacting, else None."""
    import uuid

    segments = _bank_segments(bank)
    rows = stale = 0
    damaged = False
    for segment in segments:
        try:
            with np.load(segment) as data:
                shas = data["shas"]
        except Exception:  # noqa: BLE001 - a damaged segment: rewritten without it
            damaged = True
            continue
        rows += len(shas)
        stale += sum(str(sha) not in current for sha in shas)
    if not damaged and stale * 2 <= rows and len(segments) <= BANK_SEGMENTS:
        return None
    before = sum(p.stat().st_size for p in segments)
    kept_rows, kept_shas, seen = [], [], set()
    for segment in segments:
        try:
            with np.load(segment) as data:
                shas, features = data["shas"], data["features"]
        except Exception:  # noqa: BLE001 - as above
            continue
        keep = []
        for i, sha in enumerate(shas):
            if str(sha) in current and str(sha) not in seen:
                seen.add(str(sha))
                keep.append(i)
        kept_rows.append(features[keep])
        kept_shas.append(shas[keep])
    after = 0
    if seen:  # written before the old segments go: a process killed between leaves twins
        merged = bank / f"{uuid.uuid4().hex}.npz"
        _atomic_save_npz(merged, features=np.concatenate(kept_rows),
                         shas=np.concatenate(kept_shas))
        after = merged.stat().st_size
    for segment in segments:
        segment.unlink(missing_ok=True)
    return rows - len(seen), max(0, before - after)


def _compute_features(extract, paths, cfg: TrainParams, name: str,
                      augment_seed: Optional[int] = None, exif: bool = True) -> np.ndarray:
    """The features of ``paths`` through ``extract``, in order."""
    from petalflow.tasks.inputs import image_dataset

    ds = image_dataset(paths, None, cfg.image_size, cfg.batch_size,  # in order: rows = paths
                       augment=augment_seed is not None, seed=augment_seed or 0, exif=exif)
    # One array filled batch by batch: no list of batches concatenated (and converted) at the
    # end, which held the split's features three times over at once (grows with the data).
    features, done, started = np.zeros((0, 0), np.float32), 0, time.time()
    last = started
    for batch in ds:
        rows = extract(batch)
        if done == 0:
            features = aligned_empty(len(paths), rows.shape[1])
        features[done:done + len(rows)] = rows
        done += len(rows)
        now = time.time()
        if now - last >= PROGRESS_EVERY_S and done < len(paths):
            last = now
            log("features (%s): %d/%d images, %.0f images/s", name, done, len(paths),
                done / (now - started))
    features = features[:done]
    log("features (%s): %d images in %.1f s (%s)", name, done, time.time() - started,
        extract.kind)
    return features


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Keras ``class_weight`` that makes every class weigh the same in the loss: images /
    (classes present x the class's images); 1.0 for each class when they are the same size."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)
    present = counts > 0
    total, k = int(counts.sum()), int(present.sum())
    return {int(c): round(total / (k * int(counts[c])), 6) for c in np.flatnonzero(present)}


DRIFT_SAMPLE = 500  # training images the drift reference describes


def training_drift_reference(network, train_paths: list, train_labels, num_classes: int,
                             cfg: TrainParams, train_features: Optional[np.ndarray] = None,
                             exif: bool = True) -> dict:
    """The drift reference stored with the model: feature and image statistics of a seeded
    sample of the training split, overall and per class (``train_labels``). Features come from
    ``train_features`` (already computed, same order as ``train_paths``) when given, else from
    the trained ``network`` (``model.frozen_network``: images -> features, probabilities), as
    serving computes them."""
    from petalflow.tasks.serving import drift_reference, file_statistics

    rng = np.random.default_rng(cfg.seed)
    pick = np.sort(rng.permutation(len(train_paths))[:DRIFT_SAMPLE])
    paths = [train_paths[i] for i in pick]
    if train_features is not None:
        features = np.asarray(train_features)[pick]
    else:
        from petalflow.tasks.inputs import image_dataset

        features = np.concatenate([
            network(batch)[0].numpy()
            for batch in image_dataset(paths, None, cfg.image_size, 64, exif=exif)
        ]) if paths else np.zeros((0, 0))
    stats = file_statistics(paths)
    return drift_reference(features, stats, np.asarray(train_labels)[pick], num_classes,
                           image_size=cfg.image_size)


def _epoch_end_callback(validate, manager, epoch_var, total: int, hook, phase: str):
    """Per epoch: add validation metrics, checkpoint, then report to the hook."""
    from petalflow.tasks.model import keras

    class EpochEnd(keras().callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            logs.update(validate())
            epoch_var.assign(epoch + 1)
            manager.save(checkpoint_number=epoch + 1)
            if hook:
                hook(epoch + 1, total, {"phase": phase, **{n: float(v) for n, v in logs.items()}})

    return EpochEnd()


def _save_frozen_backbone(fn, folder: Path) -> None:
    """``model.save_frozen``, where a failure (a full or read-only disk) costs the next
    training its shortcut, not this one its run."""
    from petalflow.tasks.model import save_frozen

    try:
        save_frozen(fn, folder)
    except Exception as exc:  # noqa: BLE001 - a cache, not the training's result
        log("the frozen backbone was not saved to %s: %s", folder, exc, level=30)


VALIDATION_ROWS = 4096  # validation features per call of the head


def _validate_on_features(head, val_x, val_y):
    from petalflow.tasks.model import keras

    def validate() -> dict:
        # Called directly, a chunk at a time: the same probabilities as head.predict, without
        # its per-call set-up (~35 ms an epoch here, more than the call itself).
        probs = np.concatenate([head(val_x[i:i + VALIDATION_ROWS], training=False).numpy()
                                for i in range(0, len(val_x), VALIDATION_ROWS)])
        loss = keras().losses.sparse_categorical_crossentropy(val_y, probs)
        return {
            "val_loss": float(np.mean(loss)),
            "val_accuracy": float(np.mean(np.argmax(probs, axis=1) == val_y)),
        }

    return validate


def _validate_on_images(classifier, val_paths, val_y, cfg: TrainParams, exif: bool = True):
    from petalflow.tasks.inputs import image_dataset

    def validate() -> dict:
        ds = image_dataset(val_paths, val_y, cfg.image_size, max(cfg.batch_size, 64),
                           exif=exif)
        val_loss, val_acc = classifier.evaluate(ds, verbose=0)
        return {"val_loss": float(val_loss), "val_accuracy": float(val_acc)}

    return validate


DONE_MARKER = "train.json"


@contextlib.contextmanager
def _workdir_lock(workdir: Path):
    """Exclusive lock held while training in ``workdir``; a killed process releases it."""
    with file_lock(workdir / ".lock", wait=False) as held:
        if not held:
            raise RuntimeError(f"{workdir} is in use by another training process")
        yield


SEEDED_MARKER = "seeded-into.txt"


def _abandoned(attempt: Path) -> bool:
    """An attempt that stopped before finishing, whose process is gone (lock free) and whose
    checkpoints have not seeded another attempt yet."""
    if (attempt / DONE_MARKER).exists() or (attempt / SEEDED_MARKER).exists():
        return False
    if not (attempt / "checkpoints" / "checkpoint").exists():
        return False
    with file_lock(attempt / ".lock", wait=False) as free:  # held: still training
        return free


def seed_from_abandoned_attempt(workdir: Path) -> Optional[Path]:
    """Copy the checkpoints of the newest abandoned sibling attempt (same run key) into
    ``workdir``, so a rerun after a kill resumes instead of restarting. Returns the source.

    A killed attempt seeds at most one later attempt: the source is marked, so the attempt
    after that (a forced retrain of the same data, say) starts from scratch."""
    if (workdir / "checkpoints").exists():
        return None
    siblings = [p for p in workdir.parent.iterdir()
                if p.is_dir() and p != workdir and p.name != "features" and _abandoned(p)]
    if not siblings:
        return None
    source = max(siblings, key=lambda p: (p / "checkpoints" / "checkpoint").stat().st_mtime)
    shutil.copytree(source / "checkpoints", workdir / "checkpoints")
    (source / SEEDED_MARKER).write_text(str(workdir) + "\n")
    return source


RUN_ENDED = "run-ended"  # in an attempt: the flow run that trained it has ended


def attempt_name(flow_run_id) -> str:
    """A flow run's own attempt folder name under each run key it trains: retries of the run
    reuse it (and resume)."""
    return f"run-{flow_run_id}"


def end_attempts(runs_dir: Path, name: str) -> None:
    """The flow run whose attempts are called ``name`` has ended: its finished trainings
    (train.json written) are registered in MLflow, or their run failed after training, and no
    later attempt resumes them, so ``prune_attempts`` may remove them. An unfinished one is
    left unmarked: its checkpoints seed the next attempt of its run key."""
    for attempt in Path(runs_dir).glob(f"*/{name}"):
        if (attempt / DONE_MARKER).is_file():
            (attempt / RUN_ENDED).touch()


def _done_with(attempt: Path) -> bool:
    return (attempt / RUN_ENDED).is_file() or (attempt / SEEDED_MARKER).is_file()


def prune_attempts(runs_dir: Path, keep: str) -> list[tuple[str, int]]:
    """Remove the training attempts under ``runs_dir`` that no run needs: those whose flow run
    ended (``end_attempts``) and killed ones whose checkpoints seeded a later attempt; never
    the attempts called ``keep`` (this run's, there to look at until the next run) nor one a
    training holds. Attempts of runs killed after their training, and those from before
    attempts were marked, stay. Returns ("<run key>/<attempt>", bytes) of each one removed."""
    runs_dir = Path(runs_dir)
    removed = []
    for key in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        if not key.is_dir() or key.name.startswith("."):
            continue
        remove_set_aside(key)  # a removal a killed process left half done
        for attempt in sorted(key.iterdir()):
            if attempt.name == keep or not _done_with(attempt):
                continue
            try:
                with file_lock(attempt / ".lock", wait=False) as free:
                    if not free or not _done_with(attempt):
                        continue  # a training uses it again (a retry of its run)
                    size = set_aside(attempt)
            except OSError as exc:  # housekeeping: never fails the run that does it
                log("runs: could not remove %s (%s)", attempt, exc, level=30)
                continue
            removed.append((f"{key.name}/{attempt.name}", size))
        remove_set_aside(key)
    return removed


# The head's validation loss at its epochs (``epochs_advice``): still falling by this share at
# the last epoch, the head had not finished learning; this share above its lowest at the last
# epoch, it had been overfitting since that epoch.
STILL_FALLING = 0.02
OVERFITTING = 0.10
# ... and falling, over the last fifth of the epochs, at more than this share of its average
# fall per epoch: a long training whose loss creeps down by 2 % an epoch at its floor (60
# epochs, 120 classes: 0.109 -> 0.107; its last 12 epochs at 0.04 of its average rate, the
# accuracy flat for 35 of them) has finished.
STILL_LEARNING = 0.10


def epochs_advice(val_loss: list, epochs: int) -> Optional[str]:
    """What the head's validation loss over its ``epochs`` (``val_loss``, one per epoch) says
    about their number, when it says something: still falling at the last epoch by more than
    ``STILL_FALLING`` and over its last fifth at more than ``STILL_LEARNING`` of its average
    rate (more epochs would likely help), or at the last epoch more than
    ``OVERFITTING`` above its lowest, reached at least two epochs earlier (fewer would do as
    well or better); else None. The default 5 epochs on the flowers say neither (BENCHMARKS.md,
    "How many epochs")."""
    losses = [float(v) for v in val_loss[:epochs]]
    if len(losses) < max(epochs, 2) or not all(np.isfinite(losses)):
        return None
    last, before = losses[-1], losses[-2]
    lowest = min(losses)
    best = losses.index(lowest) + 1
    fifth = math.ceil(epochs / 5)  # epochs: the fall per epoch in them, and over all
    rate, average = (losses[-1 - fifth] - last) / fifth, (losses[0] - last) / (epochs - 1)
    if last == lowest and last < before * (1 - STILL_FALLING) \
            and rate > STILL_LEARNING * average:
        return (f"the validation loss was still falling at the last of the {epochs} epochs "
                f"({before:.4f} -> {last:.4f}): the head had not finished learning; more "
                f"epochs than {epochs} (epochs on cached features cost little) would likely "
                "raise its accuracy")
    if best <= epochs - 2 and last > lowest * (1 + OVERFITTING):
        return (f"the validation loss was lowest at epoch {best} of {epochs} ({lowest:.4f}) "
                f"and {last:.4f} at the last: the head overfitted after epoch {best}; about "
                f"{best} epochs would likely do as well or better")
    return None


def train_model(
    data_info: DatasetInfo, cfg: TrainParams, workdir: Path,
    on_epoch_end: Optional[EpochHook] = None, backbone_path: Optional[str] = None,
    resume_killed: bool = True, features_dir: Optional[Path] = None,
) -> dict:
    """Train in ``workdir`` (one folder per run, locked while in use); see ``_train``.

    ``backbone_path`` is the local copy of ``cfg.backbone`` (from ``fetch_backbone``); without
    it the handle is loaded directly.

    A new folder whose siblings (same data and parameters, ``workdir.parent``) include an attempt
    that was killed or failed mid-training starts from that attempt's last checkpoint, unless
    ``resume_killed`` is False (a forced retrain starts fresh). Backbone features are cached
    in ``features_dir`` (``feature_cache_dir``), by default beside the attempts.
    """
    workdir = Path(workdir)
    with _workdir_lock(workdir):
        (workdir / RUN_ENDED).unlink(missing_ok=True)  # its run is retried: needed again
        seeded = seed_from_abandoned_attempt(workdir) if resume_killed else None
        with unchanged_data(data_info):  # a photo gone since the scan: said so
            record = _train(data_info, cfg, workdir, on_epoch_end, backbone_path,
                            Path(features_dir) if features_dir else workdir.parent / "features")
        # The frozen network, the features and the edge export's converters are garbage now
        # (the backbone and Keras's state were let go before the export, the serving export's
        # graph after it, in _train).
        release_memory()
    record["seeded_from"] = str(seeded) if seeded else None
    (workdir / DONE_MARKER).write_text(json.dumps(record, indent=2))
    return record


def _train(
    data_info: DatasetInfo, cfg: TrainParams, workdir: Path,
    on_epoch_end: Optional[EpochHook], backbone_path: Optional[str], features_dir: Path,
) -> dict:
    """Train on ``data_info``'s train split; return the training record (also in train.json).

    Phase 1 trains the head over the frozen backbone for ``cfg.epochs`` on cached features:
    with augmentation, the plain ones plus ``AUGMENTED_VIEWS`` cached augmented copies.
    Phase 2 (``fine_tune_layers > 0``) unfreezes the top layers and trains end to end at
    ``fine_tune_learning_rate``.
    ``on_epoch_end(epoch, total_epochs, metrics)`` is called after every checkpoint.
    """
    import tensorflow as tf

    from petalflow.tasks.features import FeatureExtractor
    from petalflow.tasks.inputs import image_dataset
    from petalflow.tasks.model import (
        build_classifier, build_head, export_serving_model, feature_dim, frozen_from_signature,
        frozen_network, keras, load_backbone, load_frozen, unfreeze_top_layers, variables_only,
    )
    from petalflow.tasks.serving import DRIFT_REFERENCE

    k = keras()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    mixed = use_mixed_precision()
    k.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    timings: dict[str, float] = {}
    mark = [started]

    def lap(name: str) -> None:
        now = time.time()
        timings[name] = round(now - mark[0], 3)
        mark[0] = now

    device = configure_device()
    log("training on %s", device)
    k.utils.set_random_seed(cfg.seed)

    classes = data_info["classes"]
    manifest = load_manifest(Path(data_info["manifest"]))  # read once for every split's rows
    train_paths, train_y = split_files(data_info, "train", manifest)
    val_paths, val_y = split_files(data_info, "val", manifest)
    exif = reads_exif(data_info)  # False: the scan found no photo to turn upright

    # Without fine-tuning the backbone is only ever used frozen: a frozen copy an earlier
    # training saved (``frozen_backbone_dir``, beside the feature caches) replaces loading the
    # SavedModel and freezing it (MobileNetV2 0.35: ~0.1 s instead of ~3.2 s).
    frozen_dir = frozen_backbone_dir(features_dir.parent / FROZEN_BACKBONES, cfg, backbone_path)
    frozen = None if cfg.fine_tune_layers else load_frozen(frozen_dir)
    frozen_reused = frozen is not None
    if frozen is not None:
        log("backbone: its frozen copy from %s (no SavedModel load)", frozen_dir)
    elif not cfg.fine_tune_layers and (local := local_backbone(cfg, backbone_path)):
        # Else frozen from its serving signature, without loading it as a TF Hub layer
        # (MobileNetV2 0.35: ~0.9 s instead of ~2.7 s), when it is a plain feature-vector model.
        frozen = frozen_from_signature(Path(local), cfg.image_size)
        if frozen is not None:
            log("backbone: frozen from its serving signature (no TF Hub load)")
    if frozen is not None:
        backbone, dim = None, int(frozen.outputs[0].shape[-1])
    else:
        backbone = load_backbone(backbone_path or cfg.backbone,
                                 trainable=cfg.fine_tune_layers > 0)
        backbone.trainable = False
        dim = feature_dim(backbone, cfg.image_size)
    head = build_head(dim, len(classes), seed=cfg.seed)
    lap("load_backbone")

    total = cfg.epochs + (cfg.fine_tune_epochs if cfg.fine_tune_layers else 0)
    epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False)
    head_opt = k.optimizers.Adam(cfg.learning_rate)
    tune_opt = k.optimizers.Adam(cfg.fine_tune_learning_rate)
    # The backbone's variables only when they train: frozen, they are the backbone's own (a
    # save without them: ~5 ms instead of 50-110 ms for MobileNetV2 0.35, once an epoch).
    tuned = {"backbone": variables_only(backbone)} if cfg.fine_tune_layers else {}
    averager = WeightAverage(head) if cfg.average_weights else None
    if averager:
        tuned["head_average"] = averager.state
    ckpt = tf.train.Checkpoint(head=head, epoch=epoch_var, head_opt=head_opt,
                               tune_opt=tune_opt, **tuned)
    manager = tf.train.CheckpointManager(ckpt, str(workdir / "checkpoints"), max_to_keep=2)
    resumed_from = 0
    if manager.latest_checkpoint:
        # CheckpointManager records a checkpoint only after its files are complete, so a
        # checkpoint half-written when the process died is never the latest one. Optimizer
        # slots are restored as the optimizer creates them, at its first step: resumed after
        # the last epoch, there is none, and TensorFlow would warn of each unused value.
        ckpt.restore(manager.latest_checkpoint).expect_partial()
        resumed_from = int(epoch_var.numpy())

    # Features depend only on data, split and backbone: shared (written atomically, locked).
    reused = []  # the cached feature files this training read instead of computing
    # On the CPU through TensorFlow Lite (converted on first use: not at all when cached).
    # Without fine-tuning the backbone never changes: the extractor holds the only reference
    # and lets go of it once frozen (before the conversion: its peak).
    extract = FeatureExtractor(backbone, cfg.image_size, tflite=device == "CPU",
                               release_when_frozen=not cfg.fine_tune_layers, frozen=frozen)
    if not cfg.fine_tune_layers:
        backbone = None
    bank = feature_bank_dir(features_dir.parent / FEATURE_BANKS, cfg, backbone_path)
    mark_feature_cache(features_dir, data_info["fingerprint"])
    val_x, val_y, hit, banked = cached_features(
        extract, val_paths, val_y, cfg, features_dir / "val.npz", exif=exif, bank=bank,
        shas=split_shas(data_info, "val", manifest))
    reused += ["val"] if hit else []
    # Images whose plain features came from the bank, and images the backbone ran on.
    counts = {"from_earlier": banked, "computed": 0 if hit else len(val_paths) - banked}
    lap("val_features")
    train_features = None  # the train split's cached features, when training used them
    history: dict[str, list] = {}

    def record(h):
        for name, values in (h.history if h else {}).items():
            history.setdefault(name, []).extend(float(v) for v in values)

    loss = "sparse_categorical_crossentropy"
    # Each class weighs the same in the loss (``balance_classes``; from the training split).
    weights = class_weights(train_y, len(classes)) if cfg.balance_classes else None
    start = int(epoch_var.numpy())
    if start < cfg.epochs:
        cb = _epoch_end_callback(_validate_on_features(head, val_x, val_y), manager, epoch_var,
                                 total, on_epoch_end, "head")
        train_x, train_y, hit, banked = cached_features(
            extract, train_paths, train_y, cfg, features_dir / "train.npz", exif=exif,
            bank=bank, shas=split_shas(data_info, "train", manifest))
        reused += ["train"] if hit else []
        counts["from_earlier"] += banked
        counts["computed"] += 0 if hit else len(train_paths) - banked
        copies = AUGMENTED_VIEWS if cfg.augment else 0
        if not copies:  # fitted on as they are: where a tensor can share them (a cache's are not)
            train_x = aligned(train_x)
        train_features = train_x
        views = [train_x]  # with augmentation, + AUGMENTED_VIEWS augmented copies, each cached
        for view in range(copies):
            x, hit, name = augmented_copy(extract, train_paths, train_y, cfg, features_dir,
                                          view, exif)
            views.append(x)
            reused += [name] if hit else []
        fit_x = train_x if len(views) == 1 else np.concatenate(
            views, out=aligned_empty(sum(map(len, views)), train_x.shape[1]))
        fit_y = np.tile(train_y, len(views))
        lap("train_features")
        if not cfg.fine_tune_layers:
            # Every feature is computed; the export reuses the backbone the engine froze (frozen
            # now when every feature came from the cache), and the loaded backbone is freed
            # (unless the TensorFlow engine runs on it) before the epochs, where with many
            # images the step's peak can be (the features held for fitting), not only before
            # the export.
            extract.frozen_backbone()
            if not frozen_reused:  # for the next training with this backbone
                _save_frozen_backbone(extract.frozen, frozen_dir)
        head.compile(optimizer=head_opt, loss=loss, metrics=["accuracy"])
        # The features handed to Keras as a tensor over their own memory: not copied into one.
        callbacks = [cb]
        if averager:
            steps = -(-len(fit_x) // cfg.batch_size)
            callbacks.insert(0, averager.callback(cfg.epochs, steps))
        record(head.fit(shared_tensor(fit_x), fit_y, batch_size=cfg.batch_size,
                        epochs=cfg.epochs, initial_epoch=start, shuffle=True,
                        callbacks=callbacks, verbose=0, class_weight=weights))
    # With average_weights, the head's weights averaged over its last steps, if that is not
    # worse on validation (``WeightAverage.apply``).
    validate_head = _validate_on_features(head, val_x, val_y)
    averaging = averager.apply(validate_head) if averager else None
    # The trained head's validation figures (the epochs' are the learning curve's, the last
    # step's head); the sweep ranks candidates on them. Fine-tuned, the last epoch's.
    validation = {} if cfg.fine_tune_layers else validate_head()
    if averaging:
        def said(f: dict) -> str:
            return f"val_loss={f['val_loss']:.4f}, val_accuracy={f['val_accuracy']:.4f}"

        steps, last = averaging["steps"], said(averaging["last_step"])
        log(f"head: its weights averaged over its last {steps} training steps "
            f"(average_weights): {said(averaging)} (the last step's: {last})"
            if averaging["used"] else
            f"head: the last step's weights kept (average_weights): averaged over its last "
            f"{steps} training steps they scored {said(averaging)}, the last step's {last}: "
            "the head was still learning")

    lap("train_head")
    tuned_layers: list[str] = []
    if cfg.fine_tune_layers:
        backbone.trainable = True
        tuned_layers = unfreeze_top_layers(backbone, cfg.fine_tune_layers)
        if cfg.fine_tune_layers > len(tuned_layers):
            log("fine_tune_layers is %d, and the backbone has %d layers with weights: all %d "
                "are fine-tuned", cfg.fine_tune_layers, len(tuned_layers), len(tuned_layers),
                level=30)
        start = int(epoch_var.numpy())
        if start < total:
            # End to end: the Keras model of backbone and head (the frozen path needs none).
            classifier = build_classifier(backbone, head, cfg.image_size)
            # Recompile so the new trainable set takes effect, with a low learning rate.
            classifier.compile(optimizer=tune_opt, loss=loss, metrics=["accuracy"])
            # The backbone now changes, so cached validation features go stale: use images.
            cb = _epoch_end_callback(_validate_on_images(classifier, val_paths, val_y, cfg,
                                                         exif),
                                     manager, epoch_var, total, on_epoch_end, "fine-tune")
            train_ds = image_dataset(train_paths, train_y, cfg.image_size, cfg.batch_size,
                                     shuffle=True, augment=cfg.augment, seed=cfg.seed,
                                     exif=exif)
            record(classifier.fit(train_ds, epochs=total, initial_epoch=start, callbacks=[cb],
                                  verbose=0, class_weight=weights))

    lap("fine_tune")
    export_dir = workdir / "export"
    staging = workdir / "export.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    # The export's and the edge models' network: the backbone as the feature extractor froze
    # it (frozen once only), unless fine-tuning changed it.
    frozen_features = None if cfg.fine_tune_layers else extract.frozen_backbone()
    network = frozen_network(backbone, head, cfg.image_size, features_fn=frozen_features)
    # From here on the frozen network is the model: the loaded backbone (its restored
    # functions: ~120 MiB for MobileNetV2 0.35), the feature engine and the Keras models (the
    # head links to the backbone once fine-tuning built a model of both; the checkpoint holds
    # the head) are garbage, freed before the export's peak instead of after it (BENCHMARKS.md,
    # target 1). Every checkpoint is written by now.
    engine = extract.kind
    extract.close()
    backbone = head = extract = classifier = cb = train_ds = ckpt = manager = frozen = None
    k.backend.clear_session()  # Keras's global state holds the fine-tuning model it built
    release_memory()
    try:
        export_serving_model(
            network, classes, cfg.image_size, staging,
            metadata={"backbone": redact_url(cfg.backbone),
                      "fingerprint": data_info["fingerprint"]},
        )
        # Features cached before training are the final ones only if the backbone never
        # changed.
        reusable = train_features if not cfg.fine_tune_layers else None
        write_json(staging / DRIFT_REFERENCE,
                   training_drift_reference(network, train_paths, train_y, len(classes), cfg,
                                            reusable, exif))
    except BaseException:  # a full disk: the half export does not keep its space
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(staging, export_dir)
    release_memory()  # the export's traced serving graph is garbage now
    lap("export")
    edge_dir = None
    if cfg.edge_export:
        from petalflow.tasks.edge import calibration_sample, export_tflite

        edge_dir = workdir / "edge"
        shutil.rmtree(edge_dir, ignore_errors=True)
        export_tflite(network, classes, cfg.image_size, edge_dir,
                      calibration_sample(train_paths, seed=cfg.seed), exif)
        lap("edge_export")

    record_ = {
        "export_dir": str(export_dir),
        "edge_dir": str(edge_dir) if edge_dir else None,
        "device": device,
        "mixed_precision": mixed,
        "epochs": total,
        "resumed_from_epoch": resumed_from,
        "history": history,
        # The model's validation figures: the head's as trained (averaged) without
        # fine-tuning, else the last fine-tuning epoch's.
        "validation": validation or {n: history[n][-1] for n in ("val_loss", "val_accuracy")
                                     if history.get(n)},
        # What average_weights decided in this process (None: off, or decided before).
        "weight_average": averaging,
        # Only for a training that ran every head epoch here (a resumed one lacks the first),
        # and whose head epochs were all it had (fine-tuning trains on after them).
        "advice": None if resumed_from or cfg.fine_tune_layers else epochs_advice(
            history.get("val_loss", []), cfg.epochs),
        "fine_tuned_layers": tuned_layers,
        "class_weights": {classes[c]: w for c, w in weights.items()} if weights else None,
        "features": {"dir": str(features_dir), "reused": reused, **counts, "engine": engine,
                     "frozen_backbone": str(frozen_dir) if frozen_reused else None},
        "train_images": len(train_paths),
        "val_images": len(val_paths),
        "seconds": round(time.time() - started, 2),
        "timings": timings,
    }
    return record_


@task(name="train-model")
def train_model_task(job: TrainingJob) -> dict:
    """Thin wrapper: per-epoch metrics go to MLflow and to a Prefect progress artifact (the
    job's ``progress_artifact_id``, else a new one on this run)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from petalflow.tasks.registry import log_epoch, log_training

    cfg = job.params
    progress_id = job.progress_artifact_id or create_progress_artifact(
        progress=0.0, description=f"Training {cfg.model_name}: epochs completed (%)"
    )

    def on_epoch_end(epoch: int, total: int, metrics: dict) -> None:
        log_epoch(job.run_id, epoch, {k: v for k, v in metrics.items() if k != "phase"})
        update_progress_artifact(progress_id, progress=100.0 * epoch / total)
        log("epoch %d/%d (%s): %s", epoch, total, metrics.get("phase"),
            ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))

    with disk_full_said("training", (Path(job.workdir), "the run's checkpoints and export")):
        record = train_model(job.dataset, cfg, Path(job.workdir), on_epoch_end=on_epoch_end,
                             backbone_path=job.backbone_path, resume_killed=not cfg.force,
                             features_dir=job.features_dir)
        update_progress_artifact(progress_id, progress=100.0)
        if record.get("advice"):
            log("training: %s", record["advice"], level=30)
        log_training(job.run_id, record)
    return record
