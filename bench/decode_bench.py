"""What reading EXIF orientation costs the decoding path (``tasks/images.py``): images/s of the
input pipeline training runs (``inputs.image_dataset``: read, decode, resize, batches of 32)
without reading EXIF and with it (the files' first bytes read a batch at once), on the same
photos within one invocation; the same on copies of them stored as a phone stores portrait
photos (turned, EXIF Orientation 6); and one file at a time outside tf.data (what the int8
calibration and the edge latency do), eagerly and as one TensorFlow function.

    .venv/bin/python bench/decode_bench.py --photos flower_photos --limit 1275 --repeats 3 \
        --json decode.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def _phone_copies(paths: list[str], folder: Path) -> list[str]:
    """Each photo turned and saved with EXIF Orientation 6 (displayed as the original)."""
    from PIL import Image

    out = []
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            exif = Image.Exif()
            exif[0x0112] = 6
            buf = io.BytesIO()
            im.convert("RGB").transpose(Image.Transpose.ROTATE_90).save(
                buf, "JPEG", quality=90, exif=exif.tobytes())
        target = folder / f"{i:05d}.jpg"
        target.write_bytes(buf.getvalue())
        out.append(str(target))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", required=True, type=Path, help="a folder of class folders")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--limit", type=int, default=1275, help="photos (sorted by path)")
    ap.add_argument("--single", type=int, default=50, help="files decoded one at a time")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from petalflow.tasks.common import ENV_DEFAULTS

    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import tensorflow as tf

    from petalflow.tasks.images import IMAGE_SUFFIXES, decode_upright, file_decoder
    from petalflow.tasks.inputs import image_dataset

    paths = sorted(str(p) for p in args.photos.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES)[: args.limit]
    size = args.image_size

    def pipeline(files, exif: bool) -> float:
        started = time.perf_counter()
        n = sum(int(batch.shape[0]) for batch in image_dataset(files, None, size, 32, exif=exif))
        return round(n / (time.perf_counter() - started), 1)

    def one_by_one(files, decode) -> float:
        decode(files[0])  # traced / warmed
        started = time.perf_counter()
        for path in files[1: args.single + 1]:
            decode(path)
        return round((time.perf_counter() - started) / args.single * 1000, 3)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        phone = _phone_copies(paths, Path(tmp))
        eager = (lambda path: decode_upright(tf.io.read_file(path), size))
        for repeat in range(args.repeats):
            row = {"repeat": repeat,
                   "pipeline_images_per_s": {"exif off": pipeline(paths, False),
                                             "exif on": pipeline(paths, True),
                                             "phone photos, exif on": pipeline(phone, True)},
                   "one_file_ms": {"function, exif off": one_by_one(paths, file_decoder(size, False)),
                                   "function, exif on": one_by_one(paths, file_decoder(size, True)),
                                   "eager, exif on": one_by_one(paths, eager)}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "photos": len(paths), "image_size": size, "runs": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
