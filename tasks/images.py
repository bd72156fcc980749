"""The one image decoding path shared by the scan, training, evaluation and the served model.

Keeping a single function means the model sees exactly the same pixels in training and in
production (no train/serve skew), and the scan quarantines precisely what training could not read.
"""

from __future__ import annotations

import functools

# Formats TensorFlow decodes natively; anything else is quarantined by the scan. WebP: still
# images (TensorFlow's decoder refuses animated ones, which the scan's decode check quarantines).
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
# File names that look like images (supported or not): folder inputs of `predict` are these, so
# an unsupported format is reported on its row instead of silently skipped; a dataset folder with
# none of them (and no recognisable image) is not a class.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp",
                            ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl"})


# Part of the feature caches' key: a change to what the decoding returns must not reuse the
# features of the previous decoder ("exif-orientation": JPEGs turned upright, below;
# "shrunk-smooth": images more than twice the square's size shrunk without aliasing;
# "accurate-idct": JPEGs decoded with libjpeg's accurate integer IDCT, below).
DECODER = "exif-orientation+shrunk-smooth+accurate-idct"
# TensorFlow's decode_jpeg uses libjpeg's fast integer IDCT unless told otherwise; Pillow,
# OpenCV and browsers use the accurate one. With the fast one a JPEG's pixels were ~1 level
# (of 255) off what those decoders give, so an edge model fed Pillow's pixels saw other
# images than it was trained and evaluated on. The accurate one gives Pillow's pixels exactly
# (libjpeg-turbo both) for ~10 % more decoding time.
JPEG_IDCT = "INTEGER_ACCURATE"
# libjpeg's DCT scaling: a JPEG is decoded at 1/2, 1/4 or 1/8 of its size when that still
# leaves at least the square's size on its shorter side. Each 8x8 block is averaged while it is
# decoded (no aliasing), and a phone's 12 MP photo decodes in ~30 ms instead of ~42 ms.
JPEG_SCALES = (2, 4, 8)
# EXIF's APP1 segment comes first after SOI, or after a JFIF APP0 (some tools put one or two
# others before it): the first segments within the first bytes of a file are read.
EXIF_WINDOW = 16384
_EXIF_SEGMENTS = 4
_EXIF_ENTRIES = 64  # IFD0 entries read (cameras write ~10-20; Orientation is among the first)


def exif_window(image_bytes):
    """The first bytes of encoded images (any shape of strings): what ``exif_orientations``
    reads. Batch them and read them together: read one image at a time inside tf.data, the
    reader cost more than decoding many photos (bench/decode_bench.py, BENCHMARKS.md)."""
    import tensorflow as tf

    return tf.strings.substr(image_bytes, 0, EXIF_WINDOW)


def plain(fn):
    """``fn`` as it is when a graph is traced, not converted by AutoGraph (it is plain
    TensorFlow operations; converting them added ~0.4 s to the serving export)."""
    import tensorflow as tf

    return tf.autograph.experimental.do_not_convert(fn)


def exif_orientations(windows):
    """The EXIF Orientation (1-8) of each of ``windows`` ([n] strings: images' first bytes,
    ``exif_window``, or whole files), read by TensorFlow ops for the whole batch at once (so
    the served graph does it too): an APP1 "Exif" segment among the first ``_EXIF_SEGMENTS``
    marker segments of a JPEG, its TIFF header (either byte order), tag 0x0112 among the first
    ``_EXIF_ENTRIES`` of IFD0, all within the first ``EXIF_WINDOW`` bytes. 1 ("as stored") for
    other formats, no EXIF there, damaged EXIF or a value outside 1-8; never raises."""
    return plain(_orientations)(windows)


def _orientations(windows):
    import tensorflow as tf

    def const(value):
        return tf.constant(value, tf.int32)

    # Each constant made once and each step a few operations: every operation of the served
    # graph costs memory wherever the model is loaded, whatever it computes.
    n = tf.shape(windows)[0]
    zero, one, last = const(0), const(1), const(EXIF_WINDOW)
    # Each row's window + 1 bytes, zeros after its data (every read below stays inside), one
    # row after the other: a read is one gather.
    head = tf.reshape(tf.concat([tf.io.decode_raw(windows, tf.uint8, fixed_length=EXIF_WINDOW),
                                 tf.zeros([n, 1], tf.uint8)], axis=1), [-1])
    rows = tf.expand_dims(tf.range(n) * (EXIF_WINDOW + 1), 1)
    spans = {k: tf.expand_dims(tf.range(k), 0) for k in (2, 8, 10, 2 + 12 * _EXIF_ENTRIES)}

    def read(pos, k: int):  # [n, k]: the k bytes at pos [n] of each row, as int32
        at = tf.clip_by_value(tf.expand_dims(pos, 1) + spans[k], zero, last)
        return tf.cast(tf.gather(head, rows + at), tf.int32)

    # A segment: FF, its marker, a big-endian length (counting itself), its data; EXIF's data
    # starts "Exif\0\0", then the TIFF header. Past the segments (the image data, where FF is
    # never followed by E1) or in damaged bytes, the bytes compared do not match.
    signature = const([0xFF, 0xE1, -1, -1, 0x45, 0x78, 0x69, 0x66, 0, 0])
    skipped = signature < 0
    length = const([0, 0, 256, 1, 0, 0, 0, 0, 0, 0])  # the big-endian segment length
    two, data = const(2), const(10)
    pos, tiff = tf.fill([n], 2), tf.fill([n], -1)
    for _ in range(_EXIF_SEGMENTS):
        b = read(pos, 10)
        exif = tf.reduce_all(tf.equal(b, signature) | skipped, axis=1)
        tiff = tf.where(exif & (tiff < zero), pos + data, tiff)
        pos = pos + two + tf.reduce_sum(b * length, axis=1)
    tiff = tf.where(tf.reduce_all(tf.equal(read(tf.zeros([n], tf.int32), 2), [0xFF, 0xD8]),
                                  axis=1), tiff, -1)  # a JPEG
    header = read(tiff, 8)
    little = tf.expand_dims(tf.equal(header[:, 0], 0x49), 1)  # "II": Intel; "MM": Motorola
    weights = tf.where(little, const([1, 256]), const([256, 1]))  # [n, 2]

    def words(b):  # [n, 2k] bytes -> [n, k] 16-bit numbers in each row's byte order
        return tf.reduce_sum(tf.reshape(b, [n, -1, 2]) * tf.expand_dims(weights, 1), axis=2)

    w = words(header)  # byte order, 42, then the 32-bit offset of IFD0 as two words
    offset = tf.reduce_sum(w[:, 2:] * tf.where(little, const([1, 65536]), const([65536, 1])),
                           axis=1)
    ifd = words(read(tiff + offset, 2 + 12 * _EXIF_ENTRIES))  # count, then 6 words an entry
    entries = tf.reshape(ifd[:, 1:], [n, _EXIF_ENTRIES, 6])  # tag, type, count x2, value, -
    listed = tf.expand_dims(tf.range(_EXIF_ENTRIES), 0) < ifd[:, :1]  # within IFD0's count
    hits = tf.equal(entries[..., 0], 0x0112) & listed
    value = tf.reduce_max(tf.where(hits, entries[..., 4], 0), axis=1)
    found = (tiff >= zero) & tf.reduce_any(hits, axis=1) & (value >= one) & (value <= 8)
    return tf.where(found, value, one)


def upright_images(images, orientations):
    """``images`` [n, s, s, 3] float32 (square) turned as their EXIF ``orientations`` [n] (1-8)
    say they are displayed (what ``PIL.ImageOps.exif_transpose`` does): transposed for 5-8,
    then mirrored. The batch is passed through untouched when none needs turning."""
    return plain(_upright)(images, orientations)


def _upright(images, orientations):
    import tensorflow as tf

    def turn():
        def pick(mask, changed, unchanged):
            return tf.where(mask[:, None, None, None], changed, unchanged)

        out = pick(orientations >= 5, tf.transpose(images, [0, 2, 1, 3]), images)
        rows = tf.reduce_any(tf.equal(orientations[:, None], [3, 4, 7, 8]), axis=1)
        out = pick(rows, tf.reverse(out, [1]), out)  # upside down
        cols = tf.reduce_any(tf.equal(orientations[:, None], [2, 3, 6, 7]), axis=1)
        return pick(cols, tf.reverse(out, [2]), out)  # mirrored left-right

    return tf.cond(tf.reduce_any(orientations > 1), turn, lambda: images)


def decode_image(image_bytes, image_size: int):
    """Decode image bytes (JPEG/PNG/GIF first frame/BMP/WebP) to float32 [size, size, 3] in [0, 1],
    as stored: callers turn them as their EXIF says a batch at once (``upright_images``), or one
    (``decode_upright``).

    Grayscale and RGBA are converted to RGB, 16-bit PNGs to 8 bits; the image is resized (bilinear,
    aspect ratio not kept) to a square of ``image_size``. Raises InvalidArgumentError on bytes that
    are not a decodable image (inside tf.data, such elements can be skipped with ignore_errors).

    Large images are shrunk smoothly: a JPEG is decoded at a smaller scale (``JPEG_SCALES``),
    and an image still more than twice the square's size on a side is resized with an
    antialiasing filter. Plain bilinear resizing reads 4 pixels for each output pixel: from a
    phone's 4032 x 3024 photo, 4 of every ~240, so fine texture and sensor noise came out as
    moiré and speckle (the backbone's features of 20 such photos were 0.952 cosine-similar to
    those of the same photos at their small size, 0.987 shrunk smoothly). Images at most twice
    the square's size decode as before.
    """
    return plain(_decode_image)(image_bytes, image_size)


def _decode_image(image_bytes, image_size: int):
    import tensorflow as tf

    img = _decode_pixels(image_bytes, image_size)
    size = [image_size, image_size]
    img = tf.cond(tf.reduce_max(tf.shape(img)[:2]) > 2 * image_size,
                  lambda: tf.image.resize(img, size, method="bilinear", antialias=True),
                  lambda: tf.image.resize(img, size, method="bilinear", antialias=False))
    return tf.clip_by_value(img / 255.0, 0.0, 1.0)


def decode_pixels(image_bytes, image_size: int = 0):
    """The uint8 RGB pixels [h, w, 3] of an image's bytes; a JPEG at the smallest of its DCT
    scales (``JPEG_SCALES``) that keeps ``image_size`` pixels on its shorter side (0: its
    smallest). Which scale does not change whether a JPEG decodes: every scale reads all of its
    coded data (checked on cut-short and damaged files)."""
    return plain(_decode_pixels)(image_bytes, image_size)


def _decode_pixels(image_bytes, image_size: int = 0):
    import tensorflow as tf

    def jpeg():
        shorter = tf.reduce_min(tf.image.extract_jpeg_shape(image_bytes)[:2])
        scale = tf.reduce_sum(tf.cast(
            shorter >= tf.constant(JPEG_SCALES) * max(image_size, 1), tf.int32))
        return tf.switch_case(scale, [
            functools.partial(tf.io.decode_jpeg, image_bytes, channels=3, ratio=ratio,
                              dct_method=JPEG_IDCT)
            for ratio in (1,) + JPEG_SCALES])

    def other():  # (a WebP with an alpha channel too: serving.decode_rgb)
        from petalflow.tasks.serving import decode_rgb

        return decode_rgb(image_bytes)

    img = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
    img.set_shape([None, None, 3])
    return img


def decode_upright(image_bytes, image_size: int):
    """``decode_image`` of one image, turned upright as its EXIF says (turned after the resize:
    the same pixels as before it, on a square)."""
    import tensorflow as tf

    image = decode_image(image_bytes, image_size)[None]
    return upright_images(image, exif_orientations(tf.reshape(image_bytes, [1])))[0]


@functools.lru_cache(maxsize=None)
def file_decoder(image_size: int, exif: bool = True):
    """A file path -> ``decode_upright`` (``exif=False``: ``decode_image``) as one TensorFlow
    function, for callers outside tf.data (eagerly, reading EXIF is ~100 small operations)."""
    import tensorflow as tf

    decode = decode_upright if exif else decode_image
    return tf.function(lambda path: decode(tf.io.read_file(path), image_size),
                       input_signature=[tf.TensorSpec([], tf.string)])


def decoded_shape(image_bytes):
    """(height, width) of the decoded image; raises like ``decode_image`` on bad bytes. A JPEG
    is decoded at its smallest scale (``decode_pixels``: as strict, ~1/3 less time for a large
    photo) and its size read from its header."""
    import tensorflow as tf

    img = decode_pixels(image_bytes)
    with tf.control_dependencies([img]):
        return tf.cond(tf.io.is_jpeg(image_bytes),
                       lambda: tf.image.extract_jpeg_shape(image_bytes)[:2],
                       lambda: tf.shape(img)[:2])
