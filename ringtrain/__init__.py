"""ringtrain: ring-allreduce TensorFlow training on Apache Spark barrier mode.

import ringtrain

def train():
    strategy = ringtrain.tf.strategy()
    ...
    return ringtrain.rank()

ringtrain.run(train, num_proc=2)
"""

from typing import TYPE_CHECKING

from .context import is_chief, job_dir, local_rank, local_size, rank, restart_count, size
from .errors import (
    AgentLostError,
    BackendError,
    ChannelError,
    ConfigError,
    DataError,
    InfrastructureError,
    JobTimeoutError,
    ResourceError,
    RingtrainError,
    StallError,
    WorkerError,
    WorkerLostError,
)

if TYPE_CHECKING:
    from . import data, keras, tf
    from .api import run, run_script
    from .collectives import (
        Average,
        DistributedGradientTape,
        Max,
        Min,
        Sum,
        allgather,
        allreduce,
        alltoall,
        barrier,
        broadcast,
        broadcast_variables,
        cross_rank,
        cross_size,
        grouped_allreduce,
        join,
    )

# Imported on first use (PEP 562): the task agent's keeper and every fresh worker import
# ringtrain, and numpy and the launcher would add about 0.4 s to each start (measured here).
_LAZY = {
    "run": "api",
    "run_script": "api",
    "data": None,
    "keras": None,
    "tf": None,
    **dict.fromkeys(
        (
            "Average",
            "DistributedGradientTape",
            "Max",
            "Min",
            "Sum",
            "allgather",
            "allreduce",
            "alltoall",
            "barrier",
            "broadcast",
            "broadcast_variables",
            "cross_rank",
            "cross_size",
            "grouped_allreduce",
            "join",
        ),
        "collectives",
    ),  # fmt: skip
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'ringtrain' has no attribute {name!r}")
    import importlib

    home = _LAZY[name]
    value = importlib.import_module(f".{home or name}", __name__)
    if home is not None:
        value = getattr(value, name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "Average",
    "DistributedGradientTape",
    "Max",
    "Min",
    "Sum",
    "allgather",
    "allreduce",
    "alltoall",
    "barrier",
    "broadcast",
    "broadcast_variables",
    "cross_rank",
    "cross_size",
    "data",
    "grouped_allreduce",
    "join",
    "keras",
    "AgentLostError",
    "BackendError",
    "ChannelError",
    "ConfigError",
    "DataError",
    "InfrastructureError",
    "JobTimeoutError",
    "ResourceError",
    "RingtrainError",
    "StallError",
    "WorkerError",
    "WorkerLostError",
    "__version__",
    "is_chief",
    "job_dir",
    "local_rank",
    "local_size",
    "rank",
    "restart_count",
    "run",
    "run_script",
    "size",
    "tf",
]
