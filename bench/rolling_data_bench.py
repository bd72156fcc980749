"""Scheduled retraining on data that rolls behind one URL (each round, the oldest ``--roll``
share of every class's photos out, as many new ones in): the feature bank's size on disk and
each retraining's wall time, with this checkout's code and with another checkout's (``--old``,
an earlier commit), interleaved round by round (alternately first) in two working folders.

The photos come from a folder-per-class archive made ``--scale`` times larger as
``scale_bench.py`` makes it (mirrored and re-encoded copies, each its own bytes). Each class's
photos are ordered originals first, then each kind of copy in turn (by name within each), and
round r serves, per class, the ``--window`` share of the data starting r x (window x roll)
photos in: a window that slides through the pool, so each round's new photos were never seen
and its oldest ones leave for good.

    git worktree add ../petalflow-old <commit>
    .venv/bin/python bench/rolling_data_bench.py --old ../petalflow-old \\
        --archive flower_photos_1500.tgz --backbone mobilenet_v2_035_224_feature_vector \\
        --scale 4 --window 1500 --roll 0.2 --rounds 12 --json rolling.json

Per round and side: wall s and peak RSS of ``petalflow train`` (process tree), its features
phase, the images whose features came from the bank and those computed, and after the run the
bank's bytes, segments and rows (``PETALFLOW_HOME/features/feature-banks``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from ab_bench import old_side  # noqa: E402
from grown_data_bench import train  # noqa: E402
from run_bench import BIN, served_folder  # noqa: E402
from scale_bench import scaled_archive  # noqa: E402

COPY = re.compile(r"_q(\d+)(m?)\.[^.]+$")


def pool(archive: Path) -> tuple[dict, dict]:
    """({class folder: [member names in pool order]}, {name: bytes}) of ``archive``'s images:
    originals first, then each kind of copy in turn."""
    by_class: dict[str, list] = {}
    data: dict[str, bytes] = {}
    with tarfile.open(archive, "r:*") as src:
        for m in src.getmembers():
            if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png")):
                by_class.setdefault(str(Path(m.name).parent), []).append(m.name)
                data[m.name] = src.extractfile(m).read()

    def order(name: str):
        copy = COPY.search(name)
        return (0, 0, "", name) if copy is None else (1, -int(copy[1]), copy[2], name)

    return {c: sorted(names, key=order) for c, names in by_class.items()}, data


def window_archive(by_class: dict, data: dict, share: float, start_share: float,
                   out: Path) -> tuple[int, int]:
    """A .tgz at ``out`` of each class's photos from ``start_share`` of the pool, ``share`` of
    it; returns (photos, photos of each class's pool left after the window, fewest)."""
    total, spare = 0, None
    with tarfile.open(out, "w:gz") as dst:
        for folder, names in sorted(by_class.items()):
            start = round(start_share * len(names))
            chosen = names[start:start + round(share * len(names))]
            left = len(names) - start - len(chosen)
            spare = left if spare is None else min(spare, left)
            for name in chosen:
                info = tarfile.TarInfo(name)
                info.size = len(data[name])
                dst.addfile(info, io.BytesIO(data[name]))
            total += len(chosen)
    return total, spare


def bank_state(home: Path) -> dict:
    import numpy as np

    banks = home / "features" / "feature-banks"
    segments = [p for p in banks.glob("*/*.npz") if ".tmp." not in p.name]
    rows = 0
    for segment in segments:
        with np.load(segment) as data:
            rows += len(data["shas"])
    return {"bank_bytes": sum(p.stat().st_size for p in segments),
            "bank_segments": len(segments), "bank_rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, type=Path, help="the other checkout")
    ap.add_argument("--archive", required=True, type=Path)
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--window", type=int, default=1500, help="photos per round")
    ap.add_argument("--roll", type=float, default=0.2, help="share replaced each round")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    backbone = str(Path(args.backbone).resolve())
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    base_env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    rows = []
    with tempfile.TemporaryDirectory(prefix="petalflow-rolling-") as tmp:
        tmp = Path(tmp)
        by_class, data = pool(scaled_archive(args.archive.resolve(), args.scale, tmp))
        share = args.window / len(data)
        old_cmd, old_env = old_side(args.old.resolve(), tmp / "old-code")
        sides = {"new": ([str(BIN / "petalflow")], {}), "old": (old_cmd, old_env)}
        served, server, url = served_folder(tmp)
        try:
            for r in range(args.rounds):
                photos, spare = window_archive(by_class, data, share, r * share * args.roll,
                                               served / "photos.tgz.part")
                os.replace(served / "photos.tgz.part", served / "photos.tgz")
                if spare < 0:
                    raise SystemExit(f"round {r}: the pool ran out (--scale, --rounds)")
                order = list(sides) if r % 2 == 0 else list(reversed(sides))
                for code in order:
                    cmd, extra = sides[code]
                    work = tmp / code
                    work.mkdir(exist_ok=True)
                    trained = train(url, backbone, work, {**base_env, **extra}, f"round{r}",
                                    cmd)
                    row = {"round": r, "code": code, "photos": photos, **trained,
                           "features_s": trained["timings"].get("features"),
                           **bank_state(work / "home")}
                    rows.append(row)
                    print(f"round {r:2d} {code}: {row['wall_s']:6.2f} s "
                          f"{row['peak_rss_mib']:7.1f} MiB features {row['features_s']} s "
                          f"(banked {row['from_earlier']}, computed {row['computed']}) bank "
                          f"{row['bank_rows']} rows / {row['bank_segments']} segments / "
                          f"{row['bank_bytes'] / 2**20:.1f} MiB", flush=True)
        finally:
            server.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": " ".join(sys.argv),
            "machine": {"cpu": platform.processor() or platform.machine(),
                        "cpus": len(os.sched_getaffinity(0)), "python": sys.version.split()[0]},
            "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
