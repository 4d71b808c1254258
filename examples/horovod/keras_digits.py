"""ringtrain's own Keras example in Horovod's API: scikit-learn's 8x8 digits on N ranks.

This is not one of Horovod's files. It is written for ringtrain, against Horovod's
names only, to show that such a script needs nothing but its import line changed
(``import horovod.tensorflow.keras as hvd`` -> ``import ringtrain.horovod.tensorflow.keras
as hvd``). It uses the Keras half of that API: ``hvd.DistributedOptimizer`` (optionally
accumulating several batches per update), the broadcast, metric-average and
learning-rate warm-up callbacks, and a checkpoint that only rank 0 writes.

The digits ship inside scikit-learn, so nothing is downloaded. Start it with either::

    ringtrain launch -np 2 examples/horovod/keras_digits.py --epochs 10 --out /tmp/digits
    mpiexec -n 2 python examples/horovod/keras_digits.py --epochs 10 --out /tmp/digits

Rank 0 prints the held-out accuracy before and after training.
"""

from __future__ import annotations

import argparse
import os

# tf.keras must mean tf-keras (Keras 2), as in ringtrain's workers; it is read when
# TensorFlow is first imported, so a plain mpiexec needs no extra -env flag.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ringtrain.horovod.tensorflow.keras as hvd  # noqa: E402  (the one Horovod-specific line)

HELD_OUT_FRACTION = 0.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Digits classifier trained with Horovod's Keras API")
    parser.add_argument("--epochs", type=int, default=10, help="passes over each rank's shard")
    parser.add_argument("--batch", type=int, default=32, help="examples per rank per step")
    parser.add_argument(
        "--base-lr", type=float, default=0.05, help="learning rate for one rank; N ranks use N times it"
    )
    parser.add_argument("--warmup-epochs", type=int, default=2, help="epochs to ramp the rate up over")
    parser.add_argument(
        "--accumulate", type=int, default=1, help="batches whose averaged gradients make one update"
    )
    parser.add_argument("--out", default=None, help="directory for rank 0's per-epoch checkpoints")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/held-out split")
    return parser.parse_args(argv)


def split_digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixels scaled to [0, 1] and labels, cut into a training part and a held-out part.

    Every rank computes the same cut from the same seed, so the held-out digits are never
    trained on by any rank.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.data / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    held_out = int(len(labels) * HELD_OUT_FRACTION)
    train_idx, test_idx = order[held_out:], order[:held_out]
    return pixels[train_idx], labels[train_idx], pixels[test_idx], labels[test_idx]


def my_shard(pixels: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every size-th example starting at this rank, all shards cut to one length.

    Equal shards give every rank the same number of steps per epoch; a rank with one step
    more would wait forever in an allreduce the others never join.
    """
    per_rank = len(labels) // hvd.size()
    picked = slice(hvd.rank(), per_rank * hvd.size(), hvd.size())
    return pixels[picked], labels[picked]


def build_classifier(width: int = 64) -> tf.keras.Model:
    return tf.keras.Sequential(
        [
            tf.keras.Input((64,)),
            tf.keras.layers.Dense(width, activation="relu"),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    hvd.init()
    chief = hvd.rank() == 0

    x_train, y_train, x_test, y_test = split_digits(args.seed)
    x_mine, y_mine = my_shard(x_train, y_train)
    steps_per_epoch = -(-len(y_mine) // args.batch)

    # Linear scaling: N ranks see N times the examples per update, so the rate grows with N;
    # the warm-up callback starts from the one-rank rate and reaches this over --warmup-epochs.
    scaled_lr = args.base_lr * hvd.size()
    optimizer = hvd.DistributedOptimizer(
        tf.keras.optimizers.SGD(learning_rate=scaled_lr, momentum=0.9),
        backward_passes_per_step=args.accumulate,
        average_aggregated_gradients=True,
    )
    model = build_classifier()
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=False,  # ringtrain's allreduce is not an XLA op
    )

    if chief:
        # Rank 0's untrained weights are what the broadcast hands to every rank.
        _, before = model.evaluate(x_test, y_test, verbose=0)
        print(f"held-out accuracy before training: {before:.4f}", flush=True)

    callbacks = [
        hvd.callbacks.BroadcastGlobalVariablesCallback(0),
        hvd.callbacks.MetricAverageCallback(),  # logged loss/accuracy become means over ranks
        hvd.callbacks.LearningRateWarmupCallback(
            initial_lr=scaled_lr,
            warmup_epochs=args.warmup_epochs,
            steps_per_epoch=steps_per_epoch,
            verbose=1,
        ),
    ]
    if chief and args.out:
        # Ranks hold the same weights after each update, so one copy is enough; N ranks
        # writing the same path would also race.
        os.makedirs(args.out, exist_ok=True)
        callbacks.append(tf.keras.callbacks.ModelCheckpoint(os.path.join(args.out, "digits-{epoch:02d}.h5")))

    model.fit(
        x_mine,
        y_mine,
        batch_size=args.batch,
        epochs=args.epochs,
        callbacks=callbacks,
        verbose=2 if chief else 0,
    )

    if chief:
        _, after = model.evaluate(x_test, y_test, verbose=0)
        print(f"held-out accuracy after training: {after:.4f} on {len(y_test)} digits", flush=True)


if __name__ == "__main__":
    main()
