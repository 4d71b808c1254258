"""Driver side of the data path: check the user's DataFrames and build the training stage's input.

:func:`prepare` turns ``data`` (a DataFrame, or a dict of named DataFrames) into one
DataFrame with exactly ``num_tasks`` partitions, partition ``t`` holding every row
that barrier task ``t`` will train on, in every named dataset. It uses the DataFrame
API only (no SparkContext, no RDDs), so it works on classic and Spark Connect sessions
alike, and it starts no Spark job except the emptiness check:

1. each source DataFrame goes through ``mapInArrow``, which deals its rows to the
   tasks round-robin within each source partition (so any partitioning, skewed or
   empty, ends within one row per source partition of even) and re-encodes each
   task's rows as Arrow IPC blobs of bounded size;
2. the named sets are unioned, and one ``repartition(num_tasks, key)`` moves every
   blob to its task: each task's key is chosen so that Spark's hash partitioning
   sends it exactly there (see ``_placement``).

The rows thus move once, through that shuffle, straight into the training stage.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, DataError
from ._columns import check_schema, normalize_batch
from ._placement import keys_for_partitions, round_robin_slices

logger = logging.getLogger(__name__)

DEFAULT_NAME = "train"

# Rows of the stage input: dataset name, target task, the shuffle key that reaches
# that task, and an Arrow IPC stream holding some of the task's rows.
BLOB_SCHEMA = "name string, target int, key int, ipc binary"

# A blob holds at most this many bytes of rows. Spark hands Python batches of at most
# spark.sql.execution.arrow.maxBytesPerBatch (64 MiB by default), so a task reads about
# 16 blobs at a time.
BLOB_BYTES = 4 << 20
# An encoder holds at most this much pending output across all tasks before flushing.
PENDING_BYTES = 64 << 20


def as_datasets(data: Any) -> dict[str, Any]:
    """``{name: DataFrame}`` from ``data``; a lone DataFrame is named ``"train"``.

    Raises ConfigError for anything but a Spark DataFrame or a non-empty dict of them.
    """
    from pyspark.sql import DataFrame  # classic and Connect DataFrames both derive from it

    if isinstance(data, DataFrame):
        return {DEFAULT_NAME: data}
    if isinstance(data, Mapping):
        if not data:
            raise ConfigError("data is an empty dict; pass a Spark DataFrame or {'train': df, ...}")
        datasets = {}
        for name, df in data.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"data's keys name the datasets and must be non-empty str, got {name!r}")
            if not isinstance(df, DataFrame):
                raise ConfigError(f"data[{name!r}] must be a Spark DataFrame, got {_describe(df)}")
            datasets[name] = df
        return datasets
    raise ConfigError(f"data must be a Spark DataFrame or a dict of named DataFrames, got {_describe(data)}")


def _describe(value: Any) -> str:
    kind = type(value)
    where = f"{kind.__module__}.{kind.__qualname__}"
    if kind.__module__.startswith("pandas"):
        return f"{where}; turn it into one with spark.createDataFrame(pandas_df)"
    if kind.__module__.startswith("numpy"):
        return f"{where}; build a DataFrame from it (spark.createDataFrame) or load it inside fn"
    return where


@dataclass(frozen=True)
class PreparedData:
    """The training stage's input and what the task agents need to read it.

    ``input_df`` has ``num_tasks`` partitions; partition ``t`` holds task ``t``'s rows
    of every dataset, as rows of :data:`BLOB_SCHEMA`. Hand ``names`` to each task agent,
    with the batches of its partition, through :func:`ringtrain.data.spill.spill`.
    """

    input_df: Any
    names: tuple[str, ...]
    columns: Mapping[str, tuple[str, ...]]
    num_tasks: int


def prepare(data: Any, num_tasks: int, *, check_empty: bool = True) -> PreparedData:
    """Check ``data`` and build the input DataFrame of a ``num_tasks``-task training stage.

    Raises ConfigError when ``data`` is not a DataFrame (or dict of them), and DataError
    for a column that cannot become a tensor or, with ``check_empty``, an empty
    DataFrame. The emptiness check runs ``DataFrame.isEmpty()``, a Spark job that stops
    at the first row found; the task agents check row counts again after the data arrives.
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ConfigError(f"num_tasks must be a positive int, got {num_tasks!r}")
    datasets = as_datasets(data)
    columns = {name: tuple(check_schema(df.schema, name)) for name, df in datasets.items()}
    if check_empty:
        for name, df in datasets.items():
            if df.isEmpty():
                raise DataError(f"dataset {name!r} is empty: its DataFrame has no rows")
    keys = keys_for_partitions(num_tasks)
    encoded = [
        df.mapInArrow(BlobEncoder(name, num_tasks, keys), BLOB_SCHEMA) for name, df in datasets.items()
    ]
    combined = functools.reduce(lambda a, b: a.unionByName(b), encoded)
    input_df = combined.repartition(num_tasks, "key")
    return PreparedData(input_df, tuple(datasets), columns, num_tasks)


class BlobEncoder:
    """The ``mapInArrow`` function of one dataset: deals rows to tasks, emits IPC blobs.

    Within a source partition, each Arrow batch is cut into one contiguous slice per
    task; the tasks that get the extra rows of an uneven cut rotate from batch to batch,
    starting at the partition's id, so every task's share of the partition is within
    one row of every other's.
    """

    def __init__(self, name: str, num_tasks: int, keys: list[int], blob_bytes: int = BLOB_BYTES):
        self.name = name
        self.num_tasks = num_tasks
        self.keys = keys
        self.blob_bytes = blob_bytes

    def __call__(self, batches):
        from pyspark import TaskContext

        return self.encode(batches, TaskContext.get().partitionId())

    def encode(self, batches, source: int):
        """Blob rows for the Arrow ``batches`` of source partition ``source``."""
        import pyarrow as pa

        rotation = source % self.num_tasks
        pending = [_PendingBlob() for _ in range(self.num_tasks)]
        for batch in batches:
            if batch.num_rows == 0:
                continue
            batch = normalize_batch(batch, self.name, source)
            row_bytes = max(1, batch.nbytes // batch.num_rows)
            rows_per_blob = max(1, self.blob_bytes // row_bytes)
            ready: list[tuple[int, pa.Buffer]] = []
            slices, rotation = round_robin_slices(batch.num_rows, self.num_tasks, rotation)
            for target, start, stop in slices:
                blob = pending[target]
                while start < stop:
                    take = min(stop - start, max(1, rows_per_blob - blob.rows))
                    ready.extend((target, done) for done in blob.add(batch.slice(start, take)))
                    start += take
                    if blob.rows >= rows_per_blob:
                        ready.append((target, blob.finish()))
            if sum(p.nbytes for p in pending) > PENDING_BYTES:
                ready.extend((t, p.finish()) for t, p in enumerate(pending) if p.rows)
            if ready:
                yield self._rows(ready)
        last = [(t, p.finish()) for t, p in enumerate(pending) if p.rows]
        if last:
            yield self._rows(last)

    def _rows(self, blobs: list[tuple[int, Any]]):
        import pyarrow as pa

        targets = [t for t, _ in blobs]
        return pa.RecordBatch.from_arrays(
            [
                pa.array([self.name] * len(blobs), pa.string()),
                pa.array(targets, pa.int32()),
                pa.array([self.keys[t] for t in targets], pa.int32()),
                pa.array([blob.to_pybytes() for _, blob in blobs], pa.binary()),
            ],
            names=["name", "target", "key", "ipc"],
        )


class _PendingBlob:
    """One task's rows waiting to be sent: an open Arrow IPC stream in memory."""

    def __init__(self):
        self._sink = None
        self._writer = None
        self._schema = None
        self.rows = 0

    @property
    def nbytes(self) -> int:
        return self._sink.tell() if self._sink is not None else 0

    def add(self, piece) -> list:
        """Append ``piece``; returns the finished blob if the schema changed (else [])."""
        import pyarrow as pa

        done = []
        if self._writer is not None and not piece.schema.equals(self._schema, check_metadata=True):
            done.append(self.finish())
        if self._writer is None:
            self._sink = pa.BufferOutputStream()
            self._schema = piece.schema
            self._writer = pa.ipc.new_stream(self._sink, piece.schema)
        self._writer.write_batch(piece)
        self.rows += piece.num_rows
        return done

    def finish(self):
        self._writer.close()
        blob = self._sink.getvalue()
        self._sink = self._writer = self._schema = None
        self.rows = 0
        return blob


_ERROR_LINE = re.compile(r"ringtrain\.errors\.DataError: ([^\n]*)")


def data_error_from(error: BaseException) -> DataError | None:
    """The DataError an executor raised while encoding rows, recovered from Spark's exception.

    Spark reports a Python failure on an executor as its own exception type whose text
    holds the remote traceback; the launcher calls this to give the user the DataError
    itself. None when ``error`` does not come from one.
    """
    found = _ERROR_LINE.findall(str(error))
    return DataError(found[-1]) if found else None


_FINAL_EXCEPTION = re.compile(r"^(?!\s)(?!Traceback \(most recent call last\):)(.*)$", re.MULTILINE)


def raised_data_error(traceback_text: str) -> str | None:
    """The message of the DataError a worker's traceback ends with, or None if it ends with another.

    A worker reports a failure of ``fn`` as traceback text; a DataError there (a shard name
    that was not passed, a batch larger than a rank's share) is the job's data at fault,
    which no restart can fix.
    """
    blocks = traceback_text.rstrip().rsplit("Traceback (most recent call last):", 1)
    found = _FINAL_EXCEPTION.search(blocks[-1].lstrip("\n"))
    prefix = "ringtrain.errors.DataError: "
    if found is None or not found.group(1).startswith(prefix):
        return None
    return found.group(1)[len(prefix) :]
