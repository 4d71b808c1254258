"""Where the calling worker stands in the job: rank, size, local rank, local size.

The task agent places these in each worker's environment before the worker starts.
Under a plain ``mpiexec`` (no ringtrain launcher) they come from the MPI launcher's
environment instead: MPICH/Hydra's PMI_RANK, PMI_SIZE, MPI_LOCALRANKID and
MPI_LOCALNRANKS, or Open MPI's OMPI_COMM_WORLD_* variables.
"""

from __future__ import annotations

import os

from .errors import RingtrainError

# ringtrain's own variable first, then what MPI launchers set (checked with Hydra 5.0.2).
_FALLBACKS = {
    "RANK": ("PMI_RANK", "OMPI_COMM_WORLD_RANK"),
    "SIZE": ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"),
    "LOCAL_RANK": ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"),
    "LOCAL_SIZE": ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"),
}


def _read(name: str) -> int:
    value = os.environ.get(name)
    if value is None and "RANK" not in os.environ:  # never mix ringtrain's and MPI's numbering
        value = next((os.environ[n] for n in _FALLBACKS[name] if n in os.environ), None)
    if value is None:
        raise RingtrainError(
            f"{name} is not set: ringtrain.{name.lower()}() works only inside a ringtrain worker, "
            "that is inside the function given to ringtrain.run, a script run by `ringtrain launch`, "
            "or a process started by `mpiexec`"
        )
    return int(value)


def rank() -> int:
    """This worker's rank, 0 … size()-1, ordered by (Spark partition, local index)."""
    return _read("RANK")


def size() -> int:
    """The number of workers in the job."""
    return _read("SIZE")


def local_rank() -> int:
    """This worker's index among the workers on its host."""
    return _read("LOCAL_RANK")


def local_size() -> int:
    """The number of workers on this worker's host."""
    return _read("LOCAL_SIZE")


def is_chief() -> bool:
    """True on rank 0, the worker that should save checkpoints and write logs."""
    return rank() == 0


def restart_count() -> int:
    """0 on a job's first attempt, then 1, 2, ... on each restart (see ``max_restarts``)."""
    value = os.environ.get("RINGTRAIN_RESTART_COUNT")
    if value is None:
        raise RingtrainError(
            "ringtrain.restart_count() works only inside a ringtrain worker: inside the function "
            "given to ringtrain.run or a script run by `ringtrain launch`"
        )
    return int(value)


def job_dir() -> str:
    """The job's directory, the same on every attempt: ``logs/rank-N.log`` and your checkpoints.

    It is ``run(job_dir=...)`` / ``ringtrain launch --job-dir`` / ``RINGTRAIN_JOB_DIR`` when
    given (use shared storage on a cluster), else a new local directory per job.
    """
    value = os.environ.get("RINGTRAIN_JOB_DIR") if "RINGTRAIN_RESTART_COUNT" in os.environ else None
    if not value:
        raise RingtrainError(
            "ringtrain.job_dir() works only inside a ringtrain worker: inside the function given "
            "to ringtrain.run or a script run by `ringtrain launch`"
        )
    return value
