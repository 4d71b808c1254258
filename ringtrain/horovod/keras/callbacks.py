"""``hvd.callbacks`` for standalone ``keras``; ``BestModelCheckpoint`` builds on keras' ModelCheckpoint."""

from __future__ import annotations

from typing import Any

from .._keras_callbacks import (
    BroadcastGlobalVariablesCallback,
    LearningRateScheduleCallback,
    LearningRateWarmupCallback,
    MetricAverageCallback,
    best_model_checkpoint_class,
)

# BestModelCheckpoint is built on first use (module __getattr__), so it is not listed here.
__all__ = [
    "BroadcastGlobalVariablesCallback",
    "LearningRateScheduleCallback",
    "LearningRateWarmupCallback",
    "MetricAverageCallback",
]


def __getattr__(name: str) -> Any:
    if name == "BestModelCheckpoint":
        import keras

        return best_model_checkpoint_class(keras.callbacks.ModelCheckpoint)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
