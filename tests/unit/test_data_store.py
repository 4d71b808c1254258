"""Encode, spill and read back without Spark: bad input, column types, zero-copy views, bounded reads."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from data_store import source_batch, store
from pyspark.sql import types as T

from ringtrain.data import reader
from ringtrain.data._columns import check_schema, normalize_batch
from ringtrain.data.prepare import BlobEncoder, as_datasets, data_error_from
from ringtrain.data.reader import shard
from ringtrain.errors import ConfigError, DataError

# ------------------------------------------------------------------ what data may be


class _NotSpark:
    pass


@pytest.mark.parametrize(
    "data, message",
    [
        ([1, 2], "data must be a Spark DataFrame or a dict of named DataFrames, got builtins.list"),
        (None, "got builtins.NoneType"),
        (np.zeros(3), "got numpy.ndarray; build a DataFrame from it"),
        ({}, "data is an empty dict"),
        ({"train": _NotSpark()}, r"data\['train'\] must be a Spark DataFrame, got .*_NotSpark"),
    ],
)
def test_data_that_is_not_a_dataframe_is_a_config_error(data, message):
    with pytest.raises(ConfigError, match=message):
        as_datasets(data)


def test_a_pandas_dataframe_gets_a_hint():
    pd = pytest.importorskip("pandas")
    with pytest.raises(ConfigError, match=r"pandas.*spark.createDataFrame\(pandas_df\)"):
        as_datasets(pd.DataFrame({"a": [1]}))


def test_supported_column_types_pass():
    schema = T.StructType(
        [
            T.StructField("b", T.ByteType()),
            T.StructField("i", T.IntegerType()),
            T.StructField("l", T.LongType()),
            T.StructField("f", T.FloatType()),
            T.StructField("d", T.DoubleType()),
            T.StructField("ok", T.BooleanType()),
            T.StructField("s", T.StringType()),
            T.StructField("bin", T.BinaryType()),
            T.StructField("v", T.ArrayType(T.FloatType())),
            T.StructField("vi", T.ArrayType(T.LongType())),
        ]
    )
    assert check_schema(schema, "train") == ["b", "i", "l", "f", "d", "ok", "s", "bin", "v", "vi"]


@pytest.mark.parametrize(
    "data_type, says",
    [
        (
            T.TimestampType(),
            r"type timestamp, which cannot become a tensor "
            r"\(turn it into a number, e.g. F.unix_seconds\('c'\)\)",
        ),
        (T.DecimalType(10, 2), r"type decimal\(10,2\), which cannot become a tensor \(cast it to double"),
        (T.MapType(T.StringType(), T.IntegerType()), "type map<string,int>"),
        (T.ArrayType(T.StringType()), r"type array<string>, .*\(arrays must hold numbers, not string\)"),
        (
            T.ArrayType(T.ArrayType(T.FloatType())),
            r"type array<array<float>>, "
            r".*\(nested arrays are not supported; flatten them \(F.flatten\('c'\)\)",
        ),
        (T.StructType([T.StructField("a", T.IntegerType())]), "type struct<a:int>"),
        (T.DateType(), "type date"),
    ],
)
def test_a_column_that_cannot_become_a_tensor_is_named_with_its_type(data_type, says):
    schema = T.StructType([T.StructField("fine", T.FloatType()), T.StructField("c", data_type)])
    with pytest.raises(DataError, match=rf"dataset 'val': column 'c' has {says}"):
        check_schema(schema, "val")


def test_every_bad_column_is_named_at_once_and_duplicates_are_caught():
    schema = T.StructType([T.StructField("t", T.TimestampType()), T.StructField("m", T.DateType())])
    with pytest.raises(DataError, match="column 't' has type timestamp.*column 'm' has type date"):
        check_schema(schema, "train")
    twice = T.StructType([T.StructField("a", T.IntegerType()), T.StructField("a", T.IntegerType())])
    with pytest.raises(DataError, match="two columns named 'a'"):
        check_schema(twice, "train")
    with pytest.raises(DataError, match="has no columns"):
        check_schema(T.StructType([]), "train")


def test_nulls_and_ragged_arrays_are_caught_where_rows_are_encoded():
    with_null = pa.RecordBatch.from_pydict({"a": pa.array([1.0, None])})
    with pytest.raises(DataError, match=r"column 'a' has null values \(dataset 'train', Spark partition 3\)"):
        normalize_batch(with_null, "train", 3)
    ragged = pa.RecordBatch.from_pydict({"v": pa.array([[1.0, 2.0], [3.0]])})
    with pytest.raises(DataError, match=r"column 'v' holds arrays of different lengths \(1 to 2"):
        normalize_batch(ragged, "train", 0)


def test_the_launcher_recovers_an_executors_data_error_from_sparks_text():
    remote = (
        "An exception was thrown from the Python worker. Please see the stack trace below.\n"
        "Traceback (most recent call last):\n  File ...\n"
        "ringtrain.errors.DataError: column 'a' has null values (dataset 'train', Spark partition 3); ...\n"
    )
    err = data_error_from(RuntimeError(remote))
    assert isinstance(err, DataError)
    assert str(err) == "column 'a' has null values (dataset 'train', Spark partition 3); ..."
    assert data_error_from(RuntimeError("something else")) is None


# ------------------------------------------------------------------ stored and read back


def test_rows_come_back_intact_in_every_column_type(tmp_path):
    ranks, _ = store(tmp_path, [700, 200, 100, 0], tasks=2)
    ids = []
    for s in ranks:
        cols = s.to_numpy()
        i = cols["id"]
        ids.append(i)
        assert cols["x"].dtype == np.float32 and cols["x"].shape == (s.num_rows, 3)
        assert np.array_equal(cols["x"][:, 0], i) and np.array_equal(cols["x"][:, 1], -i)
        assert cols["flag"].dtype == np.bool_ and np.array_equal(cols["flag"], i % 3 == 0)
        assert list(cols["word"]) == [f"w{k}" for k in i]
        assert list(cols["raw"]) == [bytes([k % 256]) * (k % 5) for k in i]
        assert s.column_type("x") == ("float32", (3,)) and s.column_type("word") == ("str", ())
    assert sorted(np.concatenate(ids)) == list(range(1000))
    # Dealt within one row per source partition: 350+100+50 each.
    assert [s.num_rows for s in ranks] == [500, 500]


def test_number_columns_are_read_only_views_of_the_mapped_file(tmp_path):
    (first, _), _ = store(tmp_path, [300], tasks=2)
    cols = first.to_numpy(["x", "id"])
    for values in cols.values():
        assert not values.flags.owndata and not values.flags.writeable


def test_a_task_with_several_workers_splits_its_rows(tmp_path):
    ranks, _ = store(tmp_path, [101, 50], tasks=2, workers=2)
    assert [s.num_rows for s in ranks] == [38, 38, 37, 38]  # tasks hold 76 and 75
    assert sorted(np.concatenate([s.to_numpy(["id"])["id"] for s in ranks])) == list(range(151))
    assert {s.steps_per_epoch(10) for s in ranks} == {3}


def test_to_numpy_with_a_batch_size_gives_every_rank_the_same_rows(tmp_path):
    ranks, _ = store(tmp_path, [7, 0, 0, 0, 0], tasks=3)  # 3, 2, 2 rows by placement
    assert [s.num_rows for s in ranks] == [3, 2, 2]
    sized = [s.to_numpy(batch_size=2) for s in ranks]
    assert [len(c["id"]) for c in sized] == [2, 2, 2]
    wrapped = ranks[1].to_numpy(batch_size=1)  # steps = 3: this rank wraps its 2 rows
    assert list(wrapped["id"]) == list(ranks[1].to_numpy()["id"][[0, 1, 0]])
    assert list(wrapped["word"]) == [f"w{k}" for k in wrapped["id"]]


def test_a_batch_larger_than_a_ranks_share_is_an_error_on_every_rank(tmp_path):
    ranks, _ = store(tmp_path, [9, 1], tasks=2)
    shares = [s.num_rows for s in ranks]
    for s in ranks:
        says = rf"batch_size=6 is larger than rank \d's share of dataset 'train' \({min(shares)} rows"
        with pytest.raises(DataError, match=says):
            s.steps_per_epoch(6)
        with pytest.raises(DataError, match="is larger than rank"):
            s.to_numpy(batch_size=6)


def test_shard_names_an_unknown_dataset_and_the_ones_passed(tmp_path, monkeypatch):
    _, dirs = store(tmp_path, [20, 20], tasks=2, names=("train", "val"))
    monkeypatch.setenv("RINGTRAIN_DATA_DIR", str(dirs[1]))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(reader, "_opened", {})
    assert shard("val").name == "val" and shard("val") is shard("val")
    says = "no dataset named 'test' was passed to this job; it has 'train', 'val'"
    with pytest.raises(DataError, match=says):
        shard("test")


def test_shard_outside_a_job_with_data_says_how_to_pass_it(monkeypatch):
    monkeypatch.delenv("RINGTRAIN_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"pass a DataFrame to ringtrain.run\(fn, data=df\)"):
        shard()


def test_unknown_columns_and_bad_shapes_are_named(tmp_path):
    (first, _), _ = store(tmp_path, [40], tasks=2)
    with pytest.raises(DataError, match="no column 'nope'; its columns are id, x, word, flag, raw"):
        first.to_numpy(["nope"])
    says = r"shapes\['x'\]=\(2, 2\) does not fit column 'x' \(array<float32>\[3\]\)"
    with pytest.raises(DataError, match=says):
        first.to_tf_dataset(4, columns="x", shapes={"x": (2, 2)})
    with pytest.raises(DataError, match="seed must be a non-negative int, got -1"):
        first.to_tf_dataset(4, seed=-1)


def test_blobs_stay_near_their_size_bound(tmp_path):
    encoder = BlobEncoder("train", 2, [0, 1], blob_bytes=4096)
    rows = list(encoder.encode(iter([source_batch(0, 3000)]), 0))
    sizes = [len(b) for batch in rows for b in batch.column("ipc").to_pylist()]
    row_bytes = source_batch(0, 3000).nbytes / 3000
    # One blob's rows fill about blob_bytes; IPC framing adds a few hundred bytes.
    assert max(sizes) < 4096 + 1024 + 2 * row_bytes
    assert len(sizes) > 20


def test_task_data_goes_under_the_spill_dir_else_sparks_local_dir(tmp_path, monkeypatch):
    from ringtrain.data.spill import make_task_dir

    monkeypatch.setenv("SPARK_LOCAL_DIRS", f"{tmp_path / 'spark-a'},{tmp_path / 'spark-b'}")
    monkeypatch.delenv("RINGTRAIN_DATA_SPILL_DIR", raising=False)
    first = make_task_dir(3)
    assert first.parent == tmp_path / "spark-a" and first.name.startswith("ringtrain-data-p3-")
    monkeypatch.setenv("RINGTRAIN_DATA_SPILL_DIR", str(tmp_path / "mine"))
    second = make_task_dir(3)
    assert second.parent == tmp_path / "mine" and second != first
