"""Test data builders: synthetic image datasets, archives, a tiny Hub backbone, an HTTP server."""

from __future__ import annotations

import http.server
import io
import os
import socketserver
import tarfile
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def write_image(path: Path, rgb, size=(24, 20), fmt="JPEG", noise=12, seed=0) -> Path:
    """A solid-colour image with a little noise, so files differ (distinct sha256)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None, :] + rng.integers(-noise, noise + 1,
                                                              (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, fmt)
    return path


def make_dataset(root: Path, per_class: int = 12, colours=COLOURS, seed: int = 0) -> Path:
    """root/<class>/<i>.jpg, learnable: each class has its own colour."""
    for c, (name, rgb) in enumerate(sorted(colours.items())):
        for i in range(per_class):
            write_image(root / name / f"{i:03d}.jpg", rgb, seed=seed * 1000 + c * 100 + i)
    return root


def make_random_label_dataset(root: Path, per_class: int = 12, seed: int = 0) -> Path:
    """Two classes whose images are random colours: labels carry no signal."""
    rng = np.random.default_rng(seed)
    for name in ("a", "b"):
        for i in range(per_class):
            write_image(root / name / f"{i:03d}.jpg", tuple(int(v) for v in rng.integers(0, 256, 3)),
                        seed=int(rng.integers(1 << 30)))
    return root


def make_tgz(folder: Path, archive: Path, arcname: str = "photos") -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return archive


def make_hub_tarball(saved_model: Path, archive: Path) -> Path:
    """A SavedModel as TF Hub serves it over HTTP: a .tar.gz of the model folder's contents."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(Path(saved_model).iterdir()):
            tar.add(path, arcname=path.name)
    return archive


def make_zip(folder: Path, archive: Path, arcname: str = "photos") -> Path:
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            zf.write(path, f"{arcname}/{path.relative_to(folder).as_posix()}")
    return archive


def export_tiny_backbone(path: Path, image_size: int = 32, seed: int = 0) -> Path:
    """A TF-Hub-style image feature-vector SavedModel: [b, s, s, 3] in [0, 1] -> [b, 16].

    Conv + BatchNorm + ReLU + global pooling + Dense, random but fixed weights: enough to tell
    colours apart, and it has BatchNorm statistics to prove inference mode.
    """
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="conv1_bn")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="conv2")(x)
    x = keras.layers.BatchNormalization(name="conv2_bn")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(16, activation="relu", name="top_dense")(x)
    model = keras.Model(inputs, outputs)
    # Non-trivial BatchNorm statistics, so that training-mode BN would visibly change outputs.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(tf.fill(layer.moving_mean.shape, 0.1))
            layer.moving_variance.assign(tf.fill(layer.moving_variance.shape, 2.0))
    tf.saved_model.save(model, str(path))
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@contextmanager
def serve_directory(directory: Path):
    """A real HTTP server on a free loopback port serving ``directory``; yields its base URL."""
    handler = lambda *a, **kw: _QuietHandler(*a, directory=str(directory), **kw)  # noqa: E731

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for servers the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_bytes(rgb=(10, 20, 30), size=(8, 8), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, rgb if mode == "RGB" else rgb[0]).save(buf, "PNG")
    return buf.getvalue()
