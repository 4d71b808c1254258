"""``import ringtrain.horovod.keras as hvd``: Horovod's Keras API for standalone ``keras`` (Keras 3 here).

Same functions as :mod:`ringtrain.horovod.tensorflow.keras`, with ``load_model`` and
``callbacks.BestModelCheckpoint`` on ``keras`` itself rather than ``tf.keras``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..tensorflow.keras import *  # noqa: F403 - the same API, with the Keras-specific parts below
from ..tensorflow.keras import Average, Compression, Sum, __all__  # noqa: F401
from ..tensorflow.keras import allreduce as _allreduce
from . import callbacks  # noqa: F401 - hvd.callbacks, on standalone keras


def allreduce(
    value: Any,
    name: str | None = None,
    average: bool | None = True,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    op: Any = None,
    compression: Any = Compression.none,
) -> Any:
    """Allreduce a tensor-like value; averages by default (``average=True``, as Horovod's keras module)."""
    if op is not None:
        average = None  # op supersedes the default average=True
    elif average is not None:
        op, average = (Average if average else Sum), None
    return _allreduce(value, name, average, prescale_factor, postscale_factor, op, compression)


def load_model(
    filepath: Any,
    custom_optimizers: Iterable[type] | None = None,
    custom_objects: dict[str, Any] | None = None,
    compression: Any = Compression.none,
    legacy_opts: bool = False,
) -> Any:
    """Load a saved Keras model with its optimizer wrapped in DistributedOptimizer (state kept)."""
    import keras

    from .. import _keras

    return _keras.load_model(keras, filepath, custom_optimizers, custom_objects, compression, legacy_opts)
