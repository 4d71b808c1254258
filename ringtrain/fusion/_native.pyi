"""Type stub of the native fused-buffer kernels; call them through :mod:`ringtrain.fusion`."""

from collections.abc import Sequence

import numpy as np

def pack(srcs: Sequence[np.ndarray], dst: np.ndarray, compress: str = "") -> None: ...
def unpack(
    src: np.ndarray,
    dsts: Sequence[np.ndarray],
    kind: str,
    compress: str = "",
    scale: float = 1.0,
    divisor: int = 1,
) -> None: ...
def set_threading(max_threads: int, min_bytes_per_thread: int) -> None: ...
def get_threading() -> tuple[int, int]: ...
