"""The frozen backbone's features of a batch of images: what the head trains on.

On the CPU the backbone runs as a TensorFlow Lite float32 model (the same weights, converted
once per training on first use), because TFLite's XNNPACK kernels run MobileNetV2 far faster
there than TensorFlow's graph. ``bench/feature_engines.py`` (MobileNetV2 0.35 at 224 px, 2
cores): the backbone alone 1,009-1,023 vs 197-199 images/s; the features of 1,275 photos with
their decoding 2.7 s instead of 6.8 s, plus 2.4-2.7 s of conversion; features within 1e-4 of
TensorFlow's (values up to 6). On a GPU, or when the backbone has an operation TFLite cannot
convert, TensorFlow computes them. Serving is unaffected: the exported SavedModel runs the
backbone in TensorFlow.
"""

from __future__ import annotations

import time

import numpy as np

from petalflow.tasks.common import log, release_memory, usable_cpus

# TensorFlow's CPU tensors need their buffer aligned to 64 bytes (Eigen's widest vectors); a
# NumPy array's buffer is aligned to 16. Features held in a buffer aligned to 64 are handed to
# Keras as a tensor over the same memory instead of being copied into one.
TENSOR_ALIGNMENT = 64


def aligned_empty(rows: int, dim: int) -> np.ndarray:
    """An uninitialised float32 [rows, dim] array whose buffer a TensorFlow tensor can share."""
    nbytes = rows * dim * 4
    raw = np.empty(nbytes + TENSOR_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % TENSOR_ALIGNMENT
    return raw[start:start + nbytes].view(np.float32).reshape(rows, dim)


def _shareable(array: np.ndarray) -> bool:
    return (array.dtype == np.float32 and array.ndim == 2 and array.flags.c_contiguous
            and array.flags.writeable and array.ctypes.data % TENSOR_ALIGNMENT == 0)


def aligned(array: np.ndarray) -> np.ndarray:
    """``array`` (float32 features [n, dim]) in a buffer a TensorFlow tensor can share: itself
    when it is one (or is no such features array), else a copy in one."""
    if _shareable(array) or array.dtype != np.float32 or array.ndim != 2:
        return array
    copy = aligned_empty(*array.shape)
    copy[...] = array
    return copy


def shared_tensor(array: np.ndarray):
    """``array`` as a TensorFlow tensor over the same memory (DLPack) when its buffer allows it
    (``aligned``), else ``array`` itself. ``Model.fit`` converts NumPy input into one tensor,
    a copy, and the conversion held more than the features again while it ran: with many
    images the training step's peak (16,800 images' features, 82 MiB: fit's peak +107 MiB over
    them, +0 given the shared tensor, the same losses; BENCHMARKS.md, target 3)."""
    if not _shareable(array):
        return array
    import tensorflow as tf

    try:
        return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
    except (AttributeError, BufferError, TypeError, ValueError):  # no DLPack here: copied
        return array


# Images per TFLite call: 8 was fastest on 2 cores (1,088 images/s; 1: 883, 32: 907;
# BENCHMARKS.md, feature engines).
TFLITE_BATCH = 8


class FeatureExtractor:
    """images [n, S, S, 3] float32 in [0, 1] -> features [n, dim] float32 (NumPy).

    The engine is chosen on the first call (``kind``: "tflite" or "tensorflow"), so a training
    that finds every feature in its cache converts nothing.
    """

    def __init__(self, backbone, image_size: int, tflite: bool = True,
                 release_when_frozen: bool = False, frozen=None):
        self._backbone = backbone
        self._size = image_size
        self._tflite = tflite
        self._release_when_frozen = release_when_frozen
        self._run = None
        self._closed = False
        self.kind = None
        # The backbone's frozen function (``frozen_backbone``; None until then, unless given:
        # a frozen copy saved by an earlier training, when ``backbone`` is None): what the
        # TFLite engine is converted from and what ``model.frozen_network`` reuses.
        self.frozen = frozen

    def frozen_backbone(self):
        """The backbone's frozen function (``model.frozen_backbone``), frozen once. With
        ``release_when_frozen`` (the caller keeps no other reference to the backbone: it will
        not change), the loaded backbone is let go of as soon as it is frozen: its restored
        TF Hub functions and the freeze's trace (~210 MiB for MobileNetV2 0.35) are freed
        before the TFLite conversion and the features pass, not after them. The TensorFlow
        engine, once running on the backbone, keeps it."""
        from petalflow.tasks.model import frozen_backbone

        if self.frozen is None:
            self.frozen = frozen_backbone(self._backbone, self._size)
        if self._release_when_frozen and self.kind != "tensorflow" and self._backbone is not None:
            self._backbone = None
            release_memory()
        return self.frozen

    def close(self) -> None:
        """Drop the engine (the TFLite interpreter, or the traced TensorFlow function), the
        backbone and its frozen function: the features are computed; what is left of the
        training does not need them (take ``frozen`` first to keep it)."""
        self._run = self._backbone = self.frozen = None
        self._closed = True

    def __call__(self, images) -> np.ndarray:
        if self._closed:
            raise RuntimeError("this feature extractor was closed")
        if self._run is None:
            self._run, self.kind = self._engine()
        return self._run(images)

    def _engine(self):
        if self._tflite:
            try:
                return self._tflite_engine(), "tflite"
            except Exception as exc:  # noqa: BLE001 - any conversion failure: TensorFlow runs it
                reason = " ".join(str(exc).split())[:300] or type(exc).__name__
                log("features: the backbone does not convert to TensorFlow Lite (%s); "
                    "computing them with TensorFlow", reason, level=30)
        return self._tensorflow_engine(), "tensorflow"

    def _tensorflow_engine(self):
        import tensorflow as tf

        size, backbone, frozen = self._size, self._backbone, self.frozen
        # The backbone itself, or its frozen function when it was let go of (a backbone
        # frozen for a TFLite conversion that then failed): the same network.
        network = ((lambda x: backbone(x, training=False)) if backbone is not None
                   else (lambda x: frozen(x)[0]))
        extract = tf.function(  # one trace for every batch size, the last partial one included
            network, input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)],
        )
        return lambda images: extract(images).numpy().astype(np.float32)

    def _tflite_engine(self):
        from petalflow.tasks.edge import tflite_converter, tflite_interpreter

        started = time.perf_counter()
        network = self.frozen_backbone()
        blob = tflite_converter(network, "float32", self._size, batch=TFLITE_BATCH).convert()
        release_memory()  # the converter's garbage, freed before the features pass
        interpreter, inp, out = tflite_interpreter(usable_cpus(), model_content=blob)
        log("features: the backbone converted to TensorFlow Lite in %.1f s",
            time.perf_counter() - started)

        def run(images) -> np.ndarray:
            images = np.asarray(images, np.float32)
            chunks = []
            for start in range(0, len(images), TFLITE_BATCH):
                chunk = images[start:start + TFLITE_BATCH]
                n = len(chunk)
                if n < TFLITE_BATCH:  # the model's batch is fixed: pad, then drop the padding
                    chunk = np.concatenate(
                        [chunk, np.zeros((TFLITE_BATCH - n, *chunk.shape[1:]), np.float32)])
                interpreter.set_tensor(inp, chunk)
                interpreter.invoke()
                chunks.append(interpreter.get_tensor(out)[:n].copy())
            return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)

        return run
