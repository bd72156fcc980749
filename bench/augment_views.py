"""How many augmented copies of the training features should ``--augment`` train the head on?

Measures what ``AUGMENTED_VIEWS`` (tasks/train.py) was chosen from: on one folder-per-class
dataset and backbone, for each split seed in ``--split-seeds`` (petalflow's split with that
seed, as ``petalflow train --seed`` makes it), the plain features and up to ``max(--views)``
augmented copies of the training split (``tasks.train.augmented_copy``: the augmentation and
seeds training uses) and, with ``--mirror``, a mirrored copy (every training photo flipped left
to right, nothing else); then heads trained exactly as ``petalflow train`` trains them (dropout
+ dense, Adam, 5 epochs, batch 32) on the plain features plus those copies, over
``--seeds`` initialisation seeds. The choice is made on the splits other than
``--report-seed`` (the split BENCHMARKS.md reports accuracies on: seed 42, the default), on
their validation and test photos together; the report split's figures are printed beside it,
not used.

    .venv/bin/python bench/augment_views.py --data-root flower_photos \
        --backbone mobilenet_v2_035_224_feature_vector --views 0,1,2 --mirror \
        --split-seeds 1,2,3,42 --seeds 5 --json views.json

With ``--policies``, the rows are instead plain features alone and plain features plus one
augmented copy made with each policy ``ROTATION:ZOOM_LOW-ZOOM_HIGH:CONTRAST`` (the settings of
``tasks/inputs.py``: rotation as a fraction of a full turn, the scale range — below 1 zooms in —
and the contrast factor's half-width), to choose the augmentation's settings the same way:

    .venv/bin/python bench/augment_views.py --data-root flower_photos \
        --backbone mobilenet_v2_035_224_feature_vector --split-seeds 1,2,3,4,5,6,42 \
        --policies 0.1:0.9-1.1:0.1,0:0.9-1.1:0.1,0.03:0.9-1.1:0.1,0:0.8-1.0:0.1,0:1-1:0,0.03:0.8-1.0:0.1 \
        --seeds 5 --json policies.json

With ``--flip-average``, every row also has a flip-averaged twin: the same heads scored on the
mean of their probabilities for each validation and test photo and for its mirror image
(flip test-time averaging; the mirrored photos' features computed as ``--mirror``'s are).
The rows without it are heads as ``--no-average-weights`` trains them (the last step's weights);
with ``--average-weights``, each also has a twin scored with the same fit's weights averaged
over its last epochs' steps, as ``petalflow train`` trains the head by default
(``tasks.train.WeightAverage``).
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
    ap.add_argument("--views", default="0,1,2")
    ap.add_argument("--mirror", action="store_true",
                    help="also rows with a mirrored copy (alone, and with one augmented copy)")
    ap.add_argument("--split-seeds", default="1,2,3,42")
    ap.add_argument("--report-seed", type=int, default=42)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--policies", default=None,
                    help="comma-separated ROTATION:ZOOM_LOW-ZOOM_HIGH:CONTRAST; one augmented "
                         "copy per policy instead of --views/--mirror")
    ap.add_argument("--flip-average", action="store_true",
                    help="also score every head with flip test-time averaging: the mean of its "
                         "probabilities for each validation and test photo and its mirror image")
    ap.add_argument("--average-weights", action="store_true",
                    help="also score every head with its weights averaged over the steps of its "
                         "last epochs, as average_weights trains it (tasks.train.WeightAverage), "
                         "from the same fit")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    views = [int(v) for v in args.views.split(",")]
    policies = [parse_policy(p) for p in args.policies.split(",")] if args.policies else []
    split_seeds = [int(s) for s in args.split_seeds.split(",")]

    from petalflow.tasks.common import ENV_DEFAULTS

    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import tensorflow as tf

    from petalflow.tasks import inputs
    from petalflow.tasks.dataset import prepare_dataset, split_files
    from petalflow.tasks.features import FeatureExtractor
    from petalflow.tasks.inputs import image_dataset
    from petalflow.tasks.model import build_head, keras, load_backbone
    from petalflow.tasks.params import TrainParams
    from petalflow.tasks.train import (
        WeightAverage, _validate_on_features, augmented_copy, cached_features,
    )

    defaults = (inputs.ROTATION, inputs.ZOOM, inputs.CONTRAST)
    k = keras()
    base = TrainParams(backbone=str(Path(args.backbone).resolve()))
    extract = FeatureExtractor(load_backbone(base.backbone), base.image_size)

    def mirrored(paths):
        ds = image_dataset(paths, None, base.image_size, base.batch_size)
        return np.concatenate([extract(tf.image.flip_left_right(b)) for b in ds])

    rows, seconds = [], {}
    for split_seed in split_seeds:
        cfg = base.model_copy(update={"seed": split_seed})
        with tempfile.TemporaryDirectory(prefix="augment-views-") as tmp:
            info = prepare_dataset(args.data_root.resolve(), Path(tmp) / "manifest",
                                   cfg.val_fraction, cfg.test_fraction, split_seed)
            feats = {}
            for split in ("train", "val", "test"):
                paths, labels = split_files(info, split)
                feats[split] = cached_features(extract, paths, labels, cfg,
                                               Path(tmp) / f"{split}.npz")[:2]
            flipped = {}
            if args.flip_average:
                for split in ("val", "test"):
                    flipped[split] = mirrored(split_files(info, split)[0])
            paths, labels = split_files(info, "train")
            train_x = feats["train"][0]
            if policies:
                variants = {"0": [train_x]}
                for n, policy in enumerate(policies):  # each its own cache folder: same seed
                    inputs.ROTATION, inputs.ZOOM, inputs.CONTRAST = policy
                    folder = Path(tmp) / f"policy{n}"
                    folder.mkdir()
                    started = time.time()
                    copy = augmented_copy(extract, paths, labels, cfg, folder, 0)[0]
                    seconds[f"split {split_seed}: {policy_name(policy)}"] = round(
                        time.time() - started, 2)
                    variants[f"1 ({policy_name(policy)})"] = [train_x, copy]
                inputs.ROTATION, inputs.ZOOM, inputs.CONTRAST = defaults
            else:
                started = time.time()
                copies = [augmented_copy(extract, paths, labels, cfg, Path(tmp), view)[0]
                          for view in range(max(views))]
                seconds[f"split {split_seed}: augmented copies"] = round(time.time() - started,
                                                                         2)
                variants = {str(n): [train_x, *copies[:n]] for n in views}
                if args.mirror:
                    started = time.time()
                    mirror = mirrored(paths)
                    seconds[f"split {split_seed}: mirrored copy"] = round(
                        time.time() - started, 2)
                    variants["mirror"] = [train_x, mirror]
                    variants["mirror + 1"] = [train_x, mirror, *copies[:1]]

        (train_x, train_y), (val_x, val_y), (test_x, test_y) = (feats[s] for s in
                                                               ("train", "val", "test"))
        for name, parts in variants.items():
            x, y = np.concatenate(parts), np.tile(train_y, len(parts))
            # (validation, test) accuracies per way of scoring the heads: the row's name suffix
            scores = {"": ([], [])}
            if args.average_weights:
                scores[", weights averaged"] = ([], [])
            if flipped:
                scores[", flip-averaged"] = ([], [])

            def accuracy(head, xs, ys, mirror=None) -> float:
                p = head.predict(xs, verbose=0)
                if mirror is not None:
                    p = (p + head.predict(mirror, verbose=0)) / 2
                return float(np.mean(np.argmax(p, 1) == ys))

            def score(head, suffix: str, flip: bool = False) -> None:
                for out, xs, ys, key in zip(scores[suffix], (val_x, test_x), (val_y, test_y),
                                            ("val", "test")):
                    out.append(accuracy(head, xs, ys, flipped[key] if flip else None))

            for seed in range(1, args.seeds + 1):
                k.utils.set_random_seed(seed)
                head = build_head(train_x.shape[1], len(info["classes"]), seed=seed)
                head.compile(optimizer=k.optimizers.Adam(cfg.learning_rate),
                             loss="sparse_categorical_crossentropy")
                average = WeightAverage(head) if args.average_weights else None
                steps = -(-len(x) // cfg.batch_size)
                head.fit(x, y, batch_size=cfg.batch_size, epochs=cfg.epochs, shuffle=True,
                         verbose=0,
                         callbacks=[average.callback(cfg.epochs, steps)] if average else [])
                score(head, "")
                if flipped:
                    score(head, ", flip-averaged", flip=True)
                if average:  # the same fit, its weights averaged as average_weights does
                    average.apply(_validate_on_features(head, val_x, val_y))
                    score(head, ", weights averaged")
            for suffix, (val, test) in scores.items():
                rows.append({"split_seed": split_seed, "copies": name + suffix,
                             "val_mean": round(float(np.mean(val)), 4),
                             "test_mean": round(float(np.mean(test)), 4),
                             "val": val, "test": test})
                print(json.dumps(rows[-1]), flush=True)

    names = list(dict.fromkeys(r["copies"] for r in rows))
    choice = [s for s in split_seeds if s != args.report_seed]
    print(f"\n| training features | choice splits (seeds {', '.join(map(str, choice))}): "
          f"validation + test, mean | split {args.report_seed}: validation | "
          f"split {args.report_seed}: test |")
    print("|---|---|---|---|")
    summary = []
    for name in names:
        mine = [r for r in rows if r["copies"] == name]
        chosen = [a for r in mine if r["split_seed"] in choice for a in r["val"] + r["test"]]
        report = [r for r in mine if r["split_seed"] == args.report_seed]
        summary.append({"copies": name,
                        "choice_mean": round(float(np.mean(chosen)), 4) if chosen else None,
                        "report_val": report[0]["val_mean"] if report else None,
                        "report_test": report[0]["test_mean"] if report else None})
        s = summary[-1]
        print(f"| {name} | {s['choice_mean']} | {s['report_val']} | {s['report_test']} |")
    print("features pass seconds:", json.dumps(seconds))
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "split_seeds": split_seeds,
                                         "report_seed": args.report_seed, "rows": rows,
                                         "summary": summary, "feature_seconds": seconds},
                                        indent=2))


def parse_policy(text: str) -> tuple:
    """'0.1:0.9-1.1:0.1' -> (0.1, (0.9, 1.1), 0.1): rotation, zoom range, contrast."""
    rotation, zoom, contrast = text.split(":")
    low, high = zoom.split("-")
    return float(rotation), (float(low), float(high)), float(contrast)


def policy_name(policy: tuple) -> str:
    rotation, (low, high), contrast = policy
    return f"rotation {rotation:g}, zoom {low:g}-{high:g}, contrast {contrast:g}"


if __name__ == "__main__":
    main()
