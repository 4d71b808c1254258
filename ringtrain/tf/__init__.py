"""TensorFlow glue for code running inside a ringtrain worker."""

from __future__ import annotations

import threading

_lock = threading.Lock()
_strategy = None


def strategy():
    """The job's ``tf.distribute.MultiWorkerMirroredStrategy``, built once per worker.

    Call it before any other TensorFlow op, since TF fixes its collective setup when
    it first initialises. Ops placed in ``strategy.scope()`` are mirrored across
    every worker, and gradients are allreduced (RING on CPU, NCCL on GPU).
    """
    global _strategy
    with _lock:
        if _strategy is None:
            from ..backends.tf import make_strategy

            _strategy = make_strategy()
        return _strategy
