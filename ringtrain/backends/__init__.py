"""Training backends: how the workers of one job talk to each other.

- ``tf``: TF_CONFIG plus MultiWorkerMirroredStrategy (NCCL on GPU, RING on CPU).
- ``mpi``: one MPI world formed across the barrier tasks, for ringtrain's fused collectives.
- ``auto``: chosen here, from what was measured: NCCL via tf where GPUs are assigned,
  mpi on CPU (mpi4py Allreduce ran about 10x faster than TF's gRPC RING on CPU).
"""

from __future__ import annotations

import importlib.util


def mpi_installed() -> bool:
    """True when mpi4py and Hydra's mpiexec are both present in this environment."""
    if importlib.util.find_spec("mpi4py") is None:
        return False
    from ..errors import BackendError
    from ._hydra import find_mpiexec

    try:
        find_mpiexec()
    except BackendError:
        return False
    return True


def candidates(requested: str, gpus_assigned: bool, mpi_available: bool) -> list[str]:
    """Backends to try, in order. A named backend is tried alone: it never falls back."""
    if requested != "auto":
        return [requested]
    if gpus_assigned:
        return ["tf", "mpi"] if mpi_available else ["tf"]
    return ["mpi", "tf"] if mpi_available else ["tf"]
