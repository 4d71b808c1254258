"""Collectives beyond allreduce/allgather/broadcast: alltoall, barrier, cross ranks, scaling.

Each runs inside ``progress.collective`` and starts with the engine's cross-rank
signature check, like every other collective, so a mismatch raises on every rank.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ringtrain import context, progress
from ringtrain.backends.mpi import mpi_module
from ringtrain.errors import ConfigError, RingtrainError

from . import _engine
from ._convert import HALF
from ._signature import Call, spec_of

_cross_lock = threading.Lock()
_cross: tuple[int, int, bool] | None = None  # (cross_rank, cross_size, homogeneous), once computed


def barrier(what: str = "barrier") -> None:
    """Return once every rank has entered ``barrier()`` (ranks inside ``join()`` count as entered)."""
    with _engine._lock, progress.collective(what):
        comm, _, _ = _engine.comm_info()
        _engine.check(comm, Call(what, "-", ()))


def cross_placement(
    local_ranks: Sequence[int], local_sizes: Sequence[int], rank: int
) -> tuple[int, int, bool]:
    """``(cross_rank, cross_size, homogeneous)`` of ``rank``, from every rank's local rank and size.

    The cross group of a rank is every rank with the same local rank, in rank order (one
    per host that has that many workers), as Horovod defines it. Pure, for unit tests.

    >>> cross_placement([0, 1, 0, 1, 0], [2, 2, 2, 2, 1], rank=4)
    (2, 3, False)
    """
    peers = [r for r, lr in enumerate(local_ranks) if lr == local_ranks[rank]]
    return peers.index(rank), len(peers), len(set(local_sizes)) == 1


def local_placement() -> tuple[int, int]:
    """``(local_rank, local_size)``; a lone process outside any launcher (``python script.py``) is (0, 1)."""
    try:
        return context.local_rank(), context.local_size()
    except RingtrainError:
        if _engine.comm_info()[2] == 1:
            return 0, 1
        raise


def _placement() -> tuple[int, int, bool]:
    global _cross
    with _cross_lock:
        if _cross is None:
            with _engine._lock, progress.collective("cross_ranks"):
                comm, rank, _ = _engine.comm_info()
                local_rank, local_size = local_placement()
                packed = (local_rank << 32) | local_size
                gathered = _engine.check(comm, Call("cross_ranks", "-", ()), extra=packed)[:, 1]
            _cross = cross_placement((gathered >> 32).tolist(), (gathered & 0xFFFFFFFF).tolist(), rank)
        return _cross


def cross_rank() -> int:
    """This rank's index among the ranks with the same local rank (its host's index, in rank order).

    The first call is a collective (every rank must make it, e.g. at start-up); later
    calls are free. ``ringtrain.horovod``'s ``init()`` makes the first call for you.
    """
    return _placement()[0]


def cross_size() -> int:
    """How many ranks share this rank's local rank (hosts with at least local_rank+1 workers).

    The first call is a collective, as for :func:`cross_rank`.
    """
    return _placement()[1]


def is_homogeneous() -> bool:
    """True when every host runs the same number of workers (first call is a collective)."""
    return _placement()[2]


def prepare_cross_ranks() -> None:
    """Compute cross ranks now (a collective), so later cross_rank()/cross_size() calls are local."""
    _placement()


# ------------------------------------------------------------------ alltoall


def _splits_problem(array: np.ndarray, splits: Any, size: int) -> tuple[np.ndarray, str | None]:
    """This rank's send counts along axis 0, and what is wrong with them (None when valid)."""
    if array.ndim == 0:
        return np.zeros(size, np.int64), "alltoall needs a tensor of rank >= 1 (it splits axis 0)"
    first = int(array.shape[0])
    if splits is None:
        if first % size:
            return np.zeros(size, np.int64), (
                f"alltoall without splits needs a first dimension divisible by the world size {size}, "
                f"got {first}; pass splits=[...] with one count per rank"
            )
        return np.full(size, first // size, np.int64), None
    counts = np.asarray(splits).reshape(-1)
    if counts.dtype.kind not in "iu":
        return np.zeros(size, np.int64), f"alltoall splits must be integers, got {counts.dtype}"
    counts = counts.astype(np.int64)
    if counts.size != size:
        return np.zeros(size, np.int64), (
            f"alltoall splits has {counts.size} entries; it needs one per rank ({size})"
        )
    if (counts < 0).any() or counts.sum() > first:
        return np.zeros(size, np.int64), (
            f"alltoall splits {counts.tolist()} must be >= 0 and sum to at most the first dimension {first}"
        )
    return counts, None


def alltoall(array: np.ndarray, splits: Any = None, what: str = "alltoall") -> tuple[np.ndarray, np.ndarray]:
    """Send ``array[rows for rank j]`` to rank j and concatenate what every rank sent here, in rank order.

    ``splits[j]`` rows (along axis 0) go to rank j; without ``splits`` axis 0 is split
    evenly. Returns ``(received, received_splits)``. Dimensions after the first and the
    dtype must agree across ranks.
    """
    MPI = mpi_module()
    with _engine._lock, progress.collective(what):
        comm, me, size = _engine.comm_info()
        counts, problem = _splits_problem(array, splits, size)
        gathered = _engine.check(
            comm, Call(what, "-", (spec_of(array),), free_first_dim=True), extra=int(problem is not None)
        )
        bad = np.flatnonzero(gathered[:, 1]).tolist()
        if bad:
            detail = f": {problem}" if problem else ""
            raise ConfigError(
                f"{what}: rank(s) {', '.join(map(str, bad))} passed invalid splits{detail} "
                f"(raised on rank {me})"
            )
        matrix = np.empty((size, size), np.int64)  # matrix[i, j]: rows rank i sends to rank j
        comm.Allgather(counts, matrix)
        _engine._count("Allgather")
        received = matrix[:, me].copy()
        row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize
        send = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        out = np.empty((int(received.sum()),) + tuple(array.shape[1:]), dtype=array.dtype)
        send_counts, recv_counts = counts * row_bytes, received * row_bytes
        send_displs = np.concatenate([[0], np.cumsum(send_counts)[:-1]])
        recv_displs = np.concatenate([[0], np.cumsum(recv_counts)[:-1]])
        comm.Alltoallv(
            [send, send_counts, send_displs, MPI.BYTE],
            [out.reshape(-1).view(np.uint8), recv_counts, recv_displs, MPI.BYTE],
        )
        _engine._count("Alltoallv")
    return out, received


# ------------------------------------------------------------------ scaling


def scaled(array: np.ndarray, factor: float) -> np.ndarray:
    """``array * factor`` in ``array``'s dtype (16-bit floats scaled in float32, integers truncated).

    Returns ``array`` itself when ``factor`` is 1. Integers are scaled in float64 and
    truncated toward zero, as a C cast would.
    """
    if factor == 1.0:
        return array
    dtype = array.dtype
    if dtype.kind in "iu":
        return np.trunc(array.astype(np.float64) * factor).astype(dtype)
    wide = np.dtype(np.float32) if dtype.name in HALF else dtype
    return (array.astype(wide) * np.asarray(factor, dtype=wide)).astype(dtype)


def check_factor(value: Any, name: str) -> float:
    """A pre/postscale factor as a float; ConfigError for anything that is not a real number."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    return float(value)
