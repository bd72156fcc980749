"""The one image decoding path shared by the scan, training, evaluation and the served model.

Keeping a single function means the model sees exactly the same pixels in training and in
production (no train/serve skew), and the scan quarantines precisely what training could not read.
"""

from __future__ import annotations

# Formats TensorFlow decodes natively; anything else is quarantined by the scan. WebP: still
# images (TensorFlow's decoder refuses animated ones, which the scan's decode check quarantines).
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")
# File names that look like images (supported or not): folder inputs of `predict` are these, so
# an unsupported format is reported on its row instead of silently skipped; a dataset folder with
# none of them (and no recognisable image) is not a class.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp",
                            ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl"})


# Part of the feature caches' key: a change to what decode_image returns must not reuse the
# features of the previous decoder ("exif-orientation": JPEGs turned upright, below).
DECODER = "exif-orientation"
# EXIF's APP1 segment comes first after SOI, or after a JFIF APP0 (some tools put one or two
# others before it): the first segments within the first bytes are read. Each step is a few
# graph operations, unrolled (a graph loop made the whole decode ~2x slower in tf.data).
_EXIF_SEGMENTS = 4
_EXIF_WINDOW = 65536
_EXIF_ENTRIES = 64  # IFD0 entries read (cameras write ~10-20; Orientation is among the first)


def exif_orientation(image_bytes):
    """The EXIF Orientation (1-8) of JPEG bytes, read by TensorFlow ops (so the served graph
    does it too): an APP1 "Exif" segment among the first ``_EXIF_SEGMENTS`` segments, its TIFF
    header (either byte order), tag 0x0112 among the first ``_EXIF_ENTRIES`` of IFD0, all within
    the first ``_EXIF_WINDOW`` bytes. 1 ("as stored") for other formats, no EXIF there, damaged
    EXIF, or a value outside 1-8; never raises."""
    import tensorflow as tf

    head = tf.io.decode_raw(tf.strings.substr(image_bytes, 0, _EXIF_WINDOW), tf.uint8)
    size = tf.shape(head)[0]
    head = tf.concat([head, tf.zeros([1], tf.uint8)], 0)  # reads past the data find this 0

    def read(pos, k: int):  # the k bytes at pos as int32
        return tf.cast(tf.gather(head, tf.clip_by_value(pos + tf.range(k), 0, size)), tf.int32)

    # A segment: FF, its marker, a big-endian length (counting itself), its data; EXIF's data
    # starts "Exif\0\0", then the TIFF header. Past the segments (the image data, where FF is
    # never followed by E1) or in damaged bytes, the 8 bytes compared do not match.
    compared, expected = [0, 1, 4, 5, 6, 7, 8, 9], [0xFF, 0xE1, 0x45, 0x78, 0x69, 0x66, 0, 0]
    soi = read(0, 2)
    jpeg = tf.logical_and(tf.equal(soi[0], 0xFF), tf.equal(soi[1], 0xD8))
    pos, tiff = tf.constant(2), tf.constant(-1)
    for _ in range(_EXIF_SEGMENTS):
        b = read(pos, 10)
        exif = tf.reduce_all(tf.equal(tf.gather(b, compared), expected))
        tiff = tf.where(tf.logical_and(exif, tiff < 0), pos + 10, tiff)
        pos = pos + 2 + tf.reduce_sum(b[2:4] * [256, 1])
    tiff = tf.where(jpeg, tiff, -1)
    header = read(tiff, 8)
    little = tf.equal(header[0], 0x49)  # "II": Intel byte order; "MM": Motorola

    def u16(b, i):
        return tf.where(little, b[..., i] + b[..., i + 1] * 256, b[..., i] * 256 + b[..., i + 1])

    offset = tf.where(little, u16(header, 4) + u16(header, 6) * 65536,
                      u16(header, 4) * 65536 + u16(header, 6))
    ifd = read(tiff + offset, 2 + 12 * _EXIF_ENTRIES)
    entries = tf.reshape(ifd[2:], [_EXIF_ENTRIES, 12])
    hits = tf.logical_and(tf.equal(u16(entries, 0), 0x0112),
                          tf.range(_EXIF_ENTRIES) < u16(ifd, 0))
    value = tf.reduce_max(tf.where(hits, u16(entries, 8), 0))
    found = tf.logical_and(tiff >= 0, tf.reduce_any(hits))
    return tf.where(tf.logical_and(found, tf.logical_and(value >= 1, value <= 8)), value, 1)


def upright(image, orientation):
    """``image`` [h, w, c] turned as EXIF ``orientation`` (1-8) says it is displayed (what
    ``PIL.ImageOps.exif_transpose`` does): transposed for 5-8, then mirrored. Without branches
    (a transpose and a reverse over axes chosen at run time, both passing the image through
    when there is nothing to do): a branch per image cost as much as reading the EXIF."""
    import tensorflow as tf

    swap = orientation >= 5
    flip_rows = tf.reduce_any(tf.equal(orientation, [3, 4, 7, 8]))  # upside down
    flip_cols = tf.reduce_any(tf.equal(orientation, [2, 3, 6, 7]))  # mirrored left-right
    turned = tf.transpose(image, tf.where(swap, [1, 0, 2], [0, 1, 2]))
    return tf.reverse(turned, tf.boolean_mask([0, 1], tf.stack([flip_rows, flip_cols])))


def decode_image(image_bytes, image_size: int):
    """Decode image bytes (JPEG/PNG/GIF first frame/BMP/WebP) to float32 [size, size, 3] in [0, 1].

    Grayscale and RGBA are converted to RGB, 16-bit PNGs to 8 bits; the image is resized (bilinear,
    aspect ratio not kept) to a square of ``image_size`` and turned upright as a JPEG's EXIF
    Orientation says (phones store portrait photos sideways with that tag; every image viewer
    shows them upright). Raises InvalidArgumentError on bytes that are not a decodable image
    (inside tf.data, such elements can be skipped with ignore_errors).
    """
    import tensorflow as tf

    img = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    img.set_shape([None, None, 3])
    img = tf.image.resize(img, [image_size, image_size], method="bilinear", antialias=False)
    # Turned after the resize (the same pixels as before it, on a square: less to move).
    img = upright(img, exif_orientation(image_bytes))
    img.set_shape([image_size, image_size, 3])
    return tf.clip_by_value(img / 255.0, 0.0, 1.0)


def decoded_shape(image_bytes):
    """(height, width) of the decoded image; raises like ``decode_image`` on bad bytes."""
    import tensorflow as tf

    img = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    return tf.shape(img)[:2]
