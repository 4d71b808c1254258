"""Horovod's Keras callbacks on top of ``ringtrain.keras``'s, with Horovod's constructor arguments."""

from __future__ import annotations

from typing import Any

from ringtrain import keras as _rk
from ringtrain.keras._callbacks import best_model_checkpoint_class


class BroadcastGlobalVariablesCallback(_rk.BroadcastGlobalVariablesCallback):
    """At the start of training, give every rank ``root_rank``'s model weights and optimizer state.

    ``device`` is ignored. Variables in ``local_variables`` keep each rank's own value.
    Horovod broadcasts after the first batch; ringtrain does so before it (building the
    optimizer first), so every rank's first step already starts from the same weights.
    """

    def __init__(self, root_rank: int, device: str = "", local_variables: Any = None) -> None:
        if local_variables is not None and hasattr(local_variables, "assign"):
            local_variables = [local_variables]
        super().__init__(root_rank, local_variables)


class MetricAverageCallback(_rk.MetricAverageCallback):
    """Average the numeric epoch-end logs across ranks (``device`` is ignored).

    List it before callbacks that read the logs (checkpoints, early stopping, ReduceLROnPlateau).
    """

    def __init__(self, device: str = "") -> None:
        super().__init__()


LearningRateScheduleCallback = _rk.LearningRateScheduleCallback
LearningRateWarmupCallback = _rk.LearningRateWarmupCallback

__all__ = [
    "BroadcastGlobalVariablesCallback",
    "LearningRateScheduleCallback",
    "LearningRateWarmupCallback",
    "MetricAverageCallback",
    "best_model_checkpoint_class",
]
