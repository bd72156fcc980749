"""GPU check for the training step: run on a machine that has a GPU.

    .venv/bin/python bench/gpu_check.py [--backbone HANDLE_OR_DIR] [--steps 30] [--batch-size 64]

Reports the devices TensorFlow sees, turns on memory growth (as the training step does), then
times a few training steps of the petalflow classifier (frozen backbone + head, and with the top
layers unfrozen) on random images, on the GPU and on the CPU, in images/s. Exits 1 when no GPU is
visible, so it can gate a GPU worker's readiness.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default=None,
                    help="TF Hub handle or SavedModel dir (default: a tiny exported backbone)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--fine-tune-layers", type=int, default=10)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import tempfile

    import tensorflow as tf

    from petalflow.tasks.model import (build_classifier, build_head, feature_dim, keras, load_backbone,
                             unfreeze_top_layers)
    from petalflow.tasks.train import configure_device

    device = configure_device()
    gpus = tf.config.list_physical_devices("GPU")
    report = {"device": device, "gpus": [g.name for g in gpus],
              "tensorflow": tf.__version__, "built_with_cuda": tf.test.is_built_with_cuda()}
    handle = args.backbone
    if handle is None:
        from tests.helpers import export_tiny_backbone

        handle = str(export_tiny_backbone(tempfile.mkdtemp() + "/tiny", args.image_size))
    k = keras()
    results = {}
    for where in (["/GPU:0"] if gpus else []) + ["/CPU:0"]:
        for mode in ("frozen", "fine-tune"):
            with tf.device(where):
                backbone = load_backbone(handle, trainable=mode == "fine-tune")
                if mode == "fine-tune":
                    unfreeze_top_layers(backbone, args.fine_tune_layers)
                else:
                    backbone.trainable = False
                head = build_head(feature_dim(backbone, args.image_size), 5)
                model = build_classifier(backbone, head, args.image_size)
                model.compile(optimizer=k.optimizers.Adam(1e-4),
                              loss="sparse_categorical_crossentropy")
                x = tf.random.uniform([args.batch_size, args.image_size, args.image_size, 3])
                y = tf.random.uniform([args.batch_size], 0, 5, dtype=tf.int32)
                model.train_on_batch(x, y)  # warm-up: tracing and kernel selection
                started = time.perf_counter()
                for _ in range(args.steps):
                    loss = model.train_on_batch(x, y)
                seconds = time.perf_counter() - started
            results[f"{where.strip('/')} {mode}"] = {
                "images_per_s": round(args.steps * args.batch_size / seconds, 1),
                "final_loss": float(loss)}
    report["training_steps"] = results
    print(json.dumps(report, indent=2))
    return 0 if gpus else 1


if __name__ == "__main__":
    sys.exit(main())
