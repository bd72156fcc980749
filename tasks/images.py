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


def decode_image(image_bytes, image_size: int):
    """Decode image bytes (JPEG/PNG/GIF first frame/BMP/WebP) to float32 [size, size, 3] in [0, 1].

    Grayscale and RGBA are converted to RGB, 16-bit PNGs to 8 bits; the image is resized (bilinear,
    aspect ratio not kept) to a square of ``image_size``. Raises InvalidArgumentError on bytes that
    are not a decodable image (inside tf.data, such elements can be skipped with ignore_errors).
    """
    import tensorflow as tf

    img = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    img.set_shape([None, None, 3])
    img = tf.image.resize(img, [image_size, image_size], method="bilinear", antialias=False)
    return tf.clip_by_value(img / 255.0, 0.0, 1.0)


def decoded_shape(image_bytes):
    """(height, width) of the decoded image; raises like ``decode_image`` on bad bytes."""
    import tensorflow as tf

    img = tf.io.decode_image(image_bytes, channels=3, expand_animations=False, dtype=tf.uint8)
    return tf.shape(img)[:2]
