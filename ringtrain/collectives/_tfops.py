"""TensorFlow faces of the collectives: eager calls, ``tf.function`` graphs and gradients.

Eagerly a collective runs at once on the tensors' numpy values. Inside a
``tf.function`` it becomes one stateful ``tf.numpy_function`` op; tf.function's
automatic control dependencies run stateful ops in program order, so every rank
issues its MPI calls in the order the code wrote them, whatever TF's scheduler does.
Such graphs cannot be compiled by XLA or saved.

Float results carry gradients, as Horovod's ops do: an allreduce's gradient is the
allreduce of the upstream gradient (same op and scaling); an allgather's is the
averaged upstream gradient's slice that belongs to this rank; a broadcast's is the
averaged upstream gradient on the root and zeros elsewhere; an alltoall's sends the
upstream gradient back the way the data came.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _engine, _join, _more
from ._ops import Average, ReduceOp

_SCALARS = np.ndarray | np.generic | int | float | list | tuple


def _tf() -> Any:
    import tensorflow as tf

    return tf


def wants_tf(*values: Any) -> bool:
    """True when a collective on ``values`` should take the TensorFlow path.

    That is inside a ``tf.function`` (whatever the inputs), or eagerly when an input is
    a TensorFlow or Keras tensor or variable. Plain numpy inputs stay numpy eagerly.
    """
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return False
    if not tf.executing_eagerly():
        return True
    return any(not isinstance(v, _SCALARS) for v in values)


def _op_name(what: str) -> str:
    return "ringtrain_" + re.sub(r"[^A-Za-z0-9_]", "_", what)


def _run(
    body: Callable[..., Sequence[np.ndarray]], inputs: Sequence[Any], tout: Sequence[Any], what: str
) -> list[Any]:
    """Run the numpy-level ``body`` on ``inputs``: directly when eager, as one numpy_function in a graph."""
    tf = _tf()
    if tf.executing_eagerly():
        outs = body(*[np.asarray(t.numpy()) for t in inputs])
        return [tf.convert_to_tensor(o) for o in outs]

    def graph_body(*arrays: np.ndarray) -> list[np.ndarray]:
        return list(body(*[np.asarray(a) for a in arrays]))

    outs = tf.numpy_function(graph_body, list(inputs), Tout=list(tout), stateful=True, name=_op_name(what))
    return list(outs) if isinstance(outs, list | tuple) else [outs]


def _tensor(value: Any) -> Any:
    return _tf().convert_to_tensor(value)  # also makes tf.IndexedSlices dense


def _differentiable(tensors: Sequence[Any]) -> bool:
    return any(t.dtype.is_floating for t in tensors)


def _filled(dys: Sequence[Any], outs: Sequence[Any]) -> list[Any]:
    tf = _tf()
    return [tf.zeros_like(o) if dy is None else dy for dy, o in zip(dys, outs, strict=True)]


# ------------------------------------------------------------------ allreduce


def reduce_arrays(
    arrays: Sequence[np.ndarray], op: ReduceOp, what: str, compression: str | None, pre: float, post: float
) -> list[np.ndarray]:
    """The numpy-level allreduce with Horovod's pre/postscale factors around the fused path."""
    inputs = [_more.scaled(a, pre) for a in arrays]
    return [_more.scaled(r, post) for r in _engine.fused_allreduce(inputs, op, what, compression)]


def grouped_allreduce(
    tensors: Sequence[Any],
    op: ReduceOp = Average,
    what: str = "grouped_allreduce",
    compression: str | None = None,
    pre: float = 1.0,
    post: float = 1.0,
) -> list[Any]:
    """Allreduce tf tensors (eager or symbolic) in one fused call; floats get a gradient."""
    tf = _tf()
    xs = [_tensor(t) for t in tensors]
    if not xs:
        return []

    def forward(*ts: Any) -> list[Any]:
        outs = _run(
            lambda *arrays: reduce_arrays(arrays, op, what, compression, pre, post),
            ts,
            [t.dtype for t in ts],
            what,
        )
        for out, t in zip(outs, ts, strict=True):
            out.set_shape(t.shape)
        return outs

    if not _differentiable(xs):
        return forward(*xs)

    @tf.custom_gradient
    def with_gradient(*ts: Any) -> Any:
        outs = forward(*ts)

        def gradient(*dys: Any) -> list[Any]:
            dys = _filled(dys, outs)
            floats = [i for i, t in enumerate(ts) if t.dtype.is_floating]
            reduced = grouped_allreduce([dys[i] for i in floats], op, f"{what}.grad", None, pre, post)
            grads: list[Any] = [None] * len(ts)
            for i, g in zip(floats, reduced, strict=True):
                grads[i] = g
            return grads

        return outs, gradient

    return list(with_gradient(*xs))


def allreduce(
    tensor: Any,
    op: ReduceOp = Average,
    what: str = "allreduce",
    compression: str | None = None,
    pre: float = 1.0,
    post: float = 1.0,
) -> Any:
    (out,) = grouped_allreduce([tensor], op, what, compression, pre, post)
    return out


# ------------------------------------------------------------------ allgather, broadcast, alltoall


def _differentiated(x: Any, forward: Callable[[Any], Any], backward: Callable[[Any, Any], Any]) -> Any:
    """``forward(x)``, with ``backward(x, dy)`` as its gradient when ``x`` is a float tensor."""
    tf = _tf()
    if not x.dtype.is_floating:
        return forward(x)

    @tf.custom_gradient
    def with_gradient(t: Any) -> Any:
        return forward(t), lambda dy: backward(t, dy)

    return with_gradient(x)


def allgather(tensor: Any, what: str = "allgather") -> Any:
    """Concatenate every rank's tensor along axis 0; the gradient is this rank's slice of the averaged one."""
    tf = _tf()

    def forward(t: Any) -> Any:
        (out,) = _run(lambda a: [_engine.allgather(a, what)], [t], [t.dtype], what)
        out.set_shape(tf.TensorShape([None]).concatenate(t.shape[1:]))
        return out

    def backward(t: Any, dy: Any) -> Any:
        reduced = allreduce(dy, Average, f"{what}.grad")
        firsts = allgather(tf.reshape(tf.shape(t, out_type=tf.int64)[0], [1]), f"{what}.grad_dims")
        me = _engine.comm_info()[1]
        start = tf.reduce_sum(firsts[:me])
        return reduced[start : start + firsts[me]]

    return _differentiated(_tensor(tensor), forward, backward)


def broadcast(tensor: Any, root_rank: int, what: str = "broadcast") -> Any:
    """Root's tensor on every rank; gradient: the averaged upstream one on the root, zeros elsewhere."""
    tf = _tf()

    def forward(t: Any) -> Any:
        (out,) = _run(lambda a: _engine.broadcast([a], root_rank, what), [t], [t.dtype], what)
        out.set_shape(t.shape)
        return out

    def backward(t: Any, dy: Any) -> Any:
        reduced = allreduce(dy, Average, f"{what}.grad")
        return reduced if _engine.comm_info()[1] == root_rank else tf.zeros_like(reduced)

    return _differentiated(_tensor(tensor), forward, backward)


def broadcast_variables(variables: Sequence[Any], root_rank: int, what: str = "broadcast_variables") -> Any:
    """Inside a graph: one fused broadcast op, then an assign per variable; returns the grouped assigns."""
    tf = _tf()
    variables = list(variables)
    if not variables:
        return tf.no_op()
    values = [tf.convert_to_tensor(v) for v in variables]
    outs = _run(
        lambda *arrays: _engine.broadcast(list(arrays), root_rank, what),
        values,
        [v.dtype for v in values],
        what,
    )
    return tf.group(*[var.assign(out) for var, out in zip(variables, outs, strict=True)])


def alltoall(tensor: Any, splits: Any = None, what: str = "alltoall") -> tuple[Any, Any]:
    """Scatter slices of axis 0 to every rank, gather theirs; returns (tensor, int32 received splits)."""
    tf = _tf()
    x = _tensor(tensor)
    given = splits is not None
    s = tf.cast(tf.convert_to_tensor(splits), tf.int64) if given else tf.zeros([0], tf.int64)

    def forward(t: Any, counts: Any) -> tuple[Any, Any]:
        def body(a: np.ndarray, c: np.ndarray) -> list[np.ndarray]:
            out, received = _more.alltoall(a, c if given else None, what)
            return [out, received.astype(np.int32)]

        out, received = _run(body, [t, counts], [t.dtype, tf.int32], what)
        out.set_shape(tf.TensorShape([None]).concatenate(t.shape[1:]))
        received.set_shape([None])
        return out, received

    if not x.dtype.is_floating:
        return forward(x, s)

    @tf.custom_gradient
    def with_gradient(t: Any) -> Any:
        out, received = forward(t, s)

        def gradient(dy: Any, _unused: Any = None) -> Any:
            back, _ = alltoall(dy, received, f"{what}.grad")
            return back

        return (out, received), gradient

    out, received = with_gradient(x)
    return out, received


# ------------------------------------------------------------------ join, barrier


def join() -> Any:
    """``join()`` as a tf op: an int32 scalar tensor holding the rank that joined last."""
    tf = _tf()
    (out,) = _run(lambda: [np.asarray(_join.join(), np.int32)], [], [tf.int32], "join")
    out.set_shape([])
    return out


def barrier() -> Any:
    """``barrier()`` as a tf op: eagerly it returns None once every rank arrived; in a graph, the op."""
    tf = _tf()
    if tf.executing_eagerly():
        _more.barrier()
        return None
    (out,) = _run(lambda: [np.asarray(_more.barrier() or 0, np.int32)], [], [tf.int32], "barrier")
    return out
