"""Worker side of the data path: ``ringtrain.data.shard(name)`` and the :class:`Shard` it returns.

A shard is this rank's rows of one dataset, in the Arrow IPC file its task agent wrote
to local disk. The file is memory-mapped, never read whole: every column is one
contiguous array in it, so ``to_numpy`` returns views of the file, and each batch of
``to_tf_dataset`` is one numpy gather per column. Pages read through the mapping are
handed back to the kernel once ``RINGTRAIN_DATA_MAPPED_LIMIT`` bytes of them are
resident, so a worker's resident memory stays bounded however large its shard is.
"""

from __future__ import annotations

import itertools
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import env
from ..errors import DataError
from ._columns import ColumnInfo
from ._steps import check_batch_size, epoch_order
from ._steps import steps_per_epoch as _steps_per_epoch
from .spill import LAYOUT_FILE, DataLayout, dataset_file, release_pages

DATA_DIR_VAR = "RINGTRAIN_DATA_DIR"

# to_tf_dataset gathers about this many bytes of batches per call into numpy.
READ_BYTES = 4 << 20
# Shuffled passes visit the shard in blocks of about this many bytes (see _steps.block_shuffle).
SHUFFLE_BLOCK_BYTES = 1 << 20

_opened: dict[tuple[str, str, int], Shard] = {}
_opened_lock = threading.Lock()


def shard(name: str = "train") -> Shard:
    """This rank's shard of the dataset ``name`` given to ``ringtrain.run(..., data=...)``.

    A lone DataFrame is named ``"train"``; a dict names its own. Call it inside ``fn``
    (or a script run by ``ringtrain launch``). Raises DataError for a name that was not
    passed, listing those that were.

    Example::

        def train():
            train = ringtrain.data.shard("train")
            ds = train.to_tf_dataset(64, columns="features", label="label")
            ...

        ringtrain.run(train, data={"train": df_train, "val": df_val})
    """
    from ..context import rank

    directory = os.environ.get(DATA_DIR_VAR)
    if not directory:
        raise DataError(
            "this job was given no data: pass a DataFrame to ringtrain.run(fn, data=df) (or a dict "
            "of them) and call ringtrain.data.shard() inside fn"
        )
    key = (directory, name, rank())
    with _opened_lock:
        if key not in _opened:
            _opened[key] = Shard.open(directory, name, key[2])
        return _opened[key]


class Shard:
    """One rank's rows of one dataset, memory-mapped from the task's local disk.

    ``num_rows`` and ``columns`` describe it; ``steps_per_epoch(batch_size)`` is the
    same on every rank; ``to_numpy`` and ``to_tf_dataset`` read it.
    """

    def __init__(self, name: str, rank: int, layout: DataLayout, path: Path | None):
        if name not in layout.names:
            passed = ", ".join(repr(n) for n in layout.names)
            raise DataError(f"no dataset named {name!r} was passed to this job; it has {passed}")
        if not 0 <= rank < len(layout.ranks):
            raise DataError(f"rank {rank} is not in this job's data layout ({len(layout.ranks)} ranks)")
        self.name = name
        self.rank = rank
        self._info = {c.name: c for c in layout.columns[name]}
        self._counts = layout.counts(name)
        self._start, stop = layout.ranks[rank].ranges[name]
        self.num_rows = stop - self._start
        self._file = _MappedFile(path) if self.num_rows else None
        self._views: dict[str, Any] = {}

    @classmethod
    def open(cls, directory: str | Path, name: str, rank: int) -> Shard:
        """The shard of ``rank`` from a task's data directory (what :func:`shard` calls)."""
        layout_path = Path(directory) / LAYOUT_FILE
        try:
            layout = DataLayout.from_json(layout_path.read_text())
        except FileNotFoundError:
            raise DataError(f"{layout_path} is missing: this task's data was not stored") from None
        path = dataset_file(directory, layout.names.index(name)) if name in layout.names else None
        return cls(name, rank, layout, path)

    def __repr__(self) -> str:
        return f"Shard({self.name!r}, rank={self.rank}, num_rows={self.num_rows}, columns={self.columns})"

    @property
    def columns(self) -> list[str]:
        """Column names, in the DataFrame's order."""
        return list(self._info)

    @property
    def rows_per_rank(self) -> list[int]:
        """Every rank's rows of this dataset, in rank order."""
        return list(self._counts)

    def column_type(self, column: str) -> tuple[str, tuple[int, ...]]:
        """``(dtype, row_shape)`` of ``column``: e.g. ``("float32", (784,))`` for an array column,
        ``("int64", ())`` for a scalar, ``("str", ())`` for strings."""
        info = self._column_info(column)
        return info.dtype, info.row_shape

    def steps_per_epoch(self, batch_size: int) -> int:
        """Steps per epoch at ``batch_size`` rows a step: ``max(rows_per_rank) // batch_size``,
        the same on every rank.

        Each epoch a rank reads ``steps * batch_size`` rows: a rank with more rows leaves
        fewer than ``batch_size`` of them out, a rank with fewer repeats some of its own.
        Raises DataError when ``batch_size`` exceeds some rank's rows.
        """
        return _steps_per_epoch(self._counts, batch_size, self.name)

    def to_numpy(
        self, columns: Sequence[str] | str | None = None, *, batch_size: int | None = None
    ) -> dict[str, np.ndarray]:
        """``{column: numpy array}``, one row per row of the shard.

        Number columns are read-only views of the memory-mapped file (no copy); arrays
        have shape ``(rows, length)``; strings and binary become object arrays (a copy).
        With ``batch_size``, every rank gets exactly ``steps_per_epoch(batch_size) *
        batch_size`` rows (cut, or wrapped around), so that Keras 3's
        ``fit(x, y, batch_size=batch_size)`` takes the same steps on every rank.
        """
        names = self._select(columns)
        rows = None
        if batch_size is not None:
            rows = self.steps_per_epoch(batch_size) * check_batch_size(batch_size)
        out = {}
        for name in names:
            values = self._values(name)
            if rows is not None and rows <= self.num_rows:
                values = values[:rows]
            elif rows is not None:  # wrap around, as an epoch of to_tf_dataset does
                values = _take(values, np.resize(np.arange(self.num_rows), rows))
            out[name] = _as_numpy(values)
        return out

    def to_tf_dataset(
        self,
        batch_size: int,
        *,
        columns: Sequence[str] | str | None = None,
        label: str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        shapes: dict[str, Sequence[int]] | None = None,
        prefetch: int | None = None,
    ):
        """A ``tf.data.Dataset`` of exactly ``steps_per_epoch(batch_size)`` full batches per pass.

        - ``columns``: the feature columns; a list gives a dict of tensors, a single name
          gives that tensor alone; None means every column except ``label``.
        - ``label``: a column yielded second, as ``(features, label)``.
        - ``shuffle``: each pass (epoch) reads this rank's rows in a new random order drawn
          from ``(seed, rank, epoch)``: blocks of about 1 MiB in random order, the rows of
          each ``RINGTRAIN_DATA_SHUFFLE_WINDOW`` bytes of blocks mixed together (a uniform
          shuffle for shards up to that size). Without it, storage order.
        - ``shapes``: per-row shapes for array columns, e.g. ``{"image": (28, 28, 1)}``
          for images stored as flat arrays of 784 numbers.
        - ``prefetch``: batches prepared ahead of the step (default: tf.data's autotuning).

        Rows are gathered from the memory-mapped file by numpy, a group of batches (about
        4 MiB) per call, on tf.data's background thread; no Python runs per row. The
        dataset's auto-sharding is off: it is this rank's data already. Under a
        ``tf.distribute`` strategy, ``fit`` takes the batch of a plain dataset as the
        global one; use :meth:`to_distributed_dataset`.
        """
        steps = self.steps_per_epoch(batch_size)
        batch_size = check_batch_size(batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise DataError(f"seed must be a non-negative int, got {seed!r}")
        if label is not None:
            self._column_info(label)
        names = self._select(columns, exclude=label)
        single = isinstance(columns, str)
        shapes = self._check_shapes(shapes or {})
        import tensorflow as tf  # after the checks: bad arguments fail without loading TF

        read = names + ([label] if label is not None else [])
        specs = [self._spec(name, batch_size, shapes) for name in read]
        row_bytes = self._row_bytes(read)
        orders = _EpochOrders(self, steps, batch_size, shuffle, seed, row_bytes)
        batches = _BatchReader(self, read, shapes, orders)
        epochs = itertools.count()

        def structure(*tensors):
            tensors = [tf.ensure_shape(t, spec.shape) for t, spec in zip(tensors, specs, strict=True)]
            features = dict(zip(names, tensors, strict=False))
            out = features[names[0]] if single else features
            return out if label is None else (out, tensors[-1])

        # Each pass draws its epoch number first and hands it to every read, so the passes
        # of a repeated dataset never share an order. Then each numpy call gathers a group
        # of consecutive batches (about READ_BYTES), which TF slices apart: Python runs once
        # per group rather than once per batch, as from_generator would.
        group = max(1, min(steps, READ_BYTES // max(1, row_bytes * batch_size)))
        groups = -(-steps // group)
        epoch = tf.data.Dataset.from_tensors(np.int64(0)).map(
            lambda _: tf.numpy_function(lambda: np.int64(next(epochs)), [], tf.int64, stateful=True)
        )
        group_numbers = tf.data.Dataset.range(groups)
        dataset = epoch.flat_map(lambda e: group_numbers.map(lambda g: (e, g)))
        dataset = dataset.map(
            lambda e, g: tuple(
                tf.numpy_function(
                    lambda e, g: batches.read(e, g, group),
                    [e, g],
                    [spec.dtype for spec in specs],
                    stateful=True,
                )
            )
        )
        dataset = dataset.flat_map(lambda *arrays: tf.data.Dataset.from_tensor_slices(arrays))
        dataset = dataset.map(structure)
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(steps))
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        dataset = dataset.with_options(options)
        return dataset.prefetch(tf.data.AUTOTUNE if prefetch is None else prefetch)

    def to_distributed_dataset(self, strategy, batch_size: int, **options: Any):
        """The dataset for ``model.fit`` under a ``tf.distribute`` strategy (``ringtrain.tf.strategy()``).

        Each replica gets ``batch_size`` rows of this shard per step. Passed a plain
        dataset, ``fit`` under MultiWorkerMirroredStrategy would take its batch as the
        global one and split it between the workers, reading only part of each shard.
        ``options`` are those of :meth:`to_tf_dataset`. The dataset repeats, so give
        ``fit`` the steps::

            model.fit(shard.to_distributed_dataset(strategy, 64, label="y"), epochs=3,
                      steps_per_epoch=shard.steps_per_epoch(64))

        (With several GPUs per worker, each worker's replicas take consecutive batches:
        divide the steps by the replicas per worker.)
        """
        self.steps_per_epoch(batch_size)  # a bad batch size fails here, not inside tf.distribute
        return strategy.distribute_datasets_from_function(
            lambda _: self.to_tf_dataset(batch_size, **options).repeat()
        )

    # ------------------------------------------------------------------ internals

    def _column_info(self, column: str) -> ColumnInfo:
        if column not in self._info:
            raise DataError(
                f"dataset {self.name!r} has no column {column!r}; its columns are {', '.join(self._info)}"
            )
        return self._info[column]

    def _select(self, columns: Sequence[str] | str | None, exclude: str | None = None) -> list[str]:
        if columns is None:
            names = [c for c in self._info if c != exclude]
        elif isinstance(columns, str):
            names = [columns]
        else:
            names = list(columns)
        for name in names:
            self._column_info(name)
        if not names:
            raise DataError(f"no feature columns left in dataset {self.name!r} besides the label {exclude!r}")
        return names

    def _check_shapes(self, shapes: dict[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        checked = {}
        for name, shape in shapes.items():
            info = self._column_info(name)
            shape = tuple(int(d) for d in shape)
            if info.kind != "vector" or int(np.prod(shape)) != info.width:
                raise DataError(
                    f"shapes[{name!r}]={shape} does not fit column {name!r} ({info.describe()}); give a "
                    "shape whose sizes multiply to the array length"
                )
            checked[name] = shape
        return checked

    def _row_bytes(self, names: list[str]) -> int:
        """Bytes a row of ``names`` takes in a batch (strings and binary counted as 64)."""
        total = 0
        for name in names:
            info = self._info[name]
            if info.kind in ("string", "binary"):
                total += 64
            else:
                total += np.dtype(info.dtype).itemsize * max(1, info.width)
        return total

    def _spec(self, name: str, batch_size: int, shapes: dict[str, tuple[int, ...]]):
        import tensorflow as tf

        info = self._info[name]
        dtype = tf.string if info.kind in ("string", "binary") else tf.as_dtype(info.dtype)
        return tf.TensorSpec((batch_size, *shapes.get(name, info.row_shape)), dtype, name=_tf_name(name))

    def _values(self, name: str):
        """The column's rows of this shard: a numpy view for numbers, an Arrow array otherwise."""
        if name not in self._views:
            info = self._column_info(name)
            if self._file is None:
                dtype = object if info.kind in ("string", "binary") else np.dtype(info.dtype)
                self._views[name] = np.empty((0, *info.row_shape), dtype)
            else:
                self._views[name] = self._file.column(list(self._info).index(name), info)[
                    self._start : self._start + self.num_rows
                ]
        return self._views[name]


def _tf_name(column: str) -> str:
    """A TensorSpec name from a column name (TF op names allow a narrow character set)."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in column)
    return cleaned if cleaned[:1].isalnum() else f"c{cleaned}"


def _as_numpy(values) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    return values.to_numpy(zero_copy_only=False)


def _take(values, index: np.ndarray):
    """Rows ``index`` of a column: a numpy gather, or Arrow's take for strings and binary."""
    if isinstance(values, np.ndarray):
        return values[index]
    import pyarrow as pa

    return values.take(pa.array(index))


class _MappedFile:
    """A dataset's IPC file, memory-mapped read-only; columns are zero-copy views of it."""

    def __init__(self, path: Path):
        import pyarrow as pa

        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        reader = pa.ipc.open_file(pa.py_buffer(self._map))
        self._batch = reader.get_batch(0)

    def column(self, index: int, info: ColumnInfo):
        array = self._batch.column(index)
        if info.kind in ("string", "binary"):
            return array
        if info.kind == "vector":
            flat = array.values.to_numpy(zero_copy_only=True)
            values = flat.reshape(-1, info.width)
        else:
            values = array.to_numpy(zero_copy_only=True)
        return values.view(np.bool_) if info.dtype == "bool" else values

    def release(self) -> None:
        release_pages(self._map)

    def advise(self, pattern: str) -> None:
        """Tell the kernel how the next pass reads: ``random`` (rows scattered over the whole
        file: no read-ahead), ``normal`` (blocks in random order) or ``sequential``."""
        advice = {"random": "MADV_RANDOM", "normal": "MADV_NORMAL", "sequential": "MADV_SEQUENTIAL"}[pattern]
        if hasattr(mmap, advice):
            self._map.madvise(getattr(mmap, advice))


_statm: tuple[int, int] | None = None  # (pid, fd) of an open /proc/self/statm


def resident_file_bytes() -> int | None:
    """Bytes of file-backed pages this process has resident (Linux); None where unknown.

    Measured rather than estimated: one faulting row can map far more than its own bytes
    (the kernel maps whole page-cache folios, up to megabytes, around a fault).
    """
    global _statm
    if _statm is None or _statm[0] != os.getpid():  # /proc/self is resolved when opened
        try:
            _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY))
        except OSError:
            return None
    shared_pages = int(os.pread(_statm[1], 256, 0).split()[2])
    return shared_pages * mmap.PAGESIZE


class _EpochOrders:
    """Each epoch's rows, as a (steps, batch_size) array of indices, drawn on first use.

    Shuffled passes read blocks of about SHUFFLE_BLOCK_BYTES in random order and mix the
    rows of RINGTRAIN_DATA_SHUFFLE_WINDOW bytes of blocks at a time (0: one uniform
    permutation of the whole shard).
    """

    def __init__(self, shard: Shard, steps: int, batch_size: int, shuffle: bool, seed: int, row_bytes: int):
        self._shard = shard
        self._shape = (steps, batch_size)
        self._shuffle = shuffle
        self._seed = seed
        self._block_rows = max(1, SHUFFLE_BLOCK_BYTES // max(1, row_bytes))
        window = env.get("RINGTRAIN_DATA_SHUFFLE_WINDOW")
        self._window_blocks = window // SHUFFLE_BLOCK_BYTES if window else 0
        if window:
            self._window_blocks = max(1, self._window_blocks)
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def get(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._orders:
                rows = epoch_order(
                    self._shard.num_rows,
                    self._shape[0] * self._shape[1],
                    shuffle=self._shuffle,
                    seed=self._seed,
                    rank=self._shard.rank,
                    epoch=epoch,
                    block_rows=self._block_rows,
                    window_blocks=self._window_blocks,
                ).reshape(self._shape)
                if self._shuffle:
                    rows.sort(axis=1)  # the same rows per batch, read in file order
                if self._shard._file is not None:
                    scattered = self._shuffle and not self._window_blocks
                    self._shard._file.advise(
                        "random" if scattered else "normal" if self._shuffle else "sequential"
                    )
                for old in [e for e in self._orders if e < epoch - 1]:
                    del self._orders[old]
                self._orders[epoch] = rows
            return self._orders[epoch]


class _BatchReader:
    """Gathers batches of rows; hands the mapped pages back once RINGTRAIN_DATA_MAPPED_LIMIT
    bytes of them are resident."""

    def __init__(
        self, shard: Shard, names: list[str], shapes: dict[str, tuple[int, ...]], orders: _EpochOrders
    ):
        self._shard = shard
        self._names = names
        self._shapes = shapes
        self._orders = orders
        self._limit = env.get("RINGTRAIN_DATA_MAPPED_LIMIT")
        self._base = resident_file_bytes()

    def read(self, epoch, group, size: int) -> list[np.ndarray]:
        """Batches ``group * size`` onwards (at most ``size``) of ``epoch``, each column shaped
        (batches, batch_size, ...); called by tf.data with numpy scalars."""
        index = self._orders.get(int(epoch))[int(group) * size : (int(group) + 1) * size]
        arrays = [self._gather(name, index) for name in self._names]
        if self._limit and self._base is not None and resident_file_bytes() - self._base > self._limit:
            self.release()
        return arrays

    def _gather(self, name: str, index: np.ndarray) -> np.ndarray:
        rows = _as_numpy(_take(self._shard._values(name), index.ravel()))
        return rows.reshape(*index.shape, *self._shapes.get(name, rows.shape[1:]))

    def release(self) -> None:
        if self._shard._file is not None:
            self._shard._file.release()
        self._base = resident_file_bytes()
