"""Local gradient aggregation: allreduce and apply once every ``backward_passes_per_step`` steps.

Each optimizer step adds its gradients to per-variable sums kept on this rank. On
every ``passes``-th step the sums (divided by ``passes`` when averaging) are
allreduced and applied, and the sums start again from zero; on the other steps
nothing is applied and only the optimizer's iteration counter moves on, as in
Horovod. Every rank counts the same steps, so all ranks take the same branch and
the allreduce stays collective.

The sums live in a plain holder object on the optimizer, out of Keras' tracking,
so they are neither broadcast nor saved with the optimizer's variables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ringtrain.errors import ConfigError

_ATTR = "_ringtrain_aggregation"


def check_passes(backward_passes_per_step: Any) -> int:
    """``backward_passes_per_step`` as a positive int, or ConfigError naming it."""
    if (
        isinstance(backward_passes_per_step, bool)
        or not isinstance(backward_passes_per_step, int)
        or backward_passes_per_step < 1
    ):
        raise ConfigError(f"backward_passes_per_step must be an int >= 1, got {backward_passes_per_step!r}")
    return backward_passes_per_step


class _Sums:
    """The per-variable gradient sums and the pass counter of one optimizer."""

    def __init__(self, variables: Sequence[Any]) -> None:
        import tensorflow as tf

        with tf.init_scope():  # created eagerly even when first reached while tracing a tf.function
            self.counter = tf.Variable(0, dtype=tf.int64, trainable=False, name="ringtrain_passes")
            self.sums = [
                tf.Variable(tf.zeros(tuple(v.shape), _dtype(v)), trainable=False, name="ringtrain_grad_sum")
                for v in variables
            ]


def _dtype(variable: Any) -> Any:
    import tensorflow as tf

    return tf.as_dtype(getattr(variable, "dtype", "float32"))


def step(
    optimizer: Any,
    grads: Sequence[Any],
    variables: Sequence[Any],
    passes: int,
    average: bool,
    sync: Callable[[list[Any]], Any],
) -> Any:
    """Add ``grads`` to the sums; every ``passes``-th call, ``sync`` (allreduce + apply) them.

    ``sync`` receives the summed gradients (None where ``grads`` had None) and
    returns what the optimizer's own apply returned. Returns a bool tensor: whether
    this step applied.
    """
    import tensorflow as tf

    if passes == 1:
        return sync(list(grads))
    if getattr(optimizer, "built", None) is False:
        # Keras 3 builds its slots on first apply; inside tf.cond's branch they would come out
        # without values, so build them here (tf-keras lifts its own into an init scope).
        optimizer.build(variables)
    sums = optimizer.__dict__.get(_ATTR)
    if sums is None or len(sums.sums) != len(variables):
        sums = _Sums(variables)
        optimizer.__dict__[_ATTR] = sums  # bypass Keras' attribute tracking on purpose
    present = [g is not None for g in grads]
    for total, grad in zip(sums.sums, grads, strict=True):
        if grad is not None:
            total.assign_add(tf.cast(tf.convert_to_tensor(grad), total.dtype))
    count = sums.counter.assign_add(1)

    def apply_sums() -> Any:
        summed = [t.read_value() if p else None for t, p in zip(sums.sums, present, strict=True)]
        if average:
            summed = [None if g is None else g / passes for g in summed]
        with tf.control_dependencies([g for g in summed if g is not None]):
            sync(summed)
            resets = [t.assign(tf.zeros_like(t)) for t in sums.sums] + [sums.counter.assign(0)]
        with tf.control_dependencies(resets):
            return tf.constant(True)

    def skip() -> Any:
        with tf.control_dependencies([optimizer.iterations.assign_add(1)]):
            return tf.constant(False)

    return tf.cond(tf.equal(count, passes), apply_sums, skip)
