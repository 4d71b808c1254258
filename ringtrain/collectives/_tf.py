"""Bridging TensorFlow gradients to the MPI collectives, eagerly or inside tf.function."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ringtrain import fusion

from ._engine import collect, fused_allreduce, submit_allreduce
from ._ops import Average, ReduceOp


def reduce_gradients(
    grads: Sequence[Any], op: ReduceOp = Average, compression: str | None = None, what: str = "gradients"
) -> list[Any]:
    """Allreduce a list of gradients (tf tensors, IndexedSlices or None) through the fused path.

    None stays None (every rank must have None at the same places: the signature
    covers only the tensors). IndexedSlices are made dense. Eagerly this calls MPI
    directly. Inside ``tf.function`` it overlaps the reduction with backprop: the
    gradients are cut into buckets of ``RINGTRAIN_FUSION_THRESHOLD`` bytes, last
    gradients first (backprop produces them first), and each bucket gets a stateful
    ``tf.numpy_function`` that hands it to the communication thread as soon as its
    gradients exist; one more waits for all and returns the results. TF runs stateful
    ops without data dependencies between them in program order (automatic control
    dependencies), so every rank submits its buckets in the same order.
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
    elif all(t.shape.is_fully_defined() for t in dense):
        tensors = _overlapped(tf, dense, op, compression, what)
    else:  # sizes unknown while tracing: one reduction after the last gradient

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


def overlap_buckets(nbytes: Sequence[int], threshold: int) -> list[list[int]]:
    """Indices of tensors in the order backprop produces them (last first), cut into buckets.

    Each bucket holds consecutive tensors of at most ``threshold`` bytes in all, or one
    tensor alone if it is larger; ``threshold=0`` gives every tensor a bucket.

    >>> overlap_buckets([4, 4, 8, 2], 8)
    [[3], [2], [1, 0]]
    """
    buckets: list[list[int]] = []
    size = 0
    for i in reversed(range(len(nbytes))):
        if buckets and size + nbytes[i] <= threshold:
            buckets[-1].append(i)
            size += nbytes[i]
        else:
            buckets.append([i])
            size = nbytes[i]
    return buckets


def _overlapped(tf: Any, dense: list[Any], op: ReduceOp, compression: str | None, what: str) -> list[Any]:
    nbytes = [t.shape.num_elements() * t.dtype.size for t in dense]
    buckets = overlap_buckets(nbytes, fusion.fusion_threshold())
    tokens = []
    for j, bucket in enumerate(buckets):
        # The bucket's place and count are in its name, so ranks that cut their gradients
        # differently fail the signature check instead of pairing unrelated buckets.
        name = f"{what}[{j + 1}/{len(buckets)}]"

        def start(*arrays: np.ndarray, name: str = name) -> np.int64:
            return np.int64(submit_allreduce(arrays, op, name, compression))

        tokens.append(
            tf.numpy_function(
                start, [dense[i] for i in bucket], Tout=tf.int64, stateful=True, name="ringtrain_start"
            )
        )
    order = [i for bucket in buckets for i in bucket]

    def wait(*tokens: np.ndarray) -> list[np.ndarray]:
        return [r for results in collect([int(t) for t in tokens]) for r in results]

    results = tf.numpy_function(
        wait, tokens, Tout=[dense[i].dtype for i in order], stateful=True, name="ringtrain_wait"
    )
    tensors: list[Any] = [None] * len(dense)
    for i, t in zip(order, results, strict=True):
        t.set_shape(dense[i].shape)
        tensors[i] = t
    return tensors
