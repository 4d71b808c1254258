"""Keras training through ringtrain.run: weights agree on every rank and have moved."""

from __future__ import annotations

import numpy as np
import pytest

import ringtrain

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("spark", "no_leftover_workers")]


def _data(rank: int, n: int = 256):
    rng = np.random.default_rng(100 + rank)  # every rank holds a different shard
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (x @ np.arange(1, 9, dtype="float32") > 0).astype("float32").reshape(-1, 1)
    return x, y


def _tf_keras_fit():
    import tensorflow as tf

    strategy = ringtrain.tf.strategy()
    x, y = _data(ringtrain.rank())
    with strategy.scope():
        # Different seeds per rank: the strategy must still start every rank from rank 0's weights.
        tf.keras.utils.set_random_seed(ringtrain.rank())
        model = tf.keras.Sequential(
            [
                tf.keras.Input((8,)),
                tf.keras.layers.Dense(16, activation="relu"),
                tf.keras.layers.Dense(1, activation="sigmoid"),
            ]
        )
        model.compile(optimizer=tf.keras.optimizers.SGD(0.1), loss="binary_crossentropy")
    initial = [w.copy() for w in model.get_weights()]
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat().with_options(options)
    history = model.fit(ds, epochs=2, steps_per_epoch=8, verbose=0)
    return {
        "keras": type(model).__module__,
        "initial": initial,
        "final": model.get_weights(),
        "loss": history.history["loss"],
    }


def _keras3_custom_loop():
    import keras
    import tensorflow as tf

    strategy = ringtrain.tf.strategy()
    x, y = _data(ringtrain.rank())
    with strategy.scope():
        keras.utils.set_random_seed(ringtrain.rank())
        model = keras.Sequential(
            [
                keras.Input((8,)),
                keras.layers.Dense(16, activation="relu"),
                keras.layers.Dense(1, activation="sigmoid"),
            ]
        )
        optimizer = keras.optimizers.SGD(0.1)
        optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.BinaryCrossentropy(reduction="sum_over_batch_size")
    initial = [np.array(v) for v in model.weights]

    @tf.function
    def step(xb, yb):
        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True)) / ringtrain.size()
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        losses = strategy.run(replica_step, args=(xb, yb))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    losses = []
    for i in range(8):
        lo = (i * 32) % len(x)
        losses.append(float(step(tf.constant(x[lo : lo + 32]), tf.constant(y[lo : lo + 32]))))
    return {
        "keras": keras.__version__,
        "initial": initial,
        "final": [np.array(v) for v in model.weights],
        "loss": losses,
    }


def _assert_trained_in_lockstep(results):
    assert len(results) == 2
    first = results[0]
    for other in results[1:]:
        for a, b in zip(first["final"], other["final"], strict=True):
            np.testing.assert_array_equal(a, b)
        assert first["loss"] == other["loss"]
    moved = [not np.array_equal(a, b) for a, b in zip(first["initial"], first["final"], strict=True)]
    assert all(moved), "training did not change every weight"


def test_tf_keras_model_fit_keeps_ranks_identical():
    results = ringtrain.run(_tf_keras_fit, num_proc=2, return_all=True)
    assert results[0]["keras"].startswith("tf_keras"), results[0]["keras"]
    _assert_trained_in_lockstep(results)


def test_keras3_custom_loop_keeps_ranks_identical():
    results = ringtrain.run(_keras3_custom_loop, num_proc=2, return_all=True)
    assert results[0]["keras"].startswith("3."), results[0]["keras"]
    _assert_trained_in_lockstep(results)


def _keras3_fit_on_mpi():
    import keras

    import ringtrain.keras as rk

    x, y = _data(ringtrain.rank())
    keras.utils.set_random_seed(ringtrain.rank())  # only the broadcast makes ranks agree
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ]
    )
    model.compile(
        optimizer=rk.DistributedOptimizer(keras.optimizers.SGD(0.1)),
        loss="binary_crossentropy",
        jit_compile=False,
    )
    model.build((None, 8))
    initial = [w.copy() for w in model.get_weights()]
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=2,
        verbose=0,
        callbacks=[rk.BroadcastGlobalVariablesCallback(0), rk.MetricAverageCallback()],
    )
    return {
        "keras": keras.__version__,
        "initial": initial,
        "final": model.get_weights(),
        "loss": history.history["loss"],
    }


def test_keras3_model_fit_on_mpi_backend_keeps_ranks_identical():
    results = ringtrain.run(_keras3_fit_on_mpi, num_proc=2, backend="mpi", return_all=True)
    assert results[0]["keras"].startswith("3."), results[0]["keras"]
    # Rank 0's initial weights are the broadcast ones; training must have moved them.
    _assert_trained_in_lockstep(results)
