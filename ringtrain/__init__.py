"""ringtrain: ring-allreduce TensorFlow training on Apache Spark barrier mode.

import ringtrain

def train():
    strategy = ringtrain.tf.strategy()
    ...
    return ringtrain.rank()

ringtrain.run(train, num_proc=2)
"""

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
