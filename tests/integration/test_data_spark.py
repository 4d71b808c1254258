"""The data path on a real local Spark: exact placement, skewed partitions, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from data_jobs import sized_frame, spill_prepared

from ringtrain.data import _placement
from ringtrain.data.prepare import data_error_from, prepare
from ringtrain.errors import DataError

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("spark")]


def _partition_sizes(df) -> list[int]:
    from pyspark.sql import functions as F

    rows = df.groupBy(F.spark_partition_id().alias("p")).count().collect()
    found = {r.p: r["count"] for r in rows}
    return [found.get(p, 0) for p in range(max(found, default=-1) + 1)]


def test_the_pure_hash_is_sparks_and_each_key_lands_on_its_partition(spark):
    from pyspark.sql import functions as F

    values = list(range(-50, 300)) + [2**31 - 1, -(2**31)]
    df = spark.createDataFrame([(v,) for v in values], "k int").select("k", F.hash("k").alias("h"))
    assert {r.k: r.h for r in df.collect()} == {v: _placement.spark_hash_int(v) for v in values}
    for n in (1, 2, 3, 5, 8, 13):
        keys = _placement.keys_for_partitions(n)
        placed = (
            spark.createDataFrame(list(enumerate(keys)), "target int, key int")
            .repartition(n, "key")
            .select("target", F.spark_partition_id().alias("p"))
            .collect()
        )
        assert sorted((r.target, r.p) for r in placed) == [(t, t) for t in range(n)]


@pytest.fixture(scope="module")
def skewed_df(spark):
    df = sized_frame(spark, [700, 200, 100, 0])
    assert _partition_sizes(df) == [700, 200, 100]  # and a fourth, empty partition
    assert df.rdd.getNumPartitions() == 4
    return df


@pytest.mark.parametrize("barrier", [False, True], ids=["plain", "barrier"])
def test_skewed_partitions_give_two_ranks_equal_steps_and_cover_every_row(skewed_df, tmp_path, barrier):
    from pyspark.sql import functions as F

    prepared = prepare(skewed_df, 2)
    placed = prepared.input_df.groupBy("target", F.spark_partition_id().alias("p")).count().collect()
    assert sorted({(r.target, r.p) for r in placed}) == [(0, 0), (1, 1)]  # every blob on its task
    shards, _ = spill_prepared(prepared, tmp_path, barrier=barrier)
    ranks = shards["train"]
    assert sum(s.num_rows for s in ranks) == 1000
    # Dealt round-robin inside each source partition: 350+100+50 rows each.
    assert [s.num_rows for s in ranks] == [500, 500]
    all_ids = np.concatenate([s.to_numpy(["id"])["id"] for s in ranks])
    assert sorted(all_ids) == list(range(1000))
    for batch in (32, 500):
        steps = [s.steps_per_epoch(batch) for s in ranks]
        assert steps == [steps[0]] * 2
        seen = []
        for s in ranks:
            batches = [b["id"].numpy() for b in s.to_tf_dataset(batch, columns=["id", "x"])]
            assert len(batches) == steps[0] and all(len(b) == batch for b in batches)
            seen.append(np.concatenate(batches))
        missed = 1000 - len(np.unique(np.concatenate(seen)))
        assert 0 <= missed < 2 * batch


def test_any_partitioning_reaches_any_number_of_tasks(spark, tmp_path):
    few = sized_frame(spark, [10])
    shards, _ = spill_prepared(prepare(few, 3), tmp_path / "few")
    assert [s.num_rows for s in shards["train"]] == [4, 3, 3]
    many = sized_frame(spark, [5, 0, 9, 1, 0, 30, 2, 3])
    shards, _ = spill_prepared(prepare(many, 2), tmp_path / "many")
    counts = [s.num_rows for s in shards["train"]]
    assert sum(counts) == 50 and max(counts) - min(counts) <= 8  # within a row per source partition


def test_named_datasets_travel_together_and_split_across_workers(spark, tmp_path):
    train, val = sized_frame(spark, [60, 40]), sized_frame(spark, [9, 0, 3])
    prepared = prepare({"train": train, "val": val}, 2)
    assert prepared.names == ("train", "val")
    shards, _ = spill_prepared(prepared, tmp_path, workers_per_task=2)
    assert [s.num_rows for s in shards["train"]] == [25, 25, 25, 25]
    val_rows = [s.num_rows for s in shards["val"]]
    task_rows = [val_rows[0] + val_rows[1], val_rows[2] + val_rows[3]]
    assert abs(task_rows[0] - task_rows[1]) <= 2  # within a row per non-empty source partition
    assert all(abs(a - b) <= 1 for a, b in (val_rows[:2], val_rows[2:]))  # then split per worker
    val_ids = np.concatenate([s.to_numpy(["id"])["id"] for s in shards["val"]])
    assert sorted(val_ids) == list(range(12))
    assert shards["val"][0].columns == ["id", "x", "label", "word"]


def test_an_empty_dataframe_fails_before_any_stage(spark):
    empty = sized_frame(spark, [0, 0])
    with pytest.raises(DataError, match="dataset 'val' is empty: its DataFrame has no rows"):
        prepare({"train": sized_frame(spark, [3]), "val": empty}, 2)


def test_a_column_that_cannot_become_a_tensor_fails_before_any_job(spark):
    df = spark.range(3).selectExpr("id", "current_timestamp() AS seen", "map('a', 1) AS m")
    with pytest.raises(
        DataError, match="column 'seen' has type timestamp.*column 'm' has type map<string,int>"
    ):
        prepare(df, 2, check_empty=False)


def test_nulls_found_on_an_executor_come_back_as_a_data_error(spark, tmp_path):
    df = spark.range(10).selectExpr("id", "IF(id = 7, NULL, CAST(id AS DOUBLE)) AS y")
    prepared = prepare(df, 2)
    with pytest.raises(Exception) as raised:
        spill_prepared(prepared, tmp_path)
    err = data_error_from(raised.value)
    assert isinstance(err, DataError)
    assert "column 'y' has null values (dataset 'train', Spark partition" in str(err)


def test_arrays_of_different_lengths_in_different_partitions_are_named(spark, tmp_path):
    df = sized_frame(spark, [4, 4], width=[3, 5])
    with pytest.raises(Exception) as raised:
        spill_prepared(prepare(df, 1), tmp_path)
    err = data_error_from(raised.value)
    assert err is not None and "column 'x' of dataset 'train' holds arrays of different lengths" in str(err)


def test_prepare_and_a_barrier_spill_work_over_spark_connect(tmp_path):
    pytest.importorskip("grpc_status", reason="needs pyspark's Connect client extras (ringtrain[connect])")
    helpers = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")
    cmd = [sys.executable, os.path.join(helpers, "data_connect.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    null_error = result.pop("null_error")
    assert result == {"rows": [500, 500], "val_rows": result["val_rows"], "ids_ok": True, "steps": [15, 15]}
    assert sum(result["val_rows"]) == 5
    assert "column 'y' has null values (dataset 'train', Spark partition" in null_error
