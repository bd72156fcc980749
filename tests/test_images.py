"""The one decoding path: EXIF orientation (phone photos are stored sideways with a tag)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.helpers import encoded, phone_jpeg, quadrants, training_pixels


def exif_orientation(data):
    """``exif_orientations`` of one image's bytes (a scalar tensor)."""
    import tensorflow as tf

    from petalflow.tasks.images import exif_orientations

    return exif_orientations(tf.reshape(data, [1]))[0]


@pytest.mark.parametrize("byte_order", ["II", "MM"])
def test_a_photo_stored_sideways_is_decoded_upright_as_exif_says(byte_order):
    """Each of the 8 EXIF orientations, in either TIFF byte order: the decoded pixels are the
    upright photo's (as PIL's exif_transpose and every image viewer show it), not the stored
    ones; and the orientation read is the one PIL reads."""
    import tensorflow as tf


    upright = quadrants()
    expected = training_pixels(phone_jpeg(upright, None))
    for orientation in range(1, 9):
        data = phone_jpeg(upright, orientation, byte_order)
        shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        assert np.abs(np.asarray(shown, float) - np.asarray(upright, float)).max() <= 8
        assert int(exif_orientation(tf.constant(data))) == orientation
        got = training_pixels(data)
        assert np.abs(got - expected).max() < 0.05, orientation
        if orientation > 1:  # what the stored pixels alone give: another picture
            stored = Image.open(io.BytesIO(data))
            stored.getexif().clear()
            plain = io.BytesIO()
            stored.save(plain, "JPEG", quality=100, subsampling=0)
            assert np.abs(training_pixels(plain.getvalue()) - expected).max() > 0.5, orientation


def test_exif_after_other_segments_is_found_and_in_a_served_graph_too():
    """APP1 after a JFIF APP0 and an ICC APP2 (as some editors write); read by a graph (what
    the exported model runs), not only eagerly."""
    import tensorflow as tf


    data = phone_jpeg(quadrants(), 6, before=((0xE0, b"JFIF\0\1\1\0\0\1\0\1\0\0"),
                                              (0xE2, b"ICC_PROFILE\0" + bytes(3000))))
    graph = tf.function(exif_orientation, input_signature=[tf.TensorSpec([], tf.string)])
    assert int(graph(tf.constant(data))) == 6
    assert Image.open(io.BytesIO(data)).getexif()[0x0112] == 6


_ENTRY = b"\x12\x01\x03\x00\x01\x00\x00\x00"  # tag 0x0112, SHORT, 1 value (little-endian)


def test_other_formats_and_damaged_exif_keep_the_pixels_as_stored():
    """Orientation 1 ("as stored"), never an error: no EXIF, other formats, an EXIF block cut
    short or with offsets past the end, an out-of-range value, bytes that are no image."""
    import tensorflow as tf


    good = phone_jpeg(quadrants(), 6)
    app1 = good.index(b"Exif")
    png = io.BytesIO()
    quadrants().save(png, "PNG")
    cases = {
        "no exif": phone_jpeg(quadrants(), None),
        "png": png.getvalue(),
        "cut in the exif": good[: app1 + 12],
        "ifd offset past the end": good[: app1 + 10] + b"II*\0\xff\xff\xff\x7f" + good[app1 + 18:],
        "orientation 9": good.replace(_ENTRY + b"\x06\x00", _ENTRY + b"\x09\x00"),
        "not an image": b"\xff\xd8\xff\xe1\x00\x10Exif\0\0",
        "empty": b"",
    }
    assert cases["orientation 9"] != good
    for name, data in cases.items():
        assert int(exif_orientation(tf.constant(data))) == 1, name
    assert int(exif_orientation(tf.constant(good))) == 6


def test_a_batch_is_read_at_once_with_each_files_own_orientation():
    """One read for a whole batch (what the pipelines and the served graph do): each row gets
    its own orientation, whatever the others are, and each image is turned by its own."""
    import tensorflow as tf

    from petalflow.tasks.images import decode_image, exif_orientations, upright_images

    files = [phone_jpeg(quadrants(), o) for o in (6, None, 3, 8, 1, 2)]
    png = io.BytesIO()
    quadrants().save(png, "PNG")
    files.insert(2, png.getvalue())
    assert exif_orientations(tf.constant(files)).numpy().tolist() == [6, 1, 1, 3, 8, 1, 2]
    assert exif_orientations(tf.zeros([0], tf.string)).numpy().tolist() == []
    images = tf.stack([decode_image(tf.constant(f), 32) for f in files])
    turned = upright_images(images, exif_orientations(tf.constant(files))).numpy()
    for got in turned:
        assert np.abs(got - turned[1]).max() < 0.05  # every one the upright photo


def _noisy(size: tuple, seed: int = 0) -> Image.Image:
    """``quadrants`` at ``size`` with per-pixel noise (a phone photo's sensor noise and fine
    texture, the detail that plain resizing turns into speckle)."""
    base = np.asarray(quadrants(size), np.int16)
    noise = np.random.default_rng(seed).integers(-60, 61, base.shape[:2])[..., None]
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    return encoded(image, fmt, **({"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}))


def _quadrant_speckle(decoded: np.ndarray) -> float:
    """How far the decoded pixels stray from their quadrant's colour (std, in [0, 1] units),
    away from the quadrants' borders."""
    h, w = decoded.shape[:2]
    colours = np.asarray(quadrants((2, 2)), float) / 255

    def inside(r, c):  # quadrant (r, c) without its 2 outer pixels
        return decoded[r * h // 2 + 2:(r + 1) * h // 2 - 2, c * w // 2 + 2:(c + 1) * w // 2 - 2]

    return float(np.sqrt(np.mean([np.mean((inside(r, c) - colours[r, c]) ** 2)
                                  for r in (0, 1) for c in (0, 1)])))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_large_photo_is_shrunk_smoothly_and_small_ones_decode_as_before(fmt):
    """A photo many times the square's size (a phone's) comes out as the picture, its noise
    averaged away: plain bilinear resizing reads 4 of every ~1,000 pixels of it here, and the
    noise came out as speckle (0.062 from the quadrants' colours, against 0.014 now). A JPEG is
    decoded at a smaller scale first. Images at most twice the square's size decode exactly as
    plain bilinear resizing did (the flowers', and the features cached for them)."""
    import tensorflow as tf

    from petalflow.tasks.images import decode_image

    big = tf.constant(_encoded(_noisy((1280, 960)), fmt))
    graph = tf.function(lambda data: decode_image(data, 32))
    for got in (decode_image(big, 32).numpy(), graph(big).numpy()):
        assert got.shape == (32, 32, 3)
        assert _quadrant_speckle(got) < 0.03, _quadrant_speckle(got)
    plain = tf.image.resize(tf.io.decode_image(big, channels=3), [32, 32], antialias=False)
    assert _quadrant_speckle(plain.numpy() / 255) > 0.05  # what it was

    @tf.function
    def before(data):  # the decoding before large images were shrunk smoothly (JPEGs with the
        # accurate IDCT: test_a_jpeg_decodes_to_pillows_pixels_...)
        img = (tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE") if fmt == "JPEG"
               else tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8))
        img = tf.image.resize(img, [32, 32], method="bilinear", antialias=False)
        return tf.clip_by_value(img / 255.0, 0.0, 1.0)

    for size in [(64, 48), (40, 64), (32, 32), (20, 16)]:
        small = tf.constant(_encoded(_noisy(size, seed=1), fmt))
        assert np.array_equal(graph(small).numpy(), before(small).numpy()), size


def test_a_large_jpeg_decoded_at_a_smaller_scale_is_checked_as_strictly():
    """The scan's check decodes a JPEG at its smallest scale: the size it records is the
    file's, and a photo cut short or with a damaged marker is refused as the full-size decoder
    refuses it (the training's decoder, at whatever scale, too)."""
    import tensorflow as tf

    from petalflow.tasks.images import decode_image, decoded_shape

    data = _encoded(_noisy((1280, 960)), "JPEG")
    assert decoded_shape(tf.constant(data)).numpy().tolist() == [960, 1280]
    png = _encoded(_noisy((300, 200)), "PNG")
    assert decoded_shape(tf.constant(png)).numpy().tolist() == [200, 300]
    sos = data.index(b"\xff\xda")
    damaged = {"cut short": data[: len(data) * 9 // 10],
               "cut in its header": data[: sos - 10],
               "an unknown marker in its data":
                   data[: sos + 4000] + b"\xff\xae" + data[sos + 4002:]}
    for name, bad in damaged.items():
        with pytest.raises(tf.errors.InvalidArgumentError):
            tf.io.decode_jpeg(bad, channels=3)  # the full-size decoder refuses it ...
        with pytest.raises(tf.errors.InvalidArgumentError):
            decoded_shape(tf.constant(bad))  # ... and so does the scan's check, name
        for size in (32, 224):
            with pytest.raises(tf.errors.InvalidArgumentError):
                decode_image(tf.constant(bad), size)


@pytest.mark.parametrize("width, height, size", [(60, 40, 32), (300, 200, 32), (1000, 700, 64),
                                                 (241, 240, 120)])
def test_a_jpeg_decodes_to_pillows_pixels_at_the_scale_pillows_draft_picks(width, height, size):
    """A JPEG's pixels are the ones Pillow (and OpenCV, browsers: libjpeg's accurate IDCT)
    decodes, also at the reduced DCT scale training reads a large one at, which Pillow's
    ``draft`` picks by the same rule: someone feeding an edge model from Pillow gives it the
    pixels it was trained and evaluated on. With TensorFlow's default fast IDCT they were up to
    several levels off (~1 on average)."""
    from petalflow.tasks.images import decode_pixels

    noise = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(noise), "JPEG", quality=85)
    photo = Image.open(io.BytesIO(data))
    photo.draft("RGB", (size, size))
    expected = np.asarray(photo.convert("RGB"))
    pixels = decode_pixels(data, size).numpy()
    assert pixels.shape == expected.shape
    assert np.array_equal(pixels, expected)
