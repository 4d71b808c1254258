"""Train a Keras classifier on scikit-learn's digits over 2 ringtrain workers.

Each worker reads its own shard of the training set; MultiWorkerMirroredStrategy
averages gradients across workers every step. Rank 0 then scores the held-out set.

It survives a lost worker: ``tf.keras.callbacks.BackupAndRestore`` keeps a backup in the
job directory (``ringtrain.job_dir()``, the same on every attempt) at the end of each
epoch, and with ``--max-restarts`` ringtrain runs the job again after a failure, which
then resumes from the last backup instead of epoch 0. ``--crash-after-epoch N`` makes
rank 1 kill itself after epoch N of the first attempt, to see it happen.

    python examples/keras_digits.py [--num-proc 2] [--epochs 15] [--max-restarts 1]
        [--job-dir DIR] [--crash-after-epoch N]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import ringtrain

TARGET_ACCURACY = 0.9


def load_digits_split(seed: int = 0):
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)


def train(epochs: int, batch_per_worker: int, crash_after_epoch: int = 0) -> dict:
    import tensorflow as tf

    strategy = ringtrain.tf.strategy()  # before any other TF op
    x_train, x_test, y_train, y_test = load_digits_split()

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices((x_train, y_train))
        ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)  # this worker's shard
        return ds.shuffle(len(x_train), seed=ringtrain.rank()).batch(batch_per_worker).repeat()

    steps_per_epoch = len(x_train) // (batch_per_worker * ringtrain.size())
    with strategy.scope():
        model = tf.keras.Sequential(
            [
                tf.keras.Input((64,)),
                tf.keras.layers.Dense(128, activation="relu"),
                tf.keras.layers.Dense(10),
            ]
        )
        model.compile(
            optimizer=tf.keras.optimizers.Adam(1e-2),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
    first_epoch: list[int] = []

    class Progress(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if not first_epoch:
                first_epoch.append(epoch)
                if ringtrain.is_chief() and ringtrain.restart_count():
                    print(f"restart {ringtrain.restart_count()}: resuming at epoch {epoch + 1}")

        def on_epoch_end(self, epoch, logs=None):
            if crash_after_epoch == epoch + 1 and ringtrain.rank() == 1 and not ringtrain.restart_count():
                print(f"rank 1 kills itself after epoch {epoch + 1}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    # The backup lives in the job directory, which every attempt of this job shares; each
    # worker restores from it at the start of fit, and it is removed when fit completes.
    backup = tf.keras.callbacks.BackupAndRestore(os.path.join(ringtrain.job_dir(), "backup"))
    history = model.fit(
        strategy.distribute_datasets_from_function(dataset_fn),
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        verbose=0,
        callbacks=[backup, Progress()],
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    if ringtrain.is_chief():
        print(f"epochs={epochs} final training loss={history.history['loss'][-1]:.4f}")
    return {"accuracy": float(accuracy), "test_samples": len(x_test), "first_epoch": first_epoch[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-per-worker", type=int, default=32)
    parser.add_argument("--max-restarts", type=int, default=1, help="run the job again after a failure")
    parser.add_argument("--job-dir", help="shared storage on a cluster (default: a new local directory)")
    parser.add_argument("--crash-after-epoch", type=int, default=0, help="rank 1 dies after this epoch, once")
    args = parser.parse_args(argv)

    result = ringtrain.run(
        train,
        args.epochs,
        args.batch_per_worker,
        args.crash_after_epoch,
        num_proc=args.num_proc,
        max_restarts=args.max_restarts,
        job_dir=args.job_dir,
    )
    accuracy = result["accuracy"]
    print(f"held-out accuracy: {accuracy:.4f} on {result['test_samples']} digits ({args.num_proc} workers)")
    if accuracy < TARGET_ACCURACY:
        print(f"accuracy is below {TARGET_ACCURACY}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
