"""More data than memory: through ringtrain.run, each of 2 workers trains over a shard larger
than the memory it may still allocate.

Each worker imports TensorFlow and builds its model, then caps its private memory
(RLIMIT_DATA: heap and anonymous mappings; file mappings do not count) at what it uses
plus HEADROOM, shows that its shard's size can no longer be allocated, and trains one
epoch over the shard (2 x HEADROOM of float32 features) with ringtrain's allreduce
optimizer. Its resident memory, file pages included, must rise by less than the shard.
"""

from __future__ import annotations

import numpy as np
import pytest

import ringtrain

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.usefixtures("spark", "no_leftover_workers"),
]

WIDTH = 1024  # float32 features: 4 KiB a row
HEADROOM = 256 << 20
ROWS_PER_RANK = 2 * HEADROOM // (4 * WIDTH)  # 512 MiB of features per rank
BATCH = 512


def _frame(spark, rows: int):
    """``rows`` rows of WIDTH pseudo-random floats in [-1, 1) (from Spark's hash, no Python in the
    executors) and a label the first two features make."""
    from pyspark.sql import functions as F

    x = F.expr(f"transform(sequence(0, {WIDTH - 1}), i -> CAST(hash(id, i) / 2147483648.0 AS FLOAT))")
    return (
        spark.range(0, rows, 1, 8)
        .select(x.alias("x"))
        .select("x", (F.col("x")[0] + 2 * F.col("x")[1]).cast("float").alias("y"))
    )


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _fit_under_a_cap():
    import resource

    import tensorflow as tf

    import ringtrain.keras as rk

    shard = ringtrain.data.shard()
    shard_bytes = shard.num_rows * WIDTH * 4
    tf.keras.utils.set_random_seed(ringtrain.rank())
    model = tf.keras.Sequential([tf.keras.Input((WIDTH,)), tf.keras.layers.Dense(1)])
    model.compile(optimizer=rk.DistributedOptimizer(tf.keras.optimizers.SGD(0.05)), loss="mse")
    dataset = shard.to_tf_dataset(BATCH, columns="x", label="y")

    cap = _status_kb("VmData") * 1024 + HEADROOM
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    try:
        bytearray(shard_bytes)
        cap_holds = False
    except MemoryError:
        cap_holds = True
    rss_before = _status_kb("VmRSS")
    history = model.fit(dataset, epochs=1, verbose=0, callbacks=[rk.BroadcastGlobalVariablesCallback(0)])
    return {
        "cap_holds": cap_holds,
        "shard_bytes": shard_bytes,
        "steps": int(model.optimizer.iterations.numpy()),
        "expected_steps": shard.steps_per_epoch(BATCH),
        "loss": history.history["loss"][-1],
        "zero_loss": float(np.mean(shard.to_numpy(["y"])["y"] ** 2)),  # predicting 0 scores this
        "rss_rise_kb": _status_kb("VmHWM") - rss_before,
        "weights": [np.asarray(w) for w in model.get_weights()],
    }


def test_each_worker_trains_over_a_shard_larger_than_its_memory_cap(spark):
    df = _frame(spark, 2 * ROWS_PER_RANK)
    results = ringtrain.run(
        _fit_under_a_cap, data=df, num_proc=2, backend="mpi", return_all=True, timeout=900
    )
    for rank, r in enumerate(results):
        print(
            f"rank {rank}: {r['shard_bytes'] >> 20} MiB shard, {r['steps']} steps, loss {r['loss']:.4f} "
            f"(zero model {r['zero_loss']:.4f}), resident memory rose {r['rss_rise_kb'] >> 10} MiB"
        )
    for r in results:
        assert r["cap_holds"], "the cap should forbid allocating the shard's size"
        assert r["shard_bytes"] == 2 * HEADROOM
        assert r["steps"] == r["expected_steps"] == ROWS_PER_RANK // BATCH
        assert np.isfinite(r["loss"]) and r["loss"] < r["zero_loss"]
        # Pages read through the mapping were handed back as the epoch went.
        assert r["rss_rise_kb"] * 1024 < r["shard_bytes"]
    for a, b in zip(results[0]["weights"], results[1]["weights"], strict=True):
        np.testing.assert_array_equal(a, b)
