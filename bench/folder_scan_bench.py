"""The scan of a folder source that grew: every file read and hashed, or only the new ones.

A folder source (``--data-url /data/photos``, scheduled retraining on a folder the data grows
in) is scanned on every run. From a folder-per-class archive (built to ``--scale`` as
``scale_bench.py`` builds it) the benchmark extracts a folder less the last ``--added`` of each
class's photos, scans it once (``dataset.prepare_dataset``, as ``petalflow train`` does), then
moves the held-back photos in and scans again, twice per repeat, alternately first:
  with:    the earlier scan's ``file_hashes.csv`` in place (files whose size, times and inode
           it recorded are not read);
  without: the same manifest folder less that file (every file read and hashed, as before).
Both sides have the earlier scan's verdicts (known files are not decoded again), so the
difference is reading and hashing. It reports each scan's wall time and the bytes the process
read (``rchar`` of /proc/self/io: through the page cache or not). The folder was just written,
so the page cache holds it: the times are the best case for reading everything; ``--cold``
drops its files from the cache before each scan (``posix_fadvise``), as for data larger than
memory or not read since the last run.

    .venv/bin/python bench/folder_scan_bench.py --archive flower_photos_1500.tgz \
        --scales 1,4,8 --repeats 3 [--cold] --json folder_scan.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from scale_bench import scaled_archive  # noqa: E402


def bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def held_back(root: Path, share: float, aside: Path) -> int:
    """Move the last ``share`` of each class folder's images (by name) to ``aside``."""
    moved = 0
    for folder in sorted(p for p in root.rglob("*") if p.is_dir()):
        images = sorted(p for p in folder.iterdir()
                        if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for path in images[len(images) - max(1, round(share * len(images))):] if images else []:
            target = aside / path.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
            moved += 1
    return moved


def put_back(aside: Path, root: Path) -> None:
    for path in sorted(p for p in aside.rglob("*") if p.is_file()):
        target = root / path.relative_to(aside)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)  # new files, as copied in


def evict(root: Path) -> None:
    """Drop the folder's files from the page cache (their pages are clean: no root needed), so
    a scan reads them from the disk, as one of data larger than memory does."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def scan(root: Path, out_dir: Path, cold: bool = False) -> dict:
    from petalflow.tasks.dataset import prepare_dataset

    if cold:
        os.sync()
        evict(root)
    before, start = bytes_read(), time.perf_counter()
    info = prepare_dataset(root, out_dir, 0.15, 0.15, 42)
    return {"wall_s": round(time.perf_counter() - start, 3),
            "read_mb": round((bytes_read() - before) / 1e6, 1),
            "files": info["counts"]["found"], "fingerprint": info["fingerprint"]}


def one_scale(archive: Path, scale: int, share: float, repeats: int, tmp: Path,
              cold: bool) -> dict:
    built = scaled_archive(archive, scale, tmp)
    work = tmp / f"x{scale}"
    with tarfile.open(built, "r:*") as tar:
        tar.extractall(work / "data", filter="data")
    from petalflow.tasks.dataset import find_data_root

    root = find_data_root(work / "data")
    added = held_back(root, share, work / "aside")
    time.sleep(3.5)  # the scan does not record files changed within 3 s of it (RACY_NS)
    first = scan(root, work / "manifests" / "split")
    put_back(work / "aside", root)
    time.sleep(3.5)
    rows = []
    for r in range(repeats):
        sides = {}
        for side in (("with", "without") if r % 2 == 0 else ("without", "with")):
            manifests = work / f"m_{side}_{r}"
            shutil.copytree(work / "manifests", manifests)
            if side == "without":
                (manifests / "split" / "file_hashes.csv").unlink()
            sides[side] = scan(root, manifests / "split", cold)
        assert sides["with"]["fingerprint"] == sides["without"]["fingerprint"]
        rows.append(sides)
        print(f"x{scale} repeat {r + 1}: with {sides['with']}  without {sides['without']}",
              flush=True)
    shutil.rmtree(work)
    if built != archive:
        built.unlink()
    return {"scale": scale, "files_before": first["files"], "added": added,
            "first_scan": first, "repeats": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archive", required=True, type=Path)
    ap.add_argument("--scales", default="1,4,8")
    ap.add_argument("--added", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true",
                    help="drop the folder's files from the page cache before each scan")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    import tensorflow  # noqa: F401 - imported before any timing (the decode check needs it)

    results = {"command": " ".join(sys.argv), "machine": platform.processor() or
               platform.machine(), "cpus": os.cpu_count(), "scales": []}
    with tempfile.TemporaryDirectory() as tmp:
        for scale in [int(s) for s in args.scales.split(",")]:
            results["scales"].append(one_scale(args.archive.resolve(), scale, args.added,
                                               args.repeats, Path(tmp), args.cold))
    print("\n| data | files before → after | scan with the recorded hashes: s / MB read | "
          "without: s / MB read | wall ratio |")
    print("|---|---|---|---|---|")
    for s in results["scales"]:
        with_ = [r["with"] for r in s["repeats"]]
        without = [r["without"] for r in s["repeats"]]
        print(f"| {s['scale']}x | {s['files_before']:,} → {with_[0]['files']:,} | "
              + " / ".join(f"{w['wall_s']:.2f}" for w in with_)
              + f" s, {with_[0]['read_mb']:.0f} MB | "
              + " / ".join(f"{w['wall_s']:.2f}" for w in without)
              + f" s, {without[0]['read_mb']:.0f} MB | "
              + " / ".join(f"{a['wall_s'] / b['wall_s']:.3f}" for a, b in zip(with_, without))
              + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
