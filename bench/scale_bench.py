"""Scaling benchmark: petalflow train + predict against the in-memory baseline as the data grows.

From one folder-per-class archive (the 1x data) it builds larger archives: 2x adds a mirrored
copy of every photo (re-encoded JPEG q90), 4x adds two more re-encodings (q85 plain and
mirrored), 8x four more (q80 and q75, plain and mirrored), 16x eight more (q70 down to q55,
plain and mirrored); every copy has its own bytes, so the scan keeps them all. For each size it
runs, in one invocation and back to back:
  petalflow: ``petalflow train`` (cold: fresh PETALFLOW_HOME and MLflow store, archive served over
  local HTTP, augmentation off) then ``petalflow predict`` on the test split's images;
  baseline: ``bench/baseline.py`` (every image decoded into one float32 array, model.fit) on the
  same split, up to ``--baseline-max-scale`` (its memory grows with the data: at 8x it would need
  about twice its 4x figure, near this machine's 24 GiB, so it is not run there).
It measures wall time and peak RSS of each process tree (polled from /proc, children included),
writes a JSON file, prints a markdown table and plots both against dataset size (PNG).

Accuracy at 2x and more is not a quality figure: a photo's copies land in different splits.

    .venv/bin/python bench/scale_bench.py --archive flower_photos_1500.tgz \
        --backbone mobilenet_v2_035_224_feature_vector --scales 1,2,4,8 \
        --json scale.json --plot docs/bench/scaling.png
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from run_bench import Server, run_baseline, run_petalflow  # noqa: E402

COPIES = {  # (quality, mirrored) of the extra copies each scale adds, in order
    2: [(90, True)],
    4: [(90, True), (85, False), (85, True)],
    8: [(90, True), (85, False), (85, True), (80, False), (80, True), (75, False), (75, True)],
}
# 16x: eight more (q70 down to q55, plain and mirrored)
COPIES[16] = COPIES[8] + [(q, m) for q in (70, 65, 60, 55) for m in (False, True)]


def scaled_archive(archive: Path, scale: int, out: Path) -> Path:
    """``archive`` with each image followed by its extra copies for ``scale``."""
    from PIL import Image, ImageOps

    if scale == 1:
        return archive
    target = out / f"{archive.name.split('.')[0]}_x{scale}.tgz"
    with tarfile.open(archive, "r:*") as src, tarfile.open(target, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            dst.addfile(member, io.BytesIO(data) if data is not None else None)
            if data is None or not member.name.lower().endswith((".jpg", ".jpeg")):
                continue
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB")
                for quality, mirrored in COPIES[scale]:
                    buf = io.BytesIO()
                    (ImageOps.mirror(im) if mirrored else im).save(buf, "JPEG", quality=quality)
                    stem, dot, ext = member.name.rpartition(".")
                    info = tarfile.TarInfo(f"{stem}_q{quality}{'m' if mirrored else ''}.{ext}")
                    info.size = buf.tell()
                    buf.seek(0)
                    dst.addfile(info, buf)
    return target


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (wall, rss) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for side, marker in (("petalflow", "o"), ("baseline", "s")):
        pts = [(r["images"], r[side]) for r in rows if r.get(side)]
        xs = [p[0] for p in pts]
        wall.plot(xs, [p[1]["wall_s"] for p in pts], marker=marker, label=side)
        rss.plot(xs, [p[1]["peak_rss_mib"] / 1024 for p in pts], marker=marker, label=side)
    wall.set(xlabel="photos in the dataset", ylabel="wall time, train + predict (s)",
             title="Wall time")
    rss.set(xlabel="photos in the dataset", ylabel="peak RSS (GiB)", title="Peak memory")
    for ax in (wall, rss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", required=True, type=Path)
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--scales", default="1,2,4,8")
    ap.add_argument("--baseline-max-scale", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    args.backbone = str(Path(args.backbone).resolve())
    args.extra = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                         f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f}"
                         " GiB", "command": " ".join(sys.argv), "rows": []}
    with tempfile.TemporaryDirectory(prefix="petalflow-scale-") as tmp:
        tmp = Path(tmp)
        for scale in (int(s) for s in args.scales.split(",")):
            archive = scaled_archive(args.archive.resolve(), scale, tmp)
            sha = hashlib.sha256(archive.read_bytes()).hexdigest()
            server = Server(archive.parent)
            try:
                url = f"http://127.0.0.1:{server.port}/{archive.name}"
                work = tmp / f"x{scale}"
                pf = run_petalflow(url, sha, args, False, work / "petalflow", env)
            finally:
                server.close()
            row = {"scale": scale, "images": None, "petalflow": pf, "baseline": None}
            if scale <= args.baseline_max_scale:
                row["baseline"] = run_baseline(pf, args, work, env)
                row["wall_ratio"] = round(pf["wall_s"] / row["baseline"]["wall_s"], 3)
                row["rss_ratio"] = round(pf["peak_rss_mib"] / row["baseline"]["peak_rss_mib"], 3)
            import pandas as pd

            manifest = pd.read_csv(pf.pop("manifest"), keep_default_na=False)
            pf.pop("data_root")
            row["images"] = int((manifest["status"] == "ok").sum())
            result["rows"].append(row)
            print(json.dumps(row, indent=2), flush=True)
    print("\n| scale | photos | petalflow wall s (train + predict) | baseline wall s | wall ratio "
          "| petalflow peak MiB | baseline peak MiB | RSS ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        pf, b = r["petalflow"], r["baseline"]
        print(f"| {r['scale']}x | {r['images']} | {pf['wall_s']} ({pf['train']['wall_s']} + "
              f"{pf['predict']['wall_s']}) | {b['wall_s'] if b else 'not run'} | "
              f"{r.get('wall_ratio', '—')} | {pf['peak_rss_mib']} | "
              f"{b['peak_rss_mib'] if b else 'not run'} | {r.get('rss_ratio', '—')} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result["rows"], args.plot)


if __name__ == "__main__":
    main()
