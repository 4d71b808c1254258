"""Task-agent side of the data path: write the task's rows to local disk, then share the counts.

A barrier task's input partition (built by :func:`ringtrain.data.prepare.prepare`)
arrives as Arrow batches of IPC blobs. :func:`spill` streams them to disk, one Arrow
IPC file per dataset, holding no more than one input batch in memory. Each column is
first appended to a raw file; once the row count is known, the columns become one
record batch per file, so workers can memory-map every column as one contiguous array.

After the spill, each task's :class:`SpillSummary` (a few hundred bytes of JSON) goes
through the job's one exchange among tasks; :func:`build_layout` then gives every rank
its rows, and :func:`write_layout` leaves that where the task's workers read it.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ._columns import ColumnInfo, column_info
from ._steps import split_rows

logger = logging.getLogger(__name__)

LAYOUT_FILE = "layout.json"
# While the IPC file is written from the raw column files, hand back their mapped pages
# every this many bytes, so the agent's resident memory stays bounded.
_WRITE_SLICE = 16 << 20


def make_task_dir(partition: int, root: str | None = None) -> Path:
    """A fresh directory for one task's data, on the executor's local disk.

    Under ``root`` if given (the job's ``RINGTRAIN_DATA_SPILL_DIR``), else this process's
    ``RINGTRAIN_DATA_SPILL_DIR``, else the first of Spark's local directories
    (``SPARK_LOCAL_DIRS``, which Spark gives its Python workers), else the system
    temporary directory. The caller removes it when the task ends. Raises DataError
    when the directory cannot be made.
    """
    import tempfile

    from .. import env

    root = root or env.get("RINGTRAIN_DATA_SPILL_DIR") or os.environ.get("SPARK_LOCAL_DIRS", "").split(",")[0]
    try:
        if root:
            Path(root).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"ringtrain-data-p{partition}-", dir=root or None))
    except OSError as err:
        raise DataError(
            f"task {partition} cannot make a directory for its rows under {root or tempfile.gettempdir()} "
            f"({err}); set RINGTRAIN_DATA_SPILL_DIR to a writable local disk"
        ) from None


def dataset_file(directory: str | Path, index: int) -> Path:
    """The Arrow IPC file of the ``index``-th dataset (names can hold any character)."""
    return Path(directory) / f"dataset-{index}.arrow"


@dataclass(frozen=True)
class Piece:
    """One task's part of one dataset: its rows and, if it has any, its columns."""

    rows: int
    columns: tuple[ColumnInfo, ...] = ()


@dataclass(frozen=True)
class SpillSummary:
    """What one task stored, shared with every other task after the spill."""

    partition: int
    pieces: Mapping[str, Piece] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "partition": self.partition,
                "pieces": {
                    name: {"rows": p.rows, "columns": [c.to_dict() for c in p.columns]}
                    for name, p in self.pieces.items()
                },
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SpillSummary:
        data = json.loads(text)
        pieces = {
            name: Piece(int(p["rows"]), tuple(ColumnInfo.from_dict(c) for c in p["columns"]))
            for name, p in data["pieces"].items()
        }
        return cls(int(data["partition"]), pieces)


def spill(
    batches: Iterable[Any], directory: str | Path, partition: int, names: Sequence[str]
) -> SpillSummary:
    """Store this task's rows of every dataset in ``names`` under ``directory``.

    ``batches`` are the task's input Arrow record batches (rows of name, target, key and
    IPC blob). Every blob must be meant for ``partition``; one that is not means Spark
    placed rows differently from what ringtrain computed, and raises DataError.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index = {name: i for i, name in enumerate(names)}
    writers: dict[str, _DatasetWriter] = {}
    try:
        for batch in batches:
            _spill_batch(batch, directory, partition, index, writers)
        pieces = {}
        for name in names:
            writer = writers.get(name)
            pieces[name] = writer.finish() if writer else Piece(0)
    except OSError as err:
        raise DataError(
            f"task {partition} could not store its rows under {directory} ({err}); it needs room for "
            "them twice over while it writes them: set RINGTRAIN_DATA_SPILL_DIR to a local disk with room"
        ) from None
    finally:
        for writer in writers.values():
            writer.discard_raw()
    summary = SpillSummary(partition, pieces)
    logger.info(
        "partition %s stored %s", partition, ", ".join(f"{n}: {p.rows} rows" for n, p in pieces.items())
    )
    return summary


def _spill_batch(batch, directory: Path, partition: int, index, writers) -> None:
    import pyarrow as pa

    names = batch.column("name").to_pylist()
    targets = batch.column("target").to_pylist()
    blobs = batch.column("ipc")
    for row, (name, target) in enumerate(zip(names, targets, strict=True)):
        if target != partition:
            raise DataError(
                f"task {partition} received rows meant for task {target}: Spark's hash partitioning "
                "placed them differently from what ringtrain computed; please report this with your "
                "Spark version"
            )
        if name not in index:
            raise DataError(f"task {partition} received rows of unknown dataset {name!r}")
        writer = writers.get(name)
        if writer is None:
            writer = writers[name] = _DatasetWriter(directory, index[name], name, partition)
        with pa.ipc.open_stream(blobs[row].as_buffer()) as reader:
            for piece in reader:
                writer.append(piece)


class _DatasetWriter:
    """Appends one dataset's batches column by column to raw files, then writes the IPC file."""

    def __init__(self, directory: Path, index: int, name: str, partition: int):
        self.path = dataset_file(directory, index)
        self.name = name
        self.partition = partition
        self.schema = None
        self.rows = 0
        self._columns: list[_RawColumn] = []

    def append(self, batch) -> None:
        if self.schema is None:
            self.schema = batch.schema
            self._columns = [_RawColumn(self.path, i, f.type) for i, f in enumerate(batch.schema)]
        elif not batch.schema.equals(self.schema, check_metadata=True):
            raise DataError(self._mismatch(batch.schema))
        for column, array in zip(self._columns, batch.columns, strict=True):
            column.append(array)
        self.rows += batch.num_rows

    def _mismatch(self, other) -> str:
        for mine, theirs in zip(self.schema, other, strict=True):
            if mine.type != theirs.type or mine.metadata != theirs.metadata:
                a, b = column_info(mine), column_info(theirs)
                if a.kind == b.kind == "vector" and a.width != b.width:
                    return (
                        f"column {mine.name!r} of dataset {self.name!r} holds arrays of different lengths "
                        f"({a.width} and {b.width}, task {self.partition}); ringtrain needs one length per "
                        "column: pad or cut them, e.g. F.slice(c, 1, n)"
                    )
                return (
                    f"column {mine.name!r} of dataset {self.name!r} arrived as {a.describe()} and as "
                    f"{b.describe()} (task {self.partition}); cast it to one type"
                )
        return f"dataset {self.name!r} changed its columns while arriving (task {self.partition})"

    def finish(self) -> Piece:
        """Write the dataset as one record batch, from the raw column files; drop those."""
        maps: list[mmap.mmap] = []
        try:
            self._write_ipc(maps)
        finally:
            for mapped in maps:
                try:
                    mapped.close()
                except BufferError:  # an Arrow buffer still points into it; freed with that
                    pass
        self.discard_raw()
        return Piece(self.rows, tuple(column_info(f) for f in self.schema))

    def _write_ipc(self, maps: list[mmap.mmap]) -> None:
        import pyarrow as pa

        arrays = []
        for column in self._columns:
            column.close()
            arrays.append(column.array(self.rows, [column.mapped(part, maps) for part in column.parts]))
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        with open(self.path, "wb") as out:
            sink = pa.PythonFile(_ReleasingSink(out, maps), mode="w")
            with pa.ipc.new_file(sink, self.schema) as writer:
                writer.write_batch(batch)

    def discard_raw(self) -> None:
        for column in self._columns:
            column.close()
            for part in column.parts:
                part.unlink(missing_ok=True)


class _RawColumn:
    """One column's values as raw bytes on disk: a data file, and for strings an offsets file."""

    def __init__(self, dataset_path: Path, index: int, arrow_type):
        import pyarrow as pa

        self.type = arrow_type
        self.variable = (
            pa.types.is_string(arrow_type)
            or pa.types.is_large_string(arrow_type)
            or pa.types.is_binary(arrow_type)
            or pa.types.is_large_binary(arrow_type)
        )
        stem = dataset_path.with_suffix(f".{index}")
        self.parts = [stem.with_suffix(stem.suffix + ".data")]
        self._files = [open(self.parts[0], "wb")]
        if self.variable:
            self.parts.append(stem.with_suffix(stem.suffix + ".offsets"))
            self._files.append(open(self.parts[1], "wb"))
            self._files[1].write(bytes(8))  # the first int64 offset, 0
            self._end = 0

    def append(self, array) -> None:
        import numpy as np
        import pyarrow as pa

        if not self.variable:
            values = array.flatten() if pa.types.is_fixed_size_list(array.type) else array
            self._files[0].write(memoryview(values.to_numpy(zero_copy_only=True)))
            return
        large = pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type)
        offsets = np.frombuffer(array.buffers()[1], np.int64 if large else np.int32)
        offsets = offsets[array.offset : array.offset + len(array) + 1]
        first, last = int(offsets[0]), int(offsets[-1])
        self._files[0].write(memoryview(array.buffers()[2])[first:last])
        self._files[1].write(memoryview(offsets[1:].astype(np.int64) - first + self._end))
        self._end += last - first

    def close(self) -> None:
        for f in self._files:
            f.close()

    @staticmethod
    def mapped(path: Path, maps: list) -> Any:
        import pyarrow as pa

        size = path.stat().st_size
        if size == 0:
            return pa.py_buffer(b"")
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        maps.append(mapped)
        return pa.py_buffer(mapped)

    def array(self, rows: int, buffers: list) -> Any:
        import pyarrow as pa

        kind = self.type
        if self.variable:
            large = pa.large_string() if pa.types.is_string(kind) or pa.types.is_large_string(kind) else None
            target = large or pa.large_binary()
            return pa.Array.from_buffers(target, rows, [None, buffers[1], buffers[0]])
        if pa.types.is_fixed_size_list(kind):
            values = pa.Array.from_buffers(kind.value_type, rows * kind.list_size, [None, buffers[0]])
            return pa.FixedSizeListArray.from_arrays(values, kind.list_size)
        return pa.Array.from_buffers(kind, rows, [None, buffers[0]])


class _ReleasingSink:
    """A file the IPC writer writes through, that drops the source columns' mapped pages as it goes.

    Writing a memory-mapped buffer faults its pages into this process; without this
    the agent's resident memory would grow to the whole dataset.
    """

    def __init__(self, out, maps: list):
        self._out = out
        self._maps = maps
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        for start in range(0, len(view), _WRITE_SLICE):
            self._out.write(view[start : start + _WRITE_SLICE])
            if len(view) > _WRITE_SLICE:
                for mapped in self._maps:
                    release_pages(mapped)
        return len(view)

    def flush(self) -> None:
        self._out.flush()

    def tell(self) -> int:
        return self._out.tell()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


def release_pages(mapped: mmap.mmap) -> None:
    """Unmap the resident pages of a read-only file mapping; they fault back in from the file."""
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)


@dataclass(frozen=True)
class RankRows:
    """One rank's rows: for each dataset, the ``[start, stop)`` range of its task's file."""

    rank: int
    partition: int
    ranges: Mapping[str, tuple[int, int]]

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "partition": self.partition, "ranges": dict(self.ranges)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankRows:
        ranges = {name: (int(start), int(stop)) for name, (start, stop) in data["ranges"].items()}
        return cls(int(data["rank"]), int(data["partition"]), ranges)


@dataclass(frozen=True)
class DataLayout:
    """Every rank's rows of every dataset, and each dataset's columns; the same on every task."""

    names: tuple[str, ...]
    columns: Mapping[str, tuple[ColumnInfo, ...]]
    ranks: tuple[RankRows, ...]

    def counts(self, name: str) -> list[int]:
        """Rows of dataset ``name`` per rank, in rank order."""
        return [r.ranges[name][1] - r.ranges[name][0] for r in self.ranks]

    def to_json(self) -> str:
        return json.dumps(
            {
                "names": list(self.names),
                "columns": {n: [c.to_dict() for c in cols] for n, cols in self.columns.items()},
                "ranks": [r.to_dict() for r in self.ranks],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> DataLayout:
        data = json.loads(text)
        return cls(
            tuple(data["names"]),
            {n: tuple(ColumnInfo.from_dict(c) for c in cols) for n, cols in data["columns"].items()},
            tuple(RankRows.from_dict(r) for r in data["ranks"]),
        )


def build_layout(summaries: Sequence[SpillSummary], workers_per_task: Sequence[int]) -> DataLayout:
    """Pure: give every rank its rows, from every task's summary (any order).

    ``workers_per_task[i]`` is how many workers the i-th task by partition id runs.
    Ranks follow (partition, local index), as in the rendezvous; a task's rows are cut
    into contiguous ranges, one per worker, within one row of each other. Raises
    DataError for an empty dataset and for columns that differ between tasks.
    """
    ordered = sorted(summaries, key=lambda s: s.partition)
    if len({s.partition for s in ordered}) != len(ordered):
        raise DataError(f"duplicate partitions in the data summaries: {[s.partition for s in ordered]}")
    if len(workers_per_task) != len(ordered):
        raise DataError(f"{len(ordered)} task summaries but workers given for {len(workers_per_task)} tasks")
    names = tuple(ordered[0].pieces) if ordered else ()
    for s in ordered:
        if tuple(s.pieces) != names:
            raise DataError(f"task {s.partition} stored datasets {sorted(s.pieces)}, not {sorted(names)}")
    columns = {name: _agreed_columns(name, ordered) for name in names}
    ranks: list[RankRows] = []
    for summary, workers in zip(ordered, workers_per_task, strict=True):
        cuts = {name: split_rows(summary.pieces[name].rows, workers) for name in names}
        for local in range(workers):
            ranges = {name: cuts[name][local] for name in names}
            ranks.append(RankRows(len(ranks), summary.partition, ranges))
    return DataLayout(names, columns, tuple(ranks))


def _agreed_columns(name: str, summaries: Sequence[SpillSummary]) -> tuple[ColumnInfo, ...]:
    holders = [s for s in summaries if s.pieces[name].rows]
    if not holders:
        raise DataError(f"dataset {name!r} is empty: its DataFrame has no rows")
    first = holders[0]
    for other in holders[1:]:
        mine, theirs = first.pieces[name].columns, other.pieces[name].columns
        if mine == theirs:
            continue
        for a, b in zip(mine, theirs, strict=False):
            if a != b:
                if a.kind == b.kind == "vector" and a.width != b.width:
                    raise DataError(
                        f"column {a.name!r} of dataset {name!r} holds arrays of different lengths ({a.width} "
                        f"on task {first.partition}, {b.width} on task {other.partition}); ringtrain needs "
                        "one length per column: pad or cut them, e.g. F.slice(c, 1, n)"
                    )
                raise DataError(
                    f"column {a.name!r} of dataset {name!r} is {a.describe()} on task {first.partition} but "
                    f"{b.describe()} on task {other.partition}; cast it to one type"
                )
        raise DataError(
            f"dataset {name!r} has different columns on tasks {first.partition} and {other.partition}"
        )
    return first.pieces[name].columns


def write_layout(directory: str | Path, layout: DataLayout) -> Path:
    """Leave ``layout`` in the task's data directory, where its workers read it."""
    path = Path(directory) / LAYOUT_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(layout.to_json())
    os.replace(tmp, path)
    return path


def settle_task(
    directory: str | Path, gathered: Sequence[str], workers_per_task: Sequence[int]
) -> DataLayout:
    """After the exchange: every task's summary JSON (any order) in, this task's layout written.

    ``workers_per_task`` follows partition order. Raises DataError (an empty dataset,
    columns that differ between tasks) the same way on every task.
    """
    layout = build_layout([SpillSummary.from_json(text) for text in gathered], workers_per_task)
    write_layout(directory, layout)
    return layout
