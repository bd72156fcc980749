"""Benchmark: petalflow train + predict against a plain in-memory Keras baseline, same machine,
same invocation, same data split.

For each variant (augmentation off, augmentation on) it runs, as subprocesses:
  (a) ``petalflow train`` on the archive served over a local HTTP server (fresh PETALFLOW_HOME and
      embedded MLflow store each time, so nothing is reused), then ``petalflow predict`` on the
      test split's images;
  (b) ``bench/baseline.py``: every image of the same split decoded into one NumPy array, frozen
      backbone + Dense head, Adam, ``model.fit`` for the same number of epochs.
It measures wall time and peak resident memory of each whole process tree (polled from /proc,
children included) and test accuracy, and prints/writes the ratios.

    .venv/bin/python bench/run_bench.py --archive ARCHIVE.tgz --backbone SAVEDMODEL_DIR \
        [--epochs 5] [--repeats 1] [--json results.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

from petalflow.stack import descendant_pids
from petalflow.tasks.images import IMAGE_SUFFIXES  # what petalflow predict picks up

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _tree_rss_kib(root: int) -> int:
    """VmRSS summed over ``root`` and its descendants. A child still running its parent's
    program (a subprocess launch caught between its fork and its exec) shares every page with
    its parent and is not counted again: sampled there, it doubled a train run's figure
    (rb18: 2,430 instead of ~1,570 MiB)."""
    total = 0
    for pid in descendant_pids(root):
        try:
            with open(f"/proc/{pid}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh if ":" in line)
        except OSError:
            continue
        parent = int(fields.get("PPid", "0").split()[0])
        if pid != root and _cmdline(pid) == _cmdline(parent):
            continue
        if "VmRSS" in fields:
            total += int(fields["VmRSS"].split()[0])
    return total


def measure(cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    """Run ``cmd``; return wall seconds, peak RSS (MiB) of its process tree, and exit code."""
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        peak = [0]

        def poll():
            while proc.poll() is None:
                peak[0] = max(peak[0], _tree_rss_kib(proc.pid))
                time.sleep(0.05)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        rc = proc.wait()
        watcher.join()
    wall = time.perf_counter() - started
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n--- {log}:\n"
                         + log.read_text()[-4000:])
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(peak[0] / 1024, 1)}


class Server:
    """python -m http.server on a free loopback port, serving the archive's folder."""

    def __init__(self, folder: Path):
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(self.port)],
            cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def served_folder(tmp: Path, name: str = "photos.tgz") -> tuple[Path, "Server", str]:
    """(an empty folder under ``tmp``, a Server of it, the URL of ``name`` in it): for
    archives replaced behind one URL."""
    served = tmp / "served"
    served.mkdir()
    server = Server(served)
    return served, server, f"http://127.0.0.1:{server.port}/{name}"


def run_petalflow(url, sha, args, augment: bool, work: Path, env: dict) -> dict:
    work.mkdir(parents=True)
    env = {**env, "PETALFLOW_HOME": str(work / "home")}
    summary = work / "summary.json"
    train_cmd = [str(BIN / "petalflow"), "train", "--data-url", url, "--data-sha256", sha,
                 "--backbone", args.backbone, "--epochs", str(args.epochs),
                 "--augment" if augment else "--no-augment", "--summary-json", str(summary),
                 *args.extra]
    train = measure(train_cmd, work, env, work / "train.log")
    s = json.loads(summary.read_text())
    manifest = next((work / "home" / "manifests").rglob("manifest.csv"))
    data_root = Path(json.loads(next((work / "home" / "manifests").rglob("dataset.json"))
                                .read_text())["data_root"])
    m = pd.read_csv(manifest, keep_default_na=False)
    test = m[(m["status"] == "ok") & (m["split"] == "test")]
    listing = work / "test_images"
    listing.mkdir()
    for rel in test["path"]:  # links keep predict's input to exactly the test split
        dst = listing / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(data_root / rel)
    pred_csv = work / "predictions.csv"
    pred_cmd = [str(BIN / "petalflow"), "predict", "--model", s["model_uri"], "--input",
                str(listing), "--output", str(pred_csv)]
    predict = measure(pred_cmd, work, env, work / "predict.log")
    preds = pd.read_csv(pred_csv, keep_default_na=False)
    truth = preds["path"].map(lambda p: Path(p).relative_to(listing).parts[0])
    return {
        "train": train, "predict": predict,
        "wall_s": round(train["wall_s"] + predict["wall_s"], 2),
        "peak_rss_mib": max(train["peak_rss_mib"], predict["peak_rss_mib"]),
        "test_accuracy": s["test_metrics"]["test_accuracy"],
        "predict_accuracy": float((preds["label"] == truth).mean()),
        "test_images": int(len(test)),
        "train_timings": json.loads((Path(s["workdir"]) / "train.json").read_text())["timings"],
        "timings": s.get("timings"),  # the run's per-phase table (flow level)
        "manifest": str(manifest), "data_root": str(data_root),
    }


def run_baseline(pf: dict, args, work: Path, env: dict) -> dict:
    out = work / "baseline.json"
    cmd = [sys.executable, str(REPO / "bench" / "baseline.py"), "--manifest", pf["manifest"],
           "--data-root", pf["data_root"], "--backbone", args.backbone, "--epochs",
           str(args.epochs), "--json", str(out)]
    res = measure(cmd, work, env, work / "baseline.log")
    script = json.loads(out.read_text())
    res["test_accuracy"] = script["test_accuracy"]
    # Its own phases; "fit clean-up" tells which of its two speeds the run had (baseline.py).
    res["phases_s"] = script.get("phases_s")
    return res


def run_predict_throughput(model_uri: str, folder: Path, work: Path, env: dict) -> dict:
    """petalflow predict on a whole folder vs the plain one-by-one mlflow.tensorflow loop."""
    n = sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    out = work / "throughput"
    out.mkdir(parents=True)
    pf = measure([str(BIN / "petalflow"), "predict", "--model", model_uri, "--input", str(folder),
                  "--output", str(out / "all.csv")], work, env, out / "petalflow.log")
    plain = measure([sys.executable, str(REPO / "bench" / "plain_predict.py"), "--model",
                     model_uri, "--folder", str(folder), "--json", str(out / "plain.json")],
                    work, env, out / "plain.log")
    plain_loop = json.loads((out / "plain.json").read_text())
    return {
        "images": n,
        "petalflow_predict": {**pf, "images_per_s": round(n / pf["wall_s"], 1)},
        "plain_one_by_one": {**plain, "images_per_s": round(n / plain["wall_s"], 1),
                             "loop_only_images_per_s": round(plain_loop["loop_images_per_s"], 1)},
        "ratio": round(plain["wall_s"] / pf["wall_s"], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", required=True, type=Path)
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--variants", default="off,on", help="augmentation variants: off,on")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-throughput", action="store_true",
                    help="skip the prediction-throughput comparison")
    ap.add_argument("extra", nargs="*", help="extra petalflow train options (after --)")
    args = ap.parse_args()
    args.backbone = str(Path(args.backbone).resolve())
    archive = args.archive.resolve()
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB",
               "python": platform.python_version(), "runs": []}
    server = Server(archive.parent)
    url = f"http://127.0.0.1:{server.port}/{archive.name}"
    try:
        with tempfile.TemporaryDirectory(prefix="petalflow-bench-") as tmp:
            for r in range(args.repeats):
                for variant in args.variants.split(","):
                    work = Path(tmp) / f"r{r}-aug-{variant}"
                    pf = run_petalflow(url, sha, args, variant == "on", work / "petalflow", env)
                    base = run_baseline(pf, args, work, env)
                    row = {
                        "repeat": r, "augment": variant, "petalflow": pf, "baseline": base,
                        "wall_ratio": round(pf["wall_s"] / base["wall_s"], 3),
                        "train_only_wall_ratio": round(pf["train"]["wall_s"] / base["wall_s"], 3),
                        "memory_ratio": round(pf["peak_rss_mib"] / base["peak_rss_mib"], 3),
                    }
                    if not args.no_throughput and "throughput" not in results:
                        model_uri = "models:/petalflow-classifier/1"
                        tp_env = {**env, "MLFLOW_TRACKING_URI":
                                  f"sqlite:///{work / 'petalflow' / 'mlflow' / 'mlflow.db'}"}
                        results["throughput"] = run_predict_throughput(
                            model_uri, Path(pf["data_root"]), work, tp_env)
                        print(json.dumps(results["throughput"], indent=2), flush=True)
                    for key in ("manifest", "data_root"):
                        pf.pop(key)
                    results["runs"].append(row)
                    print(json.dumps(row, indent=2), flush=True)
    finally:
        server.close()
    print("\n| augment | petalflow acc | baseline acc | petalflow wall s (train+predict) | "
          "baseline wall s (its fit clean-up s) | wall ratio | train-only ratio | "
          "petalflow peak MiB | baseline peak MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results["runs"]:
        pf, b = row["petalflow"], row["baseline"]
        tail = (b.get("phases_s") or {}).get("fit clean-up", "?")
        print(f"| {row['augment']} | {pf['test_accuracy']:.4f} | {b['test_accuracy']:.4f} | "
              f"{pf['wall_s']} ({pf['train']['wall_s']} + {pf['predict']['wall_s']}) | "
              f"{b['wall_s']} ({tail}) | {row['wall_ratio']} | {row['train_only_wall_ratio']} | "
              f"{pf['peak_rss_mib']} | {b['peak_rss_mib']} | {row['memory_ratio']} |")
    if "throughput" in results:
        tp = results["throughput"]
        print(f"\nprediction throughput on {tp['images']} images (whole command, load included): "
              f"petalflow predict {tp['petalflow_predict']['images_per_s']} images/s, plain "
              f"one-by-one {tp['plain_one_by_one']['images_per_s']} images/s "
              f"(loop only {tp['plain_one_by_one']['loop_only_images_per_s']}), "
              f"ratio {tp['ratio']}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
