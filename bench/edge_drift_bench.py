"""Edge models and drift, measured on a real folder-per-class dataset.

1. ``petalflow train`` on the whole dataset (edge export on, the default) into a fresh
   PETALFLOW_HOME and SQLite MLflow store; the run's summary holds, per format (SavedModel,
   TFLite float16, TFLite int8), the test-split accuracy, size and latency. They are printed.
2. Drift, through the registered model's own interface (``mlflow.pyfunc.load_model(...)
   .predict(images, params={"output": "drift"})``), on random samples of n images
   (n = 20, 50, 100, 200; ``--repeats`` samples each):
   - ``held-out``: the test split (photos the model never saw, same distribution);
   - ``one class``: held-out photos (validation and test splits) of a single class, the class
     drawn at random for each sample: photos like the training ones, in another class mix;
   - ``grayscale``, ``rotated`` (a quarter turn), ``grayscale+rotated``, ``dark`` (x0.4):
     the same test photos, transformed;
   - ``phone size`` (enlarged 8x: 2560 x 1920 for a 320 x 240 photo, the same picture; the
     model's features and accuracy barely move), ``half size`` and ``thumbnail`` (at most
     80 px a side: the model sees them upscaled, blurred): the same test photos resized;
   - ``unseen class``: a second ``petalflow train`` without one class (``--hold-out-class``,
     default: the last class folder), whose drift is measured on that class's photos, against
     its own held-out test photos as the in-distribution reference.
   The threshold (``DRIFT_THRESHOLD`` in tasks/serving.py) must sit above every held-out score
   and below the shifted ones: the table shows min / median / max per condition and n.
3. Small training sets (``--small N``, repeatable): ``petalflow train`` on N photos per class
   (seeded pick), drift on the photos it did not get (same distribution, never seen: its drift
   reference holds only its training split), on them in grayscale, and, from a second model
   trained on N per class without the held-out class, on that class's photos.
   ``--skip-full`` runs only this part.

    .venv/bin/python bench/edge_drift_bench.py --archive flower_photos_1500.tgz \
        --backbone mobilenet_v2_035_224_feature_vector [--small 10 --small 30] \
        [--skip-full] --json edge_drift.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SIZES = (20, 50, 100, 200)


def train(data_url: str, backbone: str, home: Path, name: str, edge: bool) -> dict:
    env = dict(os.environ, PETALFLOW_HOME=str(home / "home"),
               MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}")
    home.mkdir(parents=True, exist_ok=True)
    summary = home / f"{name}.json"
    cmd = [str(BIN / "petalflow"), "train", "--data-url", data_url, "--backbone", backbone,
           "--model-name", name, "--summary-json", str(summary)]
    if not edge:
        cmd.append("--no-edge-export")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def test_files(summary: dict, splits=("test",)) -> list[Path]:
    return [path for path, _ in labelled_files(summary, splits)]


def labelled_files(summary: dict, splits=("test",)) -> list[tuple[Path, str]]:
    import pandas as pd

    manifest = pd.read_csv(summary["manifest"], keep_default_na=False)
    root = Path(json.loads((Path(summary["manifest"]).parent / "dataset.json").read_text())
                ["data_root"])
    rows = manifest[(manifest["status"] == "ok") & manifest["split"].isin(splits)]
    return [(root / p, label) for p, label in zip(rows["path"], rows["label"])]


def transform(path: Path, kind: str) -> bytes:
    from PIL import Image, ImageEnhance

    img = Image.open(path).convert("RGB")
    if "grayscale" in kind:
        img = img.convert("L").convert("RGB")
    if "rotated" in kind:
        img = img.rotate(90, expand=True)
    if kind == "dark":
        img = ImageEnhance.Brightness(img).enhance(0.4)
    if kind == "phone size":
        img = img.resize((img.width * 8, img.height * 8), Image.LANCZOS)
    if kind == "half size":
        img = img.resize((img.width // 2, img.height // 2), Image.LANCZOS)
    if kind == "thumbnail":
        img.thumbnail((80, 80), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def scores(model, images, repeats: int, seed: int, threshold: float, sizes=SIZES) -> dict:
    """Drift of ``repeats`` random samples of n ``images`` for each n in ``sizes``. ``images``
    is a list of encoded images, or a dict of such lists (one per class): each sample then
    comes from one of them, drawn at random."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    groups = list(images.values()) if isinstance(images, dict) else [images]
    out = {}
    for n in sizes:
        if n > min(len(g) for g in groups):
            continue
        values, parts = [], []
        for _ in range(repeats):
            group = groups[rng.integers(len(groups))]
            pick = rng.choice(len(group), n, replace=False)
            frame = model.predict(pd.DataFrame({"image": [
                base64.b64encode(group[i]).decode() for i in pick]}),
                params={"output": "drift"})
            values.append(float(frame["drift_score"].iloc[0]))
            parts.append((float(frame["feature_drift"].iloc[0]),
                          float(frame["image_drift"].iloc[0])))
        out[n] = {"min": min(values), "median": float(np.median(values)), "max": max(values),
                  "over_threshold": float(np.mean([v > threshold for v in values])),
                  "feature_median": float(np.median([p[0] for p in parts])),
                  "image_median": float(np.median([p[1] for p in parts])),
                  "values": values}
    return out


def full_and_unseen(args, work: Path, root: Path, held: str, result: dict) -> None:
    """Parts 1 and 2: the whole archive, then the model trained without ``held``."""
    import mlflow

    from petalflow.tasks.serving import DRIFT_THRESHOLD

    full = train(str(args.archive.resolve()), args.backbone, work / "full", "edge-bench",
                 edge=True)
    result["edge"] = full["edge"]
    result["timings"] = full["timings"]
    mlflow.set_tracking_uri(f"sqlite:///{work / 'full' / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(full["model_uri"])
    held_out = test_files(full)
    conditions = {"held-out": [p.read_bytes() for p in held_out]}
    by_class: dict = {}
    for path, label in labelled_files(full, ("val", "test")):
        by_class.setdefault(label, []).append(path.read_bytes())
    conditions["one class (held-out photos)"] = by_class
    for kind in ("grayscale", "rotated", "grayscale+rotated", "dark", "phone size", "half size",
                 "thumbnail"):
        conditions[kind] = [transform(p, kind) for p in held_out]
    result["drift"].update({k: scores(model, v, args.repeats, 1, DRIFT_THRESHOLD, args.sizes)
                            for k, v in conditions.items()})

    # Unseen class: train without one class folder, measure on its photos.
    data = work / "without"
    shutil.copytree(root, data, ignore=lambda d, names: [held] if Path(d) == root else [])
    part = train(str(data), args.backbone, work / "part", "edge-bench-part", edge=False)
    mlflow.set_tracking_uri(f"sqlite:///{work / 'part' / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model(part["model_uri"])
    result["drift"][f"held-out (model without {held})"] = scores(
        model, [p.read_bytes() for p in test_files(part)], args.repeats, 2, DRIFT_THRESHOLD,
        args.sizes)
    result["drift"][f"unseen class {held}"] = scores(
        model, [p.read_bytes() for p in sorted((root / held).iterdir())], args.repeats, 3,
        DRIFT_THRESHOLD, args.sizes)


def small_training_set(args, work: Path, root: Path, classes: list, held: str, per_class: int,
                       result: dict) -> None:
    """Part 3: models trained on ``per_class`` photos per class (with and without ``held``);
    drift on photos they never got."""
    import mlflow

    from petalflow.tasks.serving import DRIFT_THRESHOLD

    rng = np.random.default_rng(per_class)
    picked, rest = {}, []
    for c in classes:
        files = sorted((root / c).iterdir())
        order = rng.permutation(len(files))
        picked[c] = [files[i] for i in order[:per_class]]
        rest += [files[i] for i in order[per_class:]] if c != held else []
    for name, keep in (("small", classes), ("small-without", [c for c in classes if c != held])):
        data = work / f"{name}-{per_class}" / "photos"
        for c in keep:
            (data / c).mkdir(parents=True)
            for f in picked[c]:
                shutil.copyfile(f, data / c / f.name)
        summary = train(str(data), args.backbone, work / f"{name}-{per_class}",
                        f"{name}-{per_class}", edge=False)
        mlflow.set_tracking_uri(f"sqlite:///{work / f'{name}-{per_class}' / 'mlflow.db'}")
        model = mlflow.pyfunc.load_model(summary["model_uri"])
        label = f"{per_class} per class"
        if name == "small":
            unseen_rest = [p.read_bytes() for p in rest]
            result["drift"][f"{label}: photos it never got"] = scores(
                model, unseen_rest, args.repeats, 4, DRIFT_THRESHOLD, args.sizes)
            result["drift"][f"{label}: those in grayscale"] = scores(
                model, [transform(p, "grayscale") for p in rest], args.repeats, 5,
                DRIFT_THRESHOLD, args.sizes)
        else:
            others = set(picked[held])
            result["drift"][f"{label} without {held}: {held} photos"] = scores(
                model, [p.read_bytes() for p in sorted((root / held).iterdir())
                        if p not in others], args.repeats, 6, DRIFT_THRESHOLD, args.sizes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archive", type=Path, required=True)
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--hold-out-class", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--small", type=int, action="append", default=[],
                    help="also train on this many photos per class (repeatable)")
    ap.add_argument("--skip-full", action="store_true", help="only the --small part")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)),
                    help="sample sizes n, comma-separated (default: %(default)s)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.sizes = tuple(int(n) for n in args.sizes.split(","))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from petalflow.tasks.serving import DRIFT_THRESHOLD

    work = Path(tempfile.mkdtemp(prefix="edge-drift-"))
    result = {"command": " ".join(sys.argv), "machine": f"{platform.node()} "
              f"({os.cpu_count()} CPUs)", "threshold": DRIFT_THRESHOLD}
    result["drift"] = {}
    try:
        with tarfile.open(args.archive) as tar:
            tar.extractall(work / "data", filter="data")
        root = next(p for p in (work / "data").rglob("*")
                    if p.is_dir() and sum(1 for c in p.iterdir() if c.is_dir()) >= 2)
        classes = sorted(c.name for c in root.iterdir() if c.is_dir())
        held = args.hold_out_class or classes[-1]
        if not args.skip_full:
            full_and_unseen(args, work, root, held, result)
        for n in args.small:
            small_training_set(args, work, root, classes, held, n, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"command: {result['command']}\nmachine: {result['machine']}\n")
    print("| format | test accuracy | size (MB) | latency (ms/image) |\n|---|---|---|---|")
    for row in result.get("edge", []):
        print(f"| {row['format']} | {row['test_accuracy']:.4f} | {row['size_mb']:.2f} | "
              f"{row['latency_ms']:.1f} |")
    print(f"\ndrift score (threshold {DRIFT_THRESHOLD}): min / median / max of "
          f"{args.repeats} samples\n")
    print("| condition | " + " | ".join(f"n={n}" for n in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for cond, by_n in result["drift"].items():
        cells = [f"{v['min']:.2f} / {v['median']:.2f} / {v['max']:.2f}" if (v := by_n.get(n))
                 else "-" for n in args.sizes]
        print(f"| {cond} | " + " | ".join(cells) + " |")
    print("\nshare of samples over the threshold; median feature / image drift\n")
    print("| condition | " + " | ".join(f"n={n}" for n in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    for cond, by_n in result["drift"].items():
        cells = [f"{v['over_threshold']:.0%}; {v['feature_median']:.2f} / "
                 f"{v['image_median']:.2f}" if (v := by_n.get(n)) else "-" for n in args.sizes]
        print(f"| {cond} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
