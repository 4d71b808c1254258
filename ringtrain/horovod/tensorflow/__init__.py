"""``import ringtrain.horovod.tensorflow as hvd``: Horovod's TensorFlow API on ringtrain's MPI collectives.

Every collective works eagerly and inside ``tf.function`` (as one stateful op, kept in
program order), returns TF tensors, and carries Horovod's gradients. Run scripts
with ``ringtrain launch -np N script.py``, ``mpiexec -n N python script.py`` or
``ringtrain.horovod.spark.run``. See docs/horovod.md for what differs from Horovod.

Example::

    import tensorflow as tf
    import ringtrain.horovod.tensorflow as hvd

    hvd.init()
    with tf.GradientTape() as tape:
        loss = loss_fn(model(x), y)
    tape = hvd.DistributedGradientTape(tape)
    grads = tape.gradient(loss, model.trainable_variables)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from ringtrain import collectives as _rc
from ringtrain.collectives import _tfops
from ringtrain.collectives._tf import reduce_gradients as _reduce_gradients
from ringtrain.errors import ConfigError

from .._common import (
    Adasum,
    Average,
    Compression,
    Max,
    Min,
    ProcessSet,
    Product,
    Sum,
    add_process_set,
    ccl_built,
    check_groups,
    check_no_register,
    check_process_set,
    cross_rank,
    cross_size,
    cuda_built,
    ddl_built,
    global_process_set,
    gloo_built,
    gloo_enabled,
    init,
    is_homogeneous,
    is_initialized,
    local_rank,
    local_size,
    mpi_built,
    mpi_enabled,
    mpi_threads_supported,
    nccl_built,
    rank,
    remove_process_set,
    require_init,
    resolve_op,
    rocm_built,
    shutdown,
    size,
    split_compression,
    start_timeline,
    stop_timeline,
)

__all__ = [
    "Adasum",
    "Average",
    "Compression",
    "DistributedGradientTape",
    "Max",
    "Min",
    "ProcessSet",
    "Product",
    "Sum",
    "add_process_set",
    "allgather",
    "allgather_object",
    "allreduce",
    "alltoall",
    "barrier",
    "broadcast",
    "broadcast_global_variables",
    "broadcast_object",
    "broadcast_variables",
    "ccl_built",
    "cross_rank",
    "cross_size",
    "cuda_built",
    "ddl_built",
    "global_process_set",
    "gloo_built",
    "gloo_enabled",
    "grouped_allgather",
    "grouped_allreduce",
    "init",
    "is_homogeneous",
    "is_initialized",
    "join",
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


def _what(base: str, name: str | None) -> str:
    return f"{base}({name})" if name else base


def _prepare(what: str, process_set: Any) -> None:
    require_init(what)
    check_process_set(process_set, what)


def _check_sparse_op(op: Any, prescale: float, postscale: float, what: str) -> None:
    if op not in (Average, Sum):
        raise ConfigError(
            f"{what}: tf.IndexedSlices support only op=Average or Sum (got {op!r}); "
            "densify them with tf.convert_to_tensor first"
        )
    if prescale != 1.0 or postscale != 1.0:
        raise ConfigError(f"{what}: prescale_factor/postscale_factor are not supported with tf.IndexedSlices")


def _sparse_allreduce(slices: Any, op: Any, what: str) -> Any:
    """Horovod's sparse allreduce: allgather values and indices; the dense sum is the same."""
    values = _tfops.allgather(slices.values, f"{what}.values")
    indices = _tfops.allgather(slices.indices, f"{what}.indices")
    if op is Average:
        values = values / tf.cast(size(), values.dtype)
    return tf.IndexedSlices(values, indices, dense_shape=slices.dense_shape)


def grouped_allreduce(
    tensors: Sequence[Any],
    average: bool | None = None,
    device_dense: str = "",
    device_sparse: str = "",
    compression: Any = Compression.none,
    op: Any = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    process_set: Any = global_process_set,
    ignore_name_scope: bool = False,
    name: str | None = None,
) -> list[Any]:
    """Allreduce several tensors in one fused call (tf.IndexedSlices are allgathered, as in Horovod).

    ``device_dense``/``device_sparse``/``ignore_name_scope`` are ignored (ringtrain reduces
    on the host). ``compression=hvd.Compression.fp16`` sends float32 data as float16.
    """
    what = _what("grouped_allreduce", name)
    _prepare(what, process_set)
    op = resolve_op(op, average, what)
    wire, custom = split_compression(compression, what)
    tensors = list(tensors)
    if not tensors:
        return tensors
    out: list[Any] = [None] * len(tensors)
    dense = [i for i, t in enumerate(tensors) if not isinstance(t, tf.IndexedSlices)]
    for i, t in enumerate(tensors):
        if isinstance(t, tf.IndexedSlices):
            _check_sparse_op(op, prescale_factor, postscale_factor, what)
            out[i] = _sparse_allreduce(t, op, f"{what}.{i}")
    if dense:
        inputs = [tf.convert_to_tensor(tensors[i]) for i in dense]
        contexts = [None] * len(inputs)
        if custom is not None:
            inputs, contexts = map(list, zip(*[custom.compress(t) for t in inputs], strict=True))
        reduced = _rc.grouped_allreduce(
            inputs, op, name, wire, prescale_factor=prescale_factor, postscale_factor=postscale_factor
        )
        if custom is not None:
            reduced = [custom.decompress(r, c) for r, c in zip(reduced, contexts, strict=True)]
        for i, r in zip(dense, reduced, strict=True):
            out[i] = r
    return out


def allreduce(
    tensor: Any,
    average: bool | None = None,
    device_dense: str = "",
    device_sparse: str = "",
    compression: Any = Compression.none,
    op: Any = None,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
    name: str | None = None,
    process_set: Any = global_process_set,
    ignore_name_scope: bool = False,
) -> Any:
    """Reduce ``tensor`` over all ranks (default op Average); a tf.IndexedSlices is allgathered instead.

    ``prescale_factor`` scales the input before the reduction, ``postscale_factor`` the
    result after it. Arguments as Horovod's; devices and name scopes are ignored.
    """
    what = _what("allreduce", name)
    if isinstance(tensor, tf.IndexedSlices):
        _prepare(what, process_set)
        op = resolve_op(op, average, what)
        _check_sparse_op(op, prescale_factor, postscale_factor, what)
        return _sparse_allreduce(tensor, op, what)
    (out,) = grouped_allreduce(
        [tensor],
        average=average,
        compression=compression,
        op=op,
        prescale_factor=prescale_factor,
        postscale_factor=postscale_factor,
        process_set=process_set,
        name=name,
    )
    return out


def allgather(
    tensor: Any,
    name: str | None = None,
    ignore_name_scope: bool = False,
    process_set: Any = global_process_set,
) -> Any:
    """Concatenate every rank's tensor along axis 0 (first dimensions may differ)."""
    _prepare("allgather", process_set)
    return _tfops.allgather(tensor, _what("allgather", name))


def grouped_allgather(
    tensors: Sequence[Any],
    name: str | None = None,
    ignore_name_scope: bool = False,
    process_set: Any = global_process_set,
) -> list[Any]:
    """:func:`allgather` of each tensor, in order."""
    return [
        allgather(t, f"{name}.{i}" if name else None, process_set=process_set) for i, t in enumerate(tensors)
    ]


def broadcast(
    tensor: Any,
    root_rank: int,
    name: str | None = None,
    ignore_name_scope: bool = False,
    process_set: Any = global_process_set,
) -> Any:
    """``root_rank``'s tensor on every rank."""
    _prepare("broadcast", process_set)
    return _tfops.broadcast(tensor, root_rank, _what("broadcast", name))


def broadcast_variables(
    variables: Sequence[Any], root_rank: int, process_set: Any = global_process_set, inplace: bool = False
) -> Any:
    """Assign ``root_rank``'s values to ``variables`` on every rank (fused; works inside tf.function).

    ``inplace`` is accepted and ignored: the values go through one fused buffer either way.
    """
    _prepare("broadcast_variables", process_set)
    return _rc.broadcast_variables(variables, root_rank)


def broadcast_global_variables(root_rank: int) -> Any:
    """TF1 graphs only: broadcast ``tf.compat.v1.global_variables()``; eagerly it raises, as in Horovod."""
    require_init("broadcast_global_variables")
    if tf.executing_eagerly():
        raise ConfigError(
            "broadcast_global_variables() does not support eager execution; use "
            "hvd.broadcast_variables(model.variables, root_rank) (and the optimizer's variables)"
        )
    return _rc.broadcast_variables(tf.compat.v1.global_variables(), root_rank)


def alltoall(
    tensor: Any,
    splits: Any = None,
    name: str | None = None,
    ignore_name_scope: bool = False,
    process_set: Any = global_process_set,
) -> Any:
    """Send ``splits[j]`` rows of ``tensor`` to rank j; returns the gathered rows (and the received
    splits when ``splits`` was given), as Horovod's does."""
    _prepare("alltoall", process_set)
    out, received = _tfops.alltoall(tensor, splits, _what("alltoall", name))
    return (out, received) if splits is not None else out


def join() -> Any:
    """This rank is out of data: serve the others' allreduces until all have joined.

    Returns an int32 scalar tensor: the rank that joined last. See :func:`ringtrain.join`.
    """
    require_init("join")
    return _tfops.join()


def barrier(process_set: Any = global_process_set) -> Any:
    """Block until every rank has called barrier()."""
    _prepare("barrier", process_set)
    return _rc.barrier()


def broadcast_object(
    obj: Any,
    root_rank: int = 0,
    session: Any = None,
    name: str | None = None,
    process_set: Any = global_process_set,
) -> Any:
    """``root_rank``'s ``obj`` (pickled with cloudpickle) on every rank. Eager only."""
    import cloudpickle

    _prepare("broadcast_object", process_set)
    what = name or type(obj).__name__
    payload = (
        np.frombuffer(cloudpickle.dumps(obj), np.uint8) if rank() == root_rank else np.zeros(0, np.uint8)
    )
    length = _rc.broadcast(np.array([payload.size], np.int64), root_rank, f"{what}.size")
    if rank() != root_rank:
        payload = np.zeros(int(length[0]), np.uint8)
    data = _rc.broadcast(payload, root_rank, f"{what}.data")
    return cloudpickle.loads(data.tobytes())


def allgather_object(
    obj: Any, session: Any = None, name: str | None = None, process_set: Any = global_process_set
) -> list[Any]:
    """Every rank's ``obj`` (pickled with cloudpickle), as a list in rank order. Eager only."""
    import cloudpickle

    _prepare("allgather_object", process_set)
    what = name or type(obj).__name__
    buffer = io.BytesIO()
    cloudpickle.dump(obj, buffer)
    payload = np.frombuffer(buffer.getvalue(), np.uint8)
    lengths = _rc.allgather(np.array([payload.size], np.int64), f"{what}.size")
    data = _rc.allgather(payload, f"{what}.data")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [cloudpickle.loads(data[bounds[i] : bounds[i + 1]].tobytes()) for i in range(len(lengths))]


class DistributedGradientTape(_rc.DistributedGradientTape):
    """Wraps a ``tf.GradientTape``: ``gradient()`` returns gradients allreduced across ranks.

    Arguments as Horovod's. ``sparse_as_dense`` is implied (sparse gradients are
    reduced densely, which gives the same values); devices and ``groups`` are accepted
    and ignored (fusion buckets group gradients by size). ``gradient_predivide_factor=f``
    scales gradients by 1/f before the sum and f/size after it (op Average only).
    """

    def __init__(
        self,
        gradtape: Any,
        device_dense: str = "",
        device_sparse: str = "",
        compression: Any = Compression.none,
        sparse_as_dense: bool = False,
        op: Any = Average,
        gradient_predivide_factor: float = 1.0,
        num_groups: int = 0,
        groups: Any = None,
        process_set: Any = global_process_set,
        scale_local_gradients: bool = True,
    ) -> None:
        _prepare("DistributedGradientTape", process_set)
        op = resolve_op(op, None, "DistributedGradientTape")
        check_groups(num_groups, groups)
        self._predivide = float(gradient_predivide_factor)
        if self._predivide != 1.0 and op is not Average:
            raise ConfigError(
                f"DistributedGradientTape: gradient_predivide_factor={self._predivide} needs op=Average, "
                f"got {op!r}"
            )
        wire, self._custom = split_compression(compression, "DistributedGradientTape")
        self._reduce_op, self._wire = op, wire
        super().__init__(gradtape, op=op, compression=wire)

    def gradient(self, target: Any, sources: Any, output_gradients: Any = None, **kwargs: Any) -> Any:
        """Like ``tf.GradientTape.gradient``, then allreduced; same structure as ``sources``."""
        kwargs.pop("use_generic_names", None)  # Horovod's op naming; nothing to name here
        if self._predivide == 1.0 and self._custom is None:
            return super().gradient(target, sources, output_gradients, **kwargs)
        grads = self._tape.gradient(target, sources, output_gradients=output_gradients, **kwargs)
        flat = [None if g is None else tf.convert_to_tensor(g) for g in tf.nest.flatten(grads)]
        flat = [None if g is None else g / self._predivide for g in flat]
        contexts: list[Any] = [None] * len(flat)
        if self._custom is not None:
            for i, g in enumerate(flat):
                if g is not None:
                    flat[i], contexts[i] = self._custom.compress(g)
        reduced = _reduce_gradients(flat, self._reduce_op, self._wire, "DistributedGradientTape")
        if self._custom is not None:
            reduced = [
                None if g is None else self._custom.decompress(g, c)
                for g, c in zip(reduced, contexts, strict=True)
            ]
        reduced = [None if g is None else g * self._predivide for g in reduced]
        return tf.nest.pack_sequence_as(grads, reduced)

    def register_local_source(self, source: Any) -> None:
        check_no_register("DistributedGradientTape.register_local_source")
