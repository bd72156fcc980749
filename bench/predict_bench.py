"""`petalflow predict` as a user runs it: when its first prediction is written, and images/s
on a whole folder, against the plain one-image-at-a-time loop over the registered model.

It serves the archive over local HTTP, runs ``petalflow train`` on it once (defaults; fresh
PETALFLOW_HOME and MLflow store; the run's summary, with its per-phase timings and edge-model
table, is kept), then on every photo of the extracted archive, ``--repeats`` times:
``petalflow predict --model models:/petalflow-classifier/1 --input <folder> --timing`` (wall,
peak RSS of the process tree, and the command's own timing line: first prediction written, images
done, images/s after the first) and once ``bench/plain_predict.py`` (``mlflow.pyfunc.load_model``,
one image per call).

    .venv/bin/python bench/predict_bench.py --archive flower_photos_1500.tgz \
        --backbone mobilenet_v2_035_224_feature_vector --repeats 3 --json predict.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from run_bench import BIN, Server, measure  # noqa: E402

from petalflow.tasks.images import IMAGE_SUFFIXES  # noqa: E402

TIMING = re.compile(r"first prediction written ([\d.]+) s after the command started; (\d+) "
                    r"images in ([\d.]+) s \(([\d.]+) images/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", required=True, type=Path)
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    archive = args.archive.resolve()
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    server = Server(archive.parent)
    out: dict = {"predict": []}
    try:
        with tempfile.TemporaryDirectory(prefix="petalflow-predict-bench-") as tmp:
            work = Path(tmp)
            env["PETALFLOW_HOME"] = str(work / "home")
            summary_path = work / "summary.json"
            out["train"] = measure(
                [str(BIN / "petalflow"), "train", "--data-url",
                 f"http://127.0.0.1:{server.port}/{archive.name}", "--data-sha256", sha,
                 "--backbone", str(Path(args.backbone).resolve()),
                 "--summary-json", str(summary_path)], work, env, work / "train.log")
            summary = json.loads(summary_path.read_text())
            out["summary"] = {k: summary.get(k) for k in ("model_uri", "test_metrics", "edge",
                                                          "timings")}
            data_root = Path(json.loads(next((work / "home" / "manifests").rglob(
                "dataset.json")).read_text())["data_root"])
            images = sum(1 for p in data_root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            out["images"] = images
            uri = "models:/petalflow-classifier/1"
            for i in range(args.repeats):
                log = work / f"predict{i}.log"
                res = measure([str(BIN / "petalflow"), "predict", "--model", uri, "--input",
                               str(data_root), "--output", str(work / f"p{i}.csv"), "--timing"],
                              work, env, log)
                found = TIMING.search(log.read_text())
                if found:
                    res.update(first_prediction_s=float(found[1]), done_s=float(found[3]),
                               images_per_s_after_first=float(found[4]))
                res["images_per_s_whole_command"] = round(images / res["wall_s"], 1)
                out["predict"].append(res)
                print(json.dumps(res), flush=True)
            plain = measure([sys.executable, str(REPO / "bench" / "plain_predict.py"), "--model",
                             uri, "--folder", str(data_root), "--json", str(work / "plain.json")],
                            work, {**env, "MLFLOW_TRACKING_URI":
                                   f"sqlite:///{work / 'mlflow' / 'mlflow.db'}"},
                            work / "plain.log")
            plain.update(json.loads((work / "plain.json").read_text()))
            plain["images_per_s_whole_command"] = round(images / plain["wall_s"], 1)
            out["plain_one_by_one"] = plain
            print(json.dumps(plain), flush=True)
    finally:
        server.close()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
