"""The one decoding path: EXIF orientation (phone photos are stored sideways with a tag)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.helpers import phone_jpeg, quadrants


def exif_orientation(data):
    """``exif_orientations`` of one image's bytes (a scalar tensor)."""
    import tensorflow as tf

    from petalflow.tasks.images import exif_orientations

    return exif_orientations(tf.reshape(data, [1]))[0]


def _decode(data: bytes, size: int = 32) -> np.ndarray:
    import tensorflow as tf

    from petalflow.tasks.images import decode_upright

    return decode_upright(tf.constant(data), size).numpy()


@pytest.mark.parametrize("byte_order", ["II", "MM"])
def test_a_photo_stored_sideways_is_decoded_upright_as_exif_says(byte_order):
    """Each of the 8 EXIF orientations, in either TIFF byte order: the decoded pixels are the
    upright photo's (as PIL's exif_transpose and every image viewer show it), not the stored
    ones; and the orientation read is the one PIL reads."""
    import tensorflow as tf


    upright = quadrants()
    expected = _decode(phone_jpeg(upright, None))
    for orientation in range(1, 9):
        data = phone_jpeg(upright, orientation, byte_order)
        shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        assert np.abs(np.asarray(shown, float) - np.asarray(upright, float)).max() <= 8
        assert int(exif_orientation(tf.constant(data))) == orientation
        got = _decode(data)
        assert np.abs(got - expected).max() < 0.05, orientation
        if orientation > 1:  # what the stored pixels alone give: another picture
            stored = Image.open(io.BytesIO(data))
            stored.getexif().clear()
            plain = io.BytesIO()
            stored.save(plain, "JPEG", quality=100, subsampling=0)
            assert np.abs(_decode(plain.getvalue()) - expected).max() > 0.5, orientation


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
