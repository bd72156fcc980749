"""How many calibration images the int8 edge model needs: accuracy on the validation split
(not the test split that BENCHMARKS.md reports) and conversion time, per calibration-sample
size and seed, for the classifier a ``petalflow train`` run trained.

The classifier is rebuilt from the run's last checkpoint (backbone + head, as training built
it); each int8 conversion is the one ``tasks/edge.py`` makes (``tflite_converter``), with
``calibration_sample(train files, n, seed)``. The float16 model's validation accuracy is
printed for reference.

    .venv/bin/python bench/edge_calibration.py --run <PETALFLOW_HOME>/runs/<key>/<attempt> \
        --dataset <PETALFLOW_HOME>/manifests/<id>/dataset.json \
        --backbone mobilenet_v2_035_224_feature_vector --sizes 10 25 50 100 --seeds 0 1 2 \
        --json calibration.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, type=Path, help="a training run's working folder")
    ap.add_argument("--dataset", required=True, type=Path, help="its dataset.json")
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 100])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import numpy as np
    import tensorflow as tf

    from petalflow.tasks.dataset import split_files
    from petalflow.tasks.edge import (
        _decode_file, calibration_sample, tflite_classifier, tflite_converter,
    )
    from petalflow.tasks.model import (
        build_head, feature_dim, frozen_network, load_backbone, variables_only,
    )

    size = args.image_size
    info = json.loads(args.dataset.read_text())
    backbone = load_backbone(str(Path(args.backbone).resolve()))
    head = build_head(feature_dim(backbone, size), len(info["classes"]))
    status = tf.train.Checkpoint(head=head, backbone=variables_only(backbone)).restore(
        tf.train.latest_checkpoint(str(args.run / "checkpoints"))).expect_partial()
    status.assert_existing_objects_matched()
    train_paths, _ = split_files(info, "train")
    val_paths, val_y = split_files(info, "val")
    val_images = [_decode_file(p, size).numpy() for p in val_paths]

    network = frozen_network(backbone, head, size)

    def convert(fmt: str, sample=()) -> tuple[bytes, float]:
        converter = tflite_converter(network, fmt, size, sample)
        started = time.perf_counter()
        model = converter.convert()
        return model, time.perf_counter() - started

    def accuracy(model: bytes) -> float:
        path = args.run / "calibration-bench.tflite"
        path.write_bytes(model)
        run = tflite_classifier(path)
        correct = sum(int(np.argmax(run(img)) == y) for img, y in zip(val_images, val_y))
        path.unlink()
        return correct / len(val_y)

    float_model, float_s = convert("float16")
    out = {"val_images": len(val_y), "train_images": len(train_paths),
           "float16": {"val_accuracy": accuracy(float_model), "convert_s": round(float_s, 2)},
           "int8": []}
    print(json.dumps(out["float16"]), flush=True)
    for n in args.sizes:
        for seed in args.seeds:
            model, seconds = convert("int8", calibration_sample(train_paths, n, seed))
            row = {"calibration_images": n, "seed": seed, "val_accuracy": accuracy(model),
                   "convert_s": round(seconds, 2)}
            out["int8"].append(row)
            print(json.dumps(row), flush=True)
    print("\n| calibration images | int8 val accuracy (mean, min-max over seeds) | convert s |")
    print("|---|---|---|")
    for n in args.sizes:
        rows = [r for r in out["int8"] if r["calibration_images"] == n]
        accs = [r["val_accuracy"] for r in rows]
        print(f"| {n} | {statistics.mean(accs):.4f} ({min(accs):.4f}-{max(accs):.4f}) | "
              f"{statistics.mean(r['convert_s'] for r in rows):.2f} |")
    print(f"float16 val accuracy {out['float16']['val_accuracy']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
