"""Bridging TensorFlow gradients to the MPI collectives, eagerly or inside tf.function."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._engine import fused_allreduce
from ._ops import Average, ReduceOp


def reduce_gradients(
    grads: Sequence[Any], op: ReduceOp = Average, compression: str | None = None, what: str = "gradients"
) -> list[Any]:
    """Allreduce a list of gradients (tf tensors, IndexedSlices or None) through the fused path.

    None stays None (every rank must have None at the same places: the signature
    covers only the tensors). IndexedSlices are made dense. Eagerly this calls MPI
    directly; in a graph it adds ONE ``tf.numpy_function`` for all tensors, so the
    ranks' MPI calls keep one order however TF schedules ops.
    """
    import tensorflow as tf

    where = [i for i, g in enumerate(grads) if g is not None]
    dense = [tf.convert_to_tensor(grads[i]) for i in where]
    out = list(grads)
    if not dense:
        return out
    if tf.executing_eagerly():
        reduced = fused_allreduce([np.asarray(t.numpy()) for t in dense], op, what, compression)
        tensors = [tf.convert_to_tensor(r) for r in reduced]
    else:

        def body(*arrays: np.ndarray) -> list[np.ndarray]:
            return fused_allreduce([np.asarray(a) for a in arrays], op, what, compression)

        tensors = tf.numpy_function(
            body, dense, Tout=[t.dtype for t in dense], stateful=True, name="ringtrain_allreduce"
        )
        for t, d in zip(tensors, dense, strict=True):
            t.set_shape(d.shape)
    for i, t in zip(where, tensors, strict=True):
        out[i] = t
    return out
