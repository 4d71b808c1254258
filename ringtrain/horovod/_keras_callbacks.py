"""Horovod's Keras callbacks, built on the Keras flavour of the module that asks for them.

``ringtrain.horovod.tensorflow.keras.callbacks`` builds them on ``tf.keras``' Callback
(tf-keras in ringtrain workers) and ``ringtrain.horovod.keras.callbacks`` on Keras 3's,
so a tf-keras script never imports Keras 3 (about 3.6 s of start-up here). The
behaviour comes from ``ringtrain.keras``' mixins; this module adds Horovod's
constructor arguments.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ringtrain.keras import _BroadcastMixin, _MetricAverageMixin
from ringtrain.keras._callbacks import (
    LearningRateScheduleMixin,
    LearningRateWarmupMixin,
    best_model_checkpoint_class,
)


class _Broadcast(_BroadcastMixin):
    """At the start of training, give every rank ``root_rank``'s model weights and optimizer state.

    ``device`` is ignored. Variables in ``local_variables`` keep each rank's own value.
    Horovod broadcasts after the first batch; ringtrain does so before it (building the
    optimizer first), so every rank's first step already starts from the same weights.
    A model with no weights until its first step is broadcast after that step.
    """

    def __init__(self, root_rank: int, device: str = "", local_variables: Any = None) -> None:
        if local_variables is not None and hasattr(local_variables, "assign"):
            local_variables = [local_variables]
        super().__init__(root_rank, local_variables)


class _MetricAverage(_MetricAverageMixin):
    """Average the numeric epoch-end logs across ranks (``device`` is ignored).

    List it before callbacks that read the logs (checkpoints, early stopping, ReduceLROnPlateau).
    """

    def __init__(self, device: str = "") -> None:
        super().__init__()


_MIXINS = {
    "BroadcastGlobalVariablesCallback": _Broadcast,
    "MetricAverageCallback": _MetricAverage,
    "LearningRateScheduleCallback": LearningRateScheduleMixin,
    "LearningRateWarmupCallback": LearningRateWarmupMixin,
}
NAMES = (*_MIXINS, "BestModelCheckpoint")
_built: dict[tuple[str, int], type] = {}


def callback_class(name: str, callbacks: ModuleType, module: str) -> type:
    """Horovod's callback ``name`` built on the Keras ``callbacks`` module, for the public ``module``."""
    if name == "BestModelCheckpoint":
        return best_model_checkpoint_class(callbacks.ModelCheckpoint)
    key = (name, id(callbacks))
    if key not in _built:
        mixin = _MIXINS[name]
        _built[key] = type(
            name, (mixin, callbacks.Callback), {"__doc__": mixin.__doc__, "__module__": module}
        )
    return _built[key]
