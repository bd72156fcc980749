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
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from petalflow.temporary_server import free_port  # noqa: F401 - petalflow's own

COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def write_image(path: Path, rgb, size=(24, 20), fmt="JPEG", noise=12, seed=0) -> Path:
    """A solid-colour image with a little noise, so files differ (distinct sha256)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None, :] + rng.integers(-noise, noise + 1,
                                                              (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, fmt)
    return path


# How a camera stores a photo that is displayed upright with EXIF Orientation o: the upright
# picture turned by the inverse of what the tag says (PIL's exif_transpose undoes it).
_STORED = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_270}


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    """``image`` saved as ``fmt`` (JPEG, PNG, WEBP, ...) with Pillow's ``options``."""
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def training_pixels(data: bytes, size: int = 32) -> np.ndarray:
    """What training decodes for these bytes (``images.decode_upright``): float32 [size,
    size, 3] in [0, 1]."""
    import tensorflow as tf

    from petalflow.tasks.images import decode_upright

    return decode_upright(tf.constant(data), size).numpy()


def quadrants(size=(64, 32)) -> Image.Image:
    """An image that looks different every way it is turned or mirrored: four colours."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[: h // 2, : w // 2] = (220, 40, 40)
    arr[: h // 2, w // 2:] = (40, 200, 60)
    arr[h // 2:, : w // 2] = (30, 60, 220)
    arr[h // 2:, w // 2:] = (240, 230, 40)
    return Image.fromarray(arr)


def phone_jpeg(upright: Image.Image, orientation: int, byte_order: str = "II",
               before: tuple = ()) -> bytes:
    """JPEG bytes of ``upright`` as a phone stores it: the pixels turned, EXIF Orientation
    ``orientation`` (1-8; None: no EXIF at all) in IFD0 after another tag, in TIFF byte order
    "II" or "MM", its APP1 after the marker segments ``before`` ((marker, data) pairs)."""
    import struct

    stored = upright.transpose(_STORED[orientation]) if orientation in _STORED else upright
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=100, subsampling=0)
    jpeg = buf.getvalue()
    assert jpeg[2:4] == b"\xff\xe0"  # PIL writes JFIF's APP0 first: replaced below
    rest = jpeg[4 + int.from_bytes(jpeg[4:6], "big"):]
    segments = b"".join(b"\xff" + bytes([m]) + struct.pack(">H", len(d) + 2) + d
                        for m, d in before)
    if orientation is not None:
        e = ">" if byte_order == "MM" else "<"
        ifd = struct.pack(e + "H", 2) + struct.pack(e + "HHI", 0x010F, 2, 4) + b"Cam\0" \
            + struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(e + "I", 0)
        tiff = byte_order.encode() + struct.pack(e + "HI", 42, 8) + ifd
        segments += b"\xff\xe1" + struct.pack(">H", len(tiff) + 8) + b"Exif\0\0" + tiff
    return b"\xff\xd8" + segments + rest


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


def export_tiny_backbone(path: Path, image_size: Optional[int] = 32, seed: int = 0,
                         outputs: int = 16) -> Path:
    """A TF-Hub-style image feature-vector SavedModel: [b, s, s, 3] in [0, 1] -> [b, outputs]
    (``image_size=None``: any square size, like a backbone that declares none; ``outputs``
    1001: shaped like an ImageNet classification model).

    Conv + BatchNorm + ReLU + global pooling + Dense, random but fixed weights: enough to tell
    colours apart, and it has BatchNorm statistics to prove inference mode.
    """
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf
    import tf_keras as keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3))  # None, None: any size
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="conv1_bn")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="conv2")(x)
    x = keras.layers.BatchNormalization(name="conv2_bn")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    top = keras.layers.Dense(outputs, activation="relu", name="top_dense")(x)
    model = keras.Model(inputs, top)
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
def serve_handler(handler):
    """A real threaded HTTP server on a free loopback port with ``handler``; yields the server
    (its URL is ``base_url(server)``). Stopped on exit."""

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def base_url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


@contextmanager
def serve_directory(directory: Path, tls: Optional[tuple[Path, Path]] = None):
    """A real HTTP server on a free loopback port serving ``directory``; yields its base URL.
    ``tls``: (certificate, key) PEM files, served over HTTPS with them."""
    handler = lambda *a, **kw: _QuietHandler(*a, directory=str(directory), **kw)  # noqa: E731
    with serve_handler(handler) as server:
        if tls is None:
            yield base_url(server)
            return
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        yield f"https://127.0.0.1:{server.server_address[1]}"




def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files for 127.0.0.1 signed by themselves: what a server with an
    organisation's own certificate authority presents to a client that does not trust it."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "petalflow test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def png_bytes(rgb=(10, 20, 30), size=(8, 8), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, rgb if mode == "RGB" else rgb[0]).save(buf, "PNG")
    return buf.getvalue()


class _Revalidating(http.server.BaseHTTPRequestHandler):
    """Serves the files of a dict {path: bytes} the test can change at any time, with an ETag
    (sha256 of the bytes) and a Last-Modified (bumped on each change), answering conditional
    requests with 304 like a real static file server. Counts requests and body bytes sent."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server API
        site = self.server.site
        site.requests.append((self.path, self.headers.get("If-None-Match"),
                              self.headers.get("If-Modified-Since")))
        location = site.redirects.get(self.path)
        if location is not None:  # a "latest" link, a release page's asset, a loop
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = site.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        import email.utils
        import hashlib

        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        modified = email.utils.formatdate(site.mtimes[self.path], usegmt=True)
        if not site.etag:
            etag = None
        if site.validators:
            inm = self.headers.get("If-None-Match")
            ims = self.headers.get("If-Modified-Since")
            if (inm and inm == etag) or (not inm and ims and ims == modified):
                self.send_response(304)
                if etag:
                    self.send_header("ETag", etag)
                self.end_headers()
                return
        self.send_response(200)
        if site.validators:
            if etag:
                self.send_header("ETag", etag)
            self.send_header("Last-Modified", modified)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        site.body_bytes += len(body)


class ChangingSite:
    """State of a ``revalidating_server``: put new bytes behind a path with ``put``, a 302
    with ``redirects[path] = location``."""

    def __init__(self, validators: bool = True, etag: bool = True):
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, str] = {}  # path -> Location of a 302
        self.mtimes: dict[str, float] = {}
        self.requests: list[tuple] = []
        self.body_bytes = 0
        self.validators = validators
        self.etag = etag
        self.url = ""

    def put(self, path: str, data: bytes) -> str:
        import time

        self.files[path] = data
        self.mtimes[path] = max(time.time(), self.mtimes.get(path, 0) + 1)
        return self.url + path

    @property
    def conditional(self) -> int:
        return sum(1 for _p, inm, ims in self.requests if inm or ims)


@contextmanager
def revalidating_server(validators: bool = True, etag: bool = True):
    """A real HTTP server on a free loopback port whose content the test changes (ChangingSite).
    ``validators=False``: a server that sends neither ETag nor Last-Modified; ``etag=False``:
    only Last-Modified. It answers GET only (HEAD: 501), as a presigned GET URL does."""
    with serve_handler(_Revalidating) as server:
        server.site = ChangingSite(validators, etag)
        server.site.url = base_url(server)
        yield server.site


class _Private(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` {path: bytes} (the query ignored), those under ``/private/``
    only with ``server.authorization``; a path in ``server.redirects`` answers 302 to its URL.
    Records (path, Authorization header) per request in ``server.seen``."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - http.server API
        server = self.server
        server.seen.append((self.path, self.headers.get("Authorization")))
        path = self.path.split("?", 1)[0]
        if path in server.redirects:
            self.send_response(302)
            self.send_header("Location", server.redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path.startswith("/private/") and (self.headers.get("Authorization")
                                             != server.authorization):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="models"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = server.files.get(path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def private_server(files: dict, login: str, password: str):
    """A real HTTP server on a free loopback port whose ``/private/`` files need basic
    authentication as ``login``:``password`` (``_Private``); yields the server (``seen``,
    ``redirects``, its URL ``base_url(server)``)."""
    import base64

    with serve_handler(_Private) as server:
        server.files, server.redirects, server.seen = dict(files), {}, []
        server.authorization = "Basic " + base64.b64encode(
            f"{login}:{password}".encode()).decode()
        yield server


RETRYABLE_STATUS = {429, 502, 503}


def prefect_request(stack, method: str, path: str, attempts: int = 6, **kw):
    """One raw call to a stack's Prefect REST API (what a user's curl or the UI sends), with
    the stack's auth header, retried on 429/502/503 as Prefect's own client does: a
    SQLite-backed server answers 503 when concurrent writes collide."""
    import base64
    import time

    import httpx

    kw.setdefault("timeout", 30)
    auth = stack.env().get("PREFECT_API_AUTH_STRING")
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} \
        if auth else {}
    headers.update(kw.pop("headers", {}))
    for attempt in range(attempts):
        resp = httpx.request(method, f"{stack.prefect_api}{path}", headers=headers, **kw)
        if resp.status_code not in RETRYABLE_STATUS or attempt == attempts - 1:
            return resp
        try:
            delay = float(resp.headers.get("Retry-After", ""))
        except ValueError:
            delay = min(2.0 ** attempt, 10.0)
        time.sleep(delay)
    return resp


def many_colours(n: int) -> dict:
    """``n`` classes named like a user's ("class 00 of the collection", ...), a colour each."""
    return {f"class {i:02d} of the collection": (5 * i % 256, 40, 255 - 3 * i % 256)
            for i in range(n)}


def many_class_card(tmp: Path, n: int) -> tuple[dict, Path]:
    """(summary, evaluation folder) for the model card of a dataset of ``n`` classes named
    like a user's ("class 00 of the collection", ...), 3 photos each, evaluated with a few
    confusions: what ``report.model_card`` reads."""
    from petalflow.tasks.dataset import dataset_summary, prepare_dataset
    from petalflow.tasks.evaluate import classification_tables

    info = prepare_dataset(make_dataset(tmp / "data", per_class=3, colours=many_colours(n)),
                           tmp / "prepared", 0.2, 0.2, 0)
    classes = info["classes"]
    y_true = np.repeat(np.arange(n), 2)
    y_pred = y_true.copy()
    y_pred[::7] = (y_pred[::7] + 1) % n  # every seventh image taken for the next class
    _, per_class, confusion = classification_tables(y_true, y_pred, classes)
    evaluation = tmp / "evaluation"
    evaluation.mkdir()
    per_class.to_csv(evaluation / "per_class.csv", index=False)
    confusion.to_csv(evaluation / "confusion.csv")
    summary = {
        "model_name": "m", "model_version": "1", "alias": "champion", "alias_reason": "first",
        "dataset": dataset_summary(info), "manifest": info["manifest"], "comparison": {},
        "test_metrics": {"test_accuracy": 0.857, "test_images": 2 * n, "test_macro_f1": 0.85},
    }
    return summary, evaluation


def prefect_events(name: str, since: str, at_least: int = 1) -> list[dict]:
    """Events of that name stored by the Prefect server since ``since`` (ISO time); they
    arrive asynchronously, so this waits up to 30 s for ``at_least`` of them."""
    import time

    from prefect.client.orchestration import get_client

    deadline = time.time() + 30
    while True:
        with get_client(sync_client=True) as client:
            found = client.request("POST", "/events/filter", json={
                "filter": {"event": {"name": [name]}, "any_resource": None,
                           "occurred": {"since": since}},
                "limit": 50}).json()["events"]
        if len(found) >= at_least or time.time() > deadline:
            return found
        time.sleep(1)


def running_processes() -> Iterator[tuple[int, str, list[str], str]]:
    """(pid, command line, environment as NAME=VALUE strings, working folder) of every process
    running on this machine but this one; zombies, processes that exit meanwhile and those not
    ours to read are skipped."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        proc = Path("/proc") / entry
        try:
            if (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            env = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        yield int(entry), cmd.strip(), env, cwd
