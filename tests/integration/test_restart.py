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

    class DieOnce(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            # After epoch 2 of the first attempt only, and after its backup is written.
            if ringtrain.restart_count() == 0 and ringtrain.rank() == 1 and epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    with strategy.scope():
        tf.keras.utils.set_random_seed(0)
        model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(1)])
        model.compile(optimizer=tf.keras.optimizers.SGD(0.05), loss="mse")
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat().with_options(options)
    backup = tf.keras.callbacks.BackupAndRestore(os.path.join(ringtrain.job_dir(), "backup"))
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
