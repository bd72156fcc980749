"""Plain in-memory Keras baseline for the benchmark (not part of the pipeline).

Every image of the train/val/test splits is decoded into one NumPy array, then a frozen TF Hub
backbone + Dense head is trained with Adam for 5 epochs via ``model.fit`` — the classic
transfer-learning tutorial recipe. It uses the same split as the petalflow run it is compared
with (``--manifest``), so both are scored on the same test images.

    python bench/baseline.py --manifest M.csv --data-root DIR --backbone HANDLE --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    started = time.time()
    phases = {}
    mark = [started]

    def phase(name: str) -> None:  # seconds since the previous mark, for the JSON
        now = time.time()
        phases[name] = round(now - mark[0], 2)
        mark[0] = now

    import tensorflow_hub as hub
    import tf_keras as keras
    from PIL import Image

    manifest = pd.read_csv(args.manifest, keep_default_na=False)
    manifest = manifest[manifest["status"] == "ok"]
    classes = sorted(manifest["label"].unique())
    index = {c: i for i, c in enumerate(classes)}

    def load(split):
        rows = manifest[manifest["split"] == split]
        x = np.zeros((len(rows), args.image_size, args.image_size, 3), np.float32)
        for i, rel in enumerate(rows["path"]):
            with Image.open(Path(args.data_root) / rel) as im:
                im = im.convert("RGB").resize((args.image_size, args.image_size), Image.BILINEAR)
                x[i] = np.asarray(im, np.float32) / 255.0
        return x, rows["label"].map(index).to_numpy()

    phase("imports")
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load("train"), load("val"), load("test")
    phase("load")
    keras.utils.set_random_seed(42)
    model = keras.Sequential([
        keras.Input((args.image_size, args.image_size, 3)),
        hub.KerasLayer(args.backbone, trainable=False),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(len(classes), activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    phase("build")
    # "epochs" ends when fit's last epoch has ended; "fit clean-up" is what fit takes after that
    # before it returns: in about two runs of three ~17 s, idle, destroying its tf.data
    # iterator (a TensorFlow behaviour, traced; BENCHMARKS.md, target 1), else ~0 s.
    model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=args.epochs,
              batch_size=args.batch_size, verbose=2, callbacks=[keras.callbacks.LambdaCallback(
                  on_train_end=lambda logs: phase("epochs"))])
    phase("fit clean-up")
    _, test_acc = model.evaluate(x_test, y_test, verbose=0)
    phase("evaluate")
    out = {"test_accuracy": float(test_acc), "seconds_in_script": time.time() - started,
           "train_images": int(len(x_train)), "test_images": int(len(x_test)),
           "phases_s": phases}
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
