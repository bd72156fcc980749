"""Plain prediction baseline: load the registered model with ``mlflow.pyfunc.load_model``
and classify a folder's images one by one (the naive loop a user would write).

    python bench/plain_predict.py --model models:/NAME/1 --folder DIR --json OUT.json
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path

from petalflow.tasks.images import IMAGE_SUFFIXES  # the images petalflow predict takes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--folder", required=True, type=Path)
    ap.add_argument("--json", required=True, type=Path)
    args = ap.parse_args()
    started = time.time()
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(args.model)
    files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    loop_start = time.time()
    labels = []
    for path in files:
        out = model.predict(pd.DataFrame({"image": [base64.b64encode(path.read_bytes()).decode()]}))
        labels.append(out["label"].iloc[0])
    loop = time.time() - loop_start
    result = {"images": len(files), "loop_s": loop, "loop_images_per_s": len(files) / loop,
              "seconds_in_script": time.time() - started}
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
