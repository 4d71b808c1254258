"""The MPI side of the collectives: signature check, fused buckets, one MPI call per bucket.

Every tensor-data call is buffer based (``Allreduce``/``Allgatherv``/``Bcast`` on numpy
buffers, in place where MPI allows); only the small mismatch description is pickled.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ringtrain import fusion, progress
from ringtrain.backends.mpi import mpi_module, world
from ringtrain.errors import BackendError, ConfigError

from . import _join
from ._convert import HALF, check_reducible
from ._ops import ReduceOp, op_name
from ._signature import Call, mismatch_message, signature, spec_of

logger = logging.getLogger(__name__)

# MPI calls made, by MPI function name; tests read it to prove one call per bucket.
CALLS: collections.Counter[str] = collections.Counter()

# One collective at a time per process: ranks must issue collectives in the same order,
# and TF may run numpy_function bodies on several threads.
_lock = threading.RLock()

_MPI_TYPES = {"float32": "FLOAT", "float64": "DOUBLE", "int32": "INT32_T", "int64": "INT64_T"}
_MPI_OPS = {ReduceOp.Average: "SUM", ReduceOp.Sum: "SUM", ReduceOp.Min: "MIN", ReduceOp.Max: "MAX"}


class _Pool:
    """Bucket buffers kept across steps: a fresh 100 MB buffer costs page faults on every step."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, np.dtype], np.ndarray] = {}

    def get(self, role: str, dtype: np.dtype, count: int) -> np.ndarray:
        key = (role, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.size < count:
            buf = np.empty(count, dtype=dtype)
            self._buffers[key] = buf
        return buf[:count]

    def clear(self) -> None:
        self._buffers.clear()


POOL = _Pool()


def comm_info() -> tuple[Any, int, int]:
    comm = world()
    return comm, comm.Get_rank(), comm.Get_size()


def check(comm: Any, call: Call, extra: int = 0) -> np.ndarray:
    """Allgather ``[signature, extra]`` from every rank; raise on every rank if signatures differ.

    Returns the gathered ``(size, 2)`` int64 array (column 1 holds each rank's ``extra``).
    Ranks that have called :func:`ringtrain.join` answer with a "join" signature; the
    call goes ahead when they can serve it (see :mod:`._join`).
    """
    replayed = _join.replayed_check()
    if replayed is not None:  # a joined rank re-running this call: the check already happened
        return replayed
    mine = np.array([signature(call), extra], dtype=np.int64)
    gathered = np.empty((comm.Get_size(), 2), dtype=np.int64)
    comm.Allgather(mine, gathered)
    CALLS["Allgather"] += 1
    if (gathered[:, 0] != mine[0]).any():
        calls = comm.allgather(call)  # small metadata only, never tensor data
        if not _join.joined_ranks_serve(calls, comm.Get_rank()):
            raise BackendError(mismatch_message(calls, comm.Get_rank()))
    return gathered


# ------------------------------------------------------------------ allreduce


def _half_sum_op(MPI: Any, dtype: np.dtype) -> Any:
    """A user-defined MPI op summing 16-bit floats, for compressed buckets (MPI has no half type)."""
    ops = _half_sum_op.__dict__.setdefault("cache", {})
    if dtype.name not in ops:

        def add(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
            a = np.frombuffer(inbuf, dtype=dtype)
            b = np.frombuffer(inoutbuf, dtype=dtype)
            np.add(b, a, out=b)

        ops[dtype.name] = MPI.Op.Create(add, commute=True)
    return ops[dtype.name]


def fused_allreduce(
    arrays: Sequence[np.ndarray], op: ReduceOp, what: str, compression: str | None = None
) -> list[np.ndarray]:
    """Allreduce ``arrays`` bucket by bucket: pack, one MPI Allreduce, unpack with 1/size fused in."""
    MPI = mpi_module()
    with _lock, progress.collective(what):
        comm, _, size = comm_info()
        # Validate only after the check: a rank that raised alone would leave the others hanging.
        check(comm, Call(what, op_name(op), tuple(spec_of(a) for a in arrays), compression=compression))
        if not isinstance(op, ReduceOp):
            raise ConfigError(f"{what}: op must be ringtrain.Average, Sum, Min or Max, got {op!r}")
        if compression not in fusion.COMPRESSIONS:
            raise ConfigError(
                f"{what}: compression={compression!r} is not supported; use None, 'fp16' or 'bf16'"
            )
        for a in arrays:
            check_reducible(a.dtype.name, what)
        buckets = fusion.plan_buckets([(a.dtype, a.nbytes) for a in arrays], fusion.fusion_threshold())
        results: list[np.ndarray | None] = [None] * len(arrays)
        scale = 1.0 / size if op is ReduceOp.Average else 1.0
        for bucket in buckets:
            members = [arrays[i] for i in bucket]
            for i, out in zip(
                bucket, _reduce_bucket(MPI, comm, members, op, scale, compression), strict=True
            ):
                results[i] = out
    return results  # type: ignore[return-value]


def _reduce_bucket(
    MPI: Any, comm: Any, members: list[np.ndarray], op: ReduceOp, scale: float, compression: str | None
) -> list[np.ndarray]:
    dtype = members[0].dtype
    count = sum(a.size for a in members)
    if count == 0:
        return [np.empty(a.shape, dtype) for a in members]
    mpi_op = getattr(MPI, _MPI_OPS[op])
    summing = op in (ReduceOp.Sum, ReduceOp.Average)
    if compression and dtype.name == "float32" and summing:
        wire = fusion.wire_dtype(dtype, compression)
        buf = fusion.pack(members, out=POOL.get("pack", wire, count), compress=compression)
        comm.Allreduce(MPI.IN_PLACE, [buf.view(np.uint16), MPI.UINT16_T], op=_half_sum_op(MPI, wire))
        CALLS["Allreduce"] += 1
        return fusion.unpack(buf, members, scale=scale, compress=compression)
    if dtype.name in HALF:
        # MPI has no 16-bit float type: reduce in float32 (exact for Min/Max, one rounding
        # for sums), scale in float32, then round once back, as fusion.unpack would.
        buf = fusion.pack(members, out=POOL.get("pack", dtype, count))
        wide = POOL.get("widen", np.dtype(np.float32), count)
        np.copyto(wide, buf, casting="unsafe")
        comm.Allreduce(MPI.IN_PLACE, [wide, MPI.FLOAT], op=mpi_op)
        CALLS["Allreduce"] += 1
        if scale != 1.0:
            np.multiply(wide, np.float32(scale), out=wide)
        np.copyto(buf, wide, casting="unsafe")
        return fusion.unpack(buf, members)
    buf = fusion.pack(members, out=POOL.get("pack", dtype, count))
    comm.Allreduce(MPI.IN_PLACE, [buf, getattr(MPI, _MPI_TYPES[dtype.name])], op=mpi_op)
    CALLS["Allreduce"] += 1
    return fusion.unpack(buf, members, scale=scale)


# ------------------------------------------------------------------ allgather


def allgather(array: np.ndarray, what: str = "allgather") -> np.ndarray:
    MPI = mpi_module()
    with _lock, progress.collective(what):
        comm, _, _ = comm_info()
        call = Call(what, "-", (spec_of(array),), free_first_dim=True)
        first = int(array.shape[0]) if array.ndim else -1
        gathered = check(comm, call, extra=first)
        if array.ndim == 0:  # every rank passed a scalar (the signatures agree)
            raise ConfigError(
                f"{what} needs tensors of rank >= 1 (it concatenates along axis 0); reshape to (1,)"
            )
        row = int(np.prod(array.shape[1:], dtype=np.int64))
        firsts = gathered[:, 1]
        counts = firsts * row * array.dtype.itemsize
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        out = np.empty((int(firsts.sum()),) + tuple(array.shape[1:]), dtype=array.dtype)
        send = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        comm.Allgatherv(send, [out.reshape(-1).view(np.uint8), counts, displs, MPI.BYTE])
        CALLS["Allgatherv"] += 1
    return out


# ------------------------------------------------------------------ broadcast


def broadcast(arrays: Sequence[np.ndarray], root_rank: int, what: str) -> list[np.ndarray]:
    """Broadcast ``arrays`` from ``root_rank``, fused into buckets; returns fresh arrays."""
    MPI = mpi_module()
    with _lock, progress.collective(what):
        comm, _, size = comm_info()
        check(comm, Call(what, "-", tuple(spec_of(a) for a in arrays), root=root_rank))
        if (
            isinstance(root_rank, bool)
            or not isinstance(root_rank, int | np.integer)
            or not (0 <= root_rank < size)
        ):
            raise ConfigError(f"{what}: root_rank={root_rank!r} is not a rank of this job (0..{size - 1})")
        buckets = fusion.plan_buckets([(a.dtype, a.nbytes) for a in arrays], fusion.fusion_threshold())
        results: list[np.ndarray | None] = [None] * len(arrays)
        for bucket in buckets:
            members = [arrays[i] for i in bucket]
            count = sum(a.size for a in members)
            if count:
                buf = fusion.pack(members, out=POOL.get("pack", members[0].dtype, count))
                comm.Bcast([buf.view(np.uint8), MPI.BYTE], root=int(root_rank))
                CALLS["Bcast"] += 1
                outs = fusion.unpack(buf, members)
            else:
                outs = [np.empty(a.shape, a.dtype) for a in members]
            for i, out in zip(bucket, outs, strict=True):
                results[i] = out
    return results  # type: ignore[return-value]
