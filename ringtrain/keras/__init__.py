"""Keras glue for data-parallel ``model.fit`` over ringtrain's MPI collectives.

* :func:`DistributedOptimizer` averages gradients across ranks inside the optimizer step.
* ``BroadcastGlobalVariablesCallback`` makes every rank start from rank 0's weights
  and optimizer state.
* ``MetricAverageCallback`` averages the epoch-end logs across ranks.
* ``LearningRateScheduleCallback``/``LearningRateWarmupCallback`` set the learning rate
  by epoch (Horovod's semantics); ``BestModelCheckpoint`` keeps the best model, saved by rank 0.

Works with Keras 3 (``import keras``) and tf-keras (``TF_USE_LEGACY_KERAS=1``,
``tf.keras``). Limits: the train step is a ``tf.function`` and the optimizer reaches MPI
through ``tf.numpy_function`` ops (one per gradient bucket, so reduction overlaps
backprop), so compile with ``jit_compile=False``
(Keras 3 picks XLA by itself only on GPU hosts); ``run_eagerly=True`` also works.
Only the TensorFlow backend of Keras 3 is supported.

Example (``mpiexec -n 2 python train.py``)::

    import keras, ringtrain
    model.compile(optimizer=ringtrain.keras.DistributedOptimizer(keras.optimizers.Adam(1e-3)),
                  loss="mse", jit_compile=False)
    model.fit(x, y, callbacks=[ringtrain.keras.BroadcastGlobalVariablesCallback(0),
                               ringtrain.keras.MetricAverageCallback()])

Importing this module imports neither Keras nor TensorFlow; the callback classes are
built on first use (set CUDA_VISIBLE_DEVICES before that).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ringtrain.collectives import Average, ReduceOp, broadcast_variables, grouped_allreduce
from ringtrain.collectives._tf import reduce_gradients
from ringtrain.errors import ConfigError

from . import _aggregate, _callbacks

__all__ = [
    "BestModelCheckpoint",
    "BroadcastGlobalVariablesCallback",
    "DistributedOptimizer",
    "LearningRateScheduleCallback",
    "LearningRateWarmupCallback",
    "MetricAverageCallback",
]

logger = logging.getLogger(__name__)


def _is_keras3_optimizer_class(cls: type) -> bool:
    keras = sys.modules.get("keras")
    base = getattr(getattr(keras, "optimizers", None), "Optimizer", None)
    return base is not None and issubclass(cls, base) and hasattr(cls, "apply")


def _check_no_xla() -> None:
    """numpy_function cannot be compiled by XLA; say so instead of TF's long error."""
    try:
        from tensorflow.python.framework import ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - private TF modules moved: skip the early check
        return
    if control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph()):
        raise ConfigError(
            "ringtrain.keras.DistributedOptimizer cannot run under XLA: compile the model with "
            "jit_compile=False (Keras 3 turns XLA on by itself on GPU hosts)"
        )


def DistributedOptimizer(  # noqa: N802
    optimizer: Any,
    op: ReduceOp = Average,
    compression: str | None = None,
    backward_passes_per_step: int = 1,
    average_aggregated_gradients: bool = False,
    gradient_predivide_factor: float = 1.0,
) -> Any:
    """Return a copy of ``optimizer`` whose updates use gradients allreduced across ranks.

    The copy is an instance of a subclass of the optimizer's own class, built from its
    config. Keras 3: ``apply``/``apply_gradients`` are wrapped; tf-keras:
    ``apply_gradients``. Inside the train step's ``tf.function`` the gradients are
    reduced in buckets that start as soon as backprop has produced them (see
    ``ringtrain.DistributedGradientTape``), in an order Keras keeps identical on every
    rank. ``compression="fp16"``/``"bf16"`` halves the bytes sent.

    ``backward_passes_per_step=N`` sums gradients locally over N steps and allreduces
    and applies the sum on every N-th step (divided by N with
    ``average_aggregated_gradients=True``); the steps in between apply nothing.
    ``gradient_predivide_factor=f`` (op Average only) scales gradients by 1/f before
    the sum and by f/size after it, as Horovod does.

    An optimizer that is already distributed comes back unchanged when the arguments
    are the ones it was built with, and raises ConfigError when they differ.
    """
    cls = distributed_class(
        type(optimizer),
        op,
        compression,
        backward_passes_per_step,
        average_aggregated_gradients,
        gradient_predivide_factor,
    )
    if cls is type(optimizer):
        return optimizer
    return cls.from_config(optimizer.get_config())


def distributed_class(
    base: type,
    op: ReduceOp = Average,
    compression: str | None = None,
    backward_passes_per_step: int = 1,
    average_aggregated_gradients: bool = False,
    gradient_predivide_factor: float = 1.0,
) -> type:
    """The subclass of optimizer class ``base`` that :func:`DistributedOptimizer` instantiates.

    Keras deserialisation can build it from a saved config directly (``from_config``),
    which is how a saved model's optimizer state is restored into a distributed one.
    """
    if not isinstance(op, ReduceOp):
        raise ConfigError(f"op must be ringtrain.Average, Sum, Min or Max, got {op!r}")
    if compression not in (None, "fp16", "bf16"):
        raise ConfigError(f"compression={compression!r} is not supported; use None, 'fp16' or 'bf16'")
    passes = _aggregate.check_passes(backward_passes_per_step)
    predivide = float(gradient_predivide_factor)
    if predivide != 1.0 and op is not Average:
        raise ConfigError(f"gradient_predivide_factor={predivide} needs op=Average, got {op!r}")
    settings = {
        "op": op,
        "compression": compression,
        "backward_passes_per_step": passes,
        "average_aggregated_gradients": average_aggregated_gradients,
        "gradient_predivide_factor": predivide,
    }
    if getattr(base, "_ringtrain_distributed", False):
        built = base._ringtrain_settings
        changed = [f"{k}={v!r} (it has {built[k]!r})" for k, v in settings.items() if v != built[k]]
        if changed:
            raise ConfigError(
                f"this {base.__name__} optimizer is already distributed, with other settings: "
                f"{', '.join(changed)}. Wrap the plain optimizer once, with every setting you want"
            )
        return base

    def reduce(grads: list[Any]) -> list[Any]:
        _check_no_xla()
        if predivide == 1.0:
            return reduce_gradients(grads, op, compression, "DistributedOptimizer")
        scaled = [None if g is None else _to_dense(g) / predivide for g in grads]
        reduced = reduce_gradients(scaled, op, compression, "DistributedOptimizer")
        return [None if g is None else g * predivide for g in reduced]

    def aggregated(self: Any, grads: list[Any], variables: Any, apply_reduced: Any) -> Any:
        return _aggregate.step(
            self, grads, variables, passes, average_aggregated_gradients, lambda g: apply_reduced(reduce(g))
        )

    if _is_keras3_optimizer_class(base):

        def apply(self: Any, grads: Any, trainable_variables: Any = None) -> Any:
            # apply_gradients() calls apply(), so this one override covers both.
            if passes == 1:
                return base.apply(self, reduce(list(grads)), trainable_variables)
            variables = self._trainable_variables if trainable_variables is None else trainable_variables
            return aggregated(
                self, list(grads), list(variables), lambda g: base.apply(self, g, trainable_variables)
            )

        methods = {"apply": apply}
    else:  # tf-keras (TF_USE_LEGACY_KERAS=1) optimizers funnel updates through apply_gradients

        def apply_gradients(self: Any, grads_and_vars: Any, *args: Any, **kwargs: Any) -> Any:
            pairs = list(grads_and_vars)
            variables = [v for _, v in pairs]

            def apply_reduced(grads: list[Any]) -> Any:
                return base.apply_gradients(self, list(zip(grads, variables, strict=True)), *args, **kwargs)

            if passes == 1:
                return apply_reduced(reduce([g for g, _ in pairs]))
            return aggregated(self, [g for g, _ in pairs], variables, apply_reduced)

        methods = {"apply_gradients": apply_gradients}
    methods["_ringtrain_distributed"] = True
    methods["_ringtrain_settings"] = settings
    return type(base.__name__, (base,), methods)


def _to_dense(grad: Any) -> Any:
    import tensorflow as tf

    return tf.convert_to_tensor(grad)


def _variables(optimizer: Any) -> list[Any]:
    found = optimizer.variables
    return list(found() if callable(found) else found)


class _BroadcastMixin:
    """Broadcasts model weights and optimizer state from ``root_rank`` at the start of training.

    A model without weights yet (a Sequential with no input shape, in tf-keras) gets
    them in its first step, so it is broadcast right after that step, as Horovod does.
    """

    def __init__(self, root_rank: int = 0, local_variables: Any = None) -> None:
        super().__init__()
        self.root_rank = root_rank
        self._local = {id(v) for v in (local_variables or [])}  # left as each rank has them
        self._done = False

    def on_train_begin(self, logs: Any = None) -> None:
        if not self._done and getattr(self.model, "built", True):
            self._broadcast()

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if not self._done:
            self._broadcast()

    def _implements_train_batch_hooks(self) -> bool:  # tf-keras calls batch hooks only if asked
        return not self._done and not getattr(self.model, "built", True)

    def _broadcast(self) -> None:
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        variables = list(model.variables)
        if optimizer is not None:
            # Optimizer state must exist before it can be broadcast; Keras builds it lazily.
            if not getattr(optimizer, "built", True) or not _variables(optimizer):
                optimizer.build(model.trainable_variables)
            variables += _variables(optimizer)
        variables = [v for v in variables if id(v) not in self._local]
        broadcast_variables(variables, root_rank=self.root_rank)
        logger.debug("broadcast %d variables from rank %d", len(variables), self.root_rank)
        self._done = True


class _MetricAverageMixin:
    """Averages the numeric epoch-end logs across ranks (keys sorted, so every rank agrees)."""

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if not logs:
            return
        import numpy as np

        keys = sorted(k for k, v in logs.items() if np.ndim(v) == 0 and np.isreal(v))
        values = [np.asarray(float(logs[k]), dtype=np.float64) for k in keys]
        for key, value in zip(keys, grouped_allreduce(values, op=Average, name="MetricAverage"), strict=True):
            logs[key] = float(value)


# Hooks tf-keras' CallbackList asks for; Keras 3 ignores them. One class then serves both.
def _no_batch_hooks(self: Any) -> bool:
    return False


def _train_batch_hooks(self: Any) -> bool:
    return True


_LEGACY_HOOKS = {
    "_implements_train_batch_hooks": _no_batch_hooks,
    "_implements_test_batch_hooks": _no_batch_hooks,
    "_implements_predict_batch_hooks": _no_batch_hooks,
}
_BATCH_HOOKS = dict(_LEGACY_HOOKS, _implements_train_batch_hooks=_train_batch_hooks)

_DOCS = {
    "BroadcastGlobalVariablesCallback": (
        _BroadcastMixin,
        "Callback: at train begin, broadcast model variables and optimizer state from ``root_rank``.\n\n"
        "Builds the optimizer first if Keras has not yet. Use with DistributedOptimizer so every\n"
        "rank starts from the same weights, whatever its seed.",
    ),
    "MetricAverageCallback": (
        _MetricAverageMixin,
        "Callback: average numeric epoch-end logs (loss, metrics) across ranks.\n\n"
        "List it before callbacks that read the logs (checkpointing, early stopping).",
    ),
    "LearningRateScheduleCallback": (_callbacks.LearningRateScheduleMixin, None),
    "LearningRateWarmupCallback": (_callbacks.LearningRateWarmupMixin, None),
}
_classes: dict[str, type] = {}


def _build(name: str) -> type:
    import keras  # Keras 3; its Callback base works in tf-keras fits too, given _LEGACY_HOOKS

    mixin, doc = _DOCS[name]
    hooks = _BATCH_HOOKS if name.startswith("LearningRate") else _LEGACY_HOOKS
    hooks = {k: v for k, v in hooks.items() if not hasattr(mixin, k)}  # the mixin's own answer wins
    attrs = dict(hooks, __doc__=doc or mixin.__doc__, __module__=__name__)
    return type(name, (mixin, keras.callbacks.Callback), attrs)


def __getattr__(name: str) -> Any:  # PEP 562: build the Keras classes only when asked for
    if name in _DOCS:
        if name not in _classes:
            _classes[name] = _build(name)
        return _classes[name]
    if name == "BestModelCheckpoint":
        import keras

        return _callbacks.best_model_checkpoint_class(keras.callbacks.ModelCheckpoint)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
