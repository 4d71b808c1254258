"""The Keras half of ``ringtrain.horovod``, shared by its ``tensorflow.keras`` and ``keras`` modules.

Each public module passes its Keras flavour: ``tf.keras`` (tf-keras when
``TF_USE_LEGACY_KERAS=1``, which ringtrain workers set) or Keras 3's ``keras``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ringtrain import keras as _rk
from ringtrain.errors import ConfigError

from ._common import (
    Average,
    Compression,
    Sum,
    check_groups,
    check_process_set,
    global_process_set,
    require_init,
    resolve_op,
    split_compression,
)


def DistributedOptimizer(  # noqa: N802
    optimizer: Any,
    name: str | None = None,
    device_dense: str = "",
    device_sparse: str = "",
    compression: Any = Compression.none,
    sparse_as_dense: bool = False,
    gradient_predivide_factor: float = 1.0,
    op: Any = Average,
    backward_passes_per_step: int = 1,
    average_aggregated_gradients: bool = False,
    num_groups: int = 0,
    groups: Any = None,
    process_set: Any = global_process_set,
    scale_local_gradients: bool = True,
) -> Any:
    """Wrap a Keras optimizer so each update uses gradients allreduced across ranks.

    Arguments as Horovod's; ``name``, devices, ``sparse_as_dense`` (sparse gradients are
    reduced densely, same values) and ``groups`` are accepted and ignored.
    ``backward_passes_per_step=N`` accumulates N steps of gradients locally before one
    allreduce and update (divided by N with ``average_aggregated_gradients=True``).
    Only op Average and Sum, as in Horovod; compile with ``jit_compile=False``.
    """
    what = "DistributedOptimizer"
    require_init(what)
    check_process_set(process_set, what)
    op = resolve_op(op, None, what)
    if op not in (Average, Sum):
        raise ConfigError(f"{what}: op must be hvd.Average or hvd.Sum, got {op!r}")
    check_groups(num_groups, groups)
    wire, custom = split_compression(compression, what)
    if custom is not None:
        raise ConfigError(
            f"{what}: custom compressor {custom!r} is not supported here; use hvd.Compression.none or "
            "hvd.Compression.fp16 (custom compressors work with hvd.allreduce and DistributedGradientTape)"
        )
    return _rk.DistributedOptimizer(
        optimizer,
        op=op,
        compression=wire,
        backward_passes_per_step=backward_passes_per_step,
        average_aggregated_gradients=average_aggregated_gradients,
        gradient_predivide_factor=gradient_predivide_factor,
    )


def broadcast_global_variables(root_rank: int) -> None:
    """TF1-session only in Horovod; in TF2 use ``callbacks.BroadcastGlobalVariablesCallback``."""
    raise ConfigError(
        "broadcast_global_variables() needs a TF1 session; in TF2 add "
        "hvd.callbacks.BroadcastGlobalVariablesCallback(root_rank) to fit(), or call "
        "hvd.broadcast_variables(model.variables, root_rank)"
    )


def _optimizer_classes(module: Any, base: type) -> list[type]:
    return [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, base) and c is not base]


def load_model(
    keras: Any,
    filepath: Any,
    custom_optimizers: Iterable[type] | None = None,
    custom_objects: dict[str, Any] | None = None,
    compression: Any = Compression.none,
    legacy_opts: bool = False,
) -> Any:
    """Load a saved Keras model whose optimizer comes back as a DistributedOptimizer, state included.

    Every optimizer class of ``keras.optimizers`` (``keras.optimizers.legacy`` with
    ``legacy_opts=True``) and of ``custom_optimizers`` is deserialised straight into its
    distributed subclass, so the saved optimizer state is restored into it.
    """
    require_init("load_model")
    wire, custom = split_compression(compression, "load_model")
    if custom is not None:
        raise ConfigError("load_model: use hvd.Compression.none or hvd.Compression.fp16")
    source = keras.optimizers.legacy if legacy_opts else keras.optimizers
    classes = _optimizer_classes(source, source.Optimizer) + list(custom_optimizers or [])
    objects: dict[str, Any] = {}
    for cls in classes:
        distributed = _rk.distributed_class(cls, compression=wire)
        # tf-keras looks built-in optimizers up by their lower-cased names
        objects[cls.__name__] = objects[cls.__name__.lower()] = distributed
    objects.update(custom_objects or {})
    return keras.models.load_model(filepath, custom_objects=objects)


def value_collective(collective: Callable[..., Any], value: Any, name: str | None, **kwargs: Any) -> Any:
    """Horovod's Keras-level collectives take any tensor-like value and return a tensor."""
    import tensorflow as tf

    return collective(tf.convert_to_tensor(value), name=name, **kwargs)
