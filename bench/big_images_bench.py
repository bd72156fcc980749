"""Drift's image statistics on big lossless images: sampled (over ``serving.STATS_PIXELS``
pixels, every s-th pixel of every s-th row) against every pixel (what versions registered
before the sample computed), same files, same invocation.

It makes ``--images`` PNGs of ``--size`` pixels (the archive's first photos, enlarged; PNG
compression level 1) in a temporary folder, then, ``--repeats`` times and alternately, runs
``serving.image_statistics`` over their bytes in a fresh process for each variant, measuring
the process's wall time and peak RSS, and the largest difference between the two variants'
figures (brightness, contrast, saturation; relative).

    .venv/bin/python bench/big_images_bench.py --archive flower_photos_1500.tgz \
        [--images 16] [--size 8160x6120] [--repeats 2] [--json big.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from run_bench import measure  # noqa: E402

CHILD = """
import json, sys
from pathlib import Path
from petalflow.tasks import serving
if sys.argv[1] == "every pixel":
    serving.STATS_PIXELS = float("inf")
files = sorted(Path(sys.argv[2]).glob("*.png"))
stats = serving.file_statistics([str(f) for f in files])
Path(sys.argv[3]).write_text(json.dumps(stats.tolist()))
"""


def make_images(archive: Path, n: int, size: tuple[int, int], out: Path) -> None:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg"))),
                         key=lambda m: m.name)[:n]
        for i, member in enumerate(members):
            with Image.open(tar.extractfile(member)) as im:
                im.convert("RGB").resize(size).save(out / f"{i:03d}.png", compress_level=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", required=True, type=Path)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--size", default="8160x6120", help="WIDTHxHEIGHT")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.lower().split("x"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    runs, figures = [], {}
    with tempfile.TemporaryDirectory(prefix="petalflow-big-images-") as tmp:
        work = Path(tmp)
        make_images(args.archive.resolve(), args.images, size, work / "images")
        mb = sum(f.stat().st_size for f in (work / "images").iterdir()) / 1e6
        print(f"{args.images} PNGs of {size[0]}x{size[1]} ({mb:.0f} MB)")
        for repeat in range(args.repeats):
            for variant in ("sampled", "every pixel"):
                out = work / f"{variant}.json"
                result = measure([sys.executable, "-c", CHILD, variant, str(work / "images"),
                                  str(out)], work, env, work / "child.log")
                figures[variant] = np.array(json.loads(out.read_text()))
                runs.append({"repeat": repeat, "variant": variant, **result})
                print(f"repeat {repeat} {variant:12s} {result['wall_s']:6.2f} s "
                      f"{result['peak_rss_mib']:8.1f} MiB")
    sampled, full = figures["sampled"], figures["every pixel"]
    assert (sampled[:, :3] == full[:, :3]).all()  # the sizes are the files'
    worst = float(np.max(np.abs(sampled[:, 3:] - full[:, 3:]) / np.abs(full[:, 3:])))
    print(f"largest relative difference of the figures: {worst:.2e}")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cpus": len(os.sched_getaffinity(0))},
            "images": args.images, "size": size, "megabytes": round(mb, 1), "runs": runs,
            "largest_relative_difference": worst}, indent=2))


if __name__ == "__main__":
    main()
