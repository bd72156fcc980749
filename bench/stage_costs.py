"""Two fixed costs of every ``petalflow train``, each measured both ways in one invocation:

* **backbone load**: ``hub.KerasLayer(handle)`` (which first tries Keras 3's load context and so
  imports Keras 3) against ``hub.KerasLayer(hub.load(handle))`` (``model.load_backbone``), each
  in a fresh Python process, alternating: seconds, the process's RSS after it, and whether
  Keras 3 was imported;
* **edge export**: the two TFLite conversions (float16, int8) by TFLite's function converter
  (``TFLiteConverter.from_concrete_functions``, which freezes the network again for every
  format) against the graph-def converter over the network frozen once for the serving export
  (``model.frozen_network`` + ``edge.export_tflite``); the probabilities of both on the same
  photos are compared.

    .venv/bin/python bench/stage_costs.py --photos flower_photos \
        --backbone mobilenet_v2_035_224_feature_vector --repeats 2 --json stage_costs.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run in a fresh process: Keras 3, once imported, stays imported.
LOAD = """\
import json, os, sys, time
for key, value in {env}.items():
    os.environ.setdefault(key, value)
import tensorflow_hub as hub
import tf_keras
started = time.perf_counter()
handle = sys.argv[1]
layer = hub.KerasLayer(handle) if sys.argv[2] == "handle" else hub.KerasLayer(hub.load(handle))
seconds = time.perf_counter() - started
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024
print(json.dumps({{"seconds": round(seconds, 2), "rss_mib": rss,
                  "keras3_imported": "keras.src" in sys.modules}}))
"""


def backbone_rows(backbone: str, repeats: int, env: dict) -> list[dict]:
    rows = []
    for repeat in range(repeats):
        for way in ("handle", "loaded"):
            out = subprocess.run([sys.executable, "-c", LOAD.format(env=env), backbone, way],
                                 capture_output=True, text=True, check=True).stdout
            row = {"stage": "backbone load", "repeat": repeat,
                   "way": "KerasLayer(handle)" if way == "handle" else "KerasLayer(hub.load())",
                   **json.loads(out.strip().splitlines()[-1])}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def edge_rows(backbone_path: str, photos: list[str], repeats: int, size: int) -> tuple:
    import numpy as np
    import tensorflow as tf

    from petalflow.tasks.edge import (
        FORMATS, _decode_file, calibration_sample, export_tflite, model_file, tflite_classifier,
    )
    from petalflow.tasks.model import build_head, feature_dim, frozen_network, load_backbone

    backbone = load_backbone(backbone_path)
    head = build_head(feature_dim(backbone, size), 5)
    calibration = calibration_sample(photos[:1000])
    probe = photos[1000:1040]

    def by_function(out: Path) -> None:
        spec = tf.TensorSpec([1, size, size, 3], tf.float32, name="image")
        def network(image):
            return {"probabilities": head(backbone(image, training=False), training=False)}

        classify = tf.function(network, input_signature=[spec])
        holder = tf.Module()
        holder.weights_ = list(backbone.variables) + list(head.variables)
        concrete = classify.get_concrete_function()
        for fmt in FORMATS:
            conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete], holder)
            conv.experimental_lower_to_saved_model = False
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            if fmt == "float16":
                conv.target_spec.supported_types = [tf.float16]
            else:
                conv.representative_dataset = lambda: (
                    [tf.expand_dims(_decode_file(p, size), 0)] for p in calibration)
                conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            (out / model_file(fmt)).write_bytes(conv.convert())

    rows, probs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for way in ("function converter, per format", "frozen once, graph converter"):
                out = Path(tmp) / f"{repeat}-{way[:6]}"
                out.mkdir()
                started = time.perf_counter()
                freeze_s = 0.0
                if way.startswith("function"):
                    by_function(out)
                else:
                    network = frozen_network(backbone, head, size)  # the export's own freeze
                    freeze_s = time.perf_counter() - started
                    export_tflite(network, list("abcde"), size, out, calibration)
                total = time.perf_counter() - started
                row = {"stage": "edge export", "repeat": repeat, "way": way,
                       "seconds": round(total, 2),
                       "seconds_beyond_the_export_freeze": round(total - freeze_s, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                for fmt in FORMATS:
                    run = tflite_classifier(out / model_file(fmt))
                    probs[(way, fmt)] = np.stack(
                        [run(_decode_file(p, size).numpy()) for p in probe])
    diff = {fmt: float(np.abs(probs[("function converter, per format", fmt)]
                              - probs[("frozen once, graph converter", fmt)]).max())
            for fmt in FORMATS}
    return rows, diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", required=True, type=Path, help="a folder of class folders "
                    "(1,040 photos or more: calibration from the first 1,000, probe the next 40)")
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from petalflow.tasks.common import ENV_DEFAULTS

    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from petalflow.tasks.images import IMAGE_SUFFIXES

    backbone = str(Path(args.backbone).resolve())
    photos = sorted(str(p) for p in args.photos.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    rows = backbone_rows(backbone, args.repeats, dict(ENV_DEFAULTS))
    edge, diff = edge_rows(backbone, photos, args.repeats, args.image_size)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "backbone": Path(args.backbone).name, "rows": rows + edge,
              "edge_max_abs_probability_diff": diff}
    print(json.dumps({"edge_max_abs_probability_diff": diff}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
