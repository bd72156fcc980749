"""Disk used through scheduled retraining on data that changes behind one URL, with this
checkout's code and (``--old``) another checkout's, same invocation.

From a folder-per-class archive it makes ``--versions`` archives, each holding ``--added`` more
of every class's photos than the one before (the last is the whole archive; built as
``grown_data_bench.py`` builds its "before" archive). For each side, in a fresh working folder:
``petalflow train`` on each version in turn, served over local HTTP behind the same URL (what a
weekly run sees), then once more on the last version (a run with nothing to do). After each run
it records the size of every folder under PETALFLOW_HOME and of the MLflow store, the run's
wall time and peak RSS (process tree), and its scan, features and total phases.

    git worktree add ../petalflow-old <commit>
    .venv/bin/python bench/disk_bench.py --archive flower_photos_1500.tgz \
        --backbone mobilenet_v2_035_224_feature_vector [--old ../petalflow-old] \
        [--scale 1] [--versions 4] [--added 0.05] [--old-first] [--json disk.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from ab_bench import old_side  # noqa: E402
from grown_data_bench import without_the_last  # noqa: E402
from run_bench import BIN, Server, measure  # noqa: E402
from scale_bench import scaled_archive  # noqa: E402


def folder_bytes(root: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root)
               for f in files if not os.path.islink(os.path.join(d, f)))


def sizes(work: Path) -> dict:
    """MiB per folder of PETALFLOW_HOME, the MLflow store, and their total."""
    home = work / "home"
    out = {p.name: folder_bytes(p) / 2**20 for p in sorted(home.iterdir()) if p.is_dir()}
    out["mlflow"] = folder_bytes(work / "mlflow") / 2**20
    out["total"] = sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


def side(cmd: list, archives: list[Path], served: Path, url: str, backbone: str, work: Path,
         env: dict) -> list[dict]:
    rows = []
    for i, archive in enumerate(archives + archives[-1:]):
        shutil.copyfile(archive, served / "photos.tgz")
        summary = work / f"run{i}.json"
        result = measure(cmd + ["train", "--data-url", url, "--backbone", backbone,
                                "--summary-json", str(summary)],
                         work, env, work / f"run{i}.log")
        s = json.loads(summary.read_text())
        row = {"run": i, "status": s["status"], "images": s["dataset"]["used"],
               "wall_s": result["wall_s"], "peak_rss_mib": result["peak_rss_mib"],
               "phases_s": {k: s["timings"].get(k)
                            for k in ("scan", "features", "evaluation", "total")},
               "champion_predictions_recorded": (s.get("comparison") or {}).get(
                   "champion_predictions_recorded"),
               "mib": sizes(work)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", required=True, type=Path)
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--old", type=Path, default=None, help="another checkout to compare with")
    ap.add_argument("--scale", type=int, default=1,
                    help="the archive made this many times larger, as scale_bench.py does")
    ap.add_argument("--versions", type=int, default=4)
    ap.add_argument("--added", type=float, default=0.05)
    ap.add_argument("--old-first", action="store_true",
                    help="run the --old side first (the order's effect, e.g. a warmer disk)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    backbone = str(Path(args.backbone).resolve())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    result = {"command": " ".join(sys.argv),
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "cpus": len(os.sched_getaffinity(0)),
                          "python": sys.version.split()[0]},
              "sides": {}}
    with tempfile.TemporaryDirectory(prefix="petalflow-disk-") as tmp:
        tmp = Path(tmp)
        full = scaled_archive(args.archive.resolve(), args.scale, tmp)
        archives = [without_the_last(full, (args.versions - 1 - k) * args.added,
                                     tmp / f"v{k}.tgz")[0]
                    for k in range(args.versions - 1)] + [full]
        served = tmp / "served"
        served.mkdir()
        server = Server(served)
        url = f"http://127.0.0.1:{server.port}/photos.tgz"
        commands, envs = {"new": [str(BIN / "petalflow")]}, {"new": {}}
        if args.old:
            commands["old"], envs["old"] = old_side(args.old.resolve(), tmp / "old")
        order = sorted(commands, reverse=args.old_first)  # "new", "old"; or "old" first
        try:
            for code, cmd in ((code, commands[code]) for code in order):
                work = tmp / f"work-{code}"
                work.mkdir()
                print(f"--- {code}", flush=True)
                result["sides"][code] = side(cmd, archives, served, url, backbone, work,
                                             {**env, **envs[code],
                                              "PETALFLOW_HOME": str(work / "home")})
                shutil.rmtree(work)
        finally:
            server.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
