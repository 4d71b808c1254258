"""``import ringtrain.horovod.tensorflow.keras as hvd``: Horovod's tf.keras API on ringtrain.

``tf.keras`` is tf-keras in ringtrain workers (``TF_USE_LEGACY_KERAS=1``) and Keras 3
otherwise; both work. Compile with ``jit_compile=False`` (the allreduce is a
``tf.numpy_function``, which XLA cannot compile).

Example::

    import tensorflow as tf
    import ringtrain.horovod.tensorflow.keras as hvd

    hvd.init()
    opt = hvd.DistributedOptimizer(tf.keras.optimizers.Adam(0.001 * hvd.size()))
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    model.fit(dataset, callbacks=[hvd.callbacks.BroadcastGlobalVariablesCallback(0),
                                  hvd.callbacks.MetricAverageCallback()])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import tensorflow as tf

from ... import _keras
from ..._common import (
    Adasum,
    Average,
    Compression,
    ProcessSet,
    Sum,
    add_process_set,
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
from ..._keras import DistributedOptimizer, broadcast_global_variables
from .. import allgather as _allgather
from .. import allreduce as _allreduce
from .. import broadcast as _broadcast
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
    average: bool | None = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    op: Any = None,
    compression: Any = Compression.none,
) -> Any:
    """Allreduce a tensor-like value (default op Average); returns a tensor."""
    return _keras.value_collective(
        _allreduce,
        value,
        name,
        average=average,
        prescale_factor=prescale_factor,
        postscale_factor=postscale_factor,
        op=op,
        compression=compression,
    )


def allgather(value: Any, name: str | None = None) -> Any:
    """Concatenate every rank's value along axis 0; returns a tensor."""
    return _keras.value_collective(_allgather, value, name)


def broadcast(value: Any, root_rank: int, name: str | None = None) -> Any:
    """``root_rank``'s value on every rank; returns a tensor."""
    return _keras.value_collective(_broadcast, value, name, root_rank=root_rank)


def load_model(
    filepath: Any,
    custom_optimizers: Iterable[type] | None = None,
    custom_objects: dict[str, Any] | None = None,
    compression: Any = Compression.none,
    legacy_opts: bool = False,
) -> Any:
    """Load a saved tf.keras model with its optimizer wrapped in DistributedOptimizer (state kept)."""
    return _keras.load_model(tf.keras, filepath, custom_optimizers, custom_objects, compression, legacy_opts)
