"""An edge model's input from an image file, with numpy and Pillow only (no TensorFlow).

``petalflow pull --format tflite`` saves this file beside the TFLite model (``edge_input.py``)
so that code with no TensorFlow (``ai_edge_litert``'s interpreter) feeds the model the pixels
training gave it (``tasks/images.py``), as its edge accuracy was measured on::

    from edge_input import model_input
    x = model_input("photo.jpg", 224)   # float32 [1, 224, 224, 3] in [0, 1]

As training does: a JPEG is decoded at 1/2, 1/4 or 1/8 scale when that leaves at least ``size``
pixels on its shorter side (libjpeg's DCT scaling; Pillow's ``draft`` picks the scale by the same
rule), with libjpeg's accurate IDCT, and made RGB (alpha dropped, grey repeated); it is resized
to ``size`` x ``size``, aspect ratio not kept: bilinear with half-pixel centres
(``tf.image.resize``), or, while a side is over twice ``size``, that filter widened to the
shrink (``tf.image.resize(..., antialias=True)``); then a JPEG is turned upright as its EXIF
Orientation says (after the resize, as training turns it). The arithmetic is TensorFlow's, in
float32 and in its order, so a JPEG, PNG (16-bit too), GIF, BMP or WebP gives training's values
bit for bit (tests/test_edge_input.py).

This module imports nothing of petalflow: it is copied as it is.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


# EXIF Orientation -> (transpose, upside down, mirrored), applied in that order, as training
# turns its squares (images.upright_images; PIL.ImageOps.exif_transpose's result).
_TURNS = {o: (o >= 5, o in (3, 4, 7, 8), o in (2, 3, 6, 7)) for o in range(1, 9)}


def model_input(source, size: int) -> np.ndarray:
    """The image at ``source`` (a path or a binary file) as the model's input: float32
    ``[1, size, size, 3]`` in [0, 1]."""
    with Image.open(source) as image:
        image.draft("RGB", (size, size))  # a JPEG's DCT scale; other formats: nothing
        orientation = image.getexif().get(0x0112, 1) if image.format == "JPEG" else 1
        if image.mode.startswith("I"):  # a 16-bit grey PNG: its high byte, as TensorFlow
            grey = (np.asarray(image).astype(np.int64) >> 8).clip(0, 255)  # (Pillow clips)
            pixels = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
        else:
            pixels = np.asarray(image.convert("RGB"), np.float32)
    if max(pixels.shape[:2]) > 2 * size:
        square = _smooth_resize(_smooth_resize(pixels, size, 0), size, 1)
    else:
        square = _bilinear_resize(pixels, size)
    square = np.clip(square / np.float32(255), np.float32(0), np.float32(1))
    transpose, upside_down, mirrored = _TURNS.get(orientation, _TURNS[1])
    if transpose:  # turned after the resize, as training does: the same sums, in its order
        square = square.transpose(1, 0, 2)
    if upside_down:
        square = square[::-1]
    if mirrored:
        square = square[:, ::-1]
    return np.ascontiguousarray(square)[None]


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


def _smooth_resize(pixels: np.ndarray, size: int, axis: int) -> np.ndarray:
    """One pass of ``tf.image.resize(..., antialias=True)`` (TensorFlow's ScaleAndTranslate
    with its triangle kernel) along ``axis`` (0: the rows, which it does first; then 1):
    the weights and the sums computed as its kernels compute them, in float32, in their
    order."""
    f32 = np.float32
    n = pixels.shape[axis]
    scale = f32(size) / f32(n)
    inv_scale = f32(1.0 / float(scale))
    kernel_scale = max(inv_scale, f32(1))
    one_over = f32(1) / kernel_scale
    span = min(2 * int(np.ceil(float(kernel_scale))) + 1, n)
    sample = (np.arange(size, dtype=f32) + f32(0.5)) * inv_scale
    first = np.clip(np.ceil(sample - kernel_scale - f32(0.5)), 0, n - 1).astype(int)
    last = np.clip(np.floor(sample + kernel_scale - f32(0.5)), 0, n - 1).astype(int) + 1
    weights = np.zeros((size, span), f32)
    total = np.zeros(size, f32)
    for i in range(span):
        inside = first + i < last
        position = (first + i).astype(f32) + f32(0.5) - sample
        distance = np.abs(position * one_over)
        weight = np.where(inside & (distance < f32(1)), f32(1) - distance, f32(0)).astype(f32)
        weights[:, i] = weight
        total = total + weight
    weights = weights * (f32(1) / total)[:, None]
    moved = np.moveaxis(pixels, axis, 0)
    out = np.zeros((size,) + moved.shape[1:], f32)
    for i in range(span):
        index = np.minimum(first + i, n - 1)  # past the span: weight 0, adds nothing
        w = weights[:, i].reshape((size,) + (1,) * (moved.ndim - 1))
        out = out + w * moved[index]
    return np.moveaxis(out, 0, axis)
