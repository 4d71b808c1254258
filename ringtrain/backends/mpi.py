"""MPI backend: the job's MPI world, reached through mpi4py.

``mpi4py`` is imported lazily (importing it initialises MPI), so importing ringtrain
on a Spark driver never starts MPI. Workers get the world with :func:`world`; it
works in a ringtrain worker started with ``backend="mpi"`` and under a plain
``mpiexec -n N python script.py``.
"""

from __future__ import annotations

import logging
import os
import threading
from types import ModuleType
from typing import Any

from ringtrain.errors import BackendError

__all__ = ["mpi_module", "world"]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_MPI: ModuleType | None = None
_WORLD: Any = None


def mpi_module() -> ModuleType:
    """``mpi4py.MPI``, imported on first use; BackendError if mpi4py or the MPI library is missing."""
    global _MPI
    if _MPI is not None:
        return _MPI
    with _lock:
        if _MPI is None:
            try:
                from mpi4py import MPI
            except ImportError as exc:
                raise BackendError(
                    f"the MPI backend needs mpi4py and an MPI library, but importing mpi4py failed "
                    f"({exc}); install them with `pip install mpi4py mpich`"
                ) from exc
            except RuntimeError as exc:  # mpi4py is there but cannot load or initialise libmpi
                raise BackendError(
                    f"mpi4py could not load or initialise the MPI library ({exc}); install one with "
                    "`pip install mpich` or point mpi4py at a system MPI (MPI4PY_LIBMPI)"
                ) from exc
            _MPI = MPI
    return _MPI


def world() -> Any:
    """The job's ``MPI.COMM_WORLD``, checked against the SIZE/RANK a ringtrain worker was given.

    Raises BackendError when the worker was told it is one of SIZE workers but the MPI
    world it joined has another size, which means it was not started as part of the
    job's MPI world (each process then runs alone and collectives would be wrong).
    """
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    MPI = mpi_module()
    comm = MPI.COMM_WORLD
    want_size, want_rank = os.environ.get("SIZE"), os.environ.get("RANK")
    if want_size is not None and int(want_size) != comm.Get_size():
        raise BackendError(
            f"rank {want_rank}: SIZE={want_size} but the MPI world has {comm.Get_size()} process(es); "
            "the worker did not join the job's MPI world. Start workers with backend='mpi' "
            "(or under `mpiexec -n SIZE`), not as separate MPI singletons"
        )
    if want_rank is not None and int(want_rank) != comm.Get_rank():
        raise BackendError(
            f"RANK={want_rank} but this process is rank {comm.Get_rank()} of the MPI world; "
            "the launcher and MPI disagree on rank order. Start workers with backend='mpi'"
        )
    logger.debug("MPI world: rank %s of %s (%s)", comm.Get_rank(), comm.Get_size(), MPI.Get_library_version())
    _WORLD = comm
    return comm
