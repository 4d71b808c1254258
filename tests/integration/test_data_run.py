"""Training on a Spark DataFrame through ringtrain.run(data=...), end to end on 2 workers.

The training set has source partitions of 700, 200, 100 and 0 rows; the held-out set
(7, 0 and 4 rows) leaves the two ranks unequal shares, 6 and 5 rows, so it shows the
equal-steps rule where it matters.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from data_jobs import sized_frame

import ringtrain
from ringtrain.errors import ConfigError, DataError

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("spark", "no_leftover_workers")]

BATCH = 48  # 500 rows a rank: 10 steps, 20 rows left out per rank and epoch
VAL_BATCH = 2


@pytest.fixture(scope="module")
def frames(spark):
    return {"train": sized_frame(spark, [700, 200, 100, 0]), "val": sized_frame(spark, [7, 0, 4])}


def _epoch_ids(shard, batch: int, **options) -> tuple[list[int], np.ndarray]:
    """One pass of ``to_tf_dataset``: each batch's size, and every id read."""
    sizes, ids = [], []
    for features in shard.to_tf_dataset(batch, columns=["id", "x"], **options):
        sizes.append(int(features["id"].shape[0]))
        ids.append(features["id"].numpy())
    return sizes, np.concatenate(ids)


def _skewed_then_fit():
    import tensorflow as tf

    strategy = ringtrain.tf.strategy()
    train, val = ringtrain.data.shard("train"), ringtrain.data.shard("val")
    sizes, ids = _epoch_ids(train, BATCH)
    val_sizes, val_ids = _epoch_ids(val, VAL_BATCH, shuffle=False)

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
    batches_seen = []

    class CountBatches(tf.keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            batches_seen.append(batch)

    steps = train.steps_per_epoch(BATCH)
    dataset = train.to_distributed_dataset(strategy, BATCH, columns="x", label="label")
    history = model.fit(dataset, epochs=2, steps_per_epoch=steps, verbose=0, callbacks=[CountBatches()])
    return {
        "rows": train.num_rows,
        "steps": steps,
        "batch_sizes": sizes,
        "ids": ids.tolist(),
        "val_rows": val.num_rows,
        "val_steps": val.steps_per_epoch(VAL_BATCH),
        "val_batch_sizes": val_sizes,
        "val_ids": val_ids.tolist(),
        "iterations": int(model.optimizer.iterations.numpy()),
        "fit_batches": len(batches_seen),
        "loss": history.history["loss"],
        "weights": model.get_weights(),
    }


@pytest.fixture(scope="module")
def skewed_run(frames):
    return ringtrain.run(_skewed_then_fit, data=frames, num_proc=2, backend="tf", return_all=True)


def test_skewed_partitions_give_equal_steps_and_exact_batches(skewed_run):
    assert [r["rows"] for r in skewed_run] == [500, 500]
    assert {r["steps"] for r in skewed_run} == {500 // BATCH}
    for r in skewed_run:
        assert r["batch_sizes"] == [BATCH] * r["steps"]
    # Unequal shares of the held-out set: the same steps on both ranks all the same.
    assert sorted(r["val_rows"] for r in skewed_run) == [5, 6]
    for r in skewed_run:
        assert r["val_steps"] == 6 // VAL_BATCH
        assert r["val_batch_sizes"] == [VAL_BATCH] * 3


def test_one_epoch_covers_every_row_but_the_documented_remainder(skewed_run):
    ids = np.concatenate([r["ids"] for r in skewed_run])
    assert set(ids) <= set(range(1000))
    missed = 1000 - len(np.unique(ids))
    assert missed == 1000 - 2 * 10 * BATCH  # each rank left out 500 - 480 rows this epoch
    assert missed < 2 * BATCH  # size * batch_size
    # Held out, 6 and 5 rows at 3 steps of 2: the 5-row rank reads one of its rows twice.
    val_ids = [r["val_ids"] for r in skewed_run]
    assert sorted(set(val_ids[0]) | set(val_ids[1])) == list(range(11))
    assert sorted(len(set(ids)) for ids in val_ids) == [5, 6] and all(len(ids) == 6 for ids in val_ids)


def test_tf_keras_fit_under_the_strategy_finishes_two_epochs_and_learns(skewed_run):
    for r in skewed_run:
        assert r["iterations"] == r["fit_batches"] == 2 * r["steps"]
        assert len(r["loss"]) == 2 and r["loss"][1] < r["loss"][0]
    for a, b in zip(skewed_run[0]["weights"], skewed_run[1]["weights"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def _keras3_mpi_fit():
    import keras

    import ringtrain.keras as rk

    shard = ringtrain.data.shard()
    cols = shard.to_numpy(["x", "label"], batch_size=BATCH)  # steps * BATCH rows on every rank
    x = cols["x"][:, 1:2] / 7.0
    y = cols["label"].astype("float32")
    keras.utils.set_random_seed(ringtrain.rank())  # different starts: the broadcast must align them
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, activation="sigmoid")])
    model.compile(
        optimizer=rk.DistributedOptimizer(keras.optimizers.SGD(1.0)),
        loss="binary_crossentropy",
        jit_compile=False,
    )
    history = model.fit(
        x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[rk.BroadcastGlobalVariablesCallback(0)]
    )
    return {
        "rows": len(x),
        "iterations": int(model.optimizer.iterations.numpy()),
        "loss": history.history["loss"],
        "weights": [np.asarray(w) for w in model.get_weights()],
    }


def test_keras3_fit_on_to_numpy_on_mpi_ends_with_identical_weights(frames):
    results = ringtrain.run(_keras3_mpi_fit, data=frames["train"], num_proc=2, backend="mpi", return_all=True)
    assert [r["rows"] for r in results] == [480, 480]
    assert [r["iterations"] for r in results] == [20, 20]
    for a, b in zip(results[0]["weights"], results[1]["weights"], strict=True):
        assert np.array_equal(a, b)
    assert results[0]["weights"][1][0] != 0.0  # the bias moved from its zero start


def _ids_then_fail_once():
    shard = ringtrain.data.shard()
    record = Path(ringtrain.job_dir(), f"attempt{ringtrain.restart_count()}-rank{ringtrain.rank()}.json")
    ids = sorted(int(i) for i in shard.to_numpy(["id"])["id"])
    record.write_text(json.dumps({"ids": ids, "dir": os.environ["RINGTRAIN_DATA_DIR"]}))
    if ringtrain.restart_count() == 0 and ringtrain.rank() == 1:
        raise RuntimeError("rank 1 fails the first attempt")
    return ringtrain.restart_count()


def test_a_restart_stores_the_rows_again_and_each_rank_gets_the_same_ones(frames, tmp_path):
    got = ringtrain.run(
        _ids_then_fail_once,
        data=frames["train"],
        num_proc=2,
        backend="mpi",
        max_restarts=1,
        job_dir=str(tmp_path),
        return_all=True,
    )
    assert got == [1, 1]
    for rank in (0, 1):
        first = json.loads((tmp_path / f"attempt0-rank{rank}.json").read_text())
        second = json.loads((tmp_path / f"attempt1-rank{rank}.json").read_text())
        assert first["ids"] == second["ids"] and len(first["ids"]) == 500
        assert first["dir"] != second["dir"]  # a fresh store per attempt
        assert not Path(first["dir"]).exists() and not Path(second["dir"]).exists()  # removed with the task


def test_run_script_gives_a_script_its_shard(frames, tmp_path):
    script = tmp_path / "count.py"
    script.write_text(
        "import json, sys\n"
        "import ringtrain\n"
        "shard = ringtrain.data.shard(sys.argv[1])\n"
        "path = f'{sys.argv[2]}/rank{ringtrain.rank()}.json'\n"
        "json.dump({'rows': shard.num_rows, 'columns': shard.columns}, open(path, 'w'))\n"
    )
    assert (
        ringtrain.run_script(str(script), "val", str(tmp_path), data=frames, num_proc=2, backend="mpi")
        is None
    )
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rows"] for r in reports) == [5, 6]
    assert reports[0]["columns"] == ["id", "x", "label", "word"]


# ------------------------------------------------------------------ bad input, before training


def _timed_failure(error, match, *args, **kwargs):
    started = time.monotonic()
    with pytest.raises(error, match=match) as raised:
        ringtrain.run(*args, **kwargs)
    assert time.monotonic() - started < 90
    return raised.value


def _never_runs():
    raise AssertionError("fn must not run")


def test_data_that_is_not_a_dataframe(spark):
    pandas = pytest.importorskip("pandas")
    err = _timed_failure(
        ConfigError,
        "data must be a Spark DataFrame",
        _never_runs,
        data=pandas.DataFrame({"a": [1]}),
        num_proc=2,
    )
    assert "spark.createDataFrame(pandas_df)" in str(err) and not isinstance(err, DataError)
    _timed_failure(ConfigError, r"data\['val'\] must be a Spark DataFrame", _never_runs, data={"val": [1]})


def test_a_column_that_cannot_become_a_tensor(spark):
    df = spark.range(4).selectExpr("id", "current_timestamp() AS seen")
    _timed_failure(
        DataError, r"column 'seen' has type timestamp.*F\.unix_seconds", _never_runs, data=df, num_proc=2
    )


def test_an_empty_dataframe(spark, frames):
    empty = sized_frame(spark, [0, 0])
    _timed_failure(
        DataError,
        "dataset 'val' is empty: its DataFrame has no rows",
        _never_runs,
        data={"train": frames["train"], "val": empty},
        num_proc=2,
    )


def test_nulls_found_while_the_rows_move(spark):
    df = spark.range(10).selectExpr("id", "IF(id = 7, NULL, CAST(id AS DOUBLE)) AS y")
    _timed_failure(DataError, "column 'y' has null values", _never_runs, data=df, num_proc=2, backend="mpi")


def _open(name):
    ringtrain.data.shard(name)


def test_a_shard_name_that_was_not_passed(frames):
    err = _timed_failure(
        DataError,
        r"rank [01] on .*: no dataset named 'test' was passed to this job; it has 'train', 'val'",
        _open,
        "test",
        data=frames,
        num_proc=2,
        backend="mpi",
        max_restarts=2,  # a data error is never retried
    )
    assert "Traceback (most recent call last)" in str(err)


def _steps(batch):
    return ringtrain.data.shard("val").steps_per_epoch(batch)


def test_a_batch_larger_than_a_ranks_share(frames, capfd):
    _timed_failure(
        DataError,
        r"batch_size=6 is larger than rank [01]'s share of dataset 'val' \(5 rows; 11 rows over 2 ranks\)",
        _steps,
        6,
        data=frames,
        num_proc=2,
        backend="mpi",
        max_restarts=1,
    )
    assert "restart 1 of 1" not in capfd.readouterr().err
