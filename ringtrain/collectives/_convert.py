"""Moving tensors between numpy and TensorFlow without importing TensorFlow needlessly."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from ringtrain.errors import ConfigError

REDUCIBLE = ("float32", "float64", "float16", "bfloat16", "int32", "int64")
HALF = ("float16", "bfloat16")

NUMPY, TF = "numpy", "tf"


def _tf() -> Any:
    return sys.modules.get("tensorflow")


def to_numpy(value: Any, what: str) -> tuple[np.ndarray, str]:
    """``(array, kind)``: a numpy view or copy of ``value`` and whether it came from TF.

    numpy arrays and scalars pass through; eager tf tensors, tf.Variables, Keras
    variables and tf.IndexedSlices (made dense) become numpy arrays.
    """
    if isinstance(value, np.ndarray):
        return value, NUMPY
    if isinstance(value, np.generic | int | float | list | tuple):
        return np.asarray(value), NUMPY
    tf = _tf()
    if tf is not None:
        if isinstance(value, tf.IndexedSlices):
            value = tf.convert_to_tensor(value)
        if isinstance(value, tf.Tensor) and not hasattr(value, "numpy"):
            raise ConfigError(
                f"{what} got a symbolic tensor {value.name!r}: ringtrain collectives run eagerly. Inside "
                "tf.function use ringtrain.DistributedGradientTape or ringtrain.keras.DistributedOptimizer, "
                "or call the collective through tf.numpy_function"
            )
    if hasattr(value, "numpy") and hasattr(value, "dtype"):  # eager tf tensor, tf.Variable, keras Variable
        return np.asarray(value.numpy()), TF
    raise ConfigError(f"{what} takes numpy arrays or TensorFlow tensors, got {type(value).__name__}")


def from_numpy(array: np.ndarray, kind: str) -> Any:
    """Back to the caller's kind: numpy stays numpy, TF inputs get an eager tf tensor of the same dtype."""
    if kind == NUMPY:
        return array
    import tensorflow as tf

    return tf.convert_to_tensor(array)


def check_reducible(dtype_name: str, what: str) -> None:
    if dtype_name not in REDUCIBLE:
        raise ConfigError(f"{what} cannot reduce {dtype_name} tensors; it supports {', '.join(REDUCIBLE)}")
