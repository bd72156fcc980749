"""Edge models: TensorFlow Lite copies of the trained classifier, beside every version.

Two conversions of the same Keras classifier (backbone + head) that training produced:
``model_float16.tflite`` (weights stored as float16) and ``model_int8.tflite`` (weights and
activations int8, calibrated on a sample of the training split; input and output stay float32,
so callers need no scale or zero point). Both take one image ``[1, S, S, 3]`` float32 in [0, 1]
(decoded RGB, resized to S x S with bilinear resampling, antialiased when a side shrinks more
than 2x, no crop) and return the class
probabilities ``[1, classes]`` in the order of ``labels.txt``. ``edge.json`` describes that
contract and, after ``evaluate_edge``, each model's test-split accuracy, size and latency;
``edge_input.py`` (a copy of ``tasks/edge_input.py``: numpy and Pillow only) makes that input
from an image file as training decodes it.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Optional, Sequence

from petalflow.tasks.common import log, usable_cpus, write_json


FORMATS = ("float16", "int8")
# Int8 calibration sample. bench/edge_calibration.py (validation split, 3 seeds): 50 images
# gave the same mean accuracy as 100 (0.850) for 1.6 s less conversion; 10 and 25 gave 0.846.
CALIBRATION_IMAGES = 50
LATENCY_IMAGES = 50  # test files timed one at a time, for every model (and the SavedModel)


EDGE_INPUT = "edge_input.py"  # beside the models: their input from a file, without TensorFlow


def write_edge_input(out_dir: Path) -> Path:
    """``edge_input.py`` in ``out_dir``: a copy of this package's ``edge_input`` module."""
    import shutil

    target = Path(out_dir) / EDGE_INPUT
    shutil.copyfile(Path(__file__).with_name(EDGE_INPUT), target)
    return target


def model_file(fmt: str) -> str:
    return f"model_{fmt}.tflite"


def _decode_file(path: str, image_size: int, exif: bool = True):
    from petalflow.tasks.images import file_decoder

    return file_decoder(image_size, exif)(path)


def calibration_sample(paths: Sequence[str], n: int = CALIBRATION_IMAGES, seed: int = 0) -> list:
    """A fixed, seeded sample of up to ``n`` training files for int8 calibration."""
    paths = sorted(paths)
    random.Random(seed).shuffle(paths)
    return paths[:n]


def tflite_converter(network, fmt: str, image_size: int, calibration_paths: Sequence[str] = (),
                     batch: int = 1, output: int = -1, exif: bool = True):
    """The converter of ``network`` (a frozen function images -> tensors,
    ``model.frozen_function``) to a TFLite model of its output number ``output``, input fixed
    to [batch, S, S, 3]: float32 (as trained), float16 weights, or int8 weights and activations
    calibrated on ``calibration_paths`` (input and output float32; decoded as
    ``images.file_decoder`` with ``exif``).

    It converts the frozen graph as it is (TensorFlow's graph-def converter), so one freeze
    serves every format and the serving export, where the converter built from a function
    froze it again on every conversion (~1 s each for MobileNetV2 0.35; both ways gave the
    same probabilities, bit for bit, on 40 photos)."""
    import tensorflow as tf

    def node(tensor) -> str:
        return tensor.name.split(":")[0]

    conv = tf.compat.v1.lite.TFLiteConverter(
        network.graph.as_graph_def(), None, None,
        input_arrays_with_shape=[(node(network.inputs[0]), [batch, image_size, image_size, 3])],
        output_arrays=[node(network.outputs[output])])
    if fmt == "float32":
        return conv
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if fmt == "float16":
        conv.target_spec.supported_types = [tf.float16]
    else:
        sample = list(calibration_paths)
        conv.representative_dataset = lambda: (
            [tf.expand_dims(_decode_file(path, image_size, exif), 0)] for path in sample)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return conv


def write_labels(out_dir: Path, class_names: Sequence[str]) -> Path:
    """``labels.txt``: one class name per line (UTF-8), in the order of the model's outputs.
    A name may hold spaces (Fruits-360's "Apple Braeburn"): a reader takes whole lines."""
    path = Path(out_dir) / "labels.txt"
    path.write_text("".join(f"{name}\n" for name in class_names), encoding="utf-8")
    return path


def export_tflite(network, class_names: Sequence[str], image_size: int, out_dir: Path,
                  calibration_paths: Sequence[str], exif: bool = True) -> dict:
    """Convert ``network`` (``model.frozen_network`` of the trained classifier: its second
    output is the class probabilities) to the two TFLite models in ``out_dir`` with
    ``labels.txt`` and ``edge.json``; returns the edge description."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = list(calibration_paths)

    models = {}
    for fmt in FORMATS:
        # A backbone with an op TFLite cannot convert (or quantize) costs that edge model
        # only, never the training run: the reason is recorded and reported instead.
        try:
            converter = tflite_converter(network, fmt, image_size, sample, exif=exif)
            (out_dir / model_file(fmt)).write_bytes(converter.convert())
        except Exception as exc:  # noqa: BLE001 - any converter failure, reported below
            (out_dir / model_file(fmt)).unlink(missing_ok=True)
            reason = " ".join(str(exc).split())[:500] or type(exc).__name__
            log("edge model %s not produced: %s", fmt, reason, level=30)
            models[fmt] = {"file": None, "error": f"conversion failed: {reason}"}
            continue
        models[fmt] = {"file": model_file(fmt),
                       "size_bytes": (out_dir / model_file(fmt)).stat().st_size}

    write_labels(out_dir, class_names)
    write_edge_input(out_dir)
    description = {
        "input": {"shape": [1, image_size, image_size, 3], "dtype": "float32",
                  "range": [0.0, 1.0], "color": "RGB",
                  "resize": "bilinear to the square size, aspect ratio not kept; antialiased "
                            "when a side shrinks more than 2x (tf.image.resize antialias=True)",
                  "orientation": "upright: a JPEG turned as its EXIF Orientation says first",
                  "from_a_file": f"{EDGE_INPUT} beside the model: model_input(path, size), "
                                 "training's decoding with numpy and Pillow only"},
        "output": {"shape": [1, len(class_names)], "dtype": "float32",
                   "meaning": "class probabilities in labels.txt order"},
        "labels": list(class_names),
        "calibration_images": len(sample),
        "models": models,
    }
    write_json(out_dir / "edge.json", description)
    return description


def tflite_interpreter(threads: int = 1, **model):
    """The stock TFLite interpreter (XNNPACK on the CPU) over ``model_path=`` or
    ``model_content=``, tensors allocated: (interpreter, input index, output index)."""
    import warnings

    import tensorflow as tf

    with warnings.catch_warnings():  # its move to ai_edge_litert; the stock one still works
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated")
        interpreter = tf.lite.Interpreter(num_threads=threads, **model)
    interpreter.allocate_tensors()
    return (interpreter, interpreter.get_input_details()[0]["index"],
            interpreter.get_output_details()[0]["index"])


def tflite_classifier(model_path: Path, threads: int = 1):
    """A function image [S, S, 3] float32 -> probabilities, over the stock interpreter."""
    import numpy as np

    interpreter, inp, out = tflite_interpreter(threads, model_path=str(model_path))

    def run(image):
        interpreter.set_tensor(inp, np.asarray(image, np.float32)[None])
        interpreter.invoke()
        return interpreter.get_tensor(out)[0].copy()

    return run


def latency_ms(fn, items) -> float:
    """Mean milliseconds of ``fn`` per item (the first call, which allocates, not counted)."""
    fn(items[0])
    started = time.perf_counter()
    for item in items:
        fn(item)
    return 1000.0 * (time.perf_counter() - started) / len(items)


def evaluate_edge(edge_dir: Path, export_dir: Path, test_paths: Sequence[str], test_y,
                  image_size: int, savedmodel_latency_ms: Optional[float] = None,
                  exif: bool = True) -> dict:
    """Each TFLite model's test-split accuracy, size and CPU latency per image (one image file
    in, its probabilities out, decode included, batch 1, one interpreter thread), beside the
    serving SavedModel's size and ``savedmodel_latency_ms`` (the evaluation measured it the
    same way, ``evaluate.evaluate_model``). Written into ``edge.json`` and returned. The
    accuracy pass decodes in parallel and gives each interpreter every core (it measures
    answers, not time)."""
    import numpy as np

    from petalflow.tasks.inputs import image_dataset

    edge_dir = Path(edge_dir)
    description = json.loads((edge_dir / "edge.json").read_text())
    converted = [fmt for fmt in FORMATS if description["models"].get(fmt, {}).get("file")]
    accuracy_runners = {fmt: tflite_classifier(edge_dir / model_file(fmt), usable_cpus())
                        for fmt in converted}
    correct = {fmt: 0 for fmt in FORMATS}
    images = (image for batch in image_dataset(test_paths, None, image_size, 32,  # in order
                                               exif=exif)
              for image in batch.numpy())
    for image, label in zip(images, np.asarray(test_y)):
        for fmt, run in accuracy_runners.items():
            correct[fmt] += int(np.argmax(run(image)) == label)
    accuracy_runners = images = None  # their interpreters, freed before the timed ones load
    runners = {fmt: tflite_classifier(edge_dir / model_file(fmt)) for fmt in converted}
    timed = list(test_paths[:LATENCY_IMAGES])
    results = {fmt: result for fmt, result in description["models"].items()
               if fmt not in runners}  # not converted: keeps its error
    for fmt, run in runners.items():
        results[fmt] = {
            "file": model_file(fmt),
            "test_accuracy": correct[fmt] / max(len(test_paths), 1),
            "size_bytes": (edge_dir / model_file(fmt)).stat().st_size,
            "latency_ms": round(latency_ms(
                lambda p, run=run: run(_decode_file(p, image_size, exif).numpy()), timed),
                3),
        }
    size = sum(f.stat().st_size for f in Path(export_dir).rglob("*") if f.is_file())
    description["savedmodel"] = {"size_bytes": size, "latency_ms": savedmodel_latency_ms}
    description["models"] = results
    description["test_images"] = len(test_paths)
    description["latency"] = ("ms per image file: decode + resize + classify, batch 1, one "
                              "interpreter thread")
    write_json(edge_dir / "edge.json", description)
    return description


def edge_summary(description: dict, savedmodel_accuracy: float) -> list[dict]:
    """Rows (format, test accuracy, size, latency) for the model card and the artifacts."""
    saved = description.get("savedmodel", {})
    rows = [{"format": "SavedModel", "test_accuracy": round(savedmodel_accuracy, 4),
             "size_mb": round(saved.get("size_bytes", 0) / 1e6, 2),
             "latency_ms": saved.get("latency_ms")}]
    for fmt, result in description["models"].items():
        if result.get("error"):
            rows.append({"format": f"TFLite {fmt}", "test_accuracy": None, "size_mb": None,
                         "latency_ms": None, "error": result["error"]})
            continue
        rows.append({"format": f"TFLite {fmt}",
                     "test_accuracy": round(result.get("test_accuracy", float("nan")), 4),
                     "size_mb": round(result["size_bytes"] / 1e6, 2),
                     "latency_ms": result.get("latency_ms")})
    return rows
