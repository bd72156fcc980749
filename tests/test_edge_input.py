"""edge_input: an edge model's input made with numpy and Pillow only is training's."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import encoded, phone_jpeg, training_pixels


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


@pytest.mark.parametrize("what, data, size", [
    ("a small JPEG", encoded(_noise(60, 40), "JPEG", quality=85), 32),
    ("a JPEG read at 1/4 scale", encoded(_noise(256, 250, seed=1), "JPEG", quality=90), 60),
    ("a grey JPEG", encoded(_noise(50, 60, "L", seed=2), "JPEG"), 32),
    ("a PNG with alpha", encoded(_noise(40, 50, "RGBA", seed=3), "PNG"), 32),
    ("a palette GIF", encoded(_noise(30, 30, seed=4).convert("P"), "GIF"), 32),
    ("a BMP enlarged", encoded(_noise(20, 16, seed=5), "BMP"), 32),
    ("a phone's photo, shrunk smoothly after a 1/8 scale decode",
     encoded(_noise(1600, 1200, seed=7), "JPEG", quality=90), 64),
    ("a PNG over twice the size", encoded(_noise(400, 150, seed=8), "PNG"), 32),
    ("a grey JPEG over twice the size", encoded(_noise(50, 70, "L", seed=2), "JPEG"), 32),
    ("a lossy WebP with alpha", encoded(_noise(40, 30, "RGBA", seed=10), "WEBP", quality=80), 32),
    ("a grey PNG with alpha", encoded(_noise(40, 30, "RGBA", seed=11).convert("LA"), "PNG"), 32),
    ("a palette PNG with a transparent colour",
     encoded(_noise(40, 30, seed=12).convert("P"), "PNG", transparency=0), 32),
    ("a 16-bit grey PNG", encoded(Image.fromarray(np.random.default_rng(13).integers(
        0, 65536, (30, 40)).astype(np.uint16)), "PNG"), 32),
])
def test_the_pixels_are_trainings_bit_for_bit(what, data, size):
    """numpy and Pillow give the values TensorFlow's decoding gives, bit for bit: the same
    libjpeg IDCT and DCT scale, the same float32 arithmetic in the same order (bilinear as
    ResizeBilinear computes it; smoothed shrinking as ScaleAndTranslate does, rows first)."""
    from petalflow.tasks.edge_input import model_input

    got = model_input(io.BytesIO(data), size)
    assert got.shape == (1, size, size, 3) and got.dtype == np.float32
    assert np.array_equal(got[0], training_pixels(data, size)), what


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("width, height, size", [(90, 60, 32), (1600, 1200, 64)])
def test_a_phones_photo_is_turned_as_its_exif_says_after_the_resize(orientation, width,
                                                                    height, size):
    """Each EXIF Orientation, on a photo resized plainly and one shrunk smoothly: turned after
    the resize as training turns it (before it, the sums come in another order: 1e-6 off)."""
    from petalflow.tasks.edge_input import model_input

    data = phone_jpeg(_noise(width, height, seed=orientation), orientation)
    assert np.array_equal(model_input(io.BytesIO(data), size)[0], training_pixels(data, size))


def test_it_imports_nothing_but_numpy_and_pillow():
    """It is copied beside the model for code without petalflow or TensorFlow."""
    from petalflow.tasks import edge_input

    code = ("import sys, runpy; runpy.run_path(sys.argv[1]); "
            "print(sorted(m for m in ('tensorflow', 'petalflow', 'tasks') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, edge_input.__file__],
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
