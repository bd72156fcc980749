"""Should training weigh rare classes up (``balance_classes``)? Measured on an imbalanced cut of a
folder-per-class dataset.

On one dataset and backbone: petalflow's split (``--split-seed``, as ``petalflow train --seed``
makes it) and the backbone features of every split (``tasks.train.cached_features``: the
engine and images training uses). Then, for each class in turn and each share in ``--keep``,
the training split keeps only that share of the class's photos (seeded pick) and heads are
trained exactly as ``petalflow train`` trains them (dropout + dense, Adam at the default
learning rate, 5 epochs, batch 32) without and with ``tasks.train.class_weights``, over
``--seeds`` initialisation seeds. Evaluated on the validation and test photos together (every
class at its full share), reported as:
- accuracy there (= balanced accuracy: the classes are about the same size there);
- the cut class's recall;
- accuracy on the same imbalance as training (the cut class's rows weighed by the share), what
  a test split cut like the training one would report.

    .venv/bin/python bench/class_balance.py --data-root flower_photos \
        --backbone mobilenet_v2_035_224_feature_vector --keep 0.1,0.25 --seeds 3 \
        --json class_balance.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True, type=Path,
                    help="an extracted folder-per-class dataset")
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--keep", default="0.1,0.25", help="shares of the cut class kept")
    ap.add_argument("--split-seed", type=int, default=42)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    keeps = [float(k) for k in args.keep.split(",")]

    from petalflow.tasks.common import ENV_DEFAULTS

    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from petalflow.tasks.dataset import prepare_dataset, split_files
    from petalflow.tasks.features import FeatureExtractor
    from petalflow.tasks.model import build_head, keras, load_backbone
    from petalflow.tasks.params import TrainParams
    from petalflow.tasks.train import cached_features, class_weights

    k = keras()
    cfg = TrainParams(backbone=str(Path(args.backbone).resolve()), seed=args.split_seed)
    extract = FeatureExtractor(load_backbone(cfg.backbone), cfg.image_size, tflite=True)
    with tempfile.TemporaryDirectory(prefix="class-balance-") as tmp:
        info = prepare_dataset(args.data_root.resolve(), Path(tmp) / "manifest",
                               cfg.val_fraction, cfg.test_fraction, args.split_seed)
        feats = {}
        for split in ("train", "val", "test"):
            paths, labels = split_files(info, split)
            feats[split] = cached_features(extract, paths, labels, cfg,
                                           Path(tmp) / f"{split}.npz")[:2]
    classes = info["classes"]
    train_x, train_y = feats["train"]
    eval_x = np.concatenate([feats["val"][0], feats["test"][0]])
    eval_y = np.concatenate([feats["val"][1], feats["test"][1]])
    rng = np.random.default_rng(0)
    rows = []
    for cut, name in enumerate(classes):
        for keep in keeps:
            mine = np.flatnonzero(train_y == cut)
            dropped = rng.permutation(mine)[int(round(len(mine) * keep)):]
            kept = np.setdiff1d(np.arange(len(train_y)), dropped)
            x, y = train_x[kept], train_y[kept]
            for balanced in (False, True):
                weights = class_weights(y, len(classes)) if balanced else None
                runs = []
                for seed in range(1, args.seeds + 1):
                    k.utils.set_random_seed(seed)
                    head = build_head(x.shape[1], len(classes), seed=seed)
                    head.compile(optimizer=k.optimizers.Adam(cfg.learning_rate),
                                 loss="sparse_categorical_crossentropy")
                    head.fit(x, y, batch_size=cfg.batch_size, epochs=cfg.epochs, shuffle=True,
                             verbose=0, class_weight=weights)
                    right = np.argmax(head.predict(eval_x, verbose=0), 1) == eval_y
                    share = np.where(eval_y == cut, keep, 1.0)
                    runs.append((float(right.mean()), float(right[eval_y == cut].mean()),
                                 float((share * right).sum() / share.sum())))
                mean = np.mean(runs, axis=0)
                rows.append({"cut_class": name, "keep": keep, "balanced": balanced,
                             "train_images": int(len(y)), "cut_images": int(len(mine) - len(dropped)),
                             "accuracy": round(float(mean[0]), 4),
                             "cut_class_recall": round(float(mean[1]), 4),
                             "accuracy_same_imbalance": round(float(mean[2]), 4), "runs": runs})
                print(json.dumps({k_: v for k_, v in rows[-1].items() if k_ != "runs"}),
                      flush=True)

    print(f"\n{len(eval_y)} evaluation photos (validation + test, split seed {args.split_seed}); "
          f"means over {args.seeds} seeds\n")
    print("| cut class | kept | training | accuracy | cut class's recall | "
          "accuracy, same imbalance |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cut_class']} | {r['keep']:.0%} ({r['cut_images']}) | "
              f"{'balanced' if r['balanced'] else 'plain'} | {r['accuracy']:.4f} | "
              f"{r['cut_class_recall']:.4f} | {r['accuracy_same_imbalance']:.4f} |")
    summary = {}
    for balanced in (False, True):
        mine = [r for r in rows if r["balanced"] == balanced]
        summary["balanced" if balanced else "plain"] = {
            m: round(float(np.mean([r[m] for r in mine])), 4)
            for m in ("accuracy", "cut_class_recall", "accuracy_same_imbalance")}
    print("\nmean over every cut:", json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows,
                                         "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
