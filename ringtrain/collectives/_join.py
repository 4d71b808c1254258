"""``join()``: a rank that has run out of data keeps serving the others' allreduces.

Every collective starts with the signature check (``_engine.check``): one exchange of
``[signature, extra]`` (a shared-memory barrier on one host, else an MPI Allgather). A
rank inside :func:`join` answers each check with the signature of a "join" call and, as
``extra``, how many collectives it has served since it joined. When signatures differ
every rank exchanges its :class:`Call` description (``_engine.check`` already does so
to build the mismatch message), which tells a joined rank the shapes, dtypes, op and
compression of the collective the others are running. It then runs the same collective
with neutral inputs (zeros for Sum/Average, the dtype's largest value for Min and
smallest for Max), re-using the check that already happened, so every rank makes the
same MPI calls in the same order. Average still divides by the full world size, as
Horovod's join does. Each collective served is one step of ``join`` in the rank's
progress record, so its count of collectives keeps pace with the running ranks' (the
stall inspector compares these counts).

Only allreduces (any op, fused or not, compressed or not) and barriers can be served;
a broadcast, allgather or alltoall while a rank has joined raises ConfigError on
every rank. When every rank has joined the check agrees and ``join`` returns the
rank that joined last (the one that had served the fewest collectives; the highest
such rank on a tie).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ringtrain import progress
from ringtrain.errors import BackendError, ConfigError

from ._ops import ReduceOp
from ._signature import Call, mismatch_message, signature

JOIN = "join"
BARRIER = "barrier"

_REDUCE_OPS = {op.value: op for op in ReduceOp}

# Set by a joined rank just before it re-runs another rank's collective, read (once) by
# that collective's check; guarded by the engine's lock, which join() holds.
_replay: np.ndarray | None = None


def replayed_check() -> np.ndarray | None:
    """The gathered check a joined rank's re-run collective should reuse, or None; clears it."""
    global _replay
    gathered, _replay = _replay, None
    return gathered


def _is_allreduce(call: Call) -> bool:
    return call.op in _REDUCE_OPS and call.root is None and not call.free_first_dim


def served_call(calls: Sequence[Call], me: int) -> Call | None:
    """The collective the joined ranks serve, or None when ``calls`` do not involve joined ranks.

    Raises ConfigError on every rank when the running ranks' collective cannot be
    served by joined ranks; returns None (the caller then raises the mismatch) when
    the running ranks disagree among themselves.
    """
    joined = [r for r, c in enumerate(calls) if c.what == JOIN]
    running = [c for c in calls if c.what != JOIN]
    if not joined or not running:
        return None
    first = running[0]
    if any(c.comparable() != first.comparable() for c in running[1:]):
        return None
    if not (_is_allreduce(first) or first.what == BARRIER):
        ranks = ", ".join(map(str, joined))
        raise ConfigError(
            f"{first.what} cannot run while rank(s) {ranks} have called join(): joined ranks can "
            f"only serve allreduces and barriers (raised on rank {me}). Run broadcasts, allgathers "
            "and alltoalls before any rank joins, or after join() returns on every rank"
        )
    return first


def joined_ranks_serve(calls: Sequence[Call], me: int) -> bool:
    """True when the only ranks whose call differs have joined and can serve this one."""
    return served_call(calls, me) is not None


def neutral(spec: tuple[tuple[int, ...], str], op: ReduceOp) -> np.ndarray:
    """An array that leaves ``op``'s result unchanged: zeros, or the dtype's extreme for Min/Max."""
    shape, dtype_name = spec
    dtype = _dtype(dtype_name)
    if op is ReduceOp.Min or op is ReduceOp.Max:
        big = np.iinfo(dtype).max if dtype.kind in "iu" else np.inf
        small = np.iinfo(dtype).min if dtype.kind in "iu" else -np.inf
        return np.full(shape, big if op is ReduceOp.Min else small, dtype=dtype)
    return np.zeros(shape, dtype=dtype)


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _last_joined(gathered: np.ndarray) -> int:
    served = gathered[:, 1]
    latest = np.flatnonzero(served == served.min())
    return int(latest.max())


def join() -> int:
    """Mark this rank as out of data and serve the other ranks' allreduces until every rank joins.

    Meanwhile this rank adds neutral values to each allreduce the others run (zeros
    for Sum and Average, so an Average is the sum of the running ranks' tensors
    divided by the world size). Returns the rank that joined last. A broadcast,
    allgather or alltoall while some rank has joined raises ConfigError on every rank.

    Example (ranks with fewer batches finish early without hanging the others)::

        for batch in my_batches:          # lengths differ across ranks
            train_step(batch)             # allreduces gradients
        ringtrain.join()
    """
    global _replay
    from . import _engine

    call = Call(JOIN, "-", ())
    served = 0
    with _engine._lock:
        comm, me, _ = _engine.comm_info()
        while True:
            # One step per collective the others run, counted once like theirs: the served
            # allreduce runs inside this step, so the progress recorder takes it as part of it.
            with progress.collective(JOIN):
                sig = signature(call)
                gathered = _engine.exchange(comm, sig, served)
                if (gathered[:, 0] == sig).all():
                    return _last_joined(gathered)
                calls = _engine.gather_calls(comm, call)
                target = served_call(calls, me)
                if target is None:
                    raise BackendError(mismatch_message(calls, me))
                if target.what != BARRIER:
                    op = _REDUCE_OPS[target.op]
                    _replay = gathered
                    try:
                        _engine.fused_allreduce(
                            [neutral(spec, op) for spec in target.specs], op, target.what, target.compression
                        )
                    finally:
                        _replay = None
            served += 1
