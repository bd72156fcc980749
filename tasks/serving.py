"""Load an exported petalflow model and classify encoded images: the one prediction code path.

Used by evaluation, ``petalflow predict`` and MLflow's pyfunc: this file travels inside every
registered model (MLflow ``code_paths``, as ``petalflow_serving.py``) and is its
``loader_module``, so ``mlflow.pyfunc.load_model(...)`` and ``mlflow models serve`` need only the
model's own requirements (mlflow, tensorflow, pandas, numpy), not petalflow. It must therefore
import nothing from petalflow. Loading runs ``tf.saved_model.load`` only (no pickle, no Keras
Lambda layers); all preprocessing is inside the SavedModel's graph.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

LOADER_MODULE = "petalflow_serving"  # this file's name inside a registered model
DRIFT_REFERENCE = "drift_reference.json"  # beside the SavedModel, written by training
# Drift score above which a batch is reported as drifted (chosen by measurement: BENCHMARKS.md,
# drift of one class's photos). Since a batch is compared with training photos of its own
# class mix, a class the model never saw scores less than against the training mix (0.26-0.48
# on the flowers); at 0.25 every such sample was over, and no sample of 50 or more photos like
# the training ones (any mix, one class included) was, but 3 % with a 10-per-class model.
DRIFT_THRESHOLD = 0.25
# Weight, in images, of the features' average spread in each feature's own spread. A small
# training split leaves many backbone features zero in almost every reference image: their
# spread, estimated near 0, made any batch's mean "move" by many of them (a reference of 36
# photos scored 0.3-1.1 on photos like it; the threshold is 0.3). Pulled towards the average
# by 10 images' worth, scores no longer depend on the reference's size (BENCHMARKS.md, drift
# on small training sets); with 500 reference images the weight is 2 %.
SPREAD_PRIOR_IMAGES = 10
# Images a batch needs for a verdict (chosen by measurement: BENCHMARKS.md, drift on small
# batches). Photos like the training ones went over the threshold in 33-60 % of samples of 1
# to 5 images and 7-23 % of samples of 10 (the mean of a few photos moves far by chance), 0-7 %
# of samples of 20; every grayscale, rotated or darkened sample of 20 went over. A smaller
# batch gets its score, and "drifted" stays False: too few images to tell.
DRIFT_MIN_IMAGES = 20
IMAGE_STATS = ("width", "height", "aspect", "brightness", "contrast", "saturation")
# Width and height are compared as the model sees them (a reference with "resolution_of": its
# input size S): log2(min(side, S) / S), 0 for a side of S or more, -1 for half of S, and only
# a fall counts (images upscaled more than the training ones were). Compared in pixels, photos
# of a phone's size against 320-px training photos scored 68.9, "drifted", with backbone
# features like the training photos' (0.06) and the same accuracy; a batch of 80-px
# thumbnails, which the model sees blurred, still scores over the threshold (BENCHMARKS.md,
# drift and image size).
RESOLUTION_STATS = (0, 1)
# The least spread (in log2 units: an octave) width and height are standardised by: a batch's
# sides must fall by half beyond the training photos' to move by one unit (a batch of photos
# at half the flowers' size, which the model classifies 8 points worse, scores ~0.4; at 3/4,
# under the threshold). Standardised by the training photos' own spread (0.1 for the flowers,
# from the few under the input size), the noise of a reference of 10 photos per class put
# photos like the training ones over the threshold in 40 % of samples of 50; and a training
# split all at or above the input size (spread 0) still tells thumbnails.
RESOLUTION_SPREAD = 1.0
# Pixels the statistics of a lossless image (PNG, BMP, GIF, WebP) are computed on at most: a
# bigger one is sampled (every s-th pixel of every s-th row), as a JPEG is decoded at 1/4
# scale. Over every pixel, in float, the statistics of 16 PNGs of 50 MP took 12.5 s and
# 2,940 MiB, sampled 8.1-8.6 s and 1,130-1,150 MiB, figures within 0.1 % (BENCHMARKS.md,
# drift statistics of big lossless images).
STATS_PIXELS = 1_000_000
ERROR_UNDECODABLE = "undecodable image"
# A row of the pyfunc input that is not base64 at all: most often a file path, which read as
# "undecodable image" before. (From Python, a file's bytes as they are are taken too: no image
# file is base64 text, so they cannot be mistaken for it.)
ERROR_NOT_BASE64 = ("not base64: the 'image' column takes each image file's bytes "
                    "base64-encoded (from Python, the bytes as they are also do), not a path")
# A cell holding an image already decoded (a numpy array of pixels, a PIL image), which Python
# callers pass: the model decodes files itself (EXIF orientation included), and an array does
# not say its channel order (OpenCV's is BGR) or value range. One row, saying so; a 64x64x3
# array was taken for a list of 64 rows before.
ERROR_PIXELS = ("decoded pixels ({}), not an image file: the 'image' column takes each image "
                "file's bytes, base64-encoded; encode the pixels as a PNG first")
ERROR_PIL_IMAGE = ("a PIL image ({}), not an image file: the 'image' column takes each image "
                   "file's bytes, base64-encoded; save it as a PNG or JPEG first")
# TensorFlow Serving's REST convention for binary data, {"b64": "<base64>"}, as a client
# written for it sends each image (`{"instances": [{"image": {"b64": ...}}]}`): MLflow hands
# such a cell over as the dict's repr (in-process callers, as the dict).
_B64_OBJECT = re.compile(r"""^\{\s*(['"])b64\1\s*:\s*(['"])([^'"]*)\2\s*\}$""")
# A row whose cell is empty, None or NaN (a missing image in the caller's table).
ERROR_EMPTY = "empty: no image in this row"
# A row in a format the model cannot decode says which (by the file's first bytes) instead of
# ERROR_UNDECODABLE, which then means a damaged file: iPhones store photos as HEIC (and keep
# the name .jpg after some transfers), scanners TIFF, and photo folders hold Live Photos' videos.
ERROR_UNSUPPORTED = ("unsupported image format {} (the model reads JPEG, PNG, GIF, BMP and "
                     "WebP): convert the file first")
_FTYP_BRANDS = {  # ISO media files: the brand after "ftyp" at byte 4
    **dict.fromkeys((b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"),
                    "HEIC/HEIF"),
    **dict.fromkeys((b"avif", b"avis"), "AVIF"),
    **dict.fromkeys((b"isom", b"iso2", b"mp41", b"mp42", b"qt  ", b"M4V ", b"3gp4", b"3gp5"),
                    "MP4/QuickTime video"),
}
_MAGIC = ((b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\xff\x0a", "JPEG XL"),
          (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"%PDF", "PDF"), (b"8BPS", "PSD"))
# An archive of photos where one image was expected (`petalflow predict --input photos.zip`,
# a zip posted to the served model): named, instead of ERROR_UNDECODABLE.
ERROR_ARCHIVE = "a {} archive, not an image: extract it and classify the images it holds"
_ARCHIVE_MAGIC = ((b"PK\x03\x04", "zip"), (b"PK\x05\x06", "zip"), (b"\x1f\x8b", "gzip (.tgz, .gz)"),
                  (b"7z\xbc\xaf\x27\x1c", "7-Zip"), (b"Rar!\x1a\x07", "RAR"),
                  (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"), (b"\x28\xb5\x2f\xfd", "Zstandard"))


# Pixels an image may have: larger ones are refused from their header, never decoded (a
# 20,000 x 20,000 PNG of 0.3 MB decodes to 1.2 GB, and two decode at once; over ~700 MP
# TensorFlow's decoder refuses, which read as "undecodable image"). The training scan
# quarantines the same ones (dataset.py takes this limit from here).
MAX_PIXELS = 64_000_000
ERROR_TOO_LARGE = "image too large ({}x{} pixels, limit {}): downscale it first"
# Bytes of a base64 row decoded to read its header: a JPEG's size comes after its EXIF and
# colour profile (up to 64 KiB each); a header not read there is not checked.
_HEADER_BYTES = 1 << 18
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                       0xCF})


def header_size(data: bytes) -> Optional[tuple[int, int]]:
    """(width, height) of a JPEG, PNG, GIF, BMP or WebP file from its header, without decoding
    it; None when the header cannot be read (another format, damaged, or cut short)."""
    d = bytes(data[:_HEADER_BYTES])

    def be(at: int, n: int) -> int:
        return int.from_bytes(d[at:at + n], "big")

    def le(at: int, n: int) -> int:
        return int.from_bytes(d[at:at + n], "little")

    if d.startswith(b"\x89PNG\r\n\x1a\n") and d[12:16] == b"IHDR" and len(d) >= 24:
        return be(16, 4), be(20, 4)
    if d[:6] in (b"GIF87a", b"GIF89a") and len(d) >= 10:
        return le(6, 2), le(8, 2)
    if d.startswith(b"BM") and len(d) >= 26:  # a bottom-up bitmap's height is negative
        return (abs(int.from_bytes(d[18:22], "little", signed=True)),
                abs(int.from_bytes(d[22:26], "little", signed=True)))
    if d.startswith(b"RIFF") and d[8:12] == b"WEBP" and len(d) >= 30:
        chunk = d[12:16]
        if chunk == b"VP8X":  # extended: the canvas size
            return 1 + le(24, 3), 1 + le(27, 3)
        if chunk == b"VP8L":  # lossless: 14 bits each, less one
            bits = le(21, 4)
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        if chunk == b"VP8 ":  # lossy: the key frame's header
            return le(26, 2) & 0x3FFF, le(28, 2) & 0x3FFF
        return None
    if d.startswith(b"\xff\xd8"):  # JPEG: its segments up to the frame header (SOFn)
        i = 2
        while i + 9 <= len(d) and d[i] == 0xFF:
            marker = d[i + 1]
            if marker == 0xFF:  # a fill byte
                i += 1
            elif marker in _JPEG_SOF:
                return be(i + 7, 2), be(i + 5, 2)
            elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
                i += 2
            else:
                i += 2 + be(i + 2, 2)
    return None


def decodable_start(head: bytes) -> bool:
    """Whether a file that begins with ``head`` (its first 12 bytes or more) is, by its
    signature, in a format the model decodes: JPEG, PNG, GIF, BMP or WebP."""
    head = bytes(head[:12])
    return (head.startswith((b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM"))
            or (head.startswith(b"RIFF") and head[8:12] == b"WEBP"))


def too_large(data: Optional[bytes]) -> Optional[str]:
    """ERROR_TOO_LARGE for an image whose header says it has more than MAX_PIXELS pixels."""
    size = header_size(data) if data else None
    if size is None or size[0] * size[1] <= MAX_PIXELS:
        return None
    return ERROR_TOO_LARGE.format(size[0], size[1], MAX_PIXELS)


# TensorFlow's BMP decoder has no palettes: it reads an 8-bit BMP's palette indices as grey
# levels (right for a grey ramp, another picture for a colour palette: a prediction made on
# it is silently wrong) and refuses 1 and 4 bits. The training scan quarantines them too.
ERROR_PALETTE_BMP = ("{}-bit colour-palette BMP: the model reads 24/32-bit and 8-bit grey "
                     "BMPs; save it as a 24-bit BMP or a PNG first")


def palette_bmp(data: Optional[bytes]) -> Optional[str]:
    """ERROR_PALETTE_BMP for a BMP of 1, 4 or 8 bits a pixel whose palette is not the grey
    ramp an 8-bit grey BMP has (index i: grey level i); None for any other file, or a header
    not read whole."""
    d = bytes(data[:2048]) if data else b""  # the headers (at most 14 + 124) and a palette
    if not d.startswith(b"BM") or len(d) < 50:
        return None
    dib, bits = int.from_bytes(d[14:18], "little"), int.from_bytes(d[28:30], "little")
    if dib < 40 or bits > 8:  # (OS/2's 12-byte header: 24-bit ones only seen)
        return None
    if bits < 8:
        return ERROR_PALETTE_BMP.format(bits)
    used = int.from_bytes(d[46:50], "little") or 256
    table = d[14 + dib:14 + dib + 4 * used]
    if used > 256 or len(table) < 4 * used:
        return None
    grey = all(table[4 * i:4 * i + 3] == bytes((i, i, i)) for i in range(used))
    return None if grey else ERROR_PALETTE_BMP.format(bits)


def _refuse_before_decoding(rows: list, headers: Sequence[Optional[bytes]], blank) -> dict:
    """{row: its reason} for the rows whose ``headers`` say they are too large
    (ERROR_TOO_LARGE) or a colour-palette BMP (ERROR_PALETTE_BMP), each replaced in ``rows``
    by ``blank`` (a value the graph fails to decode: never decoded)."""
    refused = {}
    for i, head in enumerate(headers):
        reason = too_large(head) or palette_bmp(head)
        if reason:
            refused[i] = reason
            rows[i] = blank
    return refused


def _say_refused(frame: pd.DataFrame, refused: dict) -> pd.DataFrame:
    for i, reason in refused.items():
        frame.loc[frame.index[i], "error"] = reason
    return frame


def unsupported_format(data: bytes) -> Optional[str]:
    """The name of the format of an image file the model cannot decode, from its first bytes
    (None: not one of those)."""
    head = bytes(data[:16])
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12])
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def archive_format(data: bytes) -> Optional[str]:
    """The kind of archive ``data`` is, from its first bytes (a tar: "ustar" at byte 257);
    None: not an archive."""
    head = bytes(data[:262])
    if head[257:262] == b"ustar":
        return "tar"
    return next((name for magic, name in _ARCHIVE_MAGIC if head.startswith(magic)), None)


# Why an image the decoder refused could not be read, when its bytes show it: said after
# ERROR_UNDECODABLE (the kind a caller counts by stays its first words), as the training scan's
# quarantine reasons say it. A bare ERROR_UNDECODABLE is left for an image damaged inside.
# (format, its signature, what its last bytes hold when whole)
_ENDINGS = (("JPEG", b"\xff\xd8\xff", b"\xff\xd9"),
            ("PNG", b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"))
TAIL_BYTES = 64  # of a file, read to tell whether it was cut short
UNDECODABLE_CUT_SHORT = (ERROR_UNDECODABLE + ": {} cut short (the file ends before its image "
                         "data does: a copy or download that did not finish?)")
# TensorFlow 2.21 refuses an animated WebP 3 channels ("WebP Animation must be 4 channel
# RGBA", which reads as if an RGBA file would do) and corrupts its heap decoding it with its
# own (``decode_rgb``); an animated GIF is read as its first frame.
UNDECODABLE_ANIMATED_WEBP = (ERROR_UNDECODABLE + ": animated WebP (the model reads still "
                             "images; TensorFlow cannot decode an animated WebP): save one "
                             "frame as a still WebP, PNG or JPEG first")
UNDECODABLE_EMPTY_FILE = ERROR_UNDECODABLE + ": empty file (0 bytes)"
# A download that got an error or sign-in page instead of the photo, saved under the photo's
# name: common in photos fetched from a list of URLs (a scraper, wget -i).
UNDECODABLE_WEB_PAGE = (ERROR_UNDECODABLE + ": a web page (HTML), not an image: a download "
                        "that got an error or sign-in page instead?")
UNDECODABLE_NOT_AN_IMAGE = (ERROR_UNDECODABLE + ": not an image (its first bytes are those of "
                            "no format the model reads: JPEG, PNG, GIF, BMP or WebP)")


def animated_webp(head: bytes) -> bool:
    """Whether a file beginning with ``head`` (21 bytes or more) is an animated WebP: its
    extended header (VP8X) has the animation flag."""
    head = bytes(head[:21])
    return (head.startswith(b"RIFF") and head[8:16] == b"WEBPVP8X" and len(head) == 21
            and bool(head[20] & 0x02))


def web_page(head: bytes) -> bool:
    """Whether a file beginning with ``head`` (its first kilobyte, say) is an HTML page: it
    starts (after a byte-order mark and white space) as one does, or has an ``<html`` tag."""
    text = bytes(head[:1024]).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith((b"<!doctype html", b"<html", b"<head", b"<!--")) or b"<html" in text


def text_start(head: bytes) -> Optional[str]:
    """The first line (at most 40 characters) of ``head`` when it reads as text: UTF-8 with
    no control characters but line breaks and tabs; else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        try:  # a multi-byte character cut by the end of ``head``
            text = head[:-3].decode("utf-8") if len(head) > 3 else ""
        except UnicodeDecodeError:
            return None
    text = text.lstrip("\ufeff")
    if not text.strip() or any(c < " " and c not in "\t\r\n" for c in text):
        return None
    return text.strip().splitlines()[0][:40]


def cut_short(head: bytes, tail: bytes) -> Optional[str]:
    """UNDECODABLE_CUT_SHORT for a JPEG or PNG file beginning with ``head`` whose last bytes,
    ``tail`` (its last TAIL_BYTES or more), do not end as such a file does (its end-of-image
    marker, its IEND chunk; trailing zeros and line ends allowed): TensorFlow says only
    "Invalid JPEG data or crop window" of the commonest bad image, a copy or download cut
    short. None otherwise. Ask it only of a file the decoder refused: a whole photo may carry
    data after its end (a phone's motion photo, its video)."""
    tail = bytes(tail[-TAIL_BYTES:]).rstrip(b"\x00\r\n")
    for name, signature, ending in _ENDINGS:
        if bytes(head[:8]).startswith(signature) and not tail.endswith(ending):
            return UNDECODABLE_CUT_SHORT.format(name)
    return None


def why_undecodable(head: bytes, tail: bytes) -> Optional[str]:
    """What the bytes of a file the decoder refused show of why (``ERROR_UNDECODABLE: ...``):
    empty, a web page, not an image, an animated WebP, a JPEG or PNG cut short; None when
    they show nothing (an image damaged inside). ``head``: its first bytes (a kilobyte, or
    all of them), ``tail``: its last TAIL_BYTES (or all of them). A format the model cannot
    decode, or an archive, is named by ``unsupported_format`` and ``archive_format`` before
    this is asked."""
    if not head:
        return UNDECODABLE_EMPTY_FILE
    if not decodable_start(head):  # (an image's own bytes may hold "<html": it stays one)
        return UNDECODABLE_WEB_PAGE if web_page(head) else UNDECODABLE_NOT_AN_IMAGE
    if animated_webp(head):
        return UNDECODABLE_ANIMATED_WEBP
    return cut_short(head, tail)


def _name_failures(frame: pd.DataFrame, raw: Sequence[Optional[bytes]]) -> pd.DataFrame:
    """``frame`` with each undecodable row of a known unsupported format, or of an archive,
    saying which, and otherwise what its bytes show of why (``why_undecodable``); ``raw``
    None: a row whose bytes are not at hand, left as it is."""
    for i in np.flatnonzero(frame["error"].to_numpy() == ERROR_UNDECODABLE):
        data = raw[i]
        if data is None:
            continue
        fmt = unsupported_format(data)
        kind = None if fmt else archive_format(data)
        if fmt:
            frame.loc[frame.index[i], "error"] = ERROR_UNSUPPORTED.format(fmt)
        elif kind:
            frame.loc[frame.index[i], "error"] = ERROR_ARCHIVE.format(kind)
        else:
            frame.loc[frame.index[i], "error"] = why_undecodable(data, data) or ERROR_UNDECODABLE
    return frame


# Rows per call of the SavedModel: its memory grows with the rows it runs at once (MobileNetV2
# 0.35 at 224 px: +145 MiB over the loaded model at 8 rows, +343 at 32, +573-587 at 64, about
# 4.8 MB more per row), so a request of any size runs 16 at a time: `petalflow predict` on
# 1,500 photos peaks at 1,196 MiB instead of 1,333-1,343 at 32, with 5 % fewer images/s
# (BENCHMARKS.md, target 1). Each registered model keeps the value it shipped with.
CALL_ROWS = 16
PROB_PREFIX = "prob_"


def output_columns(class_names: Sequence[str]) -> list[str]:
    """Column order of a prediction table: label, probability, error, prob_<class>..."""
    return ["label", "probability", "error"] + [PROB_PREFIX + c for c in class_names]


def read_metadata(saved_model_dir: Path) -> dict:
    """The model's metadata (class_names, image_size, backbone, fingerprint), TF not needed."""
    return json.loads((Path(saved_model_dir) / "petalflow.json").read_text())


class ImageClassifier:
    """Wraps the exported SavedModel; ``predict`` maps a DataFrame of images to a DataFrame.

    Input column ``image``: base64 strings (standard or URL-safe) of encoded image files, or raw
    ``bytes``. Output, one row per input in order: ``label`` (class name, "" when the image could
    not be decoded), ``probability``, ``error`` ("" or the reason) and ``prob_<class>`` per class.
    """

    def __init__(self, saved_model_dir: str):
        import tensorflow as tf

        self.metadata = read_metadata(Path(saved_model_dir))
        self.class_names: list[str] = self.metadata["class_names"]
        self._model = tf.saved_model.load(str(saved_model_dir))
        self._serve_b64 = self._model.signatures["serving_default"]
        self._serve_bytes = self._model.signatures["classify_bytes"]
        self._embed_bytes = self._model.signatures.get("embed_bytes")  # newer exports only
        # Newer still: classify_bytes also returns each row's backbone features.
        self.gives_features = "features" in self._serve_bytes.structured_outputs
        reference = Path(saved_model_dir) / DRIFT_REFERENCE
        self.drift_reference: Optional[dict] = (
            json.loads(reference.read_text()) if reference.is_file() else None)

    def features(self, images: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """(backbone features [n, dim], decodable [n] bool) of encoded images: what drift
        compares with the training data."""
        import tensorflow as tf

        if self._embed_bytes is None:
            raise ValueError("this model version has no feature output (exported before drift "
                             "references existed)")
        images = list(images)
        _refuse_before_decoding(images, list(images), b"")  # never decoded: not ok
        feats, ok = [], []
        for i in range(0, len(images), CALL_ROWS):
            out = self._embed_bytes(
                image_bytes=tf.constant(list(images[i:i + CALL_ROWS]), tf.string))
            feats.append(out["features"].numpy())
            ok.append(out["ok"].numpy())
        if not feats:
            return np.zeros((0, 0), np.float32), np.zeros(0, bool)
        return np.concatenate(feats), np.concatenate(ok)

    def drift(self, images: Sequence[bytes]) -> dict:
        """How far a batch of images is from what the model was trained on (``drift_scores``);
        undecodable images are left out."""
        if self.drift_reference is None or self._embed_bytes is None:
            raise ValueError("this model version has no drift reference (registered before "
                             "drift references existed)")
        images = [bytes(b) for b in images]
        if "classes" in self.drift_reference and self.gives_features:
            # The batch's class mix comes from classifying it, in the same pass.
            frame, features = self.predict_with_features(images)
            ok = (frame["error"] == "").to_numpy()
            return self.drift_of_classified(features[ok], self.probabilities(frame)[ok],
                                            [b for b, keep in zip(images, ok) if keep])
        features, ok = self.features(images)
        return self.drift_of_features(features[ok], [b for b, keep in zip(images, ok) if keep])

    def probabilities(self, frame: pd.DataFrame) -> np.ndarray:
        """[rows, classes] class probabilities of a prediction table, in class order."""
        return frame[[PROB_PREFIX + c for c in self.class_names]].to_numpy(np.float64)

    def drift_of_features(self, features: np.ndarray, images: Sequence[bytes]) -> dict:
        """``drift`` of decodable images whose backbone features are known already (from
        ``predict_with_features``): the same figures without running the backbone again,
        compared with the training split as a whole (``drift_of_classified`` takes the
        batch's class mix into account)."""
        return self.drift_of_classified(features, None, images)

    def drift_of_classified(self, features: np.ndarray, probabilities: Optional[np.ndarray],
                            images: Sequence[bytes]) -> dict:
        """``drift`` of decodable images whose backbone features and class ``probabilities``
        (rows of ``predict_with_features``) are known already: the batch is compared with
        training images of the class mix it was classified as, so photos of one class, or
        any mix unlike the training split's, are not "drifted" for that alone."""
        self._check_drift(len(images))
        return drift_scores(self.drift_reference, np.asarray(features), image_statistics(images),
                            probabilities)

    def drift_of_classified_files(self, features: np.ndarray,
                                  probabilities: Optional[np.ndarray],
                                  paths: Sequence[str]) -> dict:
        """``drift_of_classified`` of image files, each read as its statistics are computed
        (``file_statistics``): a prediction job's sample of 256 phone photos held in memory at
        once took ~0.5 GB. The same figures."""
        self._check_drift(len(paths))
        return drift_scores(self.drift_reference, np.asarray(features), file_statistics(paths),
                            probabilities)

    def _check_drift(self, images: int) -> None:
        if self.drift_reference is None:
            raise ValueError("this model version has no drift reference (registered before "
                             "drift references existed)")
        if images == 0:
            raise ValueError("no decodable image to compute drift on")

    def get_raw_model(self) -> "ImageClassifier":
        """This object: what MLflow's ``PyFuncModel.get_raw_model()`` returns, so a caller can
        reach ``predict_with_features``."""
        return self

    @property
    def columns(self) -> list[str]:
        return output_columns(self.class_names)

    def _to_frame(self, outputs: dict, index=None) -> pd.DataFrame:
        data = {}
        for col in self.columns:
            values = outputs[col].numpy()
            if values.dtype == object:
                values = [v.decode("utf-8") for v in values]
            data[col] = values
        return pd.DataFrame(data, index=index)

    def classify_raw(self, images: Sequence[bytes]) -> dict:
        """The ``classify_bytes`` signature's outputs (tensors) for encoded images, in one
        call: what the evaluation's latency figure times."""
        import tensorflow as tf

        return self._serve_bytes(image_bytes=tf.constant(list(images), tf.string))

    def predict_bytes(self, images: Sequence[bytes]) -> pd.DataFrame:
        """Classify raw encoded image bytes; undecodable items get an ``error``, not an exception."""
        if len(images) == 0:
            return pd.DataFrame({c: [] for c in self.columns})
        rows = list(images)
        refused = _refuse_before_decoding(rows, images, b"")
        return _say_refused(_name_failures(self._in_calls(rows, self.classify_raw), images),
                            refused)

    def predict_with_features(self, images: Sequence[bytes]) -> tuple[pd.DataFrame, np.ndarray]:
        """``predict_bytes`` of encoded images plus, from the same pass, each row's backbone
        features ([n, dim], zeros where the row has an error): what ``drift_of_features``
        compares with the training data. Only where ``gives_features``."""
        if not self.gives_features:
            raise ValueError("this model version gives no features with its predictions "
                             "(exported before they were added)")
        images = list(images)
        rows = list(images)
        refused = _refuse_before_decoding(rows, images, b"")
        frames, features = [], []
        for i in range(0, len(rows), CALL_ROWS):
            out = self.classify_raw(rows[i:i + CALL_ROWS])
            frames.append(self._to_frame(out))
            features.append(out["features"].numpy())
        if not frames:
            return pd.DataFrame({c: [] for c in self.columns}), np.zeros((0, 0), np.float32)
        frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        return _say_refused(_name_failures(frame, images), refused), np.concatenate(features)

    def _in_calls(self, items: list, call) -> pd.DataFrame:
        """The prediction table of ``items``, ``CALL_ROWS`` per ``call`` (bounded memory)."""
        frames = [self._to_frame(call(items[i:i + CALL_ROWS]))
                  for i in range(0, len(items), CALL_ROWS)]
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)

    def predict(self, model_input, params: Optional[dict] = None) -> pd.DataFrame:
        """Predictions per row; with ``params={"output": "drift"}`` instead one row describing
        how far the whole batch is from the training data (``drift``)."""
        import tensorflow as tf

        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise ValueError("input needs a column 'image' with base64-encoded image files")
            values = model_input["image"].tolist()
            index = model_input.index
            if values and all(_image_list(v) for v in values):
                # {"image": [b64, …]} from Python (REST's "inputs" format): MLflow's schema
                # enforcement hands it over as one row holding the list; a row per image.
                values, index = [x for v in values for x in v], None
        elif isinstance(model_input, dict) and "image" in model_input:
            values, index = _rows(model_input["image"]), None
        else:
            values, index = _rows(model_input), None
        if not values:
            return pd.DataFrame({c: [] for c in self.columns})
        cells = [_cell(v) for v in values]
        values = [text for text, _ in cells]
        if (params or {}).get("output", "predictions") == "drift":
            raw = [_b64decode(v) for v in values]
            return pd.DataFrame([self.drift([r for r in raw if r is not None])])
        sent = list(values)
        headers = [_b64_header(v) if v else None for v in values]
        refused = _refuse_before_decoding(sent, headers, "@")
        refused.update({i: reason for i, (_, reason) in enumerate(cells) if reason})
        frame = self._in_calls(
            sent, lambda rows: self._serve_b64(image=tf.constant(rows, tf.string)))
        # (refused rows keep their reason: their whole base64 is not decoded to name it)
        failed = [i for i in np.flatnonzero(frame["error"].to_numpy() != "") if i not in refused]
        raw = {i: _b64decode(values[i]) if values[i] else None for i in failed}
        frame.loc[[i for i in failed if values[i] and raw[i] is None], "error"] = ERROR_NOT_BASE64
        frame.loc[[i for i in failed if not values[i]], "error"] = ERROR_EMPTY
        frame = _say_refused(_name_failures(frame, [raw.get(i) for i in range(len(values))]),
                             refused)
        if index is not None:
            frame.index = index
        return frame


def image_statistics(images: Sequence[bytes]) -> np.ndarray:
    """[n, len(IMAGE_STATS)] per encoded image: width, height, aspect (w/h), brightness (mean
    of RGB in [0, 1]), contrast (std of the gray levels), saturation (mean of max-min over RGB).
    Images must be decodable. The training reference and every batch use this same function,
    so the reduced-scale JPEG decode is applied alike on both sides."""
    import tensorflow as tf

    return _statistics(tf.data.Dataset.from_tensor_slices(tf.constant(list(images), tf.string)))


def file_statistics(paths: Sequence[str]) -> np.ndarray:
    """``image_statistics`` of image files, read as they are decoded (bounded memory)."""
    import tensorflow as tf

    return _statistics(tf.data.Dataset.from_tensor_slices(
        tf.constant([str(p) for p in paths], tf.string)).map(tf.io.read_file))


def decode_rgb(data):
    """The uint8 RGB pixels [h, w, 3] of an encoded PNG, GIF (its first frame), BMP or WebP,
    as TensorFlow's ``decode_image`` gives them with 3 channels (the training decoder's and this
    file's, one function). A still WebP with an alpha channel (a product photo on a transparent
    background, a web page's image), which TensorFlow refuses 3 channels ("Number of channels
    requested does not match input"), is decoded with its 4 and the alpha dropped, as a PNG's
    is. An animated WebP stays an error: decoded with its own channels, TensorFlow 2.21
    corrupts its heap (the process aborts)."""
    import tensorflow as tf

    head = tf.strings.join([tf.strings.substr(data, 0, 32), "\0" * 32])  # any length: 32+

    def text(at: int, n: int):
        return tf.strings.substr(head, at, n)

    def byte(at: int):
        return tf.cast(tf.io.decode_raw(text(at, 1), tf.uint8)[0], tf.int32)

    # The RIFF container's first chunk: VP8X's flags (alpha 0x10, animation 0x02) at byte
    # 20; VP8L's alpha bit is bit 28 of the 32 bits after its signature byte (byte 24, 0x10).
    webp = tf.logical_and(tf.equal(text(0, 4), "RIFF"), tf.equal(text(8, 4), "WEBP"))
    alpha = tf.logical_or(
        tf.logical_and(tf.equal(text(12, 4), "VP8X"),
                       tf.equal(tf.bitwise.bitwise_and(byte(20), 0x12), 0x10)),
        tf.logical_and(tf.equal(text(12, 4), "VP8L"),
                       tf.not_equal(tf.bitwise.bitwise_and(byte(24), 0x10), 0)))
    return tf.cond(
        tf.logical_and(webp, alpha),
        lambda: tf.io.decode_image(data, channels=4, expand_animations=False)[..., :3],
        lambda: tf.io.decode_image(data, channels=3, expand_animations=False))


def _statistics(encoded) -> np.ndarray:
    """The statistics rows of a dataset of encoded images, decoded in parallel, one image per
    core (one eager decode after another in a Python loop: 0.85 s for 500 photos, 0.21 s so
    on 2 cores; the same figures to 1e-6)."""
    import os

    import tensorflow as tf

    # common.usable_cpus, which this file cannot import (it travels without petalflow).
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2

    def row(data):
        def jpeg():  # decoded at 1/4 scale (DCT scaling, ~10x faster); the size is the file's
            return (tf.io.decode_jpeg(data, channels=3, ratio=4),
                    tf.image.extract_jpeg_shape(data)[:2])

        def other():  # over STATS_PIXELS: every step-th pixel of every step-th row
            rgb = decode_rgb(data)
            size = tf.shape(rgb)[:2]
            step = tf.maximum(1, tf.cast(tf.math.sqrt(
                tf.cast(size[0], tf.float64) * tf.cast(size[1], tf.float64) / STATS_PIXELS),
                tf.int32))
            return rgb[::step, ::step], size

        rgb, size = tf.cond(tf.io.is_jpeg(data), jpeg, other)
        rgb = tf.cast(rgb, tf.float32) / 255.0
        h, w = tf.cast(size[0], tf.float64), tf.cast(size[1], tf.float64)
        values = [tf.reduce_mean(rgb), tf.math.reduce_std(tf.reduce_mean(rgb, axis=2)),
                  tf.reduce_mean(tf.reduce_max(rgb, axis=2) - tf.reduce_min(rgb, axis=2))]
        return tf.stack([w, h, w / tf.maximum(h, 1.0), *(tf.cast(v, tf.float64) for v in values)])

    # TensorFlow ops only: AutoGraph's conversion of `row` (and of decode_rgb inside it)
    # was ~0.25 s of every call.
    rows = encoded.map(tf.autograph.experimental.do_not_convert(row),
                       num_parallel_calls=workers, deterministic=True).batch(256)
    # Without tf.data's autotuning, as common.without_autotuning (which this file cannot
    # import) explains: the end of a pass otherwise often waits idle for its clean-up.
    options = tf.data.Options()
    options.autotune.enabled = False
    rows = rows.with_options(options)
    batches = [batch.numpy() for batch in rows]  # none for no images
    return (np.concatenate(batches) if batches else np.zeros(0)).reshape(-1, len(IMAGE_STATS))


def resolution_of(stats: np.ndarray, image_stats: dict) -> np.ndarray:
    """``stats`` (rows of ``image_statistics``) as a reference's ``image_stats`` compares them:
    with its ``resolution_of`` (the model's input size S), width and height become
    log2(min(side, S) / S) (``RESOLUTION_STATS``); without it (versions registered before),
    as they are."""
    size = image_stats.get("resolution_of")
    stats = np.array(stats, dtype=np.float64).reshape(-1, len(IMAGE_STATS))
    if size:
        sides = stats[:, RESOLUTION_STATS]
        stats[:, RESOLUTION_STATS] = np.log2(np.clip(sides, 1.0, float(size)) / float(size))
    return stats


def drift_reference(features: np.ndarray, stats: np.ndarray,
                    labels: Optional[Sequence[int]] = None, num_classes: int = 0,
                    image_size: Optional[int] = None) -> dict:
    """What a model was trained on, compactly: per-dimension mean and spread of its backbone
    features and of the image statistics over a sample of the training split. With the
    sample's ``labels`` (of ``num_classes``), also each class's mean and the spread within
    classes (``classes``): what a batch of a given class mix is expected to look like. With
    the model's input ``image_size``, width and height are described as the model sees them
    (``resolution_of``)."""
    def describe(x):
        x = np.asarray(x, dtype=np.float64)
        return {"mean": x.mean(axis=0).tolist(), "std": x.std(axis=0).tolist()}

    described = {"names": list(IMAGE_STATS)}
    if image_size:
        described["resolution_of"] = int(image_size)
    stats = resolution_of(stats, described)
    reference = {"images": int(len(features)), "features": describe(features),
                 "image_stats": dict(describe(stats), **described),
                 "threshold": DRIFT_THRESHOLD, "min_images": DRIFT_MIN_IMAGES}
    if labels is not None and num_classes > 1 and len(features):
        labels = np.asarray(labels, dtype=np.int64)
        reference["classes"] = {
            "counts": np.bincount(labels, minlength=num_classes).tolist(),
            "features": _describe_classes(features, labels, num_classes),
            "image_stats": _describe_classes(stats, labels, num_classes)}
    return reference


def _describe_classes(x: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Each class's mean (the overall mean for a class the sample lacks) and the variance
    within classes, pooled; 6 significant digits (a class mean per class and dimension)."""
    x = np.asarray(x, dtype=np.float64)
    overall = x.mean(axis=0)
    means = np.stack([x[labels == c].mean(axis=0) if (labels == c).any() else overall
                      for c in range(num_classes)])
    within = ((x - means[labels]) ** 2).mean(axis=0)

    def short(values):
        return [float(f"{v:.6g}") for v in values]

    return {"means": [short(row) for row in means], "within_var": short(within)}


def _shift(reference: dict, x: np.ndarray, reference_images: Optional[int] = None,
           pooled: bool = False, classes: Optional[dict] = None,
           mix: Optional[np.ndarray] = None, counts: Optional[Sequence[int]] = None,
           resolution: Optional[np.ndarray] = None) -> float:
    """Standardised mean shift of a batch from the reference, root-mean-square over the
    dimensions, with sampling noise removed (without drift, E[z^2] = 1/n for a batch of n
    beside a reference of ``reference_images``, + 1/that): 0 when the batch looks like the
    training data, ~1 when its mean moves by one training standard deviation in every
    dimension. ``pooled`` (dimensions of one kind, like backbone features) pulls each
    dimension's spread towards their average by ``SPREAD_PRIOR_IMAGES`` (a spread estimated
    from a few images can be near 0).

    With the reference's per-class description (``classes``: ``_describe_classes``) and the
    batch's class ``mix`` (the share of its images classified as each class; ``counts``: the
    reference's images per class), the batch's mean is compared with what training images in
    that mix average to, not with the training split's own mix: a batch of one class's photos
    is like the training data. The noise then is the spread within classes.

    In the dimensions ``resolution`` marks (width and height as the model sees them,
    ``RESOLUTION_STATS``), a batch whose mean is above the reference's counts as no shift at
    all (images sharper than the training ones), and the spread is at least
    ``RESOLUTION_SPREAD``: they count even where the reference's images did not vary."""
    mean = np.asarray(reference["mean"], dtype=np.float64)
    var = np.asarray(reference["std"], dtype=np.float64) ** 2
    falls = (np.zeros(len(var), dtype=bool) if resolution is None
             else np.asarray(resolution, dtype=bool))
    floor = np.where(falls, RESOLUTION_SPREAD ** 2, 0.0)
    keep = var > 1e-12 * max(float(var.max(initial=0.0)), 1e-24)  # constant dimensions say nothing
    keep |= floor > 0
    if not keep.any() or len(x) == 0:
        return 0.0
    mean, var, floor, falls = mean[keep], var[keep], floor[keep], falls[keep]
    m = reference_images or 0
    spread = (m * var + SPREAD_PRIOR_IMAGES * var.mean()) / (m + SPREAD_PRIOR_IMAGES) \
        if pooled and m else var
    spread = np.maximum(spread, floor)
    noise_var, reference_noise = var, (1.0 / m if m else 0.0)
    if classes is not None and mix is not None:
        mean = mix @ np.asarray(classes["means"], dtype=np.float64)[:, keep]
        noise_var = np.asarray(classes["within_var"], dtype=np.float64)[keep]
        per_class = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
        reference_noise = float(np.sum(mix ** 2 / per_class))
    diff = np.asarray(x, dtype=np.float64).mean(axis=0)[keep] - mean
    terms = diff ** 2 / spread - noise_var / spread * (1.0 / len(x) + reference_noise)
    terms[falls & (diff > 0)] = 0.0
    return float(np.sqrt(max(0.0, float(np.mean(terms)))))


def drift_scores(reference: dict, features: np.ndarray, stats: np.ndarray,
                 probabilities: Optional[np.ndarray] = None) -> dict:
    """feature_drift, image_drift, drift_score (the larger) and whether it is over the
    threshold the reference was stored with: ``drifted`` only for a batch of ``min_images``
    or more (a smaller one's score is mostly chance). Given the batch's class
    ``probabilities`` and a reference with per-class figures, the batch is compared with
    training images of its own class mix (``class_mix``: true); otherwise with the training
    split as a whole."""
    m = reference.get("images")
    classes = reference.get("classes")
    mix = None
    if classes is not None and probabilities is not None and len(probabilities):
        # The share of the batch classified as each class (a model unsure of every image
        # still says which class it takes each one for; its mean probabilities may not).
        chosen = np.argmax(np.asarray(probabilities, dtype=np.float64), axis=1)
        mix = np.bincount(chosen, minlength=len(classes["counts"])) / len(chosen)

    def by_class(part: str) -> dict:
        return {} if mix is None else {"classes": classes[part], "mix": mix,
                                       "counts": classes["counts"]}

    feature = _shift(reference["features"], features, m, pooled=True, **by_class("features"))
    described = reference["image_stats"]
    sides = (np.isin(np.arange(len(IMAGE_STATS)), RESOLUTION_STATS)
             if described.get("resolution_of") else None)
    image = _shift(described, resolution_of(stats, described), m, resolution=sides,
                   **by_class("image_stats"))
    threshold = float(reference.get("threshold", DRIFT_THRESHOLD))
    min_images = int(reference.get("min_images", DRIFT_MIN_IMAGES))
    score = max(feature, image)
    return {"drift_score": score, "feature_drift": feature, "image_drift": image,
            "threshold": threshold, "min_images": min_images,
            "drifted": bool(score > threshold and len(stats) >= min_images),
            "images": int(len(stats)), "class_mix": mix is not None}


# TensorFlow's ``__init__`` imports Keras's optimizers (Keras 3's, or tf-keras's with
# TF_USE_LEGACY_KERAS) so that Keras's classes register for SavedModel loading. This model is
# a frozen graph with no Keras object: a process that loads it needs no Keras, and importing
# it costs, on 2 cores, 1.7 s and 165 MiB where Keras 3 is the Keras (any environment built
# from the model's requirements: `mlflow models serve`, another team's Python) and 0.55 s for
# tf-keras (`petalflow predict`, before its first prediction; BENCHMARKS.md, target 4).
# Keras imports as usual when something asks for it later.
_KERAS_EAGER_IMPORTS = ("keras.src.optimizers", "tf_keras.src.optimizers")


def import_tensorflow_without_keras():
    """``import tensorflow`` without the Keras import TensorFlow makes for its own sake (it
    catches the ImportError a ``None`` in ``sys.modules`` raises). Afterwards Keras imports
    normally. Where TensorFlow is already imported, or refuses to start without that import
    (another version), the import is the plain one."""
    import sys

    if "tensorflow" not in sys.modules:
        blocked = [name for name in _KERAS_EAGER_IMPORTS if name not in sys.modules]
        for name in blocked:
            sys.modules[name] = None
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            pass  # the plain import below, Keras included
        finally:
            for name in blocked:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]
    import tensorflow as tf

    return tf


def _load_pyfunc(data_path: str) -> ImageClassifier:
    """MLflow pyfunc loader hook: ``data_path`` is the model's SavedModel folder."""
    import_tensorflow_without_keras()
    return ImageClassifier(data_path)


def _image_list(value) -> bool:
    """Whether a cell holds a list of images (one row per image), not one image's pixels."""
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and value.dtype.kind in "OUS"
    return isinstance(value, (list, tuple)) and all(
        v is None or isinstance(v, (str, bytes, bytearray, dict, float)) for v in value)


def _rows(given) -> list:
    """The cells of an input given as a list or a vector (one cell otherwise: one image's
    pixels are one row). Not through a numpy array of bytes, whose items lose their trailing
    NULs (a BMP's last pixels, black, read "undecodable image") and are padded to the longest
    file in memory."""
    if isinstance(given, (list, tuple, pd.Series)) or _image_list(given):
        return list(given)
    return [given]


def _cell(value) -> tuple[str, Optional[str]]:
    """(the base64 text a cell holds for the serving signature, "" for a missing one; the
    reason it holds no image file, or None). An image file's own bytes are taken as they are,
    also as a uint8 vector (base64 handed over as bytes, as schema enforcement may, stays
    base64)."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return "", None  # None, NaN and pandas' NA (a "string" column's): a missing cell
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and (
            value.ndim == 1 or value.shape[1:] == (1,)):
        value = value.tobytes()  # a file's bytes as an array: np.fromfile, cv2.imencode's
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        # base64 text, or a file's bytes: an image's header holds bytes base64 cannot (JPEG's
        # first 0xFF, PNG's 0x89, the NULs of a BMP's or GIF's sizes)
        if data.isascii():
            text = data.decode("ascii").lstrip()
            if text.startswith("{") or _b64decode(text, 1 << 10) is not None:
                return _unwrapped(text), None
        return base64.b64encode(data).decode("ascii"), None
    if isinstance(value, (np.ndarray, list, tuple)):
        try:
            pixels = np.asarray(value)
        except ValueError:  # ragged lists
            pixels = np.zeros(0)
        if pixels.size and pixels.dtype.kind in "biuf":
            return "", ERROR_PIXELS.format(
                "x".join(str(n) for n in pixels.shape) + " " + pixels.dtype.name)
    elif type(value).__module__.split(".")[0] == "PIL" and hasattr(value, "mode"):
        return "", ERROR_PIL_IMAGE.format(f"{value.mode} {value.size[0]}x{value.size[1]}")
    return _unwrapped(value), None


def _unwrapped(value) -> str:
    """A cell as the base64 text it holds: TensorFlow Serving's ``{"b64": ...}`` unwrapped."""
    if isinstance(value, dict) and list(value) == ["b64"]:
        value = value["b64"]
    text = str(value).strip()
    found = _B64_OBJECT.match(text) if text.startswith("{") else None
    return found.group(3) if found else text


def _b64decode(value: str, limit: Optional[int] = None) -> Optional[bytes]:
    """Bytes of a base64 image as the serving signature accepts it (standard or URL-safe, with
    or without a data: prefix); None when it is not base64. With ``limit``: its first
    ``limit`` bytes at most, from the start of ``value`` only (a header)."""
    import binascii

    if limit is not None:
        value = value[:limit * 2]  # room for a data: prefix and line breaks
    text = re.sub(r"\s", "", re.sub(r"^data:[^,]*,", "", value))
    text = text.replace("-", "+").replace("_", "/")
    if limit is not None and len(text) > limit // 3 * 4:
        text = text[:limit // 3 * 4]  # whole 4-character groups: no padding
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def _b64_header(value: str) -> Optional[bytes]:
    """The first bytes of a base64 row, as many as ``header_size`` needs: 4 KiB, or up to
    _HEADER_BYTES for a JPEG whose size comes after its EXIF and colour profile."""
    head = _b64decode(value, 1 << 12)
    if head and head.startswith(b"\xff\xd8") and header_size(head) is None \
            and len(head) >= 1 << 12:
        head = _b64decode(value, _HEADER_BYTES)
    return head


def encode_bytes(data: Iterable[bytes]) -> list[str]:
    """base64 strings of encoded images' bytes (the registered model's input format)."""
    return [base64.b64encode(item).decode("ascii") for item in data]
