"""Which weights should the head end its training with? Ways of averaging them, compared.

What ``average_weights`` (``tasks/train.py``: ``AVERAGED_SHARE``) was chosen from. On one
folder-per-class dataset and backbone, for each split seed in ``--split-seeds`` (petalflow's
split with that seed), the plain features of the three splits and one augmented copy of the
training split are computed once (cached in ``--cache``); then, for each recipe, heads are
trained as ``petalflow train`` trains them (dropout + dense, Adam at 3e-3, 5 epochs, batch 32)
over ``--seeds`` initialisation seeds, on the plain features and on plain + augmented, and
scored on the validation and test photos. Recipes (``--recipes``, comma-separated):

- ``last``: the last step's weights (``--no-average-weights``);
- ``tail:F``: the mean of the weights after each step of the last fraction F of the steps
  (a running mean updated after every step, as ``tasks.train.WeightAverage`` keeps it);
- ``checked:F``: as ``tail:F``, kept only if its validation loss is not higher than the last
  step's weights' (what ``average_weights`` does: ``WeightAverage.apply``);
- ``ema:M``: Keras's exponential moving average of the weights (``use_ema``, momentum M);
- ``cosine``: the learning rate decayed to 0 over the steps (cosine), the last step's weights;
- ``seeds:K``: K heads trained apart (seeds 1..K: their own initialisation, dropout and order
  of the photos), their weights averaged into one (scored once per split, not per seed);
- ``joint:K``: K heads trained side by side on the same batches (one model, K outputs: their
  own initialisation and dropout, the same order), averaged;
- ``orders:K``: as ``joint:K``, each head on its own order of the photos.

Recipes for the augmented copy (run on plain + augmented only):

- ``cleantail:F``: the first epochs on plain + augmented, the last fraction F of the epochs on
  the plain features alone, their steps averaged (checked as ``checked``);
- ``pick:F``: each epoch, each photo once, its plain or its augmented features drawn at random
  (as many steps as plain features alone), the last fraction F of the steps averaged (checked);
- ``weighted:W``: plain + augmented, the augmented features' loss weighted W, the last 40 %
  of the steps averaged (checked).

The choice is made on the splits other than ``--report-seed`` (42, the split BENCHMARKS.md
reports accuracies on), validation and test photos together.

    .venv/bin/python bench/head_recipes.py --data-root flower_photos \\
        --backbone mobilenet_v2_035_224_feature_vector \\
        --recipes last,seeds:5,ema:0.9,ema:0.95,ema:0.98,cosine,tail:0.2,tail:0.4,tail:0.6
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True, type=Path,
                    help="an extracted folder-per-class dataset")
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--recipes", default="last,tail:0.4")
    ap.add_argument("--split-seeds", default="1,2,3,4,5,6,42")
    ap.add_argument("--report-seed", type=int, default=42)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--cache", type=Path, default=Path("head-recipes-features"),
                    help="folder for each split's features (reused by later invocations)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    split_seeds = [int(s) for s in args.split_seeds.split(",")]

    from petalflow.tasks.common import ENV_DEFAULTS

    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from petalflow.tasks.model import keras

    data = {s: split_features(args, s) for s in split_seeds}
    k = keras()
    choice = [s for s in split_seeds if s != args.report_seed]
    results = []
    for features in ("plain", "plain + 1 augmented copy"):
        for recipe in args.recipes.split(","):
            per_split = {}
            if features == "plain" and recipe.split(":")[0] in AUGMENTED_ONLY:
                continue
            for s in split_seeds:
                d = data[s]
                x = d["train_x"] if features == "plain" else np.concatenate(
                    [d["train_x"], d["aug_x"]])
                y = np.tile(d["train_y"], len(x) // len(d["train_y"]))
                classes = int(d["train_y"].max()) + 1
                scores = []
                if recipe.startswith("seeds:"):
                    heads = [train(k, x, y, seed, "last", classes)
                             for seed in range(1, int(recipe.split(":")[1]) + 1)]
                    averaged = heads[0]
                    averaged.set_weights(mean_weights([h.get_weights() for h in heads]))
                    scores.append(score(averaged, d))
                else:
                    for seed in range(1, args.seeds + 1):
                        scores.append(score(train(k, x, y, seed, recipe, classes, d), d))
                per_split[s] = np.mean(scores, axis=0).tolist()  # [validation, test]
            row = {"features": features, "recipe": recipe,
                   "choice_mean": round(float(np.mean([per_split[s] for s in choice])), 4),
                   "per_split": {str(s): [round(v, 4) for v in per_split[s]]
                                 for s in split_seeds}}
            if args.report_seed in per_split:
                row["report_val"], row["report_test"] = (round(v, 4)
                                                        for v in per_split[args.report_seed])
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n| training features | recipe | splits {', '.join(map(str, choice))}: validation"
          f" + test, mean | split {args.report_seed}: validation | test |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['features']} | {r['recipe']} | {r['choice_mean']:.4f} | "
              f"{r.get('report_val', '')} | {r.get('report_test', '')} |")
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "split_seeds": split_seeds,
                                         "results": results}, indent=2))


def split_features(args, split_seed: int) -> dict:
    """The split's plain features (train, val, test) and one augmented copy of its training
    features, as ``petalflow train`` computes them; cached in ``args.cache``."""
    cache = args.cache / f"split{split_seed}.npz"
    if not cache.exists():
        from petalflow.tasks.dataset import prepare_dataset, split_files
        from petalflow.tasks.features import FeatureExtractor
        from petalflow.tasks.model import load_backbone
        from petalflow.tasks.params import TrainParams
        from petalflow.tasks.train import augmented_copy, cached_features

        cfg = TrainParams(backbone=str(Path(args.backbone).resolve()), seed=split_seed)
        extract = FeatureExtractor(load_backbone(cfg.backbone), cfg.image_size)
        out = {}
        with tempfile.TemporaryDirectory(prefix="head-recipes-") as tmp:
            info = prepare_dataset(args.data_root.resolve(), Path(tmp) / "manifest",
                                   cfg.val_fraction, cfg.test_fraction, split_seed)
            for split in ("train", "val", "test"):
                paths, labels = split_files(info, split)
                out[f"{split}_x"], out[f"{split}_y"] = cached_features(
                    extract, paths, labels, cfg, Path(tmp) / f"{split}.npz")[:2]
            paths, labels = split_files(info, "train")
            out["aug_x"] = augmented_copy(extract, paths, labels, cfg, Path(tmp), 0)[0]
        args.cache.mkdir(parents=True, exist_ok=True)
        np.savez(cache, **out)
    with np.load(cache) as loaded:
        return dict(loaded)


def mean_weights(weights: list) -> list:
    return [np.mean([w[i] for w in weights], axis=0) for i in range(len(weights[0]))]


def score(head, d: dict) -> list:
    return [float(np.mean(np.argmax(head.predict(d[f"{s}_x"], verbose=0), 1) == d[f"{s}_y"]))
            for s in ("val", "test")]


AUGMENTED_ONLY = ("cleantail", "pick", "weighted")


def train(k, x, y, seed: int, recipe: str, classes: int, d: Optional[dict] = None,
          epochs: int = 5, batch: int = 32, rate: float = 3e-3):
    from petalflow.tasks.model import build_head
    from petalflow.tasks.train import WeightAverage, _validate_on_features

    name, _, value = recipe.partition(":")
    if name in AUGMENTED_ONLY:  # x, y: the plain and augmented features, as main made them
        return augmented_recipe(k, x, y, d, seed, name, float(value), classes, epochs, batch,
                                rate)
    if name in ("joint", "orders"):
        return side_by_side(k, x, y, seed, int(value), classes, name == "orders", epochs,
                            batch, rate)
    k.utils.set_random_seed(seed)
    head = build_head(x.shape[1], classes, seed=seed)
    steps = -(-len(x) // batch)
    optimizer = {"ema": lambda: k.optimizers.Adam(rate, use_ema=True,
                                                  ema_momentum=float(value or 0.99)),
                 "cosine": lambda: k.optimizers.Adam(
                     k.optimizers.schedules.CosineDecay(rate, epochs * steps)),
                 }.get(name, lambda: k.optimizers.Adam(rate))()
    head.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    callbacks = []
    if name in ("tail", "checked"):
        average = WeightAverage(head)
        callbacks.append(average.callback(epochs, steps, float(value)))
    head.fit(x, y, batch_size=batch, epochs=epochs, shuffle=True, verbose=0,
             callbacks=callbacks)
    if name == "tail":  # the average whatever it scores: validation that always prefers it
        average.apply(lambda: {"val_loss": 0.0})
    if name == "checked":
        average.apply(_validate_on_features(head, d["val_x"], d["val_y"]))
    return head


def augmented_recipe(k, both_x, both_y, d: dict, seed: int, name: str, value: float,
                     classes: int, epochs: int, batch: int, rate: float):
    """The ``cleantail``, ``pick`` and ``weighted`` recipes (module docstring); ``both_x``,
    ``both_y``: the plain features followed by the augmented copy's, and their labels."""
    from petalflow.tasks.model import build_head
    from petalflow.tasks.train import AVERAGED_SHARE, WeightAverage, _validate_on_features

    k.utils.set_random_seed(seed)
    plain, augmented, y = d["train_x"], d["aug_x"], d["train_y"]
    head = build_head(plain.shape[1], classes, seed=seed)
    head.compile(optimizer=k.optimizers.Adam(rate), loss="sparse_categorical_crossentropy")
    average = WeightAverage(head)
    if name == "cleantail":
        clean = max(1, int(round(epochs * value)))
        if epochs > clean:
            head.fit(both_x, both_y, batch_size=batch, epochs=epochs - clean, shuffle=True,
                     verbose=0)
        head.fit(plain, y, batch_size=batch, epochs=clean, shuffle=True, verbose=0,
                 callbacks=[average.callback(clean, -(-len(plain) // batch), 1.0)])
    elif name == "pick":
        rng = np.random.default_rng(seed)
        callback = average.callback(epochs, -(-len(plain) // batch), value)
        for epoch in range(epochs):
            take = rng.random(len(plain)) < 0.5
            x = np.where(take[:, None], augmented, plain)
            head.fit(x, y, batch_size=batch, epochs=epoch + 1, initial_epoch=epoch,
                     shuffle=True, verbose=0, callbacks=[callback])
    else:  # weighted
        weights = np.concatenate([np.ones(len(plain)), np.full(len(plain), value)])
        head.fit(both_x, both_y, sample_weight=weights, batch_size=batch, epochs=epochs,
                 shuffle=True, verbose=0,
                 callbacks=[average.callback(epochs, -(-len(both_x) // batch), AVERAGED_SHARE)])
    average.apply(_validate_on_features(head, d["val_x"], d["val_y"]))
    return head


def side_by_side(k, x, y, seed: int, count: int, classes: int, own_orders: bool, epochs: int,
                 batch: int, rate: float):
    """``count`` heads in one model, each its own output and loss (so each learns as if
    alone), on the same batches or (``own_orders``) each on its own order; averaged."""
    from petalflow.tasks.model import build_head

    k.utils.set_random_seed(seed)
    inputs, outputs = [], []
    shared = k.Input(shape=(x.shape[1],))
    for i in range(count):
        source = k.Input(shape=(x.shape[1],)) if own_orders else shared
        inputs.append(source)
        hidden = k.layers.Dropout(0.2, seed=seed * 100 + i)(source)
        outputs.append(k.layers.Dense(
            classes, activation="softmax", name=f"head{i}",
            kernel_initializer=k.initializers.GlorotUniform(seed=seed * 100 + i))(hidden))
    model = k.Model(inputs if own_orders else shared, outputs)
    model.compile(optimizer=k.optimizers.Adam(rate),
                  loss=["sparse_categorical_crossentropy"] * count)
    if own_orders:
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            orders = [rng.permutation(len(x)) for _ in range(count)]
            model.fit([x[o] for o in orders], [y[o] for o in orders], batch_size=batch,
                      epochs=1, shuffle=False, verbose=0)
    else:
        model.fit(x, [y] * count, batch_size=batch, epochs=epochs, shuffle=True, verbose=0)
    head = build_head(x.shape[1], classes, seed=seed)
    head.set_weights(mean_weights([model.get_layer(f"head{i}").get_weights()
                                   for i in range(count)]))
    return head


if __name__ == "__main__":
    main()
