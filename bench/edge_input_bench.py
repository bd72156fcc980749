"""How close an edge model's input made without TensorFlow is to training's, photo by photo.

For every photo of a folder (searched recursively) it compares, against training's decoding
(``images.decode_upright``: what the edge models were calibrated and evaluated on):

- ``edge_input``: ``tasks/edge_input.model_input`` (numpy and Pillow), shipped beside the models;
- ``pillow-resize``: Pillow's decoding and its own bilinear resize (``Image.resize``), what a
  user without TensorFlow wrote before ``edge_input``;
- ``fast-idct``: training's decoding as it was before JPEGs were decoded with the accurate IDCT
  (TensorFlow's default fast one), what older versions were trained on;

the pixels (identical photos, largest difference) and the answers of a pulled TFLite model
(``petalflow pull --format tflite``: photos whose top class differs, largest probability
difference).

    .venv/bin/petalflow pull --format tflite --dest edge-model       # int8
    .venv/bin/python bench/edge_input_bench.py --images flower_photos --model \
        edge-model/model_int8.tflite --json edge_input.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _fast_idct(data: bytes, size: int):
    """Training's decoding with TensorFlow's default (fast) IDCT for JPEGs."""
    from unittest import mock

    import tensorflow as tf

    from petalflow.tasks import images

    with mock.patch.object(images, "JPEG_IDCT", ""):
        return images.decode_upright(tf.constant(data), size).numpy()


def _pillow_resize(path: Path, size: int):
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        photo = ImageOps.exif_transpose(image).convert("RGB")
        return np.asarray(photo.resize((size, size), Image.BILINEAR), np.float32) / 255


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True, help="a .tflite edge model")
    ap.add_argument("--every", type=int, default=1, help="use every n-th photo")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import tensorflow as tf

    from petalflow.tasks.edge import tflite_interpreter
    from petalflow.tasks.edge_input import model_input
    from petalflow.tasks.images import IMAGE_SUFFIXES, decode_upright

    interpreter, inp, out = tflite_interpreter(model_path=str(args.model))
    size = int(interpreter.get_input_details()[0]["shape"][1])

    def answer(pixels):
        interpreter.set_tensor(inp, np.asarray(pixels, np.float32).reshape(1, size, size, 3))
        interpreter.invoke()
        return interpreter.get_tensor(out)[0].copy()

    files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    files = files[::args.every]
    ways = {"edge_input": lambda p, d: model_input(p, size)[0],
            "pillow-resize": lambda p, d: _pillow_resize(p, size),
            "fast-idct": lambda p, d: _fast_idct(d, size)}
    rows = {name: {"identical_pixels": 0, "max_pixel_diff": 0.0, "other_top_class": 0,
                   "max_probability_diff": 0.0} for name in ways}
    for path in files:
        data = path.read_bytes()
        training = decode_upright(tf.constant(data), size).numpy()
        expected = answer(training)
        for name, way in ways.items():
            pixels = way(path, data)
            row = rows[name]
            row["identical_pixels"] += bool(np.array_equal(pixels, training))
            row["max_pixel_diff"] = max(row["max_pixel_diff"],
                                        float(np.abs(pixels - training).max()))
            got = answer(pixels)
            row["other_top_class"] += int(np.argmax(got) != np.argmax(expected))
            row["max_probability_diff"] = max(row["max_probability_diff"],
                                              float(np.abs(got - expected).max()))
    result = {"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
              "photos": len(files), "model": args.model.name, "image_size": size, "ways": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
