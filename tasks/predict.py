"""Batch prediction with a registered model: files in, one CSV row per image out."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence


def load_model(model_uri: str):
    """pyfunc model from a models:/ or runs:/ URI (via the configured MLflow) or a local folder."""
    import mlflow

    from tasks.registry import _client

    if not Path(model_uri).expanduser().exists():
        _client()  # points MLflow at MLFLOW_TRACKING_URI or the embedded store
    return mlflow.pyfunc.load_model(str(model_uri))


def predict_files(model_uri: str, files: Sequence[Path], output: Path, batch_size: int = 64):
    """Classify ``files`` in batches, streaming rows to ``output`` (CSV); return (rows, errors).

    Columns: path, label, probability, error, prob_<class> for each class.
    """
    import pandas as pd

    from tasks.serving import encode_files

    model = load_model(model_uri)
    rows = errors = 0
    tmp = output.with_name(output.name + ".part")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = None
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            images = []
            for path in chunk:
                try:
                    images.append(encode_files([path])[0])
                except OSError:
                    images.append("")
            frame = model.predict(pd.DataFrame({"image": images}))
            frame.insert(0, "path", [str(p) for p in chunk])
            if writer is None:
                writer = csv.writer(fh)
                writer.writerow(frame.columns)
            writer.writerows(frame.itertuples(index=False))
            rows += len(frame)
            errors += int((frame["error"] != "").sum())
    tmp.replace(output)
    return rows, errors
