"""Horovod-style collectives over MPI: allreduce, allgather, broadcast, alltoall, barrier, join,
cross ranks and DistributedGradientTape.

Run inside a ringtrain worker with ``backend="mpi"`` or under ``mpiexec -n N``.
Every rank must call the same collectives in the same order with tensors of the
same shapes and dtypes; a mismatch raises :class:`ringtrain.BackendError` on every
rank, naming the ranks. Inputs are numpy arrays or TensorFlow tensors of float32,
float64, float16, bfloat16, int32 or int64; results come back as the same kind and
dtype. Within a host, reductions go through one shared-memory segment (native
extension); otherwise through MPI: large tensors straight into their outputs, small
ones fused into buckets (:mod:`ringtrain.fusion`), one MPI call per bucket.

Numeric semantics:

* ``Average`` on integers is floor division of the sum by the world size
  (``sum // size``), as :func:`ringtrain.fusion.unpack` documents.
* float16/bfloat16 are summed in float32 (MPI has no half types), scaled in
  float32 and rounded once back, so an fp16 allreduce is as exact as its rounding.
* ``compression="fp16"``/``"bf16"`` (gradient tape, optimizer) sends float32
  tensors as 16-bit floats, summed in that type (rounded after each add), and widens
  the sum before scaling: relative error about 2**-11 (fp16) or 2**-8 (bf16) per
  rounding. Where both addends are NaN, which NaN results is unspecified.
* Sums run in rank order on the shared-memory path; MPI fixes no order, so with more
  than two ranks float results may differ in the last bit between the paths.
* Returned numpy arrays may be reused by a later call with the same tensors, but only
  once nothing references them any more.
* TF tensors and variables give TF results; inside ``tf.function`` every collective
  is one stateful op, run in program order (see :mod:`._tfops`).

Example (``mpiexec -n 2 python train.py``)::

    import numpy as np, ringtrain
    total = ringtrain.allreduce(np.ones(3, np.float32), op=ringtrain.Sum)  # [2., 2., 2.]
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ringtrain.errors import ConfigError

from . import _engine, _join, _more, _tfops
from ._convert import NUMPY, from_numpy, to_numpy
from ._more import cross_rank, cross_size, is_homogeneous
from ._ops import Average, Max, Min, ReduceOp, Sum
from ._tf import reduce_gradients

__all__ = [
    "Average",
    "DistributedGradientTape",
    "Max",
    "Min",
    "ReduceOp",
    "Sum",
    "allgather",
    "allreduce",
    "alltoall",
    "barrier",
    "broadcast",
    "broadcast_variables",
    "call_counts",
    "cross_rank",
    "cross_size",
    "grouped_allreduce",
    "is_homogeneous",
    "join",
]

logger = logging.getLogger(__name__)


def _what(base: str, name: str | None) -> str:
    return f"{base}({name})" if name else base


def allreduce(
    tensor: Any,
    op: ReduceOp = Average,
    name: str | None = None,
    compression: str | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> Any:
    """Reduce ``tensor`` across all ranks with ``op``; every rank gets the result.

    ``prescale_factor`` multiplies each rank's input before the reduction and
    ``postscale_factor`` the result after it (Average's 1/size comes on top); every
    rank must pass the same factors. ``compression="fp16"``/``"bf16"`` sends float32
    data as 16-bit floats. Works eagerly and inside ``tf.function`` (TF inputs give
    TF results, with gradients).

    >>> ringtrain.allreduce(np.array([1.0, 2.0], np.float32))  # mean over ranks
    """
    what = _what("allreduce", name)
    (result,) = _reduce_many([tensor], op, what, compression, prescale_factor, postscale_factor)
    return result


def grouped_allreduce(
    tensors: Sequence[Any],
    op: ReduceOp = Average,
    name: str | None = None,
    compression: str | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> list[Any]:
    """Allreduce many tensors at once: one shared-memory reduction per dtype within a host,
    or over MPI one call per bucket (``RINGTRAIN_FUSION_THRESHOLD``, default 16 MiB) or per
    large tensor. Results keep the input order, kinds and dtypes. Options as for
    :func:`allreduce`.
    """
    what = _what("grouped_allreduce", name)
    return _reduce_many(list(tensors), op, what, compression, prescale_factor, postscale_factor)


def _reduce_many(
    tensors: list[Any], op: ReduceOp, what: str, compression: str | None, prescale: Any, postscale: Any
) -> list[Any]:
    pre = _more.check_factor(prescale, "prescale_factor")
    post = _more.check_factor(postscale, "postscale_factor")
    if _tfops.wants_tf(*tensors):
        return _tfops.grouped_allreduce(tensors, op, what, compression, pre, post)
    converted = [to_numpy(t, what) for t in tensors]
    results = _tfops.reduce_arrays([a for a, _ in converted], op, what, compression, pre, post)
    return [from_numpy(r, k) for r, (_, k) in zip(results, converted, strict=True)]


def allgather(tensor: Any, name: str | None = None) -> Any:
    """Concatenate every rank's ``tensor`` along axis 0, in rank order.

    First dimensions may differ across ranks; the other dimensions and the dtype must not.
    """
    what = _what("allgather", name)
    if _tfops.wants_tf(tensor):
        return _tfops.allgather(tensor, what)
    array, kind = to_numpy(tensor, what)
    return from_numpy(_engine.allgather(array, what), kind)


def broadcast(tensor: Any, root_rank: int = 0, name: str | None = None) -> Any:
    """Return ``root_rank``'s ``tensor`` on every rank (shapes and dtypes must agree)."""
    what = _what("broadcast", name)
    if _tfops.wants_tf(tensor):
        return _tfops.broadcast(tensor, root_rank, what)
    array, kind = to_numpy(tensor, what)
    (result,) = _engine.broadcast([array], root_rank, what)
    return from_numpy(result, kind)


def alltoall(tensor: Any, splits: Any = None, name: str | None = None) -> tuple[Any, Any]:
    """Send ``splits[j]`` rows (axis 0) of ``tensor`` to rank j; gather what every rank sent here.

    Returns ``(received, received_splits)``: the rows from every rank concatenated in
    rank order, and how many came from each. Without ``splits`` axis 0 is divided
    evenly (it must be a multiple of the world size). Dimensions after the first
    and the dtype must agree across ranks.

    >>> out, counts = ringtrain.alltoall(np.arange(4.0), splits=[1, 3])
    """
    what = _what("alltoall", name)
    if _tfops.wants_tf(tensor):
        return _tfops.alltoall(tensor, splits, what)
    array, kind = to_numpy(tensor, what)
    out, received = _more.alltoall(array, splits, what)
    return from_numpy(out, kind), received


def broadcast_variables(variables: Sequence[Any], root_rank: int = 0) -> Any:
    """Overwrite ``variables`` in place with ``root_rank``'s values (fused, one Bcast per bucket).

    Takes tf.Variables, Keras variables (anything with ``assign``) or writable numpy arrays.
    Call it once after the model and optimizer are built, so every rank starts alike.
    Inside a ``tf.function`` it adds one broadcast op and the assigns, and returns
    them grouped; eagerly it returns None.
    """
    variables = list(variables)
    if _tfops.wants_tf() and variables:  # inside a tf.function
        return _tfops.broadcast_variables(variables, root_rank)
    converted = [to_numpy(v, "broadcast_variables") for v in variables]
    results = _engine.broadcast([a for a, _ in converted], root_rank, "broadcast_variables")
    for var, (_, kind), value in zip(variables, converted, results, strict=True):
        if kind == NUMPY:
            if not isinstance(var, np.ndarray):
                raise ConfigError(
                    f"broadcast_variables cannot assign to a {type(var).__name__}; pass variables or arrays"
                )
            np.copyto(var, value)
        else:
            var.assign(value)
    return None


def barrier() -> None:
    """Return once every rank has called ``barrier()`` (ranks inside :func:`join` count as arrived)."""
    if _tfops.wants_tf():  # inside a tf.function: a stateful op, kept in program order
        return _tfops.barrier()
    _more.barrier()
    return None


def join() -> int:
    """Say this rank is out of data; serve the other ranks' allreduces until every rank has joined.

    While it waits, this rank adds zeros to the others' Sum/Average allreduces (Average
    still divides by the world size) and neutral values to Min/Max. Returns the rank
    that joined last. A broadcast, allgather or alltoall while some rank has joined
    raises ConfigError on every rank. Inside a ``tf.function`` it returns an int32 tensor.

    Example::

        for x, y in my_shard:         # shards differ in length across ranks
            train_step(x, y)
        ringtrain.join()
    """
    if _tfops.wants_tf():
        return _tfops.join()
    return _join.join()


def call_counts() -> dict[str, int]:
    """Calls this process's collectives have made, by name, for tests and benchmarks.

    MPI calls by MPI function: ``Allreduce``, ``Allgatherv``, ``Bcast`` and ``Alltoallv``
    carry tensor data; ``Allgather`` counts the cross-rank signature checks made over MPI
    (and alltoall's exchange of split counts). On a single host with shared memory the
    signature checks are barriers in the segment, counted as ``shm_check``, and ``shm``
    counts shared-memory reductions (one per dtype per allreduce). Set-up exchanges and
    the descriptions ranks trade after a mismatch are not counted.
    """
    return dict(_engine.CALLS)


class DistributedGradientTape:
    """Wraps a ``tf.GradientTape`` so ``gradient()`` returns gradients allreduced across ranks.

    ``None`` gradients stay ``None``; ``tf.IndexedSlices`` are made dense. Eagerly it
    reduces after the tape is done. Inside ``tf.function`` it overlaps the reduction
    with backprop: gradient buckets (``RINGTRAIN_FUSION_THRESHOLD`` bytes, last layers
    first) are handed to a communication thread by ``tf.numpy_function`` ops as soon as
    they exist. It therefore cannot run under XLA (``jit_compile=True``) or on TPUs, and
    the graph cannot be saved with it.

    Example::

        with tf.GradientTape() as tape:
            loss = loss_fn(model(x), y)
        tape = ringtrain.DistributedGradientTape(tape)
        grads = tape.gradient(loss, model.trainable_variables)
    """

    def __init__(self, tape: Any, op: ReduceOp = Average, compression: str | None = None) -> None:
        if not isinstance(op, ReduceOp):
            raise ConfigError(f"op must be ringtrain.Average, Sum, Min or Max, got {op!r}")
        if compression not in (None, "fp16", "bf16"):
            raise ConfigError(f"compression={compression!r} is not supported; use None, 'fp16' or 'bf16'")
        self._tape = tape
        self._op = op
        self._compression = compression

    def gradient(self, target: Any, sources: Any, output_gradients: Any = None, **kwargs: Any) -> Any:
        """Like ``tf.GradientTape.gradient``, then allreduced; same structure as ``sources``."""
        import tensorflow as tf

        grads = self._tape.gradient(target, sources, output_gradients=output_gradients, **kwargs)
        flat = tf.nest.flatten(grads, expand_composites=False)
        reduced = reduce_gradients(flat, self._op, self._compression, "DistributedGradientTape")
        return tf.nest.pack_sequence_as(grads, reduced)

    def __getattr__(self, name: str) -> Any:  # watch(), stop_recording(), ... go to the tape
        return getattr(self._tape, name)

    def __enter__(self) -> DistributedGradientTape:
        self._tape.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._tape.__exit__(*exc)
