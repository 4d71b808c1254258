"""Train Keras on a Spark DataFrame over 2 ringtrain workers: scikit-learn's digits, 8x8 images.

The training and held-out sets are Spark DataFrames (pixels as an array of 64 floats,
the digit as an int). ringtrain.run moves their rows to the workers' local disks once;
inside the function, ringtrain.data.shard() gives each worker its rows, and every worker
takes the same number of steps per epoch. Two ways to train:

- ``--backend tf``: tf-keras ``fit`` under ``ringtrain.tf.strategy()``
  (MultiWorkerMirroredStrategy), reading ``to_distributed_dataset``; the flat pixels
  become 8x8x1 images with ``shapes=``;
- ``--backend mpi``: Keras 3 ``fit`` on ``to_numpy(batch_size=...)`` with
  ``ringtrain.keras.DistributedOptimizer``.

    python examples/keras_dataframe.py [--backend tf|mpi] [--epochs 12] [--batch 32]
"""

from __future__ import annotations

import argparse
import sys

import ringtrain

TARGET_ACCURACY = 0.9


def build_frames(spark, seed: int = 0):
    """(train, held-out) DataFrames of digits: ``pixels`` array<float> (64 values), ``digit`` int."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )

    def frame(x, y):
        rows = [(row.tolist(), int(label)) for row, label in zip(x, y, strict=True)]
        return spark.createDataFrame(rows, "pixels array<float>, digit int")

    return frame(x_train, y_train), frame(x_test, y_test)


def _held_out_counts(predict) -> dict:
    """This rank's correct predictions over its whole held-out shard."""
    import numpy as np

    held_out = ringtrain.data.shard("val").to_numpy()
    images = held_out["pixels"].reshape(-1, 8, 8, 1)
    predicted = np.argmax(predict(images), axis=1)
    return {"correct": int((predicted == held_out["digit"]).sum()), "total": len(predicted)}


def train_tf(epochs: int, batch: int) -> dict:
    """tf-keras fit under MultiWorkerMirroredStrategy."""
    import tensorflow as tf

    strategy = ringtrain.tf.strategy()  # before any other TF op
    shard = ringtrain.data.shard("train")
    with strategy.scope():
        model = tf.keras.Sequential(
            [
                tf.keras.Input((8, 8, 1)),
                tf.keras.layers.Conv2D(16, 3, activation="relu"),
                tf.keras.layers.Flatten(),
                tf.keras.layers.Dense(10),
            ]
        )
        model.compile(
            optimizer=tf.keras.optimizers.Adam(1e-2),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    dataset = shard.to_distributed_dataset(
        strategy, batch, columns="pixels", label="digit", shapes={"pixels": (8, 8, 1)}
    )
    history = model.fit(dataset, epochs=epochs, steps_per_epoch=shard.steps_per_epoch(batch), verbose=0)
    if ringtrain.is_chief():
        print(f"epochs={epochs} final training loss={history.history['loss'][-1]:.4f}")
    return _held_out_counts(lambda images: model(images, training=False).numpy())


def train_mpi(epochs: int, batch: int) -> dict:
    """Keras 3 fit with ringtrain's allreduce optimizer."""
    import keras

    import ringtrain.keras as rk

    shard = ringtrain.data.shard("train")
    # Exactly steps_per_epoch(batch) * batch rows on every rank, so fit's steps agree.
    data = shard.to_numpy(batch_size=batch)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=rk.DistributedOptimizer(keras.optimizers.Adam(1e-2)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    history = model.fit(
        data["pixels"].reshape(-1, 8, 8, 1),
        data["digit"],
        batch_size=batch,
        epochs=epochs,
        verbose=0,
        callbacks=[rk.BroadcastGlobalVariablesCallback(0), rk.MetricAverageCallback()],
    )
    if ringtrain.is_chief():
        print(f"epochs={epochs} final training loss={history.history['loss'][-1]:.4f}")
    return _held_out_counts(lambda images: model.predict(images, verbose=0))


def accuracy(results: list[dict]) -> tuple[float, int]:
    """Held-out accuracy over every rank's shard, and how many digits it counts."""
    total = sum(r["total"] for r in results)
    return sum(r["correct"] for r in results) / total, total


def train_and_score(spark, backend: str, num_proc: int, epochs: int, batch: int) -> tuple[float, int]:
    """Train on ``num_proc`` workers of ``spark``; return the held-out accuracy and its digit count."""
    train_df, val_df = build_frames(spark)
    train = train_tf if backend == "tf" else train_mpi
    results = ringtrain.run(
        train,
        epochs,
        batch,
        data={"train": train_df, "val": val_df},
        num_proc=num_proc,
        backend=backend,
        return_all=True,
    )
    return accuracy(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("tf", "mpi"), default="tf")
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32, help="rows per worker per step")
    args = parser.parse_args(argv)

    from ringtrain.launcher.spark import loopback_session

    spark = loopback_session(f"local[{args.num_proc}]", "ringtrain-dataframe-example")
    try:
        value, total = train_and_score(spark, args.backend, args.num_proc, args.epochs, args.batch)
    finally:
        spark.stop()
    print(f"held-out accuracy: {value:.4f} on {total} digits ({args.num_proc} workers, {args.backend})")
    if value < TARGET_ACCURACY:
        print(f"accuracy is below {TARGET_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
