"""Evaluate the exported model on the held-out test split.

Runs the exact artifact that will be registered (the serving SavedModel) on the test files and
writes pandas tables: per-class precision/recall/F1/support and the confusion matrix (CSV), a
confusion-matrix PNG and a markdown report, all in ``out_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pandas as pd
from prefect import task

from petalflow.tasks.common import log, release_memory
from petalflow.tasks.dataset import (
    DatasetInfo, load_manifest, reads_exif, split_files, split_shas, unchanged_data,
)
from petalflow.tasks.edge import LATENCY_IMAGES, latency_ms
from petalflow.tasks.registry import MLFLOW_RETRY
from petalflow.tasks.space import disk_full_said

# Test images per call of the SavedModel. Its memory grows with the rows of a call (serving.py,
# CALL_ROWS): at 8 the evaluation stays below the freeze's peak instead of setting the train
# command's (MobileNetV2 0.35, first call over the loaded model: +127 MiB at 8, +188 at 16,
# ~115 more at 32; the evaluation phase no slower; BENCHMARKS.md, target 1).
EVAL_BATCH = 8
# Markdown shows the whole confusion matrix up to this many classes, else its most frequent
# confusions (``confusion_markdown``).
MARKDOWN_MATRIX_CLASSES = 20
TOP_CONFUSIONS = 20


def classification_tables(
    y_true: Sequence[int], y_pred: Sequence[int], class_names: list[str]
) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """(metrics, per-class table, confusion matrix) for integer labels indexing class_names.

    Confusion matrix: rows are true classes, columns predicted classes, in class_names order.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n = len(class_names)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    per_class = pd.DataFrame(
        {"class": class_names, "precision": precision, "recall": recall, "f1": f1,
         "support": support}
    )
    confusion = pd.DataFrame(cm, index=pd.Index(class_names, name="true"),
                             columns=pd.Index(class_names, name="predicted"))
    metrics = {
        "test_accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "test_macro_precision": float(precision.mean()),
        "test_macro_recall": float(recall.mean()),
        "test_macro_f1": float(f1.mean()),
        "test_images": int(cm.sum()),
        # What answering the most common class for every image would score: the figure a model
        # must beat to have learned anything (0.95 on a split of 95 % "ok" photos).
        "test_majority_accuracy": majority_baseline(per_class)["accuracy"],
    }
    metrics["test_accuracy_low"], metrics["test_accuracy_high"] = accuracy_interval(
        int(tp.sum()), int(cm.sum()))
    return metrics, per_class, confusion


def accuracy_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % (Wilson score) interval of an accuracy of ``correct`` in ``n`` test images:
    where the model's accuracy on photos like them may lie. 8 of 9 right: 0.56-0.98; 194 of
    225: 0.81-0.90. (0, 1) for no images."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


# Wider than this, a 95 % interval of the test accuracy makes the run warn that its decision
# rests on too few test images (0.2: about 40-60 images at the accuracies seen here).
WIDE_INTERVAL = 0.2


def interval_words(metrics: dict) -> str:
    """" (95 % interval 0.56-0.98)" for metrics that hold the interval; "" for others (a
    summary written before it existed)."""
    if "test_accuracy_low" not in metrics:
        return ""
    return f" (95 % interval {_interval(metrics)})"


def accuracy_sentence(metrics: dict) -> str:
    """"Accuracy **0.8622** on 225 held-out images (95 % interval 0.81–0.90); macro F1 0.8600."
    (the evaluation report's and the model card's)."""
    return (f"Accuracy **{metrics['test_accuracy']:.4f}** on {metrics['test_images']} held-out "
            f"images{interval_words(metrics)}; macro F1 {metrics['test_macro_f1']:.4f}.")


def _interval(metrics: dict) -> str:
    """"0.56–0.98": the test accuracy's interval in ``metrics``."""
    return f"{metrics['test_accuracy_low']:.2f}–{metrics['test_accuracy_high']:.2f}"


def few_test_images(metrics: dict) -> Optional[str]:
    """The warning for a test split too small to judge a model by, else None."""
    if metrics.get("test_accuracy_high", 1.0) - metrics.get("test_accuracy_low", 0.0) \
            <= WIDE_INTERVAL:
        return None
    return (f"the test split holds {metrics['test_images']} images: its accuracy "
            f"{metrics['test_accuracy']:.4f} says only that the model's lies in "
            f"{_interval(metrics)} (95 %), and "
            "the quality gate and the champion decision rest on it; more photos per class, or a "
            "larger --test-fraction, make them firmer")


def majority_baseline(per_class: pd.DataFrame) -> dict:
    """The test split's most common class (the first in model order on a tie) and the accuracy
    of answering it for every image: {"class": name, "accuracy": share}."""
    row = per_class.loc[per_class["support"].idxmax()]
    return {"class": str(row["class"]),
            "accuracy": float(row["support"] / max(per_class["support"].sum(), 1))}


CELL = 48  # pixels per cell of the confusion matrix image, up to GRID_PIXELS / CELL classes
GRID_PIXELS = 2400  # with more classes the cells shrink so the grid stays this wide
LABEL_CHARS = 40  # longer class names are cut (with "…") in the image; the CSV has them whole


def read_per_class(path: Path) -> pd.DataFrame:
    """``per_class.csv`` as ``evaluate_model`` wrote it: class names stay the text they are (read
    as pandas guesses, a class folder "None" or "NA" became a missing value and "007" the
    number 7)."""
    return pd.read_csv(path, dtype={"class": str}, keep_default_na=False)


def _font(size: int):
    """DejaVu Sans (matplotlib's font, found without importing matplotlib: it covers accented and
    most non-Latin class names), else Pillow's own font."""
    from importlib.util import find_spec

    from PIL import ImageFont

    spec = find_spec("matplotlib")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        ttf = Path(folder) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if ttf.is_file():
            return ImageFont.truetype(str(ttf), size)
    return ImageFont.load_default(size=size)


def _label(name) -> str:
    name = str(name)
    return name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1] + "…"


def plot_confusion(confusion: pd.DataFrame, path: Path) -> None:
    """Write the confusion matrix as an annotated PNG heat map: rows true classes (names on the
    left), columns predicted ones (names below, vertical), white to dark blue with the count.

    Drawn with Pillow, which the image pipeline loads anyway: matplotlib's import and figure
    cost the evaluation ~0.4 s and ~37 MiB that stayed for the rest of the run (BENCHMARKS.md,
    target 1)."""
    from PIL import Image, ImageDraw

    values = confusion.to_numpy()
    n = len(values)
    cell = max(4, min(CELL, GRID_PIXELS // max(n, 1)))  # hundreds of classes: a bounded image
    counts = cell >= 24  # room for the count in each cell
    font = _font(13 if cell >= 16 else max(6, cell - 2))
    rows = [_label(x) for x in confusion.index]
    cols = [_label(x) for x in confusion.columns]
    text_w = lambda text: int(font.getlength(text)) + 1  # noqa: E731
    text_h = int(getattr(font, "size", 11)) + 6  # a line of this font, for rotated labels
    left = max(map(text_w, rows), default=0) + 40
    below = max(map(text_w, cols), default=0) + 40
    top = 12
    img = Image.new("RGB", (left + n * cell + 12, top + n * cell + below), "white")
    draw = ImageDraw.Draw(img)
    light, dark = np.array([247, 251, 255]), np.array([8, 48, 107])
    peak = values.max(initial=0) or 1
    for i in range(n):
        for j in range(n):
            v = int(values[i, j])
            x, y = left + j * cell, top + i * cell
            fill = tuple(int(c) for c in light + (dark - light) * (v / peak))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fill)
            if counts:
                draw.text((x + cell / 2, y + cell / 2), str(v), font=font, anchor="mm",
                          fill="white" if v > peak / 2 else "black")
    for i, name in enumerate(rows):
        draw.text((left - 6, top + i * cell + cell / 2), name, font=font, anchor="rm",
                  fill="black")
    for j, name in enumerate(cols):
        label = Image.new("RGB", (text_w(name), text_h), "white")
        ImageDraw.Draw(label).text((0, text_h / 2), name, font=font, anchor="lm", fill="black")
        label = label.rotate(90, expand=True)
        img.paste(label, (left + j * cell + (cell - label.width) // 2, top + n * cell + 6))
    draw.text((left + n * cell / 2, img.height - 6), "predicted", font=font, anchor="md",
              fill="black")
    title = Image.new("RGB", (text_w("true"), text_h), "white")
    ImageDraw.Draw(title).text((0, text_h / 2), "true", font=font, anchor="lm", fill="black")
    title = title.rotate(90, expand=True)
    img.paste(title, (6, top + (n * cell - title.height) // 2))
    img.save(path)


def markdown_report(metrics: dict, per_class: pd.DataFrame, confusion: pd.DataFrame) -> str:
    """Human-readable evaluation summary (for the Prefect UI and MLflow)."""
    lines = [
        "# Test-set evaluation",
        "",
        accuracy_sentence(metrics),
        "",
        majority_line(majority_baseline(per_class)),
        "",
        "## Per class",
        "",
        markdown_table(per_class.round(3)),
        "",
        "## Confusion matrix (rows: true, columns: predicted)",
        "",
        *confusion_markdown(confusion),
    ]
    return "\n".join(lines)


def majority_line(majority: dict) -> str:
    """The majority baseline in words (the report and the model card)."""
    return (f"Answering '{majority['class']}' (the most common class) for every image would score "
            f"{majority['accuracy']:.4f}: the quality gate promotes only a model that beats it.")


def confusion_markdown(confusion: pd.DataFrame) -> list[str]:
    """Markdown lines for the confusion matrix ``confusion`` (rows: true classes, columns:
    predicted, in the same order): the whole table up to ``MARKDOWN_MATRIX_CLASSES`` classes;
    beyond, the ``TOP_CONFUSIONS`` most frequent confusions (a matrix of 400 classes is 160,000
    cells, ~0.7 MB of markdown in the report, its Prefect artifact and the model card;
    confusion.csv and confusion.png keep all of it)."""
    n = len(confusion)
    if n <= MARKDOWN_MATRIX_CLASSES:
        return [markdown_table(confusion.rename_axis("true \\ predicted").reset_index())]
    counts = confusion.to_numpy().copy()
    np.fill_diagonal(counts, 0)  # confusions only
    order = np.argsort(-counts, axis=None, kind="stable")[:TOP_CONFUSIONS]
    rows = [(confusion.index[i], confusion.columns[j], int(counts[i, j]))
            for i, j in zip(*np.unravel_index(order, counts.shape)) if counts[i, j] > 0]
    if not rows:
        return [f"{n} classes: no test image was classified as another class."]
    table = pd.DataFrame(rows, columns=["true", "predicted as", "images"])
    return [f"{n} classes: the whole matrix is in confusion.csv and confusion.png; here, the "
            f"{len(rows)} most frequent confusions.", "", markdown_table(table)]


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-style markdown table of ``frame`` (no index)."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


# A model's predictions for the test images, by their sha256 (``evaluate_model``'s ``record``):
# the champion, compared with each new version on that run's test split, is run only on the
# images it has not classified before. The test split of data that grew is mostly the one
# before (``dataset.split_dataset`` ranks each image by its digest), so a retraining on grown
# data no longer runs the champion over every test image. The records used last are kept.
PREDICTION_RECORDS = 8


def prediction_record(records_dir: Path, run_id: str) -> Path:
    """Where the predictions of the model trained by MLflow run ``run_id`` are recorded: per
    TensorFlow version (the runtime that ran the model's graph)."""
    from importlib.metadata import version

    return Path(records_dir) / f"{run_id}-tensorflow-{version('tensorflow')}.csv"


def _read_record(path: Path, columns: list[str]) -> pd.DataFrame:
    """A record's rows by sha256 (empty when it is missing, unreadable or of other columns)."""
    try:
        rows = pd.read_csv(path, keep_default_na=False, index_col="sha256",
                           dtype={"sha256": str, "label": str, "error": str})
    except (OSError, ValueError, KeyError):
        return pd.DataFrame(columns=columns)
    return rows if list(rows.columns) == columns else pd.DataFrame(columns=columns)


def _write_record(path: Path, rows: pd.DataFrame) -> None:
    """Write a record whole (a concurrent reader sees the old or the new one), then remove the
    records beside it but the ``PREDICTION_RECORDS`` written or used last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    rows.to_csv(tmp, index_label="sha256")
    os.replace(tmp, path)
    records = sorted(path.parent.glob("*.csv"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in records[PREDICTION_RECORDS:]:
        old.unlink(missing_ok=True)


def evaluate_model(export_dir: Union[Path, Callable[[], Path]], data_info: DatasetInfo,
                   out_dir: Path, latency_images: int = LATENCY_IMAGES,
                   record: Optional[Path] = None) -> dict:
    """Classify the test split with the exported model; write tables and return the metrics.

    Returns {"metrics": {...}, "files": {name: path}}; files are per_class.csv, confusion.csv,
    confusion.png, predictions.csv and report.md in ``out_dir``. With ``latency_images``, the
    metrics include ``serving_latency_ms``: the mean time of one image file through the served
    signature (read, decode, classify; batch 1) over the first ``latency_images`` test files,
    the way ``edge.evaluate_edge`` times the TFLite models. With ``record``
    (``prediction_record`` of this model): the images whose bytes it holds predictions for are
    not run again, and it is written back with this split's. ``export_dir`` may be what
    fetches the model's folder (a download), called only when some image must be run.
    """
    with unchanged_data(data_info):  # a test file gone since the scan: said so
        return _evaluate_model(export_dir, data_info, out_dir, latency_images, record)


def _evaluate_model(export_dir: Union[Path, Callable[[], Path]], data_info: DatasetInfo,
                    out_dir: Path, latency_images: int, record: Optional[Path]) -> dict:
    from petalflow.tasks.serving import ImageClassifier, output_columns

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(Path(data_info["manifest"]))
    paths, y_true = split_files(data_info, "test", manifest)
    shas = split_shas(data_info, "test", manifest)
    class_names = data_info["classes"]
    columns = output_columns(class_names)
    known = _read_record(record, columns) if record is not None else pd.DataFrame(columns=columns)
    todo = [i for i, sha in enumerate(shas) if sha not in known.index]
    model = None
    if todo or (latency_images and paths):
        model = ImageClassifier(str(export_dir() if callable(export_dir) else export_dir))
        if model.class_names != class_names:
            raise ValueError("exported model's classes differ from the dataset's")
    frames = [known] if len(known) else []
    for i in range(0, len(todo), EVAL_BATCH):
        chunk = todo[i : i + EVAL_BATCH]
        frames.append(model.predict_bytes([Path(paths[j]).read_bytes() for j in chunk])
                      .set_axis([shas[j] for j in chunk]))
    rows = pd.concat(frames) if todo else known
    rows = rows[~rows.index.duplicated(keep="last")]  # an image's bytes twice in the split
    if record is not None and todo:
        _write_record(record, rows)
    elif record is not None and record.exists():
        os.utime(record)  # used: kept among the last PREDICTION_RECORDS
    preds = rows.loc[shas].reset_index(drop=True)
    index = {name: i for i, name in enumerate(class_names)}
    y_pred = preds["label"].map(lambda name: index.get(name, -1)).to_numpy()
    failed = int((y_pred < 0).sum())
    y_pred = np.where(y_pred < 0, (y_true + 1) % len(index), y_pred)  # an error counts as wrong
    metrics, per_class, confusion = classification_tables(y_true, y_pred, class_names)
    metrics["test_errors"] = failed
    if latency_images and paths:
        metrics["serving_latency_ms"] = round(latency_ms(
            lambda p: model.classify_raw([Path(p).read_bytes()]), paths[:latency_images]), 3)
    preds.insert(0, "path", paths)
    preds.insert(1, "sha256", shas)
    preds.insert(2, "true_label", [class_names[i] for i in y_true])
    files = {
        "per_class": out_dir / "per_class.csv",
        "confusion": out_dir / "confusion.csv",
        "confusion_png": out_dir / "confusion.png",
        "predictions": out_dir / "predictions.csv",
        "report": out_dir / "report.md",
    }
    per_class.to_csv(files["per_class"], index=False)
    confusion.to_csv(files["confusion"])
    preds.to_csv(files["predictions"], index=False)
    plot_confusion(confusion, files["confusion_png"])
    files["report"].write_text(markdown_report(metrics, per_class, confusion))
    result = {"metrics": metrics, "majority": majority_baseline(per_class),
              "files": {k: str(v) for k, v in files.items()},
              "recorded": len(paths) - len(todo)}  # predictions taken from ``record``
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    return result


def class_change(before: Optional[list], after: list, shown: int = 10,
                 moved: Optional[dict] = None) -> str:
    """What changed between two class lists, for a reason a user reads: "gone: roses; new:
    lilies" (up to ``shown`` names each, then how many more), and where the photos of classes
    that went lie now (``moved``, from ``moved_classes``); the order alone: "same classes,
    another order"; ``before`` unknown (a version registered without its classes): "its
    classes unknown"."""
    if not before:
        return "its classes unknown"
    gone, new = _not_in(before, after), _not_in(after, before)
    parts = ([f"gone: {_names(gone, shown)}"] if gone else []) + (
        [f"new: {_names(new, shown)}"] if new else []) + (
        [f"photos moved: {_moves(moved, shown)}"] if moved else [])
    return "; ".join(parts) or "same classes, another order"


MOVED_SHARE = 0.5  # a class's photos count as moved when more than this share lie in one class


def moved_classes(before: pd.DataFrame, after: pd.DataFrame, gone: Sequence[str]) -> dict:
    """Where the photos of classes that are gone lie now: ``{class: (class now, its photos
    there, its photos)}`` for each of ``gone`` more than half of whose photos (``before``: the
    champion's data, ``sha256`` and ``label`` of the images it used) are in one class of this
    data (``after``, likewise): a class folder renamed ("roses" to "rose") or merged into
    another. A class whose photos were deleted, or spread over several classes, is left
    out."""
    now = after.drop_duplicates("sha256").set_index("sha256")["label"]
    moved = {}
    for name in gone:
        shas = before.loc[before["label"] == name, "sha256"].drop_duplicates()
        where = now.reindex(shas).dropna().value_counts()
        if not where.empty and where.iloc[0] > MOVED_SHARE * len(shas):
            moved[name] = (str(where.index[0]), int(where.iloc[0]), len(shas))
    return moved


def _moves(moved: dict, shown: int = 10) -> str:
    """``moved_classes``' result as "roses -> rose (all 300 photos)", "tulips -> daisy (280 of
    its 300 photos)", up to ``shown``."""
    return _names([f"{old} -> {new} ({f'all {n}' if n == total else f'{n} of its {total}'} "
                   "photos)" for old, (new, n, total) in moved.items()], shown)


def _not_in(items: Sequence, others: Sequence) -> list:
    """``items`` that are not in ``others``, in their order."""
    others = set(others)
    return [item for item in items if item not in others]


def _names(items: list, shown: int = 10) -> str:
    """Up to ``shown`` of ``items``, then how many more."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def compare_with_champion(champion: Optional[dict], data_info: DatasetInfo,
                          workdir: Path, records_dir: Optional[Path] = None,
                          allow_dropped: bool = False,
                          predictions: Optional[Path] = None) -> dict:
    """What the new version is compared with. Same classes: the champion is downloaded and
    evaluated on this run's test split with the challenger's code path (``evaluate_model``);
    with ``records_dir``, only on the test images its ``prediction_record`` lacks (downloaded
    only then). When this run splits the data otherwise than the champion's training did
    (another seed or test_fraction, fewer photos), some of its test images were the
    champion's training images (``registry.learned_images``): both models are then compared
    on the others only (``unseen_comparison``; ``predictions`` is the new version's
    ``predictions.csv``), and ``accuracy`` is the new version's figure there.
    Other classes (or no champion): no figure, and ``basis`` says why. Data that shares
    classes with the champion but lacks some of its others (a missing class folder) also gets
    ``held``, why the version may not replace the champion, unless ``allow_dropped``."""
    from petalflow.tasks.registry import download_model, learned_images

    n_test = data_info["counts"].get("splits", {}).get("test")
    if champion is None:
        return {"champion_version": None, "champion_accuracy": None,
                "basis": "first model to pass the gate"}
    if champion.get("class_names") != data_info["classes"]:
        return class_list_changed(champion, data_info["classes"], allow_dropped,
                                  _moved_from_champion(champion, data_info, workdir))
    record = prediction_record(records_dir, champion["run_id"]) \
        if records_dir is not None and champion.get("run_id") else None
    learned = learned_images(champion["run_id"], Path(workdir) / "champion-manifest") \
        if champion.get("run_id") else None
    folder = Path(workdir) / "champion-model"
    try:
        result = evaluate_model(lambda: Path(download_model(champion["model_uri"], folder)),
                                data_info, Path(workdir) / "champion-evaluation",
                                latency_images=0, record=record)
    finally:  # a copy of what the registry holds: no run reads it again
        shutil.rmtree(folder, ignore_errors=True)
    version = champion["version"]
    whole = {"champion_version": version,
             "champion_accuracy": result["metrics"]["test_accuracy"],
             "champion_metrics": result["metrics"],
             # test images the champion had classified before (its prediction record): not run
             "champion_predictions_recorded": result["recorded"],
             "basis": f"this run's test split ({n_test} images)"}
    if learned is None:
        return {**whole, "basis": f"this run's test split ({n_test} images; champion "
                                  f"v{version}'s run does not say which images it learned from)"}
    if predictions is None:
        return whole
    return {**whole, **unseen_comparison(Path(predictions),
                                         Path(result["files"]["predictions"]), learned, version)}


def unseen_comparison(predictions: Path, champion_predictions: Path, learned: frozenset,
                      version: str) -> dict:
    """The comparison on the test images the champion was not trained on (sha256 not in
    ``learned``; each image once): how many (``compared_images``), the new version's accuracy
    there (``accuracy``) and the champion's, from both evaluations' ``predictions.csv``; the
    ``basis`` names them. None of them: no like-for-like figure, and the version is ``held``
    (not promoted: the champion is kept without a figure that says it is worse). Nothing
    (``{}``: the whole split's figures stand) when no test image was a training image."""
    def correct(path: Path) -> pd.Series:
        rows = pd.read_csv(path, usecols=["sha256", "true_label", "label"], dtype=str,
                           keep_default_na=False).drop_duplicates("sha256")
        return (rows["label"] == rows["true_label"]).set_axis(rows["sha256"])

    every = correct(predictions)
    new = every[~every.index.isin(learned)]
    if len(new) == len(every):
        return {}
    why = (f"this run splits the data otherwise than champion v{version}'s training did: "
           "another seed or test_fraction, or fewer photos")
    if new.empty:
        basis = f"no test image that champion v{version} was not trained on ({why})"
        return {"champion_accuracy": None, "compared_images": 0, "basis": basis,
                "held": (f"no like-for-like figure: all {len(every)} test images were champion "
                         f"v{version}'s training images ({why}); not promoted, the champion is "
                         "kept; train with its seed and test_fraction to compare them")}
    old = correct(champion_predictions).reindex(new.index, fill_value=False)
    basis = (f"the {len(new)} of this run's {len(every)} test images that champion v{version} "
             "was not trained on")
    low, high = accuracy_interval(int(new.sum()), len(new))
    log("%s: %d of this run's %d test images were its training images, so the two models are "
        "compared on the other %d%s", why, len(every) - len(new), len(every), len(new),
        "; too few to tell two models apart: train with the champion's seed and test_fraction "
        "to compare them on a whole test split" if high - low > WIDE_INTERVAL else "",
        level=30)
    return {"champion_accuracy": float(old.mean()), "accuracy": float(new.mean()),
            "compared_images": len(new), "basis": basis}


def _moved_from_champion(champion: dict, data_info: DatasetInfo, workdir: Path) -> dict:
    """``moved_classes`` for the classes of the champion this data lacks: its run's manifest
    against this run's; nothing when no class went, or either manifest is not at hand (a
    version registered without its run's manifest)."""
    from petalflow.tasks.registry import run_manifest

    gone = _not_in(champion.get("class_names") or (), data_info["classes"])
    if not gone or not champion.get("run_id") or not data_info.get("manifest"):
        return {}
    before = run_manifest(champion["run_id"], Path(workdir) / "champion-manifest",
                          ["sha256", "status", "label"])
    if before is None:
        return {}
    after = load_manifest(Path(data_info["manifest"]))
    return moved_classes(before[before["status"] == "ok"], after[after["status"] == "ok"], gone)


def class_list_changed(champion: dict, classes: Sequence[str], allow_dropped: bool,
                       moved: Optional[dict] = None) -> dict:
    """``compare_with_champion`` for data whose class list is not the champion's: promoted on
    the gate alone, except that data lacking some of the champion's classes while keeping
    others is ``held`` (not promoted) unless ``allow_dropped``; the run's log says which.
    ``moved`` (``moved_classes``): where the photos of classes that went lie now, said in the
    log and the reasons (a renamed folder is no class to put back)."""
    version = champion["version"]
    known = champion.get("class_names") or ()
    gone = _not_in(known, classes)
    kept = len(known) > len(gone)
    held = bool(gone) and kept and not allow_dropped
    moved = moved or {}
    if gone:
        log("classes the champion (v%s) predicts are not in the data any more: %s%s; %s",
            version, _names(gone), f"; photos moved: {_moves(moved)}" if moved else "",
            "this run's version does not replace it (allow_dropped_classes lets it)" if held
            else "once this version is promoted, @champion no longer predicts them", level=30)
    changed = (f"the class list changed from champion v{version}'s "
               f"({class_change(champion.get('class_names'), classes, moved=moved)}); ")
    result = {"champion_version": version, "champion_accuracy": None}
    if not held:
        allowed = " (allow_dropped_classes)" if gone and kept else ""
        return {**result, "basis": f"{changed}promoted on the gate alone{allowed}"}
    lacking = (f"champion v{version} predicts classes this data lacks (gone: {_names(gone)}): "
               "not promoted, so @champion keeps predicting them; ")
    allow = "train with allow_dropped_classes (--allow-dropped-classes) to promote a version"
    rest = _not_in(gone, list(moved))
    if not moved:
        advice = f"put their folders back, or {allow} without them"
    elif not rest:
        advice = (f"their photos are in other class folders now, {_moves(moved)}: if you "
                  f"renamed or merged those folders, {allow} with the classes as they are now, "
                  "or put the folders back as they were")
    else:
        advice = (f"the photos of some are in other class folders now, {_moves(moved)}; put "
                  f"the others' folders back ({_names(rest)}), or {allow} without them")
    return {**result, "basis": f"{changed}not promoted while it lacks classes the champion "
                               "predicts",
            "held": lacking + advice}


@task(name="evaluate-model")
def evaluate_model_task(export_dir: str, data_info: DatasetInfo, out_dir: str,
                        run_id: str, records_dir: Optional[str] = None) -> dict:
    """Thin wrapper: logs the evaluation to MLflow and publishes it as Prefect artifacts;
    with ``records_dir``, the predictions are recorded for this run's model
    (``prediction_record``: compared with later versions as the champion)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from petalflow.tasks.registry import log_evaluation

    record = prediction_record(Path(records_dir), run_id) if records_dir else None
    with disk_full_said("evaluating the model", (Path(out_dir), "the evaluation")):
        result = evaluate_model(Path(export_dir), data_info, Path(out_dir), record=record)
        release_memory()  # the loaded model is garbage now: keep the process's peak low
        warning = few_test_images(result["metrics"])
        if warning:
            log("evaluation: %s", warning, level=30)
        log_evaluation(run_id, result)
    create_markdown_artifact(
        markdown=Path(result["files"]["report"]).read_text(), key="test-evaluation",
        description="Test-set accuracy, per-class metrics and confusion matrix",
    )
    per_class = read_per_class(result["files"]["per_class"])
    create_table_artifact(
        table=per_class.round(4).to_dict(orient="records"), key="per-class-metrics",
        description="Per-class precision / recall / F1 on the test split",
    )
    return result


# Downloads the champion from the registry: retried like the registry's own calls.
@task(name="evaluate-champion", **MLFLOW_RETRY)
def compare_with_champion_task(champion: Optional[dict], data_info: DatasetInfo,
                                workdir: str, records_dir: Optional[str] = None,
                                allow_dropped: bool = False,
                                predictions: Optional[str] = None) -> dict:
    with disk_full_said("evaluating the champion", (Path(workdir), "the run's folder")):
        result = compare_with_champion(champion, data_info, Path(workdir),
                                       Path(records_dir) if records_dir else None,
                                       allow_dropped, Path(predictions) if predictions else None)
    if "champion_metrics" in result:  # a champion model was evaluated
        release_memory()
    return result


def evaluate_edge_models(edge_dir: Path, export_dir: Path, data_info: DatasetInfo,
                         image_size: int, savedmodel_latency_ms: Optional[float] = None) -> dict:
    """The edge models' test-split accuracy, size and latency (``tasks.edge.evaluate_edge``),
    beside the SavedModel's latency as the evaluation measured it (``serving_latency_ms``)."""
    from petalflow.tasks.edge import evaluate_edge

    paths, y = split_files(data_info, "test")
    with unchanged_data(data_info):
        return evaluate_edge(Path(edge_dir), Path(export_dir), paths, y, image_size,
                             savedmodel_latency_ms, reads_exif(data_info))


@task(name="evaluate-edge-models")
def evaluate_edge_task(edge_dir: str, export_dir: str, data_info: DatasetInfo,
                       image_size: int, run_id: str,
                       savedmodel_latency_ms: Optional[float] = None) -> dict:
    """Thin wrapper: logs the edge models and their figures to the MLflow run."""
    from petalflow.tasks.registry import log_edge

    with disk_full_said("evaluating the edge models", (Path(edge_dir), "the edge models")):
        description = evaluate_edge_models(Path(edge_dir), Path(export_dir), data_info,
                                           image_size, savedmodel_latency_ms)
        release_memory()
        log_edge(run_id, edge_dir, description)
    return description
