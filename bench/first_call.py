"""The served model's first call against its following ones, with and without Grappler passes.

`petalflow predict`'s first row waits for the model's first call (its warm-up: the graph's
optimisation and the kernels' set-up). This loads a registered version's folder as the pyfunc
loader does (``serving.ImageClassifier``) in a fresh process per option set, then times the
first call (``--first`` photos), the same call again beside a busy Python thread (how much of
it holds the interpreter lock: ``--busy``), and the next batches of 64 (images/s).

    .venv/bin/python bench/first_call.py --model-dir <version folder>/artifacts \
        --images flower_photos/daisy --options '{}' '{"disable_meta_optimizer": true}'

``--options``: JSON objects for ``tf.config.optimizer.set_experimental_options``, each run in
its own process (``{}``: TensorFlow's defaults, what `petalflow predict` runs with).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def one(model_dir: Path, images: Path, options: dict, first: int, busy: bool) -> dict:
    from petalflow.tasks import serving

    tf = serving.import_tensorflow_without_keras()
    if options:
        tf.config.optimizer.set_experimental_options(options)
    export = next(p for p in (model_dir / "data" / "export", model_dir) if
                  (p / "saved_model.pb").is_file())
    began = time.perf_counter()
    model = serving.ImageClassifier(str(export))
    load_s = time.perf_counter() - began
    files = sorted(p for p in images.iterdir() if p.is_file())
    data = [p.read_bytes() for p in files[:first + 256]]
    stop = threading.Event()

    def spin() -> None:  # pure Python: holds the interpreter lock whenever it runs
        n = 0
        while not stop.is_set():
            n += 1

    spinner = threading.Thread(target=spin, daemon=True)
    if busy:
        spinner.start()
    began, cpu = time.perf_counter(), time.thread_time()
    model.predict_with_features(data[:first])
    first_s, first_cpu_s = time.perf_counter() - began, time.thread_time() - cpu
    stop.set()
    began = time.perf_counter()
    model.predict_with_features(data[first:2 * first])
    second_s = time.perf_counter() - began
    rest = data[first:]
    began = time.perf_counter()
    for i in range(0, len(rest), 64):
        model.predict_with_features(rest[i:i + 64])
    return {"options": options, "busy_thread": busy, "load_s": round(load_s, 3),
            "first_call_s": round(first_s, 3), "first_call_thread_cpu_s": round(first_cpu_s, 3),
            "second_call_s": round(second_s, 3),
            "images_per_s_after": round(len(rest) / (time.perf_counter() - began), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, type=Path)
    ap.add_argument("--images", required=True, type=Path, help="a folder of at least 300 photos")
    ap.add_argument("--options", nargs="+", default=["{}"])
    ap.add_argument("--first", type=int, default=8, help="photos in the first call")
    ap.add_argument("--busy", action="store_true", help="a busy Python thread beside the call")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(one(args.model_dir.resolve(), args.images.resolve(),
                             json.loads(args.child), args.first, args.busy)))
        return
    results = []
    for _ in range(args.repeats):
        for options in args.options:  # interleaved, each in a fresh process
            cmd = [sys.executable, __file__, "--model-dir", str(args.model_dir), "--images",
                   str(args.images), "--first", str(args.first), "--child", options]
            out = subprocess.run(cmd + (["--busy"] if args.busy else []), check=True,
                                 capture_output=True, text=True, cwd=REPO,
                                 env={"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ})
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
