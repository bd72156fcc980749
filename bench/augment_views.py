"""How many augmented copies of the training features should ``--augment`` train the head on?

Measures what ``AUGMENTED_VIEWS`` (tasks/train.py) was chosen from: on one folder-per-class
dataset and backbone, the plain features of petalflow's split (seed 42) and up to ``--max-views``
augmented copies of the training split (the same augmentation and seeds training uses), then
heads trained exactly as ``petalflow train`` trains them (dropout + dense, Adam, 5 epochs,
batch 32) on the plain features plus 0, 1, 2, … copies, over several initialisation seeds.
The choice is made on validation accuracy; test accuracy is printed beside it, not used.

    .venv/bin/python bench/augment_views.py --data-root flower_photos \
        --backbone mobilenet_v2_035_224_feature_vector --views 0,1,2,4 --seeds 5
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True, type=Path,
                    help="an extracted folder-per-class dataset")
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--views", default="0,1,2,4")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    views = [int(v) for v in args.views.split(",")]

    from petalflow.tasks.common import ENV_DEFAULTS

    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from petalflow.tasks.dataset import prepare_dataset, split_files
    from petalflow.tasks.features import FeatureExtractor
    from petalflow.tasks.model import build_head, keras, load_backbone
    from petalflow.tasks.params import TrainParams
    from petalflow.tasks.train import augmented_copy, cached_features

    cfg = TrainParams(backbone=str(Path(args.backbone).resolve()))
    k = keras()
    with tempfile.TemporaryDirectory(prefix="augment-views-") as tmp:
        info = prepare_dataset(args.data_root.resolve(), Path(tmp) / "manifest",
                               cfg.val_fraction, cfg.test_fraction, cfg.seed)
        k.utils.set_random_seed(cfg.seed)
        extract = FeatureExtractor(load_backbone(cfg.backbone), cfg.image_size)
        feats, seconds = {}, {}
        for split in ("train", "val", "test"):
            paths, labels = split_files(info, split)
            started = time.time()
            feats[split] = cached_features(extract, paths, labels, cfg,
                                           Path(tmp) / f"{split}.npz")[:2]
            seconds[split] = round(time.time() - started, 2)
        paths, labels = split_files(info, "train")
        copies = []
        for view in range(max(views)):
            started = time.time()
            copies.append(augmented_copy(extract, paths, labels, cfg, Path(tmp), view)[0])
            seconds[f"augmented copy {view + 1}"] = round(time.time() - started, 2)

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (feats[s] for s in
                                                           ("train", "val", "test"))
    rows = []
    for n in views:
        x = np.concatenate([train_x, *copies[:n]])
        y = np.tile(train_y, n + 1)
        val, test = [], []
        for seed in range(1, args.seeds + 1):
            k.utils.set_random_seed(seed)
            head = build_head(train_x.shape[1], len(info["classes"]), seed=seed)
            head.compile(optimizer=k.optimizers.Adam(cfg.learning_rate),
                         loss="sparse_categorical_crossentropy", metrics=["accuracy"])
            head.fit(x, y, batch_size=cfg.batch_size, epochs=cfg.epochs, shuffle=True, verbose=0)
            val.append(float(np.mean(np.argmax(head.predict(val_x, verbose=0), 1) == val_y)))
            test.append(float(np.mean(np.argmax(head.predict(test_x, verbose=0), 1) == test_y)))
        rows.append({"copies": n, "val_mean": round(float(np.mean(val)), 4),
                     "val_sd": round(float(np.std(val)), 4),
                     "test_mean": round(float(np.mean(test)), 4),
                     "test_sd": round(float(np.std(test)), 4), "val": val, "test": test})
    print("| augmented copies | validation accuracy (mean ± sd) | test accuracy (mean ± sd) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['copies']} | {r['val_mean']:.4f} ± {r['val_sd']:.4f} | "
              f"{r['test_mean']:.4f} ± {r['test_sd']:.4f} |")
    print("features pass seconds:", json.dumps(seconds))
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "rows": rows,
                                         "feature_seconds": seconds,
                                         "images": {s: int(len(feats[s][1])) for s in feats}},
                                        indent=2))


if __name__ == "__main__":
    main()
