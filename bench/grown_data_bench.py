"""Retraining on data that grew, behind the same URL: the new images' features only (the
feature bank) against every image's (a home without the bank), same invocation.

From a folder-per-class archive (optionally made ``--scale`` times larger as
``scale_bench.py`` does) it makes the "before" archive: the same without the last
``--added`` share of each class's photos (by name). Each repeat, in a fresh working folder:
``petalflow train`` on "before" served over local HTTP (cold), then the archive behind the
same URL is replaced by the full one and the working folder is copied; in the copy, the
feature bank (``PETALFLOW_HOME/features/feature-banks``) is removed. Then ``petalflow train``
on the full archive runs in both, one after the other, alternately first (each with the
champion, the frozen backbone copy and the downloads of the first training; only the bank
differs). It measures
each retraining's wall time and peak RSS (process tree) and reads its per-phase table.

    .venv/bin/python bench/grown_data_bench.py --archive flower_photos_1500.tgz \
        --backbone mobilenet_v2_035_224_feature_vector [--scale 1] [--added 0.05] \
        [--repeats 2] [--json grown.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from run_bench import BIN, measure, served_folder  # noqa: E402
from scale_bench import scaled_archive  # noqa: E402


def without_the_last(archive: Path, share: float, out: Path) -> tuple[Path, int]:
    """``archive`` less the last ``share`` of each class folder's images (by name), and how
    many were left out."""
    with tarfile.open(archive, "r:*") as src:
        members = src.getmembers()
        by_class: dict[str, list] = {}
        for m in members:
            if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png")):
                by_class.setdefault(str(Path(m.name).parent), []).append(m.name)
        dropped = set()
        for names in by_class.values():
            names.sort()
            dropped.update(names[len(names) - max(1, round(share * len(names))):])
        with tarfile.open(out, "w:gz") as dst:
            for m in members:
                if m.name not in dropped:
                    data = src.extractfile(m).read() if m.isfile() else None
                    dst.addfile(m, io.BytesIO(data) if data is not None else None)
    return out, len(dropped)


def train(url: str, backbone: str, work: Path, env: dict, log: str,
          cmd: Optional[list] = None) -> dict:
    """``petalflow train`` (or ``cmd`` + train: another checkout's) on ``url`` with
    PETALFLOW_HOME ``work/home``, measured, with its summary's figures."""
    summary = work / f"{log}.json"
    result = measure((cmd or [str(BIN / "petalflow")]) + [
        "train", "--data-url", url, "--backbone", backbone, "--summary-json", str(summary)],
        work, {**env, "PETALFLOW_HOME": str(work / "home")}, work / f"{log}.log")
    s = json.loads(summary.read_text())
    features = s["training"]["features"]
    return {**result, "status": s["status"], "timings": s["timings"],
            "from_earlier": features.get("from_earlier"), "computed": features.get("computed"),
            "test_accuracy": s["test_metrics"]["test_accuracy"],
            "housekeeping": s.get("housekeeping")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", required=True, type=Path)
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--added", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    backbone = str(Path(args.backbone).resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    runs = []
    with tempfile.TemporaryDirectory(prefix="petalflow-grown-") as tmp:
        tmp = Path(tmp)
        full = scaled_archive(args.archive.resolve(), args.scale, tmp)
        before, added = without_the_last(full, args.added, tmp / "before.tgz")
        served, server, url = served_folder(tmp)
        try:
            for repeat in range(args.repeats):
                shutil.copyfile(before, served / "photos.tgz")
                work = tmp / f"r{repeat}"
                work.mkdir()
                first = train(url, backbone, work, env, "before")
                shutil.copyfile(full, served / "photos.tgz")
                other = tmp / f"r{repeat}-no-bank"
                shutil.copytree(work, other, symlinks=True)
                shutil.rmtree(other / "home" / "features" / "feature-banks")
                if repeat % 2 == 0:  # alternately first: the page cache favours the second
                    with_bank = train(url, backbone, work, env, "after")
                    without = train(url, backbone, other, env, "after")
                else:
                    without = train(url, backbone, other, env, "after")
                    with_bank = train(url, backbone, work, env, "after")
                runs.append({"repeat": repeat, "first": first, "with_bank": with_bank,
                             "without_bank": without})
                for name, r in (("with bank", with_bank), ("without", without)):
                    print(f"repeat {repeat} {name:10s} {r['wall_s']:6.2f} s "
                          f"{r['peak_rss_mib']:8.1f} MiB features "
                          f"{r['timings'].get('features')} s (from earlier {r['from_earlier']},"
                          f" computed {r['computed']}) accuracy {r['test_accuracy']:.4f}")
        finally:
            server.close()
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0]},
            "scale": args.scale, "added_images": added, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
