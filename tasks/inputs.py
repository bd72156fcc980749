"""tf.data input pipelines that stream images from files (never the whole dataset in memory)."""

from __future__ import annotations

from typing import Optional, Sequence

from tasks.images import decode_image


def make_augmenter(seed: int):
    """Random flip, rotation (±10%), zoom (±10%) and contrast (±10%), for training batches only."""
    from tasks.model import keras

    k = keras()
    return k.Sequential(
        [
            k.layers.RandomFlip("horizontal", seed=seed),
            k.layers.RandomRotation(0.1, seed=seed + 1),
            k.layers.RandomZoom(0.1, seed=seed + 2),
            k.layers.RandomContrast(0.1, seed=seed + 3),
        ],
        name="augment",
    )


def image_dataset(
    paths: Sequence[str],
    labels: Optional[Sequence[int]],
    image_size: int,
    batch_size: int,
    shuffle: bool = False,
    augment: bool = False,
    seed: int = 0,
):
    """Batches of float32 images [b, size, size, 3] in [0, 1] (and int labels, when given).

    Files are read and decoded in parallel, batched and prefetched with AUTOTUNE. ``augment``
    applies random augmentation per batch (use it for the training split only).
    """
    import tensorflow as tf

    paths = list(paths)
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(paths, dtype=tf.string))
    if labels is not None:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(tf.constant(labels, tf.int32))))
    if shuffle:
        ds = ds.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)

    def load(path, *label):
        image = decode_image(tf.io.read_file(path), image_size)
        return (image, *label) if label else image

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=not shuffle)
    ds = ds.batch(batch_size)
    if augment:
        augmenter = make_augmenter(seed)
        ds = ds.map(
            lambda x, *y: (augmenter(x, training=True), *y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
    return ds.prefetch(tf.data.AUTOTUNE)
