"""``hvd.callbacks`` for standalone ``keras``: BroadcastGlobalVariablesCallback, MetricAverageCallback,
LearningRateScheduleCallback, LearningRateWarmupCallback and BestModelCheckpoint.

The classes are built on ``keras.callbacks`` when first used.
"""

from __future__ import annotations

from typing import Any

from .._keras_callbacks import NAMES, callback_class


def __getattr__(name: str) -> Any:
    if name in NAMES:
        import keras

        return callback_class(name, keras.callbacks, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(NAMES)
