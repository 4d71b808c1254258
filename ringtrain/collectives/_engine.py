"""The MPI side of the collectives: signature check, then the reduction by the fastest path.

Every collective first allgathers a signature of its arguments (:func:`check`), so a
mismatch raises on every rank instead of hanging. An allreduce then takes one of two
paths, chosen from facts every rank shares, so all ranks take the same one:

* **shared memory** (:mod:`._shm`): when the ranks of each host can share a POSIX
  segment and the native extension is built. Tensors are packed straight into the
  segment, each rank reduces its slice in place with the averaging scale fused in, and
  results are copied straight out into the outputs; MPI only joins the hosts.
* **MPI**: contiguous tensors of at least :data:`DIRECT_BYTES` reduce straight from
  their input into their output (one MPI call each, no pack or unpack); smaller ones
  are packed into buckets of ``RINGTRAIN_FUSION_THRESHOLD`` bytes. MPI runs on the
  communication thread (:mod:`._stream`), so bucket k+1 is packed and bucket k-1
  unpacked while bucket k is in MPI.

Outputs are kept across calls with the same tensors and reused when nothing else still
holds them (checked by reference count), so steady-state training writes into memory
that is already mapped. Every call is buffer based: tensor data as it is, the small
mismatch description as JSON (see :mod:`._control`); nothing a peer sends is unpickled.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ringtrain import fusion, progress
from ringtrain.backends.mpi import mpi_module, world
from ringtrain.errors import BackendError, ConfigError

from . import _control, _join, _shm
from ._convert import HALF, check_reducible
from ._ops import ReduceOp, op_name
from ._signature import Call, decode_call, encode_call, mismatch_message, signature, spec_of
from ._stream import STREAM, Handle

logger = logging.getLogger(__name__)

# Calls made, by name (see collectives.call_counts): MPI functions, "shm" for shared-memory
# reductions and "shm_check" for signature checks in the segment; tests read it to prove
# one call per bucket.
CALLS: collections.Counter[str] = collections.Counter()
_calls_lock = threading.Lock()

_MPI_TYPES = {"float32": "FLOAT", "float64": "DOUBLE", "int32": "INT32_T", "int64": "INT64_T"}
_MPI_OPS = {ReduceOp.Average: "SUM", ReduceOp.Sum: "SUM", ReduceOp.Min: "MIN", ReduceOp.Max: "MAX"}
_SHM_OPS = {ReduceOp.Average: "sum", ReduceOp.Sum: "sum", ReduceOp.Min: "min", ReduceOp.Max: "max"}
_KINDS = {"float32": "f4", "float64": "f8", "float16": "f2", "bfloat16": "bf16", "int32": "i4", "int64": "i8"}

PIPELINE: bool | None = None
"""Run the MPI path's calls on the communication thread (True) or in the caller (False).

None (default) decides at the first allreduce: pipelined when every rank of the host has
at least two CPUs of its own. With one, the thread that packs and the one MPI spins in
share a core, and measured here (2 ranks, 2 cores) pipelining made the reduction slower."""

DIRECT_BYTES = 1 << 20
"""On the MPI path, contiguous tensors this large reduce straight into their output.

Set by reasoning, not by a sweep: below it, packing and unpacking cost less than one more
MPI call (with its wait for the slowest rank)."""


def _count(name: str) -> None:
    with _calls_lock:
        CALLS[name] += 1


class _Turn:
    """Whose turn it is to call MPI: one collective at a time, in submission order.

    Ranks must issue collectives in the same order, and TF may run numpy_function bodies
    on several threads. ``with _lock:`` waits until the communication thread has finished
    what was queued before, then holds the turn (re-entrant); :meth:`submitting` holds it
    only to queue more work behind what is there.
    """

    def __init__(self) -> None:
        self._rlock = threading.RLock()

    def __enter__(self) -> _Turn:
        self._rlock.acquire()
        try:
            STREAM.drain()
        except BaseException:
            self._rlock.release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._rlock.release()

    @contextmanager
    def submitting(self) -> Iterator[None]:
        with self._rlock:
            yield


_lock = _Turn()


class _Pool:
    """Bucket buffers kept across steps: a fresh 100 MB buffer costs page faults on every step."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, np.dtype], np.ndarray] = {}

    def get(self, role: Any, dtype: np.dtype, count: int) -> np.ndarray:
        key = (role, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.size < count:
            buf = np.empty(count, dtype=dtype)
            self._buffers[key] = buf
        return buf[:count]

    def clear(self) -> None:
        self._buffers.clear()


POOL = _Pool()


def _holders(arrays: Sequence[np.ndarray]) -> int:
    """The largest reference count among ``arrays`` (compared against an unshared baseline)."""
    return max(sys.getrefcount(a) for a in arrays)


class _Outputs:
    """Result arrays kept per (call name, tensor specs), reused when nobody else holds them.

    A result handed to TensorFlow from a numpy_function stays referenced while its tensor
    lives, and a result the caller keeps is referenced by the caller, so a reused array
    is never one that anybody can still read.
    """

    _FREE = _holders([np.empty(0)])  # count of an array held only by one list

    def __init__(self, limit: int = 32, max_bytes: int = 1 << 30) -> None:
        self._cache: collections.OrderedDict[Any, list[np.ndarray]] = collections.OrderedDict()
        self._limit = limit
        self._max_bytes = max_bytes  # beyond it the least recently used sets are dropped
        self.reused = 0

    def get(self, key: Any, specs: Sequence[tuple[tuple[int, ...], np.dtype]]) -> list[np.ndarray]:
        cached = self._cache.get(key)
        if cached is not None and (not cached or _holders(cached) <= self._FREE):
            self._cache.move_to_end(key)
            self.reused += 1
            return list(cached)
        fresh = [np.empty(shape, dtype=dtype) for shape, dtype in specs]
        self._cache[key] = fresh
        self._cache.move_to_end(key)
        held = sum(a.nbytes for arrays in self._cache.values() for a in arrays)
        while len(self._cache) > 1 and (len(self._cache) > self._limit or held > self._max_bytes):
            _, dropped = self._cache.popitem(last=False)
            held -= sum(a.nbytes for a in dropped)
        return list(fresh)

    def clear(self) -> None:
        self._cache.clear()


OUTPUTS = _Outputs()

# The job's shared-memory group: unset until the first allreduce decides, then a
# HostGroup or None (MPI only); and whether the MPI path pipelines (see PIPELINE).
_UNSET = object()
_host: Any = _UNSET
_auto_pipeline = False


def comm_info() -> tuple[Any, int, int]:
    comm = world()
    return comm, comm.Get_rank(), comm.Get_size()


def host_group() -> _shm.HostGroup | None:
    """The shared-memory group in use, or None (MPI only, or not decided yet)."""
    return None if _host is _UNSET else _host


def _configure_stream(MPI: Any) -> None:
    if STREAM._threaded is None:
        STREAM.configure(MPI.Query_thread() >= MPI.THREAD_SERIALIZED)


def _setup(comm: Any, MPI: Any) -> None:
    """Decide the job's allreduce path, collectively, on the first allreduce."""
    global _host, _auto_pipeline
    _configure_stream(MPI)
    found = _shm.layout(comm, MPI)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    spare = cpus >= 2 * found.local_size  # every rank of this host has two CPUs of its own
    _auto_pipeline = spare
    if found.group is not None:
        # Spinning before sleeping saves a futex round trip when the peer is running, but on
        # a busy host it burns the time slice the awaited peer needs. Measured here (2 ranks,
        # 2 cores, other load): a 50 us spin lengthened the 102 MB allreduce by ~45 %, while
        # 5 us cost nothing measurable and still catches a peer that arrives at once.
        found.group.group.spin_us = 50 if spare else 5
    logger.debug(
        "allreduce: %s, %d rank(s) on this host, %d CPU(s) here, MPI path %s",
        "shared memory" if found.group is not None else "MPI",
        found.local_size,
        cpus,
        "pipelined" if _auto_pipeline else "not pipelined",
    )
    _host = found.group


def _single_host() -> _shm.HostGroup | None:
    """The shared-memory group when it spans the whole job (one host), else None."""
    host = _host
    return host if host is not _UNSET and host is not None and not host.hierarchical else None


def exchange(comm: Any, sig: int, extra: int) -> np.ndarray:
    """Every rank's ``[signature, extra]`` as a ``(size, 2)`` int64 array: one barrier in the
    shared segment on a single host, else one MPI Allgather."""
    host = _single_host()
    if host is not None:
        gathered = host.exchange(sig, extra, comm.Get_rank())
        _count("shm_check")
        return gathered
    mine = np.array([sig, extra], dtype=np.int64)
    gathered = np.empty((comm.Get_size(), 2), dtype=np.int64)
    comm.Allgather(mine, gathered)
    _count("Allgather")
    return gathered


def check(comm: Any, call: Call, extra: int = 0) -> np.ndarray:
    """Gather ``[signature, extra]`` from every rank; raise on every rank if signatures differ.

    Returns the gathered ``(size, 2)`` int64 array (column 1 holds each rank's ``extra``).
    On a single host with shared memory this is one barrier in the segment, not an MPI call.
    Ranks that have called :func:`ringtrain.join` answer with a "join" signature; the
    call goes ahead when they can serve it (see :mod:`._join`).
    """
    replayed = _join.replayed_check()
    if replayed is not None:  # a joined rank re-running this call: the check already happened
        return replayed
    sig = signature(call)
    gathered = exchange(comm, sig, extra)
    if (gathered[:, 0] != sig).any():
        calls = gather_calls(comm, call)
        if not _join.joined_ranks_serve(calls, comm.Get_rank()):
            raise BackendError(mismatch_message(calls, comm.Get_rank()))
    return gathered


def gather_calls(comm: Any, call: Call) -> list[Call]:
    """Every rank's description of its call, after the signatures differed (JSON, never pickled)."""
    calls = []
    for rank, data in enumerate(_control.allgather_bytes(comm, encode_call(call))):
        try:
            calls.append(decode_call(data))
        except ValueError as exc:
            raise BackendError(
                f"rank {rank} sent a malformed collective description ({exc}), seen on rank "
                f"{comm.Get_rank()}; every rank of the job must run the same ringtrain version"
            ) from None
    return calls


# ------------------------------------------------------------------ allreduce


def half_sum_op(MPI: Any, dtype: np.dtype) -> Any:
    """A user-defined MPI op summing 16-bit floats, for compressed buckets (MPI has no half type)."""
    ops = half_sum_op.__dict__.setdefault("cache", {})
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
    """Allreduce ``arrays`` (see the module docstring for the path taken); results in input order."""
    MPI = mpi_module()
    with _lock, progress.collective(what):
        return _allreduce(MPI, arrays, op, what, compression, pipelined=True)


def _allreduce(
    MPI: Any, arrays: Sequence[np.ndarray], op: ReduceOp, what: str, compression: str | None, pipelined: bool
) -> list[np.ndarray]:
    """The body of an allreduce; the caller holds the turn (or is the communication thread)."""
    comm, rank, size = comm_info()
    # Compression is part of what must agree: ranks must move the same bytes.
    call = Call(what, op_name(op), tuple(spec_of(a) for a in arrays), compression=compression)
    # The check comes first, also for invalid arguments, which must raise on every rank
    # alike: a rank that raised alone would leave the others hanging. It stays a separate
    # step even on shared memory, so a rank inside join() can answer it (see _join).
    check(comm, call)
    invalid = _invalid(arrays, op, what, compression)
    if invalid is not None:
        raise invalid
    if _host is _UNSET:
        _setup(comm, MPI)
    specs = [(tuple(int(d) for d in a.shape), a.dtype) for a in arrays]
    outs = OUTPUTS.get((what, tuple(specs)), specs)
    if not arrays:
        return outs
    if size == 1:  # every op of one rank is the identity (no rounding by compression either)
        for a, out in zip(arrays, outs, strict=True):
            np.copyto(out, a)
        return outs
    summing = op in (ReduceOp.Sum, ReduceOp.Average)
    if _host is not None:
        _allreduce_shm(_host, arrays, outs, op, size, rank, compression if summing else None)
    else:
        jobs = _mpi_jobs(MPI, comm, arrays, outs, op, size, compression if summing else None)
        pipelining = _auto_pipeline if PIPELINE is None else PIPELINE
        _run_jobs(jobs, pipelined and pipelining and STREAM.threaded)
    return outs


def _invalid(
    arrays: Sequence[np.ndarray], op: ReduceOp, what: str, compression: str | None
) -> ConfigError | None:
    """The error an allreduce's arguments call for, or None (raised only after the check)."""
    if not isinstance(op, ReduceOp):
        return ConfigError(f"{what}: op must be ringtrain.Average, Sum, Min or Max, got {op!r}")
    if compression not in fusion.COMPRESSIONS:
        return ConfigError(
            f"{what}: compression={compression!r} is not supported; use None, 'fp16' or 'bf16'"
        )
    try:
        for a in arrays:
            check_reducible(a.dtype.name, what)
    except ConfigError as exc:
        return exc
    return None


def _allreduce_shm(
    host: _shm.HostGroup,
    arrays: Sequence[np.ndarray],
    outs: list[np.ndarray],
    op: ReduceOp,
    size: int,
    rank: int,
    compression: str | None,
) -> None:
    """One shared-memory reduction per dtype, after the signature check."""
    by_dtype: dict[np.dtype, list[int]] = {}
    for i, a in enumerate(arrays):
        by_dtype.setdefault(a.dtype, []).append(i)
    for dtype, indices in by_dtype.items():
        if not any(arrays[i].size for i in indices):
            continue  # nothing to move (zero-size tensors only)
        kind = _KINDS[dtype.name]
        average = op is ReduceOp.Average
        integer = kind in ("i4", "i8")
        compress = compression if (compression and kind == "f4") else ""
        host.allreduce(
            [np.ascontiguousarray(arrays[i]) for i in indices],
            [outs[i] for i in indices],
            kind,
            _SHM_OPS[op],
            compress,
            1.0 / size if average and not integer else 1.0,
            size if average and integer else 1,
            rank,
        )
        _count("shm")


# --------------------------------------------------------- the MPI path's jobs


class _Job:
    """One MPI call's worth of an allreduce: prepare (caller), communicate (MPI), finish (caller)."""

    def prepare(self) -> None:
        pass

    def communicate(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass


class _Direct(_Job):
    """A large contiguous tensor: MPI reduces from the input straight into the output."""

    def __init__(self, MPI: Any, comm: Any, src: np.ndarray, out: np.ndarray, mpi_op: Any, scale: float):
        self.MPI, self.comm, self.src, self.out, self.mpi_op, self.scale = MPI, comm, src, out, mpi_op, scale

    def communicate(self) -> None:
        mpi_type = getattr(self.MPI, _MPI_TYPES[self.src.dtype.name])
        self.comm.Allreduce([self.src, mpi_type], [self.out, mpi_type], op=self.mpi_op)
        _count("Allreduce")

    def finish(self) -> None:
        fusion.scale_in_place(self.out, self.scale)


class _Bucket(_Job):
    """Small tensors packed into one buffer, reduced in place, unpacked with the scale fused in."""

    def __init__(
        self,
        MPI: Any,
        comm: Any,
        members: list[np.ndarray],
        outs: list[np.ndarray],
        mpi_op: Any,
        scale: float,
        compression: str | None,
        slot: int,
    ):
        self.MPI, self.comm, self.members, self.outs = MPI, comm, members, outs
        self.mpi_op, self.scale, self.compression, self.slot = mpi_op, scale, compression, slot
        self.buf: np.ndarray | None = None

    def prepare(self) -> None:
        dtype = self.members[0].dtype
        wire = fusion.wire_dtype(dtype, self.compression)
        count = sum(a.size for a in self.members)
        pool = POOL.get(("pack", self.slot), wire, count)
        self.buf = fusion.pack(self.members, out=pool, compress=self.compression)

    def communicate(self) -> None:
        MPI, buf = self.MPI, self.buf
        if self.compression:
            self.comm.Allreduce(
                MPI.IN_PLACE, [buf.view(np.uint16), MPI.UINT16_T], op=half_sum_op(MPI, buf.dtype)
            )
        else:
            self.comm.Allreduce(MPI.IN_PLACE, [buf, getattr(MPI, _MPI_TYPES[buf.dtype.name])], op=self.mpi_op)
        _count("Allreduce")

    def finish(self) -> None:
        fusion.unpack(self.buf, self.members, scale=self.scale, compress=self.compression, out=self.outs)


class _HalfBucket(_Bucket):
    """float16/bfloat16: MPI has no 16-bit float type, so reduce in float32 (exact for
    Min/Max, one rounding for sums), scale in float32, then round once back."""

    def prepare(self) -> None:
        count = sum(a.size for a in self.members)
        self.buf = wide = POOL.get(("widen", self.slot), np.dtype(np.float32), count)
        offset = 0
        for a in self.members:
            np.copyto(wide[offset : offset + a.size], a.reshape(-1), casting="unsafe")
            offset += a.size

    def finish(self) -> None:
        wide = self.buf
        if self.scale != 1.0:
            np.multiply(wide, np.float32(self.scale), out=wide)
        offset = 0
        for out in self.outs:
            np.copyto(out.reshape(-1), wide[offset : offset + out.size], casting="unsafe")
            offset += out.size


def _mpi_jobs(
    MPI: Any,
    comm: Any,
    arrays: Sequence[np.ndarray],
    outs: list[np.ndarray],
    op: ReduceOp,
    size: int,
    compression: str | None,
) -> list[_Job]:
    threshold = fusion.fusion_threshold()
    mpi_op = getattr(MPI, _MPI_OPS[op])
    scale = 1.0 / size if op is ReduceOp.Average else 1.0
    direct: list[int] = []
    rest: list[int] = []
    for i, a in enumerate(arrays):
        compressed = compression is not None and a.dtype == np.float32
        big = a.nbytes >= DIRECT_BYTES or a.nbytes > threshold or threshold == 0
        if big and a.size and a.flags.c_contiguous and not compressed and a.dtype.name in _MPI_TYPES:
            direct.append(i)
        else:
            rest.append(i)
    items: list[list[int]] = [[i] for i in direct]
    planned = fusion.plan_buckets([(arrays[i].dtype, arrays[i].nbytes) for i in rest], threshold)
    items += [[rest[j] for j in bucket] for bucket in planned]
    items.sort(key=lambda item: item[0])
    alone = set(direct)
    jobs: list[_Job] = []
    for item in items:
        members = [arrays[i] for i in item]
        if sum(a.size for a in members) == 0:
            continue  # outputs of zero-size tensors need no data
        if len(item) == 1 and item[0] in alone:
            jobs.append(_Direct(MPI, comm, arrays[item[0]], outs[item[0]], mpi_op, scale))
            continue
        kind = _HalfBucket if members[0].dtype.name in HALF else _Bucket
        slot = len(jobs) % 2  # two pack buffers: bucket k+2 reuses k's after k is unpacked
        jobs.append(kind(MPI, comm, members, [outs[i] for i in item], mpi_op, scale, compression, slot))
    return jobs


def _run_jobs(jobs: list[_Job], pipelined: bool) -> None:
    """Run the jobs in order; pipelined: MPI on the communication thread, one bucket ahead."""
    if not pipelined:
        for job in jobs:
            job.prepare()
            job.communicate()
            job.finish()
        return
    in_flight: tuple[_Job, Handle] | None = None
    try:
        for job in jobs:
            job.prepare()  # packs bucket k+1 while bucket k is in MPI
            handle = STREAM.submit(job.communicate)
            if in_flight is not None:
                in_flight[1].result()
                in_flight[0].finish()  # unpacks bucket k while bucket k+1 is in MPI
            in_flight = (job, handle)
        if in_flight is not None:
            in_flight[1].result()
            in_flight[0].finish()
    finally:
        STREAM.drain()  # never leave MPI work behind an error


# ------------------------------------------------- asynchronous (graph) allreduce

_tokens = itertools.count(1)
_pending: dict[int, Handle] = {}
_PENDING_LIMIT = 4096  # handles of graphs that failed before collecting them are dropped


def submit_allreduce(
    arrays: Sequence[np.ndarray], op: ReduceOp, what: str, compression: str | None = None
) -> int:
    """Queue an allreduce on the communication thread; return a token for :func:`collect`.

    The caller goes on at once (inside ``tf.function``: with the rest of backprop). The
    arrays must stay unchanged until collected (TF's input buffers do).
    """
    MPI = mpi_module()
    arrays = list(arrays)
    with _lock.submitting():
        if _host is _UNSET:
            _configure_stream(MPI)

        def body() -> list[np.ndarray]:
            with progress.collective(what):
                return _allreduce(MPI, arrays, op, what, compression, pipelined=False)

        handle = STREAM.submit(body)
    token = next(_tokens)
    _pending[token] = handle
    while len(_pending) > _PENDING_LIMIT:
        _pending.pop(next(iter(_pending)))
    return token


def collect(tokens: Sequence[int]) -> list[list[np.ndarray]]:
    """Wait for submitted allreduces; their results in token order (the first error is raised)."""
    results: list[list[np.ndarray]] = []
    error: BaseException | None = None
    for token in tokens:
        handle = _pending.pop(int(token), None)
        if handle is None:
            raise BackendError(f"allreduce token {int(token)} is unknown or was already collected")
        try:
            results.append(handle.result())
        except Exception as exc:
            error = error or exc
    if error is not None:
        raise error
    return results


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
        _count("Allgatherv")
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
                _count("Bcast")
                outs = fusion.unpack(buf, members)
            else:
                outs = [np.empty(a.shape, a.dtype) for a in members]
            for i, out in zip(bucket, outs, strict=True):
                results[i] = out
    return results  # type: ignore[return-value]
