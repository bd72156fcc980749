"""An edge model's input from an image file, with numpy and Pillow only (no TensorFlow).

``petalflow pull --format tflite`` saves this file beside the TFLite model (``edge_input.py``)
so that code with no TensorFlow (``ai_edge_litert``'s interpreter) feeds the model the pixels
training gave it (``tasks/images.py``), as its edge accuracy was measured on::

    from edge_input import model_input
    x = model_input("photo.jpg", 224)   # float32 [1, 224, 224, 3] in [0, 1]

As training does: a JPEG is decoded at 1/2, 1/4 or 1/8 scale when that leaves at least ``size``
pixels on its shorter side (libjpeg's DCT scaling; Pillow's ``draft`` picks the scale by the same
rule), with libjpeg's accurate IDCT; the image is turned upright as its EXIF Orientation says
and made RGB (alpha dropped, grey repeated), then resized to ``size`` x ``size``, aspect ratio
not kept: bilinear with half-pixel centres (``tf.image.resize``), or, while a side is over twice
``size``, that filter widened to the shrink (``tf.image.resize(..., antialias=True)``). An 8-bit
JPEG, PNG, GIF, BMP or WebP of at most twice ``size`` gives training's values bit for bit, a
larger one within 1e-6 (the order of the sums).

This module imports nothing of petalflow: it is copied as it is.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def model_input(source, size: int) -> np.ndarray:
    """The image at ``source`` (a path or a binary file) as the model's input: float32
    ``[1, size, size, 3]`` in [0, 1]."""
    with Image.open(source) as image:
        image.draft("RGB", (size, size))  # a JPEG's DCT scale; other formats: nothing
        pixels = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), np.float32)
    if max(pixels.shape[:2]) > 2 * size:
        resized = _smooth_resize(pixels, size)
    else:
        resized = _bilinear_resize(pixels, size)
    return np.clip(resized / np.float32(255), 0, 1)[None]


def _bilinear_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """``tf.image.resize(pixels, (size, size))``: bilinear, half-pixel centres; the same
    arithmetic in the same order (float32), so the same values."""
    def axis(n: int):
        pos = (np.arange(size, dtype=np.float32) + np.float32(0.5)) * np.float32(n / size)
        pos -= np.float32(0.5)
        low = np.floor(pos)
        return (np.maximum(low, 0).astype(int), np.minimum(low + 1, n - 1).astype(int),
                (pos - low).astype(np.float32))

    (top, bottom, fy), (left, right, fx) = axis(pixels.shape[0]), axis(pixels.shape[1])
    fx, fy = fx[None, :, None], fy[:, None, None]
    upper = pixels[top][:, left] + (pixels[top][:, right] - pixels[top][:, left]) * fx
    lower = pixels[bottom][:, left] + (pixels[bottom][:, right] - pixels[bottom][:, left]) * fx
    return upper + (lower - upper) * fy


def _smooth_weights(n: int, size: int) -> np.ndarray:
    """[size, n] weights of ``tf.image.resize``'s antialiased bilinear filter shrinking n
    pixels to ``size``: a triangle as wide as the shrink around each output pixel's centre."""
    scale = np.float32(n / size)
    centre = (np.arange(size, dtype=np.float32) + np.float32(0.5)) * scale
    source = np.arange(n, dtype=np.float32)
    weights = np.maximum(np.float32(0), np.float32(1) - np.abs(
        (source[None, :] + np.float32(0.5) - centre[:, None]) / scale))
    first = np.clip(np.ceil(centre - scale - np.float32(0.5)), 0, n - 1)
    last = np.clip(np.floor(centre + scale - np.float32(0.5)), 0, n - 1)
    index = np.arange(n)[None, :]
    weights = np.where((index >= first[:, None]) & (index <= last[:, None]), weights, 0)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _smooth_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """``tf.image.resize(pixels, (size, size), antialias=True)``: along the rows, then the
    columns."""
    across = np.einsum("ow,hwc->hoc", _smooth_weights(pixels.shape[1], size), pixels)
    return np.einsum("oh,hwc->owc", _smooth_weights(pixels.shape[0], size), across)
