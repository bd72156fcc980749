"""What a feature bank costs a training as it grows with the data's history: the time to take
one training's rows from a bank (``train._features_with_bank``, every wanted image found, no
backbone run) when the bank holds only what current data needs, against a bank that kept every
row of ``--rounds`` earlier rolls (``--new`` new images each, one segment per roll, as data
rolling behind one URL left it before compaction); and the time to compact that bank
(``train.compact_feature_banks``). Synthetic rows (float32, ``--dim`` wide), written to a
temporary folder and read back from the page cache.

    .venv/bin/python bench/bank_read_bench.py --images 1275 --new 260 --rounds 365 --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def shas(start: int, count: int) -> list[str]:
    return [hashlib.sha256(b"%d" % i).hexdigest() for i in range(start, start + count)]


def segment(bank: Path, name: str, names: list[str], dim: int) -> None:
    rng = np.random.default_rng(len(names))
    np.savez(bank / f"{name}.npz", features=rng.random((len(names), dim), np.float32),
             shas=np.array(names))


def read(bank: Path, wanted: list[str]) -> float:
    from petalflow.tasks.train import _features_with_bank

    def no_backbone(*_):
        raise AssertionError("a wanted image is not in the bank")

    began = time.perf_counter()
    features, banked = _features_with_bank(no_backbone, wanted, wanted, None, "train", bank,
                                           exif=False)
    assert banked == len(wanted)
    return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1275, help="rows current data needs")
    ap.add_argument("--new", type=int, default=260, help="new images per roll")
    ap.add_argument("--rounds", type=int, default=365)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from petalflow.tasks.train import compact_feature_banks

    current = shas(0, args.images)
    result = {"command": " ".join(sys.argv),
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "cpus": len(os.sched_getaffinity(0)),
                          "python": sys.version.split()[0]}}
    with tempfile.TemporaryDirectory(prefix="bank-bench-") as tmp:
        root = Path(tmp) / "feature-banks"
        grown, compact = root / "grown", root / "compact"
        for bank in (grown, compact):
            bank.mkdir(parents=True)
        segment(compact, "current", current, args.dim)
        # Grown: the rolls' segments (images no data holds now), then the current images'.
        for r in range(args.rounds):
            segment(grown, f"r{r:04d}", shas(10**7 + r * args.new, args.new), args.dim)
        segment(grown, "zcurrent", current, args.dim)

        def size(bank: Path) -> dict:
            files = list(bank.glob("*.npz"))
            return {"segments": len(files), "mib": sum(f.stat().st_size for f in files) / 2**20}

        result["grown"], result["compact"] = size(grown), size(compact)
        times = {"grown": [], "compact": []}
        for _ in range(args.repeats):  # alternately first
            for name in (("grown", "compact") if _ % 2 == 0 else ("compact", "grown")):
                times[name].append(round(read(root / name, current), 3))
        began = time.perf_counter()
        done = compact_feature_banks(root, set(current))
        result["compaction_s"] = round(time.perf_counter() - began, 2)
        result["compacted"] = [list(d) for d in done]
        result["after_compaction"] = size(grown)
        result["after_compaction_read_s"] = round(read(grown, current), 3)
    result["read_s"] = times
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
