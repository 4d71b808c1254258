"""Restart and resume: a rank killed mid-training, the job restarted, training resumed from the checkpoint."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

import ringtrain

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("spark", "no_leftover_workers")]

EPOCHS = 6


def _fit_with_backup():
    import tensorflow as tf

    strategy = ringtrain.tf.strategy()
    rng = np.random.default_rng(ringtrain.rank())
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")).astype("float32")
    seen: list[int] = []

    class Record(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(epoch)

    backup_dir = os.path.join(ringtrain.job_dir(), "backup")

    def chief_saved_epoch():
        latest = tf.train.latest_checkpoint(os.path.join(backup_dir, "chief"))
        if latest is None:
            return -1
        return int(tf.train.load_checkpoint(latest).get_tensor("ckpt_saved_epoch/.ATTRIBUTES/VARIABLE_VALUE"))

    class DieOnce(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            # After epoch 2 of the first attempt only, once the chief's backup of it is complete
            # (as in a crash after a checkpoint; else the resume point depends on who is faster).
            if ringtrain.restart_count() == 0 and ringtrain.rank() == 1 and epoch == 1:
                wait_until(lambda: chief_saved_epoch() >= epoch)
                os.kill(os.getpid(), signal.SIGKILL)

    with strategy.scope():
        tf.keras.utils.set_random_seed(0)
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(1)])
        model.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss="mse")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat().with_options(options)
    backup = tf.keras.callbacks.BackupAndRestore(backup_dir)
    model.fit(data, epochs=EPOCHS, steps_per_epoch=4, verbose=0, callbacks=[backup, Record(), DieOnce()])
    return {"restart": ringtrain.restart_count(), "epochs": seen, "weights": model.get_weights()}


def test_killed_rank_restarts_and_resumes_from_the_checkpoint(tmp_path, capfd):
    started = time.monotonic()
    results = ringtrain.run(
        _fit_with_backup, num_proc=2, backend="tf", max_restarts=1, job_dir=str(tmp_path), return_all=True
    )
    assert time.monotonic() - started < 240
    assert [r["restart"] for r in results] == [1, 1]
    # The second attempt starts from the checkpointed epoch (index 2), not from 0.
    assert all(r["epochs"] == list(range(2, EPOCHS)) for r in results), [r["epochs"] for r in results]
    for a, b in zip(results[0]["weights"], results[1]["weights"], strict=True):
        np.testing.assert_array_equal(a, b)
    err = capfd.readouterr().err
    assert "restart 1 of 1 after: WorkerLostError" in err and "rank 1" in err and "SIGKILL" in err
    # Both attempts' output is in the rank logs of the one job directory.
    log = (tmp_path / "logs" / "rank-1.log").read_text()
    assert "restart 0" in log and "restart 1" in log


def _keras3_fit_rank0_writes():
    """The README's Keras 3 recipe on the mpi backend: rank 0 writes, every rank restores."""
    import json

    import keras

    import ringtrain.keras as rk

    weights = os.path.join(ringtrain.job_dir(), "checkpoint.weights.h5")
    state = os.path.join(ringtrain.job_dir(), "checkpoint.json")
    rng = np.random.default_rng(ringtrain.rank())
    x = rng.normal(size=(64, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")).astype("float32")
    keras.utils.set_random_seed(ringtrain.rank())  # BroadcastGlobalVariablesCallback evens this out
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(
        optimizer=rk.DistributedOptimizer(keras.optimizers.Adam(0.01)), loss="mse", jit_compile=False
    )
    initial_epoch = 0
    if os.path.exists(state):  # every rank restores
        model.optimizer.build(model.trainable_variables)
        model.load_weights(weights)
        with open(state) as f:
            initial_epoch = json.load(f)["epoch"]

    class SaveOnRankZero(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if ringtrain.rank() == 0:  # rank 0 writes, atomically
                self.model.save_weights(weights + ".tmp.weights.h5")
                os.replace(weights + ".tmp.weights.h5", weights)
                with open(state + ".tmp", "w") as f:
                    json.dump({"epoch": epoch + 1}, f)
                os.replace(state + ".tmp", state)

    seen: list[int] = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(epoch)

        def on_epoch_end(self, epoch, logs=None):
            if ringtrain.restart_count() == 0 and ringtrain.rank() == 1 and epoch == 1:
                wait_until(lambda: saved_epoch(state) >= 2)  # rank 0's checkpoint of this epoch
                os.kill(os.getpid(), signal.SIGKILL)

    model.fit(
        x,
        y,
        batch_size=16,
        epochs=EPOCHS,
        initial_epoch=initial_epoch,
        verbose=0,
        callbacks=[
            rk.BroadcastGlobalVariablesCallback(0),
            rk.MetricAverageCallback(),
            SaveOnRankZero(),
            Record(),
        ],
    )
    return {"restart": ringtrain.restart_count(), "epochs": seen, "weights": model.get_weights()}


def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the checkpoint never appeared")
        time.sleep(0.05)


def saved_epoch(state):
    import json

    try:
        with open(state) as f:
            return json.load(f)["epoch"]
    except (OSError, ValueError):
        return -1


def test_keras3_on_mpi_resumes_from_rank_zeros_checkpoint(tmp_path):
    results = ringtrain.run(
        _keras3_fit_rank0_writes,
        num_proc=2,
        backend="mpi",
        max_restarts=1,
        job_dir=str(tmp_path),
        return_all=True,
    )
    assert [r["restart"] for r in results] == [1, 1]
    assert all(r["epochs"] == list(range(2, EPOCHS)) for r in results), [r["epochs"] for r in results]
    for a, b in zip(results[0]["weights"], results[1]["weights"], strict=True):
        np.testing.assert_array_equal(a, b)
