"""Training from a skewed DataFrame on 2 workers, through the data path's components.

The DataFrame (source partitions of 701, 200, 100 and 0 rows) is prepared and spilled
on a local Spark; each ringtrain worker then opens its task's directory, the way a task
agent will set it up once the data path is wired into ringtrain.run (RINGTRAIN_DATA_DIR).
Ranks hold 501 and 500 rows, so at batch 50 a plain Keras epoch would be 11 steps on
one rank and 10 on the other; the shards make both take 10.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from data_jobs import sized_frame, spill_prepared

import ringtrain
from ringtrain.data.prepare import prepare

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("spark", "no_leftover_workers")]

BATCH = 50


@pytest.fixture(scope="module")
def rank_dirs(spark, tmp_path_factory):
    prepared = prepare(sized_frame(spark, [701, 200, 100, 0]), 2)
    shards, dirs = spill_prepared(prepared, tmp_path_factory.mktemp("spilled"))
    assert [s.num_rows for s in shards["train"]] == [501, 500]
    return dirs


def _open_shard(dirs):
    os.environ["RINGTRAIN_DATA_DIR"] = dirs[ringtrain.rank()]
    return ringtrain.data.shard("train")


def _mwms_fit(dirs):
    import tensorflow as tf

    strategy = ringtrain.tf.strategy()
    shard = _open_shard(dirs)

    def middle_column(x):
        # Each replica must get BATCH rows of its own shard a step, not a split of them.
        tf.debugging.assert_equal(tf.shape(x)[0], BATCH, message="rows per replica step")
        return x[:, 1:2] / 7.0

    with strategy.scope():
        tf.keras.utils.set_random_seed(ringtrain.rank())
        model = tf.keras.Sequential(
            [
                tf.keras.Input((3,)),
                # x = [id, id % 7, 1] and label = (id % 7 >= 3): learn from the middle column.
                tf.keras.layers.Lambda(middle_column),
                tf.keras.layers.Dense(1, activation="sigmoid"),
            ]
        )
        model.compile(optimizer=tf.keras.optimizers.SGD(1.0), loss="binary_crossentropy")

    seen_batches = []

    class CountBatches(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen_batches.append(batch)

    steps = shard.steps_per_epoch(BATCH)
    dataset = shard.to_distributed_dataset(strategy, BATCH, columns="x", label="label")
    history = model.fit(dataset, epochs=2, steps_per_epoch=steps, verbose=0, callbacks=[CountBatches()])
    return {
        "steps": steps,
        "iterations": int(model.optimizer.iterations.numpy()),
        "batches": len(seen_batches),
        "loss": history.history["loss"],
        "weights": model.get_weights(),
    }


def test_tf_keras_fit_under_the_strategy_takes_equal_steps_and_learns(rank_dirs):
    results = ringtrain.run(_mwms_fit, rank_dirs, num_proc=2, backend="tf", return_all=True)
    steps = {r["steps"] for r in results}
    assert steps == {10}  # 501 // 50 and 500 // 50 alike
    for r in results:
        assert r["iterations"] == r["batches"] == 2 * 10
        assert len(r["loss"]) == 2 and r["loss"][1] < r["loss"][0]
    for a, b in zip(results[0]["weights"], results[1]["weights"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def _keras3_mpi_fit(dirs):
    import keras

    import ringtrain.keras as rk

    shard = _open_shard(dirs)
    cols = shard.to_numpy(["x", "label"], batch_size=BATCH)  # steps * BATCH rows on every rank
    x = cols["x"][:, 1:2] / 7.0
    y = cols["label"].astype("float32")
    keras.utils.set_random_seed(ringtrain.rank())  # different starts: the broadcast must align them
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=rk.DistributedOptimizer(keras.optimizers.SGD(1.0)), loss="binary_crossentropy")
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[rk.BroadcastGlobalVariablesCallback(0)])
    return {
        "rows": len(x),
        "iterations": int(model.optimizer.iterations.numpy()),
        "weights": [np.asarray(w) for w in model.get_weights()],
    }


def test_keras3_fit_on_to_numpy_with_the_mpi_optimizer_ends_with_identical_weights(rank_dirs):
    results = ringtrain.run(_keras3_mpi_fit, rank_dirs, num_proc=2, backend="mpi", return_all=True)
    assert [r["rows"] for r in results] == [500, 500]
    assert [r["iterations"] for r in results] == [20, 20]
    for a, b in zip(results[0]["weights"], results[1]["weights"], strict=True):
        assert np.array_equal(a, b)
    assert results[0]["weights"][1][0] != 0.0  # the bias moved from its zero start
