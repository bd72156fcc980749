"""Load an exported petalflow model and classify encoded images: the one prediction code path.

Used by evaluation, ``petalflow predict`` and MLflow's pyfunc: this file travels inside every
registered model (MLflow ``code_paths``, as ``petalflow_serving.py``) and is its
``loader_module``, so ``mlflow.pyfunc.load_model(...)`` and ``mlflow models serve`` need only the
model's own requirements (mlflow, tensorflow, pandas, numpy), not petalflow. It must therefore
import nothing from petalflow. Loading runs ``tf.saved_model.load`` only (no pickle, no Keras
Lambda layers); all preprocessing is inside the SavedModel's graph.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd

LOADER_MODULE = "petalflow_serving"  # this file's name inside a registered model
ERROR_UNDECODABLE = "undecodable image"
PROB_PREFIX = "prob_"


def output_columns(class_names: Sequence[str]) -> list[str]:
    """Column order of a prediction table: label, probability, error, prob_<class>..."""
    return ["label", "probability", "error"] + [PROB_PREFIX + c for c in class_names]


def read_metadata(saved_model_dir: Path) -> dict:
    """The model's metadata (class_names, image_size, backbone, fingerprint), TF not needed."""
    return json.loads((Path(saved_model_dir) / "petalflow.json").read_text())


class ImageClassifier:
    """Wraps the exported SavedModel; ``predict`` maps a DataFrame of images to a DataFrame.

    Input column ``image``: base64 strings (standard or URL-safe) of encoded image files, or raw
    ``bytes``. Output, one row per input in order: ``label`` (class name, "" when the image could
    not be decoded), ``probability``, ``error`` ("" or the reason) and ``prob_<class>`` per class.
    """

    def __init__(self, saved_model_dir: str):
        import tensorflow as tf

        self.metadata = read_metadata(Path(saved_model_dir))
        self.class_names: list[str] = self.metadata["class_names"]
        self._model = tf.saved_model.load(str(saved_model_dir))
        self._serve_b64 = self._model.signatures["serving_default"]
        self._serve_bytes = self._model.signatures["classify_bytes"]

    @property
    def columns(self) -> list[str]:
        return output_columns(self.class_names)

    def _to_frame(self, outputs: dict, index=None) -> pd.DataFrame:
        data = {}
        for col in self.columns:
            values = outputs[col].numpy()
            if values.dtype == object:
                values = [v.decode("utf-8") for v in values]
            data[col] = values
        return pd.DataFrame(data, index=index)

    def predict_bytes(self, images: Sequence[bytes]) -> pd.DataFrame:
        """Classify raw encoded image bytes; undecodable items get an ``error``, not an exception."""
        import tensorflow as tf

        if len(images) == 0:
            return pd.DataFrame({c: [] for c in self.columns})
        return self._to_frame(self._serve_bytes(image_bytes=tf.constant(list(images), tf.string)))

    def predict(self, model_input, params: Optional[dict] = None) -> pd.DataFrame:
        import tensorflow as tf

        if isinstance(model_input, pd.DataFrame):
            if "image" not in model_input.columns:
                raise ValueError("input needs a column 'image' with base64-encoded image files")
            values = model_input["image"].tolist()
            index = model_input.index
        elif isinstance(model_input, dict) and "image" in model_input:
            values, index = list(np.atleast_1d(model_input["image"])), None
        else:
            values, index = list(np.atleast_1d(model_input)), None
        if not values:
            return pd.DataFrame({c: [] for c in self.columns})
        if all(isinstance(v, (bytes, bytearray)) for v in values):
            # pyfunc schema enforcement may hand bytes over for a string column: still base64.
            values = [bytes(v).decode("ascii", "replace") for v in values]
        values = ["" if v is None else str(v) for v in values]
        out = self._serve_b64(image=tf.constant(values, tf.string))
        frame = self._to_frame(out)
        if index is not None:
            frame.index = index
        return frame


def _load_pyfunc(data_path: str) -> ImageClassifier:
    """MLflow pyfunc loader hook: ``data_path`` is the model's SavedModel folder."""
    return ImageClassifier(data_path)


def encode_files(paths: Iterable[Path]) -> list[str]:
    """base64 strings of the given files' bytes (the registered model's input format)."""
    return [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in paths]
