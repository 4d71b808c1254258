"""What every ``ringtrain.horovod`` module shares: init state, ops, compression, process sets.

Arguments that Horovod takes but that mean nothing here (devices, name scopes, the
global process set, timelines) are accepted and ignored. Arguments that would change
results and that ringtrain cannot honour raise :class:`ringtrain.ConfigError` naming
the argument.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Sequence
from typing import Any

from ringtrain.backends.mpi import mpi_module, world
from ringtrain.collectives import _more
from ringtrain.collectives._ops import Average, Max, Min, ReduceOp, Sum
from ringtrain.errors import BackendError, ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "Adasum",
    "Average",
    "Compression",
    "Max",
    "Min",
    "ProcessSet",
    "Product",
    "Sum",
    "add_process_set",
    "global_process_set",
    "init",
    "is_initialized",
    "remove_process_set",
    "shutdown",
]


class _UnsupportedOp:
    """A Horovod reduction ringtrain does not implement; using it raises ConfigError."""

    def __init__(self, name: str, why: str) -> None:
        self.name = name
        self.why = why

    def __repr__(self) -> str:
        return f"hvd.{self.name}"


Adasum = _UnsupportedOp("Adasum", "Adasum's adaptive summation is not implemented; use op=Average")
Product = _UnsupportedOp("Product", "a product reduction is not implemented; use Sum, Average, Min or Max")


def resolve_op(op: Any, average: bool | None, what: str) -> ReduceOp:
    """Horovod's ``op``/``average`` pair as a ringtrain op (``average`` is Horovod's deprecated form)."""
    if op is not None and average is not None:
        raise ConfigError(f"{what}: pass op or average, not both (op supersedes the deprecated average)")
    if average is not None:
        warnings.warn("average= is deprecated in Horovod; use op=Average or op=Sum", DeprecationWarning, 2)
        op = Average if average else Sum
    if op is None:
        return Average
    if isinstance(op, _UnsupportedOp):
        raise ConfigError(f"{what}: op={op!r} is not supported by ringtrain: {op.why}")
    if not isinstance(op, ReduceOp):
        raise ConfigError(f"{what}: op must be hvd.Average, Sum, Min or Max, got {op!r}")
    return op


# ------------------------------------------------------------------ compression


class Compressor:
    """Compresses a tensor before an allreduce and restores it after (Horovod's interface)."""

    wire: str | None = None  # ringtrain's built-in wire format for float32, if any

    @staticmethod
    def compress(tensor: Any) -> tuple[Any, Any]:
        return tensor, None

    @staticmethod
    def decompress(tensor: Any, ctx: Any) -> Any:
        return tensor


class NoneCompressor(Compressor):
    """No compression (the default)."""


class FP16Compressor(Compressor):
    """float32 data travel as float16: packed to half precision, summed in half precision.

    Used directly (``compress``/``decompress``) it casts any float tensor to float16
    and back, as Horovod's does.
    """

    wire = "fp16"

    @staticmethod
    def compress(tensor: Any) -> tuple[Any, Any]:
        import tensorflow as tf

        if tensor.dtype.is_floating:
            return tf.cast(tensor, tf.float16), tensor.dtype
        return tensor, tensor.dtype

    @staticmethod
    def decompress(tensor: Any, ctx: Any) -> Any:
        import tensorflow as tf

        return tf.cast(tensor, ctx) if ctx is not None and ctx.is_floating else tensor


class Compression:
    """Gradient compression choices: ``Compression.none`` and ``Compression.fp16``."""

    none = NoneCompressor
    fp16 = FP16Compressor


def split_compression(compression: Any, what: str) -> tuple[str | None, Any]:
    """``(wire, custom)``: ringtrain's wire format for a built-in compressor, or a user compressor.

    Built-in: ``(None|"fp16", None)``. A user class with ``compress``/``decompress``:
    ``(None, cls)``, applied around the allreduce. Anything else raises ConfigError.
    """
    if compression is None or compression is NoneCompressor:
        return None, None
    if compression is FP16Compressor:
        return "fp16", None
    if hasattr(compression, "compress") and hasattr(compression, "decompress"):
        return None, compression
    raise ConfigError(
        f"{what}: compression must be hvd.Compression.none, hvd.Compression.fp16 or a class with "
        f"compress() and decompress(), got {compression!r}"
    )


# ------------------------------------------------------------------ process sets


class ProcessSet:
    """A set of ranks; ringtrain runs every collective on all ranks, so only the global set works."""

    def __init__(self, ranks_or_comm: Sequence[int] | Any = None) -> None:
        self.ranks = (
            None if ranks_or_comm is None or hasattr(ranks_or_comm, "Get_size") else list(ranks_or_comm)
        )
        self.mpi_comm = ranks_or_comm if hasattr(ranks_or_comm, "Get_size") else None
        self.process_set_id = 0 if ranks_or_comm is None else None

    def is_global(self) -> bool:
        size = world().Get_size()
        if self.mpi_comm is not None:
            return self.mpi_comm.Get_size() == size
        return self.ranks is None or sorted(self.ranks) == list(range(size))

    def size(self) -> int:
        return world().Get_size()

    def rank(self) -> int:
        return world().Get_rank()

    def included(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "ProcessSet(global)" if self.ranks is None else f"ProcessSet({self.ranks})"


global_process_set = ProcessSet()


def check_process_set(process_set: Any, what: str) -> None:
    """Accept the global set (or one equal to it); ConfigError for any other."""
    if process_set is None or process_set is global_process_set:
        return
    if not isinstance(process_set, ProcessSet) or not process_set.is_global():
        raise ConfigError(
            f"{what}: process_set={process_set!r} is not supported: ringtrain runs every collective on "
            "all ranks; drop process_set (or start a job with just those ranks)"
        )


def add_process_set(process_set: ProcessSet | Sequence[int]) -> ProcessSet:
    """Only a set holding every rank can be added (it is then the global set)."""
    found = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    check_process_set(found, "add_process_set")
    return found


def remove_process_set(process_set: ProcessSet) -> bool:
    """Nothing to remove: the only process set is the global one. Returns False, as Horovod does for it."""
    return False


# ------------------------------------------------------------------ init and placement

_state_lock = threading.Lock()
_initialized = False


def init(comm: Any = None, process_sets: Any = None) -> None:
    """Join the job's MPI world (a ringtrain worker's, or ``mpiexec``'s) and learn the cross ranks.

    Every rank must call it. ``comm`` may name every rank (a list of all ranks or a
    communicator of the whole world); ``process_sets`` may only hold the global set
    (or be "dynamic"). Anything narrower raises ConfigError.
    """
    global _initialized
    if comm is not None:
        whole = ProcessSet(comm)
        if not whole.is_global():
            raise ConfigError(
                f"init(comm={comm!r}) is not supported: ringtrain runs every collective on all "
                f"{world().Get_size()} ranks of the job; call init() without comm"
            )
    if process_sets is not None and not (isinstance(process_sets, str) and process_sets.lower() == "dynamic"):
        for ps in process_sets:
            check_process_set(ps, "init")
    try:
        world()
    except BackendError as err:
        raise BackendError(
            f"ringtrain.horovod needs the job's MPI world: run with `ringtrain launch --backend mpi`, "
            f"ringtrain.run(..., backend='mpi'), ringtrain.horovod.spark.run or mpiexec ({err})"
        ) from err
    _more.prepare_cross_ranks()  # a collective: every rank calls init()
    with _state_lock:
        _initialized = True


def shutdown() -> None:
    """Mark ringtrain.horovod as shut down (MPI itself stays up until the process exits)."""
    global _initialized
    with _state_lock:
        _initialized = False


def is_initialized() -> bool:
    """True between init() and shutdown()."""
    return _initialized


def require_init(what: str) -> None:
    """ConfigError unless init() has been called."""
    if not _initialized:
        raise ConfigError(f"{what}: ringtrain.horovod has not been initialized; call hvd.init() first")


def size() -> int:
    """Number of ranks in the job."""
    require_init("size()")
    return world().Get_size()


def rank() -> int:
    """This process's rank."""
    require_init("rank()")
    return world().Get_rank()


def local_size() -> int:
    """Number of ranks on this host."""
    require_init("local_size()")
    return _more.local_placement()[1]


def local_rank() -> int:
    """This rank's index among the ranks on its host."""
    require_init("local_rank()")
    return _more.local_placement()[0]


def cross_size() -> int:
    """Number of ranks that share this rank's local rank (hosts with that many workers)."""
    require_init("cross_size()")
    return _more.cross_size()


def cross_rank() -> int:
    """This rank's index among the ranks with the same local rank."""
    require_init("cross_rank()")
    return _more.cross_rank()


def is_homogeneous() -> bool:
    """True when every host runs the same number of ranks."""
    require_init("is_homogeneous()")
    return _more.is_homogeneous()


def mpi_threads_supported() -> bool:
    """Whether the MPI library runs with MPI_THREAD_MULTIPLE."""
    MPI = mpi_module()
    return MPI.Query_thread() == MPI.THREAD_MULTIPLE


def mpi_enabled() -> bool:
    """Always True: ringtrain.horovod runs over MPI."""
    return True


def mpi_built() -> bool:
    """Always True: ringtrain.horovod runs over MPI."""
    return True


def _not_built() -> bool:
    """False: ringtrain has no Gloo, NCCL, CUDA, ROCm, DDL or oneCCL build of its own."""
    return False


gloo_enabled = gloo_built = nccl_built = ddl_built = ccl_built = cuda_built = rocm_built = _not_built


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Accepted for compatibility; ringtrain writes no timeline (its stall inspector reports waits)."""
    logger.warning("start_timeline(%r): ringtrain writes no Horovod timeline; ignoring", file_path)


def stop_timeline() -> None:
    """Accepted for compatibility; see :func:`start_timeline`."""


def check_groups(num_groups: int, groups: Any) -> None:
    """Horovod's validation of ``num_groups``/``groups`` (they only shape fusion, so they are ignored)."""
    if num_groups:
        warnings.warn("num_groups is deprecated in Horovod; use groups", DeprecationWarning, 3)
        groups = num_groups if groups is None else groups
    if groups is not None and not (isinstance(groups, list) or (isinstance(groups, int) and groups > 0)):
        raise ConfigError(f"groups must be a positive int or a list of lists of variables, got {groups!r}")


def check_no_register(what: str) -> None:
    raise ConfigError(
        f"{what} is not supported: ringtrain reduces every gradient across all ranks; "
        "keep rank-local variables out of the tape or optimizer instead"
    )
