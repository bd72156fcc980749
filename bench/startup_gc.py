"""What Python's garbage collector costs while a petalflow command imports its stack: the
imports of ``petalflow train`` (TensorFlow, TF Hub, tf-keras, Prefect with its server module,
MLflow, pandas, the train flow) in a fresh process, with the default collector and with
collection off, alternating; then one full collection, before and after ``gc.freeze()``.

    .venv/bin/python bench/startup_gc.py --repeats 2 --json startup_gc.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = """\
import gc, json, sys, time
if sys.argv[1] == "off":
    gc.disable()
started = time.perf_counter()
import tensorflow, tf_keras, tensorflow_hub, prefect, mlflow, pandas
import prefect.server.api.server
from petalflow.flows import train_flow
imports = time.perf_counter() - started
stats = gc.get_stats()[2]
gc.enable()
objects = len(gc.get_objects())
started = time.perf_counter(); gc.collect(); full = time.perf_counter() - started
gc.freeze()
started = time.perf_counter(); gc.collect(); frozen = time.perf_counter() - started
print(json.dumps({"collector": sys.argv[1], "imports_s": round(imports, 2),
                  "full_collections": stats["collections"], "freed": stats["collected"],
                  "objects": objects, "full_collection_s": round(full, 3),
                  "after_freeze_s": round(frozen, 3)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from petalflow.tasks.common import ENV_DEFAULTS

    env = {**__import__("os").environ, **ENV_DEFAULTS}
    rows = []
    for _ in range(args.repeats):
        for mode in ("on", "off"):
            out = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
