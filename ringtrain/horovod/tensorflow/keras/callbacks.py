"""``hvd.callbacks`` for tf.keras: BroadcastGlobalVariablesCallback, MetricAverageCallback,
LearningRateScheduleCallback, LearningRateWarmupCallback and BestModelCheckpoint.

The classes are built on ``tf.keras.callbacks`` when first used.
"""

from __future__ import annotations

from typing import Any

from ..._keras_callbacks import NAMES, callback_class


def __getattr__(name: str) -> Any:
    if name in NAMES:
        import tensorflow as tf

        return callback_class(name, tf.keras.callbacks, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(NAMES)
