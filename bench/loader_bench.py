"""Cold load of a registered model as another team's Python loads it: ``mlflow.pyfunc.load_model``
on a pulled model folder, then one prediction, each in a fresh process, alternating between the
model's own loader (``code/petalflow_serving.py``, as registered) and this checkout's
``tasks/serving.py`` put in its place. Prints the load time, the time to the first prediction,
the peak RSS and whether Keras was imported.

    .venv/bin/petalflow pull --dest pulled-model
    .venv/bin/python bench/loader_bench.py --model pulled-model --image photo.jpg --repeats 3 \
        --json load26.json

By default the processes run without TF_USE_LEGACY_KERAS, as an environment built from the
model's requirements does (Keras 3 is TensorFlow's Keras there); ``--legacy-keras`` sets it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import base64, json, resource, sys, time
t0 = time.perf_counter()
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
t1 = time.perf_counter()
image = base64.b64encode(open(sys.argv[2], "rb").read()).decode()
label = model.predict(pd.DataFrame({"image": [image]}))["label"][0]
t2 = time.perf_counter()
print(json.dumps({"load_s": round(t1 - t0, 2), "first_prediction_s": round(t2 - t0, 2),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                  "keras_imported": any(m.split(".")[0] in ("keras", "tf_keras")
                                        for m in sys.modules),
                  "label": str(label)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="a pulled model folder")
    ap.add_argument("--image", required=True, type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--legacy-keras", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if args.legacy_keras:
        env["TF_USE_LEGACY_KERAS"] = "1"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"registered loader": Path(tmp) / "registered",
                 "this checkout's loader": Path(tmp) / "checkout"}
        for folder in sides.values():
            shutil.copytree(args.model, folder)
        shutil.copy(REPO / "tasks" / "serving.py",
                    sides["this checkout's loader"] / "code" / "petalflow_serving.py")
        for repeat in range(args.repeats):
            for side, folder in sides.items():
                out = subprocess.run([sys.executable, "-c", PROBE, str(folder), str(args.image)],
                                     env=env, capture_output=True, text=True, check=True)
                row = {"side": side, "repeat": repeat,
                       **json.loads(out.stdout.strip().splitlines()[-1])}
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv),
                                         "legacy_keras": args.legacy_keras, "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
