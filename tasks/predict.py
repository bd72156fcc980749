"""Batch prediction with a registered model: files in, one row per image out (CSV or JSON).

Files are read and classified ``batch_size`` at a time and rows are written as they come, so
memory stays bounded however large the folder.
"""

from __future__ import annotations

import contextlib
import csv
import glob
from collections import Counter
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import pandas as pd

from petalflow.tasks.common import (
    MODEL_PRELOAD_THREAD, counted, expand_input_lists, log, printable_name, redact_url,
    unread_folder, walk_files,
)
from petalflow.tasks.images import IMAGE_SUFFIXES
from petalflow.tasks.model import PROB_PREFIX
from petalflow.tasks.serving import decodable_start, encode_bytes

BatchHook = Callable[[int, int], None]  # (rows written so far, files in the job)


def iter_inputs(inputs: Sequence[str]) -> Iterator[Path]:
    """Files named, image files under folders (recursively, sorted, hidden ones skipped;
    links to missing files included, reported as unreadable like the scan quarantines them)
    and glob matches, of ``inputs`` and of the list files among them (``@FILE``:
    ``common.input_list``); raises FileNotFoundError for an item that matches nothing."""
    def listed(p: Path) -> bool:  # a file, or a link to a missing one (a row saying so)
        return p.is_file() or (p.is_symlink() and not p.exists())

    for item in expand_input_lists(inputs):
        path = Path(item).expanduser()
        if path.is_dir():
            for sub in _visible_files(path):
                if listed(sub) and sub.suffix.lower() in IMAGE_SUFFIXES:
                    yield sub
        elif listed(path):
            yield path
        else:
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise FileNotFoundError(f"{item!r} is not a file, folder or matching pattern")
            for match in matches:
                if listed(Path(match)):
                    yield Path(match)


def _visible_files(folder: Path) -> list[Path]:
    """The files under ``folder`` (linked folders followed), sorted, hidden ones (or in hidden
    folders) and those in a system's folders (``system_folder``: a NAS's thumbnails, recycle
    bins) left out: what a folder input is searched in."""
    def visible(rel: Path) -> bool:
        return not rel.name.startswith(".") and not unread_folder(rel.parts[:-1])

    return sorted(f for f in (Path(d) / name for d, names in walk_files(folder) for name in names)
                  if visible(f.relative_to(folder)))


def no_images_message(inputs: Sequence[str]) -> str:
    """Why ``inputs`` gave ``iter_inputs`` no file: how folders are searched, and the files
    their folders hold that are not named as images (saved without an extension, say)."""
    message = ("no image files found: a folder's images are found by their names "
               f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    others = []
    for item in expand_input_lists(inputs):
        path = Path(item).expanduser()
        if not path.is_dir():
            continue
        files = _visible_files(path)
        if files:
            shown = ", ".join(f.name for f in files[:3]) + (", ..." if len(files) > 3 else "")
            others.append(f"{item} holds {counted(len(files), 'other file')} ({shown})")
    if others:
        message += "; " + "; ".join(others) + (": rename them, or give them as files "
                                               "(--input FILE...)")
    return message


LEGACY_LOADER = "tasks.serving"  # what versions registered before the loader travelled name


_PRELOADED: dict = {}  # model URI -> Future of its pyfunc model (``preload_model``)


def preload_model(model_uri: str) -> None:
    """Start loading ``model_uri`` on a side thread; the next ``load_model(model_uri)`` in this
    process takes the result (once). ``petalflow predict`` overlaps the load (TensorFlow's
    import included) with the start of its flow run."""
    import threading
    from concurrent.futures import Future

    future: Future = Future()

    from petalflow.tasks.common import IMPORT_LOCK, freeze_start_up

    def work():
        model, error = None, None
        try:
            with IMPORT_LOCK:  # MLflow's and TensorFlow's imports: one thread at a time
                model = _load_model(model_uri)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever takes the model
            error = exc
        # The imports are done (the console script's collector set-up); no collection first:
        # the first prediction waits for this thread.
        freeze_start_up(collect=False)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(model)

    _PRELOADED[model_uri] = future
    threading.Thread(target=work, name=MODEL_PRELOAD_THREAD, daemon=True).start()


def forget_preloaded(model_uri: str) -> None:
    """Drop a preload nobody took (the job failed before loading), once its thread is done, so
    nothing of this command runs on after it."""
    future = _PRELOADED.pop(model_uri, None)
    if future is not None:
        future.exception()  # waits; the error, if any, was the job's to report


def load_model(model_uri: str):
    """(pyfunc model, the URI it was loaded from) for a models:/ or runs:/ URI (via the
    configured MLflow) or a local folder (taken from ``preload_model`` when it was started for
    the same URI). A registry alias is resolved first and the version it names loaded
    (``registry.pinned_model_uri``): the second item says which.

    Versions registered before the loader travelled inside the model name ``tasks.serving``
    (petalflow's serving module under its old top-level name); it is made importable under
    that name in this process only, so they keep working."""
    future = _PRELOADED.pop(model_uri, None)
    return future.result() if future is not None else _load_model(model_uri)


def _load_model(model_uri: str):
    from petalflow.tasks import serving

    serving.import_tensorflow_without_keras()  # the model is a frozen graph: no Keras

    sys.modules.setdefault(LEGACY_LOADER, serving)

    from petalflow.tasks.registry import configure_mlflow, explaining_missing, pinned_model_uri

    local = Path(model_uri).expanduser()
    if local.exists():
        return _load_checked(str(local)), model_uri
    configure_mlflow()  # points MLflow at MLFLOW_TRACKING_URI or the embedded store
    pinned = pinned_model_uri(model_uri)
    with explaining_missing(model_uri):
        import socket
        import urllib.error

        try:
            return _load_checked(pinned), pinned
        # A host not found or not answering (socket's errors, urllib's); not a full disk.
        except (ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError) as exc:
            if model_uri.startswith(("models:/", "runs:/")):
                raise  # the tracking server's: said as such by the command
            from petalflow.tasks.errors import ModelUnreachable

            raise ModelUnreachable(
                f"cannot fetch the model {redact_url(model_uri)}: {exc}; check the URI, or "
                "download the model and give its folder") from exc


def _load_checked(model_uri: str):
    """``mlflow.pyfunc.load_model``, its check of the model's requirements against this
    environment made from the model's ``requirements.txt`` (``requirement_mismatches``):
    MLflow's maps the modules of every installed package first, 0.32 s of CPU on 2 cores
    before ``petalflow predict``'s first prediction (BENCHMARKS.md, target 4)."""
    import mlflow

    path = mlflow.artifacts.download_artifacts(artifact_uri=model_uri)  # a folder: itself
    mismatches = requirement_mismatches(Path(path) / "requirements.txt")
    model = mlflow.pyfunc.load_model(path, suppress_warnings=True)
    wanted = str(model.metadata.flavors.get("python_function", {}).get("python_version", ""))
    running = "%d.%d" % sys.version_info[:2]
    if wanted and wanted.split(".")[:2] != running.split("."):
        mismatches.append(f"python (current: {platform.python_version()}, required: {wanted})")
    if mismatches:
        log("the model %s was saved with other package versions than this environment has "
            "(it may still work): %s", model_uri, "; ".join(mismatches), level=30)
    return model


def requirement_mismatches(requirements_txt: Path) -> list[str]:
    """Each line of a model's ``requirements.txt`` (``name==version`` and the like) that this
    environment does not satisfy, as "name (current: X, required: LINE)"; "current:
    uninstalled" for a package not installed. Lines that are no requirement (options, paths,
    URLs) and requirements whose marker excludes this environment are skipped."""
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement

    try:
        lines = Path(requirements_txt).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            found.append(f"{req.name} (current: uninstalled, required: {line})")
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            found.append(f"{req.name} (current: {installed}, required: {line})")
    return found


def add_top_k(frame: pd.DataFrame, k: int) -> pd.DataFrame:
    """Add top<i>_label / top<i>_probability (i = 1..k) from the prob_<class> columns."""
    prob_cols = [c for c in frame.columns if c.startswith(PROB_PREFIX)]
    names = [c[len(PROB_PREFIX):] for c in prob_cols]
    k = min(k, len(prob_cols))
    probs = frame[prob_cols].to_numpy()
    order = (-probs).argsort(axis=1, kind="stable")[:, :k]
    ok = ~failed_rows(frame)
    # In the prob_ columns' own type (float32 as the model gives them): a Parquet file's
    # columns of probabilities are all one type.
    best = np.where(ok[:, None], np.take_along_axis(probs, order, axis=1), np.nan)
    for i in range(k):
        frame[f"top{i + 1}_label"] = [names[j] if good else "" for j, good in zip(order[:, i], ok)]
        frame[f"top{i + 1}_probability"] = best[:, i].astype(probs.dtype, copy=False)
    return frame


# Bytes read of a file that does not begin as an image the model decodes (a video, an archive,
# a disk image named on the command line or matched by a glob): its first bytes are what the
# model names it by (``serving.unsupported_format``, ``archive_format``), and its row is an
# error either way; reading it whole held all of it in memory (a 3 GB video: 3 GB).
NOT_IMAGE_BYTES = 1 << 18


def read_files(paths: Sequence[Path]) -> tuple[list[bytes], list[str]]:
    """Each file's bytes (of a file that does not begin as a JPEG, PNG, GIF, BMP or WebP, the
    first ``NOT_IMAGE_BYTES``), and why each file that cannot be read could not ("unreadable
    file: ...", as the scan quarantines such a file; "" for the others). An unreadable file's
    bytes are empty: the model reports it as an error row, and the row then says why."""
    data, unread = [], []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                whole = decodable_start(fh.read(12))
                fh.seek(0)
                data.append(fh.read() if whole else fh.read(NOT_IMAGE_BYTES))
            unread.append("")
        except OSError as exc:
            data.append(b"")
            unread.append(f"unreadable file: {exc.strerror or exc}")
    return data, unread


def classifier_with_features(model):
    """The loaded model's own classifier when its classification pass also gives each image's
    backbone features (``predict_with_features``: versions exported since it was added), so a
    job's drift needs no second pass over the backbone; None for earlier versions, which are
    run through their pyfunc ``predict`` as before."""
    try:
        raw = model.get_raw_model()
    except (AttributeError, NotImplementedError):  # loaders without MLflow's hook
        return None
    return raw if getattr(raw, "gives_features", False) else None


def failed_rows(frame: pd.DataFrame) -> np.ndarray:
    """Which rows are in error (an ``error`` said): they have no label nor probabilities."""
    return (frame["error"] != "").to_numpy()


def shortest_floats(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its float32 columns (the probabilities, as the model gives them) as the
    numbers their shortest decimal names, for the text formats: 0.94918954, not float64's
    0.9491895437240601 (digits float32 does not have; a 3-class CSV of 304 photos: 43,196 ->
    32,729 bytes). Parquet keeps float32."""
    columns = [c for c in frame.columns if frame[c].dtype == np.float32]
    if not columns:
        return frame
    return frame.assign(**{c: [float(str(v)) for v in frame[c].to_numpy()] for c in columns})


class _Writer:
    """Streams rows to CSV, TSV, a JSON array, JSON lines (gzip-compressed when the output's
    name ends .gz) or Parquet (a row group per batch, every batch in the first one's column
    types), into ``<output>.part`` renamed when complete."""

    def __init__(self, output: Path, fmt: str):
        from petalflow.tasks.errors import OutputNotWritable
        from petalflow.tasks.params import output_suffix

        self.output, self.fmt = output, fmt
        self.tmp = output.with_name(output.name + ".part")
        self.raw = None  # the file under a gzip stream
        try:
            if fmt == "parquet":
                self.fh = open(self.tmp, "wb")
            elif output_suffix(str(output))[1]:  # NAME.csv.gz: gzip, its header naming NAME.csv
                import gzip
                import io

                self.raw = open(self.tmp, "wb")
                self.fh = io.TextIOWrapper(
                    gzip.GzipFile(filename=str(output), mode="wb", compresslevel=6,
                                  fileobj=self.raw), encoding="utf-8", newline="")
            else:
                self.fh = open(self.tmp, "w", newline="", encoding="utf-8")
        except OSError as exc:  # the user's output, not the .part file Python would name
            raise OutputNotWritable(
                f"cannot write the predictions file {str(output)!r} "
                f"({exc.strerror or exc}): give a file in a folder you can write to"
            ) from None
        self.csv = None
        self.parquet = None
        self.first = True
        if fmt == "json":
            self.fh.write("[\n")

    def write(self, frame: pd.DataFrame) -> None:
        if self.fmt != "parquet":
            frame = shortest_floats(frame)
        if self.fmt in ("csv", "tsv"):
            if self.csv is None:
                self.csv = csv.writer(self.fh, delimiter="\t" if self.fmt == "tsv" else ",")
                self.csv.writerow(frame.columns)
            rows = frame.itertuples(index=False)
            if frame.isna().to_numpy().any():  # a row in error: its probabilities' cells empty
                rows = (["" if isinstance(v, float) and math.isnan(v) else v for v in row]
                        for row in rows)
            self.csv.writerows(rows)
            return
        if self.fmt == "parquet":
            self._write_parquet(frame)
            return
        for record in frame.to_dict(orient="records"):
            clean = {k: (None if isinstance(v, float) and math.isnan(v) else v)
                     for k, v in record.items()}
            line = json.dumps(clean, ensure_ascii=False)
            if self.fmt == "jsonl":
                self.fh.write(line + "\n")
                continue
            self.fh.write(("" if self.first else ",\n") + line)
            self.first = False

    def _write_parquet(self, frame: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.parquet is None:  # the first batch's types are the file's
            table = pa.Table.from_pandas(frame, preserve_index=False)
            self.parquet = pq.ParquetWriter(self.fh, table.schema.remove_metadata())
        else:
            table = pa.Table.from_pandas(frame, schema=self.parquet.schema, preserve_index=False)
        self.parquet.write_table(table)

    def close(self) -> None:
        if self.fmt == "json":
            self.fh.write("\n]\n")
        if self.parquet is not None:
            self.parquet.close()
        self._close_files()
        os.replace(self.tmp, self.output)

    def discard(self) -> None:
        """The job failed: no file, not even a part of one."""
        if self.parquet is not None:
            # Closed before its file: left open, it wrote its footer to the closed file when
            # collected, and Python printed "Exception ignored in ... ParquetWriter.__del__"
            # after the job's own error.
            with contextlib.suppress(OSError, ValueError):
                self.parquet.close()
            self.parquet = None
        # A full disk fails the close's last write too: the part file goes all the same.
        with contextlib.suppress(OSError, ValueError):
            self._close_files()
        self.tmp.unlink(missing_ok=True)

    def _close_files(self) -> None:
        self.fh.close()  # a gzip stream writes its end here
        if self.raw is not None:
            self.raw.close()


DRIFT_SAMPLE = 256  # images of a prediction job that drift is measured on (seeded sample)


FIRST_BATCH = 8  # images in the first batch, so the first rows are written early


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch of ``n`` files: a first one of at most ``FIRST_BATCH``
    (the model's first call carries its warm-up; measured on MobileNetV2 0.35: 0.7 s for 8
    images, 1.0 s for 64), then ``batch_size`` at a time."""
    bounds, start = [], 0
    while start < n:
        stop = min(n, start + (min(FIRST_BATCH, batch_size) if start == 0 else batch_size))
        bounds.append((start, stop))
        start = stop
    return bounds


def predict_files(
    model_uri: str,
    files: Sequence[Path],
    output: Path,
    batch_size: int = 64,
    fmt: str = "csv",
    top_k: int = 0,
    on_batch: Optional[BatchHook] = None,
    drift: bool = False,
) -> dict:
    """Classify ``files`` in batches, streaming rows to ``output``; return the model's URI as
    loaded (``model_version_uri``: an alias resolved to the version it named), images, errors,
    images per predicted label (counted as the rows are written), when the first rows and the
    last were written (``first_written_at``, ``finished_at``: epoch seconds) and, with
    ``drift``, how far a sample of the classified images is from the model's training data
    (``drift_of_sample`` on the features the classification gave, or ``measure_drift`` for
    versions that give none). ``on_batch(done, total)`` is called after each batch is written.

    Columns: path, label, probability, error, prob_<class> for each class, then
    top<i>_label/top<i>_probability when ``top_k`` > 0.
    """
    import random
    import time

    first_written_at = None
    rows = errors = classified = 0
    labels: Counter[str] = Counter()
    # Reservoir sample of the classified files (bounded memory), with their features and class
    # probabilities when the classification pass gives the features.
    sample: list[tuple[Path, Optional[np.ndarray], Optional[np.ndarray]]] = []
    rng = random.Random(0)
    # The file first: one that cannot be written is said before the model's load.
    writer = _Writer(Path(output), fmt)
    try:
        model, pinned = load_model(model_uri)
        fused = classifier_with_features(model)
        for start, stop in batch_bounds(len(files), batch_size):
            chunk = files[start:stop]
            data, unread = read_files(chunk)
            if fused is not None:
                frame, features = fused.predict_with_features(data)
                probabilities = frame[[PROB_PREFIX + c for c in fused.class_names]].to_numpy()
            else:
                frame = model.predict(pd.DataFrame({"image": encode_bytes(data)}))
                features = probabilities = None
            frame = frame.reset_index(drop=True)
            # A file that could not be read says so, not "undecodable image".
            frame.loc[np.array([bool(u) for u in unread]), "error"] = [u for u in unread if u]
            failed = failed_rows(frame)
            if failed.any():  # no probabilities, not 0 (a mean over the column skips them)
                frame.loc[failed, ["probability", *(c for c in frame.columns
                                                    if c.startswith(PROB_PREFIX))]] = np.nan
            if top_k:
                frame = add_top_k(frame, top_k)
            # A name that is not UTF-8 is still classified; its path is written escaped.
            frame.insert(0, "path", [printable_name(p) for p in chunk])
            writer.write(frame)
            writer.fh.flush()
            first_written_at = first_written_at or time.time()
            ok = ~failed
            for row in np.flatnonzero(ok):
                classified += 1
                item = (chunk[row], None if features is None else features[row].copy(),
                        None if probabilities is None else probabilities[row].copy())
                if len(sample) < DRIFT_SAMPLE:
                    sample.append(item)
                elif (j := rng.randrange(classified)) < DRIFT_SAMPLE:
                    sample[j] = item
            rows += len(frame)
            errors += int((~ok).sum())
            labels.update(frame.loc[ok, "label"].astype(str))
            if on_batch:
                on_batch(rows, len(files))
    except BaseException:
        writer.discard()
        raise
    writer.close()
    finished_at = time.time()
    if not drift:
        measured = None
    elif fused is not None:
        measured = drift_of_sample(fused, sample)
    else:
        measured = measure_drift(model, [path for path, _, _ in sample])
    return {"model_version_uri": pinned, "images": rows, "errors": errors,
            "labels": dict(labels.most_common()),
            "first_written_at": first_written_at, "finished_at": finished_at,
            "drift": measured}


def drift_of_sample(classifier, sample: Sequence[tuple[Path, np.ndarray, np.ndarray]]) -> dict:
    """``measure_drift`` for a sample whose features and class probabilities the
    classification pass already gave (``classifier_with_features``): the same figures, the
    backbone not run again. Versions whose loader has ``drift_of_classified`` compare the
    sample with training images of its class mix."""
    if not sample:
        return {"available": False, "reason": "no classified image"}
    features = np.stack([f for _, f, _ in sample])
    probabilities = np.stack([p for _, _, p in sample])
    paths = [path for path, _, _ in sample]
    try:
        if hasattr(classifier, "drift_of_classified_files"):  # reads the files as it goes
            measured = classifier.drift_of_classified_files(
                features, probabilities, [str(p) for p in paths])
        elif hasattr(classifier, "drift_of_classified"):  # earlier loaders: every file's bytes
            measured = classifier.drift_of_classified(features, probabilities,
                                                      read_files(paths)[0])
        else:  # earlier still: the training split's own mix
            measured = classifier.drift_of_features(features, read_files(paths)[0])
    except Exception as exc:  # noqa: BLE001 - e.g. a version without a drift reference
        return {"available": False, "reason": str(exc).splitlines()[0][:300]}
    return {"available": True, **measured}


def measure_drift(model, files: Sequence[Path]) -> dict:
    """The model's own drift measure (``params={"output": "drift"}``) on ``files``: drift_score,
    feature_drift, image_drift, threshold, min_images, drifted, images; or {"available": False,
    "reason"} for versions registered without a drift reference."""
    if not files:
        return {"available": False, "reason": "no classified image"}
    try:
        frame = model.predict(pd.DataFrame({"image": encode_bytes(read_files(files)[0])}),
                              params={"output": "drift"})
    except Exception as exc:  # noqa: BLE001 - older versions: no reference, no params
        return {"available": False, "reason": str(exc).splitlines()[0][:300]}
    if "drift_score" not in frame.columns:
        return {"available": False, "reason": "this model version does not measure drift "
                "(registered before drift references existed)"}
    return {"available": True, **{k: (v.item() if hasattr(v, "item") else v)
                                  for k, v in frame.iloc[0].to_dict().items()}}


def model_uri_of(params) -> str:
    """The model a prediction job uses: ``model_uri``, else ``model_name``'s champion."""
    from petalflow.tasks.params import champion_uri

    return params.model_uri or champion_uri(params.model_name)


def predict_images(params, on_batch: Optional[BatchHook] = None) -> dict:
    """The prediction job (``PredictParams`` in, summary out) that the ``batch-predict`` flow
    runs (``petalflow predict`` runs that flow)."""
    inputs = expand_input_lists(params.input)  # list files (@FILE) read once
    files = list(iter_inputs(inputs))
    if not files:  # a scheduled run on an empty folder writes an empty table, and says why
        log("%s", no_images_message(inputs), level=30)
    uri = model_uri_of(params)
    # Where the table went, as an absolute path: a deployment run's relative output lies in its
    # worker's working directory, which the person who typed it in the UI does not see.
    output = Path(params.output).absolute()
    result = predict_files(uri, files, output, params.batch_size, fmt=params.format,
                           top_k=params.top_k, on_batch=on_batch, drift=params.drift)
    return {"model_uri": uri, "inputs": inputs, "output": str(output), **result}
