"""``import ringtrain.horovod.keras as hvd``: Horovod's Keras API for standalone ``keras`` (Keras 3 here).

Same functions as :mod:`ringtrain.horovod.tensorflow.keras`, with ``load_model`` and
``callbacks.BestModelCheckpoint`` on ``keras`` itself rather than ``tf.keras``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..tensorflow.keras import (
    Adasum,
    Average,
    Compression,
    DistributedOptimizer,
    ProcessSet,
    Sum,
    add_process_set,
    allgather,
    broadcast,
    broadcast_global_variables,
    ccl_built,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
    global_process_set,
    gloo_built,
    gloo_enabled,
    init,
    is_initialized,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    rank,
    remove_process_set,
    rocm_built,
    shutdown,
    size,
    start_timeline,
    stop_timeline,
)
from ..tensorflow.keras import allreduce as _allreduce
from . import callbacks

__all__ = [
    "Adasum",
    "Average",
    "Compression",
    "DistributedOptimizer",
    "ProcessSet",
    "Sum",
    "add_process_set",
    "allgather",
    "allreduce",
    "broadcast",
    "broadcast_global_variables",
    "callbacks",
    "ccl_built",
    "cross_rank",
    "cross_size",
    "cuda_built",
    "ddl_built",
    "global_process_set",
    "gloo_built",
    "gloo_enabled",
    "init",
    "is_initialized",
    "load_model",
    "local_rank",
    "local_size",
    "mpi_built",
    "mpi_enabled",
    "mpi_threads_supported",
    "nccl_built",
    "rank",
    "remove_process_set",
    "rocm_built",
    "shutdown",
    "size",
    "start_timeline",
    "stop_timeline",
]


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
