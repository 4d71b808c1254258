"""Fused buffers: pack many tensors into one contiguous bucket and unpack them again.

Collectives on one large buffer beat many on small ones, so gradients are grouped
into buckets (:func:`plan_buckets`), copied into one flat buffer each (:func:`pack`),
reduced, and split back (:func:`unpack`) with the averaging scale applied in the
same pass. ``compress="fp16"`` or ``"bf16"`` halves the bytes on the wire for
float32 buckets.

Two implementations give bit-identical results: the C++ extension
``ringtrain.fusion._native`` (built by ``pip install -e .`` when a C++17 compiler
is present; it releases the GIL and converts fp16/bf16 with AVX2/F16C where the
CPU has them) and a pure-numpy twin. ``RINGTRAIN_FUSION_IMPL`` picks one: ``auto``
(default: native if built), ``native`` or ``numpy``. The variables are read at
first use, not at import, so a bad value cannot break ``import ringtrain``;
:data:`IMPLEMENTATION` names the implementation in use.

Example::

    >>> import numpy as np
    >>> from ringtrain import fusion
    >>> grads = [np.ones((2, 3), np.float32), np.arange(4, dtype=np.float32)]
    >>> buf = fusion.pack(grads)              # 10 float32 values, back to back
    >>> avg = fusion.unpack(buf, grads, scale=0.5)
    >>> avg[1].tolist()
    [0.0, 0.5, 1.0, 1.5]
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ringtrain import env
from ringtrain.errors import ConfigError
from ringtrain.fusion import _numpy

__all__ = [
    "DEFAULT_FUSION_THRESHOLD",
    "IMPLEMENTATION",
    "FusedBuffers",
    "fusion_threads",
    "fusion_threshold",
    "get_implementation",
    "native_available",
    "pack",
    "plan_buckets",
    "scale_in_place",
    "select_implementation",
    "unpack",
    "wire_dtype",
]

logger = logging.getLogger(__name__)

_native: ModuleType | None
try:
    _native = importlib.import_module("ringtrain.fusion._native")
except ImportError as exc:  # not built (or built for another Python): the numpy twin takes over
    _native = None
    _NATIVE_IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _NATIVE_IMPORT_ERROR = None

DEFAULT_FUSION_THRESHOLD = env.byte_size(env.DEFAULT_FUSION_THRESHOLD)
"""Default bucket size in bytes (16 MiB, chosen by measurement: see benchmarks/RESULTS.md)."""

THRESHOLD_ENV = "RINGTRAIN_FUSION_THRESHOLD"
IMPL_ENV = "RINGTRAIN_FUSION_IMPL"
THREADS_ENV = "RINGTRAIN_FUSION_THREADS"
COMPRESSIONS = (None, "fp16", "bf16")

_BUILD_HINT = (
    "to build it, install a C++17 compiler and run `pip install -e .` "
    "(or `python setup.py build_ext --inplace`) in the ringtrain checkout"
)

# Element kinds the kernels can scale; any other dtype is copied as raw bytes.
_KINDS = {"float16": "f2", "bfloat16": "bf16", "float32": "f4", "float64": "f8", "int32": "i4", "int64": "i8"}


# --------------------------------------------------------------------- config


def fusion_threshold() -> int:
    """Bucket size in bytes from ``RINGTRAIN_FUSION_THRESHOLD`` (default 16 MiB).

    The value is a whole number of bytes, optionally with a binary suffix:
    ``67108864``, ``64M``, ``64MiB``, ``512K``, ``1G``. ``0`` disables fusion
    (every tensor gets its own bucket). An unset or empty variable means the default.
    Read on every call, so a change takes effect at the next collective.
    """
    return env.get(THRESHOLD_ENV)


# ------------------------------------------------------------------- planning


def plan_buckets(tensors: Iterable[tuple[Any, int]], threshold_bytes: int) -> list[list[int]]:
    """Group tensors into fusion buckets; return lists of tensor indices.

    ``tensors`` gives ``(dtype, nbytes)`` for each tensor, in order. Each bucket
    holds tensors of one dtype, in their original order, with at most
    ``threshold_bytes`` bytes in all, unless a single tensor alone is larger
    (it then gets a bucket of its own). Within one dtype, tensors are filled
    greedily, so consecutive tensors share a bucket. Buckets are ordered by
    their first index. ``threshold_bytes=0`` puts every tensor in its own bucket.

    >>> plan_buckets([("float32", 40), ("int64", 8), ("float32", 40), ("float32", 40)], 80)
    [[0, 2], [1], [3]]
    """
    if isinstance(threshold_bytes, bool) or not isinstance(threshold_bytes, int | np.integer):
        raise ConfigError(f"threshold_bytes must be an int, got {threshold_bytes!r}")
    if threshold_bytes < 0:
        raise ConfigError(f"threshold_bytes must be >= 0, got {threshold_bytes}")
    buckets: list[list[int]] = []
    open_bucket: dict[np.dtype, tuple[list[int], int]] = {}  # dtype -> (bucket, bytes in it)
    for index, (dtype, nbytes) in enumerate(tensors):
        key = _as_dtype(dtype)
        if nbytes < 0:
            raise ConfigError(f"tensor {index} has a negative size ({nbytes} bytes)")
        current = open_bucket.get(key)
        if current is not None and current[1] + nbytes <= threshold_bytes:
            current[0].append(index)
            open_bucket[key] = (current[0], current[1] + nbytes)
            continue
        bucket = [index]
        buckets.append(bucket)
        open_bucket[key] = (bucket, nbytes)
    return buckets


# ------------------------------------------------------------- dtype helpers


def _as_dtype(dtype: Any) -> np.dtype:
    dtype = getattr(dtype, "as_numpy_dtype", dtype)  # accept tf.DType as well
    try:
        return np.dtype(dtype)
    except TypeError as exc:
        if dtype == "bfloat16":
            return np.dtype(_bfloat16())
        raise ConfigError(f"{dtype!r} is not a dtype") from exc


def _bfloat16() -> Any:
    try:
        import ml_dtypes
    except ImportError as exc:  # pragma: no cover - ml_dtypes comes with TensorFlow
        raise ConfigError("bfloat16 needs the ml_dtypes package: pip install ml_dtypes") from exc
    return ml_dtypes.bfloat16


def _check_compress(compress: str | None) -> None:
    if compress not in COMPRESSIONS:
        raise ConfigError(f"compress={compress!r} is not supported; use None, 'fp16' or 'bf16'")


def wire_dtype(dtype: Any, compress: str | None = None) -> np.dtype:
    """The dtype of the fused buffer for tensors of ``dtype``.

    Compression applies to float32 only: ``"fp16"`` gives float16, ``"bf16"``
    gives bfloat16. Every other dtype travels as itself.
    """
    _check_compress(compress)
    dtype = _as_dtype(dtype)
    if compress is None or dtype != np.float32:
        return dtype
    return np.dtype(np.float16) if compress == "fp16" else np.dtype(_bfloat16())


def _divisor_for(scale: float, dtype: np.dtype) -> int:
    """Integer buffers are averaged by floor division: scale must be exactly 1/n."""
    if scale == 1.0:
        return 1
    n = round(1.0 / scale) if scale > 0 and np.isfinite(scale) else 0
    if n < 1 or 1.0 / n != scale:
        raise ConfigError(
            f"scale={scale!r} cannot apply to {dtype} tensors: integer buffers are averaged by "
            "floor division, so scale must be 1 or exactly 1/n for a whole n (e.g. 1/size)"
        )
    return n


# ------------------------------------------------------------ implementations


class FusedBuffers:
    """pack/unpack bound to one implementation ("native" or "numpy").

    Module-level :func:`pack` and :func:`unpack` use the selected one; tests and
    benchmarks get a specific one from :func:`get_implementation`.
    """

    def __init__(self, name: str, kernels: ModuleType) -> None:
        self.name = name
        self._kernels = kernels

    def __repr__(self) -> str:
        return f"FusedBuffers({self.name!r})"

    def pack(
        self,
        arrays: Sequence[Any],
        out: np.ndarray | None = None,
        compress: str | None = None,
    ) -> np.ndarray:
        """See :func:`ringtrain.fusion.pack`."""
        _check_compress(compress)
        arrays = [np.asarray(a) for a in arrays]
        if arrays:
            dtype = _common_dtype([a.dtype for a in arrays], "pack")
        elif out is not None:
            dtype = out.dtype
        else:
            dtype = np.dtype(np.float32)
        wire = wire_dtype(dtype, compress)
        mode = "" if wire == dtype else compress
        total = sum(a.size for a in arrays)
        if out is None:
            flat = np.empty(total, dtype=wire)
        else:
            flat = _check_buffer(out, wire, total, "out", exact=False)[:total]
        srcs = [a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in arrays]
        self._kernels.pack(srcs, flat, mode or "")
        return flat

    def unpack(
        self,
        buffer: np.ndarray,
        like: Sequence[Any],
        scale: float = 1.0,
        compress: str | None = None,
        out: Sequence[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """See :func:`ringtrain.fusion.unpack`."""
        _check_compress(compress)
        specs = [(tuple(int(d) for d in x.shape), _as_dtype(x.dtype)) for x in like]
        if not specs:
            if out:
                raise ConfigError(f"out has {len(out)} arrays but like is empty")
            return []
        dtype = _common_dtype([d for _, d in specs], "unpack")
        wire = wire_dtype(dtype, compress)
        mode = "" if wire == dtype else compress
        total = sum(int(np.prod(s, dtype=np.int64)) for s, _ in specs)
        flat = _check_buffer(buffer, wire, total, "buffer", exact=True)

        scale = float(scale)
        kind = _KINDS.get(dtype.name, "raw")
        divisor = 1
        if scale != 1.0:
            if kind == "raw":
                raise ConfigError(
                    f"cannot scale {dtype} tensors; scaling supports {', '.join(sorted(_KINDS))}"
                )
            if kind in ("i4", "i8") and not mode:
                divisor, scale = _divisor_for(scale, dtype), 1.0
        if kind == "raw" and dtype.hasobject:
            raise ConfigError(f"cannot fuse tensors of dtype {dtype}: they hold Python objects")

        results, dsts, copies = self._destinations(specs, dtype, out)
        self._kernels.unpack(flat, dsts, kind, mode or "", scale, divisor)
        for target, tmp in copies:
            np.copyto(target, tmp)
        return results

    @staticmethod
    def _destinations(
        specs: list[tuple[tuple[int, ...], np.dtype]],
        dtype: np.dtype,
        out: Sequence[np.ndarray] | None,
    ) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
        """Results to return, contiguous arrays the kernels write, and (target, temp) to copy after."""
        if out is None:
            results = [np.empty(shape, dtype=dtype) for shape, _ in specs]
            return results, results, []
        out = list(out)
        if len(out) != len(specs):
            raise ConfigError(f"out has {len(out)} arrays but like has {len(specs)}")
        dsts: list[np.ndarray] = []
        copies: list[tuple[np.ndarray, np.ndarray]] = []
        for i, (o, (shape, _)) in enumerate(zip(out, specs, strict=True)):
            if not isinstance(o, np.ndarray) or o.shape != shape or o.dtype != dtype:
                got = f"{getattr(o, 'shape', '?')} {getattr(o, 'dtype', type(o).__name__)}"
                raise ConfigError(
                    f"out[{i}] must be a numpy array of shape {shape} and dtype {dtype}, got {got}"
                )
            if not o.flags.writeable:
                raise ConfigError(f"out[{i}] is read-only")
            if o.flags.c_contiguous:
                dsts.append(o)
            else:  # strided target: unpack into a temporary, then copy
                tmp = np.empty(shape, dtype=dtype)
                dsts.append(tmp)
                copies.append((o, tmp))
        return out, dsts, copies


def _common_dtype(dtypes: list[np.dtype], what: str) -> np.dtype:
    first = dtypes[0]
    for i, d in enumerate(dtypes):
        if d != first:
            raise ConfigError(
                f"{what}: all tensors of one bucket must share a dtype, but tensor 0 is {first} "
                f"and tensor {i} is {d}; group them with plan_buckets()"
            )
    return first


def _check_buffer(buf: Any, wire: np.dtype, total: int, what: str, exact: bool) -> np.ndarray:
    if not isinstance(buf, np.ndarray):
        raise ConfigError(f"{what} must be a numpy array, got {type(buf).__name__}")
    if buf.dtype != wire:
        raise ConfigError(f"{what} has dtype {buf.dtype} but the fused buffer needs {wire}")
    if not buf.flags.c_contiguous:
        raise ConfigError(f"{what} must be C-contiguous")
    if what == "out" and not buf.flags.writeable:
        raise ConfigError("out is read-only")
    if (buf.size != total) if exact else (buf.size < total):
        need = f"exactly {total}" if exact else f"at least {total}"
        raise ConfigError(f"{what} has {buf.size} elements but needs {need}")
    return buf.reshape(-1)


def native_available() -> bool:
    """Whether the C++ extension was built and imports."""
    return _native is not None


def get_implementation(name: str) -> FusedBuffers:
    """The fused-buffer implementation called ``name`` ("native" or "numpy").

    Raises ConfigError for "native" when the extension is not built.
    """
    if name == "numpy":
        return FusedBuffers("numpy", _numpy)
    if name == "native":
        if _native is None:
            raise ConfigError(
                f"the native fused-buffer extension is not built ({_NATIVE_IMPORT_ERROR}); "
                f"{_BUILD_HINT}, or set {IMPL_ENV}=numpy"
            )
        return FusedBuffers("native", _native)
    raise ConfigError(f"unknown fused-buffer implementation {name!r}; use 'auto', 'native' or 'numpy'")


def select_implementation(choice: str | None = None) -> FusedBuffers:
    """Choose by ``choice`` or ``RINGTRAIN_FUSION_IMPL``: auto (default) | native | numpy."""
    if choice is None:
        value = env.get(IMPL_ENV)
    else:
        value = choice.strip().lower() or "auto"
        if value not in ("auto", "native", "numpy"):
            raise ConfigError(f"{IMPL_ENV}={choice!r} is not valid; use auto, native or numpy")
    if value != "auto":
        return get_implementation(value)
    if _native is not None:
        return get_implementation("native")
    logger.warning(
        "ringtrain's native fused-buffer extension is not built (%s); using the slower numpy twin; %s",
        _NATIVE_IMPORT_ERROR,
        _BUILD_HINT,
    )
    return get_implementation("numpy")


def fusion_threads() -> int:
    """Copy threads of the native kernels from ``RINGTRAIN_FUSION_THREADS`` (default 1).

    A thread is only started for at least 4 MiB of output. One thread already
    saturates memory bandwidth on small machines; servers with many memory
    channels may gain from 2-4.
    """
    return env.get(THREADS_ENV)


_selected: FusedBuffers | None = None


def selected() -> FusedBuffers:
    """The implementation behind :func:`pack` and :func:`unpack`, chosen at first use.

    The first call reads ``RINGTRAIN_FUSION_IMPL`` and ``RINGTRAIN_FUSION_THREADS``
    (a bad value raises ConfigError here, not at import).
    """
    global _selected
    if _selected is None:
        chosen = select_implementation()
        if _native is not None:
            _native.set_threading(fusion_threads(), _native.get_threading()[1])
        _selected = chosen
    return _selected


def __getattr__(name: str) -> Any:  # PEP 562: IMPLEMENTATION is decided at first use
    if name == "IMPLEMENTATION":
        return selected().name
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------- public API


def pack(arrays: Sequence[Any], out: np.ndarray | None = None, compress: str | None = None) -> np.ndarray:
    """Copy ``arrays`` (one dtype, any shapes) back to back into one flat buffer.

    Arrays may be zero-size or non-contiguous. ``out``, if given, is a C-contiguous
    buffer of the wire dtype with at least as many elements as the arrays hold
    (reuse it across steps); the result is then a view of its first elements.
    ``compress="fp16"``/``"bf16"`` casts float32 arrays to float16/bfloat16
    (round to nearest even); other dtypes travel uncompressed. ``out`` must not
    overlap the arrays. An empty ``arrays`` gives an empty buffer.
    """
    return selected().pack(arrays, out=out, compress=compress)


def unpack(
    buffer: np.ndarray,
    like: Sequence[Any],
    scale: float = 1.0,
    compress: str | None = None,
    out: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Split a fused ``buffer`` into arrays shaped like ``like``, times ``scale``.

    ``like`` is a sequence of objects with ``shape`` and ``dtype`` (arrays,
    ``tf.TensorSpec``...). ``buffer`` must hold exactly their elements, in the
    wire dtype (see :func:`wire_dtype`). Results are fresh arrays, or the ``out``
    arrays (matching shapes and dtype, possibly strided) written in place.

    Scaling, in one pass with the copy:

    * float32: ``x * float32(scale)``; float64: ``x * scale``;
    * float16/bfloat16: widened to float32, multiplied by ``float32(scale)``,
      rounded once back (nearest even);
    * compressed float32 buckets are widened exactly, then multiplied by
      ``float32(scale)``;
    * int32/int64: averaged by floor division. ``scale`` must be 1 or exactly
      ``1/n`` for a whole ``n``, and the result is ``x // n`` (rounding toward
      minus infinity, as numpy's ``floor_divide``); anything else raises ConfigError.
    """
    return selected().unpack(buffer, like, scale=scale, compress=compress, out=out)


def scale_in_place(array: np.ndarray, scale: float) -> np.ndarray:
    """Multiply a C-contiguous ``array`` by ``scale`` in place, with :func:`unpack`'s numerics.

    Used for tensors reduced straight into their output: the averaging then costs one
    pass over the result. Integers need ``scale`` = 1/n (floor division), as in unpack.
    """
    if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
        raise ConfigError("scale_in_place needs a C-contiguous numpy array")
    if float(scale) == 1.0 or array.size == 0:
        return array
    return selected().unpack(array.reshape(-1), [array], scale=scale, out=[array])[0]
