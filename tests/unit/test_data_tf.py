"""Shards into TensorFlow and Keras, in one process: exact batch counts, shapes, and real fits."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")

from data_store import store  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """Shards of 2 ranks from source partitions of 700, 200, 100 and 0 rows."""
    ranks, _ = store(tmp_path_factory.mktemp("skewed"), [700, 200, 100, 0], tasks=2)
    return ranks


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """3 ranks holding 334, 333 and 333 rows: steps come from the largest."""
    ranks, _ = store(tmp_path_factory.mktemp("uneven"), [1000], tasks=3)
    return ranks


@pytest.mark.parametrize("batch", [1, 7, 32, 333])
def test_every_rank_yields_exactly_steps_per_epoch_full_batches(uneven, batch):
    assert [s.num_rows for s in uneven] == [334, 333, 333]
    steps = 334 // batch
    assert [s.steps_per_epoch(batch) for s in uneven] == [steps] * 3
    seen = []
    for s in uneven:
        ds = s.to_tf_dataset(batch, columns=["id"])
        assert ds.cardinality().numpy() == steps
        batches = [b["id"].numpy() for b in ds]
        assert len(batches) == steps
        assert all(len(b) == batch for b in batches)
        seen.append(np.concatenate(batches))
    covered = len(np.unique(np.concatenate(seen)))
    assert 1000 - covered < len(uneven) * batch


def test_features_and_label_come_as_a_tuple_with_static_shapes(skewed):
    ds = skewed[0].to_tf_dataset(16, columns=["x", "word"], label="id", shapes={"x": (3, 1)})
    features, label = ds.element_spec
    assert features["x"].shape == (16, 3, 1) and features["x"].dtype == tf.float32
    assert features["word"].dtype == tf.string and label.shape == (16,) and label.dtype == tf.int64
    f, y = next(iter(ds))
    assert np.array_equal(f["x"].numpy()[:, 0, 0], y.numpy())
    assert [w.decode() for w in f["word"].numpy()] == [f"w{i}" for i in y.numpy()]
    one = skewed[0].to_tf_dataset(16, columns="flag", label="id")
    assert one.element_spec[0].dtype == tf.bool and one.element_spec[0].shape == (16,)


def test_shuffling_changes_order_each_epoch_and_storage_order_without_it(skewed):
    shard = skewed[1]
    ds = shard.to_tf_dataset(50, columns="id", seed=7)
    first = np.concatenate([b.numpy() for b in ds])
    second = np.concatenate([b.numpy() for b in ds])
    assert not np.array_equal(first, second)
    again = np.concatenate([b.numpy() for b in shard.to_tf_dataset(50, columns="id", seed=7)])
    assert np.array_equal(first, again)
    plain = np.concatenate([b.numpy() for b in shard.to_tf_dataset(50, columns="id", shuffle=False)])
    assert np.array_equal(plain, shard.to_numpy(["id"])["id"][: len(plain)])


def test_tf_keras_fit_over_the_dataset_finishes_two_epochs_and_learns(skewed):
    tf_keras = pytest.importorskip("tf_keras")
    shard = skewed[0]
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential([tf_keras.Input((3,)), tf_keras.layers.Dense(1)])
    model.compile(optimizer=tf_keras.optimizers.SGD(1e-7), loss="mse")
    # The label is a linear function of x (x[:, 0] is the id itself).
    ds = shard.to_tf_dataset(20, columns="x", label="id").map(lambda x, y: (x, tf.cast(y, tf.float32)))
    history = model.fit(ds, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert model.optimizer.iterations.numpy() == 2 * shard.steps_per_epoch(20)


def test_keras3_fit_on_to_numpy_takes_the_same_steps_on_every_rank(uneven):
    keras = pytest.importorskip("keras")
    steps = []
    for shard in uneven:
        cols = shard.to_numpy(batch_size=64)
        x = cols["x"][:, :2] / 1000.0
        y = cols["flag"].astype("float32")
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="sigmoid")])
        model.compile(optimizer="sgd", loss="binary_crossentropy")
        model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=True)
        steps.append(int(model.optimizer.iterations.numpy()))
    assert steps == [uneven[0].steps_per_epoch(64)] * 3
