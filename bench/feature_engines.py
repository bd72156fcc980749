"""Frozen-backbone features by TensorFlow and by the TensorFlow Lite copy training uses on the
CPU (``tasks.features.FeatureExtractor``): images/s, conversion time, and how far apart the
features are, on the same photos, each engine in turn within one invocation.

Two measurements per engine and repeat: the backbone alone on photos already decoded
(batches of 32), and the whole pipeline training runs (``inputs.image_dataset``: read, decode,
resize in parallel, then the engine), with the TFLite conversion timed separately.

    .venv/bin/python bench/feature_engines.py --photos flower_photos \
        --backbone mobilenet_v2_035_224_feature_vector --limit 1275 --repeats 2 \
        --json feature_engines.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", required=True, type=Path, help="a folder of class folders")
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--limit", type=int, default=1275, help="photos (sorted by path)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from petalflow.tasks.common import ENV_DEFAULTS

    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import numpy as np

    from petalflow.tasks.features import FeatureExtractor
    from petalflow.tasks.images import IMAGE_SUFFIXES
    from petalflow.tasks.inputs import image_dataset
    from petalflow.tasks.model import load_backbone

    size = args.image_size
    paths = sorted(str(p) for p in args.photos.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    paths = paths[: args.limit]
    backbone = load_backbone(str(Path(args.backbone).resolve()))
    decoded = np.concatenate([b.numpy() for b in image_dataset(paths[:256], None, size, 32)])

    rows, features = [], {}
    for repeat in range(args.repeats):
        for engine in ("tensorflow", "tflite"):
            extract = FeatureExtractor(backbone, size, tflite=engine == "tflite")
            started = time.perf_counter()
            extract(decoded[:8])  # conversion (TFLite) or trace (TensorFlow)
            prepare_s = time.perf_counter() - started
            assert extract.kind == engine, extract.kind
            started = time.perf_counter()
            for i in range(0, len(decoded), 32):
                extract(decoded[i:i + 32])
            decoded_ips = len(decoded) / (time.perf_counter() - started)
            started = time.perf_counter()
            out = np.concatenate([extract(b) for b in image_dataset(paths, None, size, 32)])
            pipeline_s = time.perf_counter() - started
            features[engine] = out
            row = {"repeat": repeat, "engine": engine, "prepare_s": round(prepare_s, 2),
                   "backbone_images_per_s": round(decoded_ips, 1),
                   "pipeline_s": round(pipeline_s, 2),
                   "pipeline_images_per_s": round(len(paths) / pipeline_s, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    diff = np.abs(features["tflite"] - features["tensorflow"])
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "photos": len(paths), "backbone": Path(args.backbone).name, "rows": rows,
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "max_abs_feature": float(np.abs(features["tensorflow"]).max()),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
