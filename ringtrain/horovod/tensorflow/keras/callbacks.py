"""``hvd.callbacks`` for tf.keras; ``BestModelCheckpoint`` builds on tf.keras' ModelCheckpoint."""

from __future__ import annotations

from typing import Any

from ..._keras_callbacks import (
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


def __getattr__(name: str) -> Any:  # built on first use, when tf.keras has settled on its Keras
    if name == "BestModelCheckpoint":
        import tensorflow as tf

        return best_model_checkpoint_class(tf.keras.callbacks.ModelCheckpoint)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
