"""Make the benchmark inputs from public files (run where those files can be downloaded).

``backbone``: a TF-Hub-style image feature-vector SavedModel (float32 images [batch, S, S, 3]
in [0, 1] -> [batch, features]) from the keras-applications MobileNetV2 ImageNet weights
(``mobilenet_v2_weights_tf_dim_ordering_tf_kernels_<alpha>_<S>_no_top.h5``, published with
Keras), average-pooled; ``hub.KerasLayer(DIR)`` loads it like a TF Hub handle.

``archive``: a folder-per-class ``.tgz`` cut from TensorFlow's ``flower_photos.tgz``
(https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz): the
first ``--per-class`` photos of every class by file name, photos whose longer side exceeds
``--max-side`` re-encoded at that size (JPEG q90), the others byte for byte, plus LICENSE.txt.

    .venv/bin/python bench/make_inputs.py backbone --weights \
        mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5 --alpha 0.35 \
        --out mobilenet_v2_035_224_feature_vector
    .venv/bin/python bench/make_inputs.py archive --source flower_photos.tgz \
        --out flower_photos_1500.tgz

``phone``: phone-size copies of such an archive's photos (the decoding of large photos,
BENCHMARKS.md): each enlarged to ``--size`` (Lanczos) with per-pixel noise of ``--noise``
levels (a sensor's noise, the fine detail the enlargement lacks), JPEG q90, in an
uncompressed ``.tar`` (JPEGs do not compress); the same folders and file names.

    .venv/bin/python bench/make_inputs.py phone --source flower_photos_1500.tgz \
        --size 3024x2268 --out flower_photos_1500_phone.tar
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
from pathlib import Path


def make_backbone(weights: Path, alpha: float, size: int, out: Path) -> None:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf
    import tf_keras as keras

    base = keras.applications.MobileNetV2(input_shape=(size, size, 3), alpha=alpha,
                                          include_top=False, weights=str(weights),
                                          pooling="avg")

    class FeatureVector(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = base

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32)])
        def __call__(self, images):
            # keras-applications MobileNetV2 expects [-1, 1]; the hub convention is [0, 1].
            return self.model(images * 2.0 - 1.0, training=False)

    module = FeatureVector()
    tf.saved_model.save(module, str(out), signatures={"serving_default": module.__call__})


def make_archive(source: Path, out: Path, per_class: int, max_side: int) -> None:
    from PIL import Image

    with tarfile.open(source, "r:*") as src:
        members = [m for m in src.getmembers() if m.isfile()]
        by_class: dict[str, list] = {}
        extra = []
        for m in members:
            parts = Path(m.name).parts
            if len(parts) == 3 and parts[2].lower().endswith((".jpg", ".jpeg")):
                by_class.setdefault(parts[1], []).append(m)
            elif parts[-1] == "LICENSE.txt":
                extra.append(m)
        with tarfile.open(out, "w:gz") as dst:
            for m in extra:
                dst.addfile(m, src.extractfile(m))
            for cls in sorted(by_class):
                for m in sorted(by_class[cls], key=lambda m: m.name)[:per_class]:
                    data = src.extractfile(m).read()
                    with Image.open(io.BytesIO(data)) as im:
                        if max(im.size) > max_side:
                            im = im.convert("RGB")
                            im.thumbnail((max_side, max_side), Image.BICUBIC)
                            buf = io.BytesIO()
                            im.save(buf, "JPEG", quality=90)
                            data = buf.getvalue()
                    info = tarfile.TarInfo(m.name)
                    info.size = len(data)
                    dst.addfile(info, io.BytesIO(data))


def _phone_copy(job: tuple) -> bytes:
    import numpy as np
    from PIL import Image

    data, size, noise, seed = job
    with Image.open(io.BytesIO(data)) as im:
        big = np.asarray(im.convert("RGB").resize(size, Image.LANCZOS), np.int16)
    rng = np.random.default_rng(seed)
    big = big + rng.normal(0, noise, big.shape).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_phone_archive(source: Path, out: Path, size: tuple, noise: float) -> None:
    from concurrent.futures import ProcessPoolExecutor

    with tarfile.open(source, "r:*") as src:
        members = sorted((m for m in src.getmembers() if m.isfile()
                          and m.name.lower().endswith((".jpg", ".jpeg"))), key=lambda m: m.name)
        jobs = [(src.extractfile(m).read(), size, noise, i) for i, m in enumerate(members)]
    with ProcessPoolExecutor(os.cpu_count()) as pool, tarfile.open(out, "w") as dst:
        for m, data in zip(members, pool.map(_phone_copy, jobs, chunksize=8)):
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    b = sub.add_parser("backbone")
    b.add_argument("--weights", required=True, type=Path)
    b.add_argument("--alpha", type=float, default=0.35)
    b.add_argument("--image-size", type=int, default=224)
    b.add_argument("--out", required=True, type=Path)
    a = sub.add_parser("archive")
    a.add_argument("--source", required=True, type=Path)
    a.add_argument("--out", required=True, type=Path)
    a.add_argument("--per-class", type=int, default=300)
    a.add_argument("--max-side", type=int, default=320)
    ph = sub.add_parser("phone")
    ph.add_argument("--source", required=True, type=Path)
    ph.add_argument("--out", required=True, type=Path)
    ph.add_argument("--size", default="3024x2268", help="WIDTHxHEIGHT")
    ph.add_argument("--noise", type=float, default=6.0, help="std of the added noise, 0-255")
    args = ap.parse_args()
    if args.what == "backbone":
        make_backbone(args.weights, args.alpha, args.image_size, args.out)
    elif args.what == "phone":
        make_phone_archive(args.source, args.out,
                           tuple(int(v) for v in args.size.split("x")), args.noise)
    else:
        make_archive(args.source, args.out, args.per_class, args.max_side)
    print(args.out)


if __name__ == "__main__":
    main()
