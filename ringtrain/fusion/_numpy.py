"""Pure-numpy twin of the native fused-buffer kernels (``ringtrain.fusion._native``).

Same functions, same arguments, bit-identical results; used when the extension
is not built or when ``RINGTRAIN_FUSION_IMPL=numpy``. Callers go through
:mod:`ringtrain.fusion`, which validates every argument: here sources and
destinations are C-contiguous arrays of the right sizes.

Numerics both implementations share:

* float32 -> float16 is numpy's cast, float32 -> bfloat16 is ml_dtypes' cast;
  both round to nearest even. Widening back to float32 is exact.
* A scale multiplies in float32 (float64 for float64 elements; float32 for
  float16/bfloat16 elements, rounded once back to the element type).
* Integers are divided by ``divisor`` with floor division (toward -inf).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["pack", "unpack"]


def _flat(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1)


def _bytes(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(np.uint8)


def pack(srcs: Sequence[np.ndarray], dst: np.ndarray, compress: str = "") -> None:
    """Copy ``srcs`` back to back into ``dst``; ``compress`` is '' | 'fp16' | 'bf16'."""
    if compress not in ("", "fp16", "bf16"):
        raise ValueError(f"unknown compression {compress!r}")
    if compress:
        out = _flat(dst)
        offset = 0
        for a in srcs:
            n = a.size
            np.copyto(out[offset : offset + n], _flat(a), casting="unsafe")
            offset += n
        return
    out = _bytes(dst)
    offset = 0
    for a in srcs:
        n = a.nbytes
        if n:
            np.copyto(out[offset : offset + n], _bytes(a))
        offset += n


def unpack(
    src: np.ndarray,
    dsts: Sequence[np.ndarray],
    kind: str,
    compress: str = "",
    scale: float = 1.0,
    divisor: int = 1,
) -> None:
    """Split ``src`` into ``dsts``, scaling floats by ``scale`` or floor-dividing integers by ``divisor``."""
    unit = scale == 1.0 and divisor == 1
    flat = _flat(src)
    offset = 0
    for d in dsts:
        n = d.size
        part = flat[offset : offset + n]
        out = _flat(d)
        offset += n
        if compress:
            np.copyto(out, part, casting="unsafe")  # exact widening to float32
            if np.float32(scale) != 1:  # as the native kernel: a float32 scale of 1 is not applied
                np.multiply(out, np.float32(scale), out=out)
        elif unit:
            np.copyto(_bytes(d), part.view(np.uint8))
        elif kind == "f4":
            np.multiply(part, np.float32(scale), out=out)
        elif kind == "f8":
            np.multiply(part, np.float64(scale), out=out)
        elif kind in ("f2", "bf16"):
            wide = part.astype(np.float32)
            np.multiply(wide, np.float32(scale), out=wide)
            np.copyto(out, wide, casting="unsafe")
        elif kind in ("i4", "i8"):
            np.floor_divide(part, part.dtype.type(divisor), out=out)
        else:
            raise ValueError(f"cannot scale elements of kind {kind!r}")
