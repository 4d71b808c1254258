"""ringtrain: ring-allreduce TensorFlow training on Apache Spark barrier mode.

import ringtrain

def train():
    strategy = ringtrain.tf.strategy()
    ...
    return ringtrain.rank()

ringtrain.run(train, num_proc=2)
"""

from . import data, keras, tf
from .api import run
from .collectives import (
    Average,
    DistributedGradientTape,
    Max,
    Min,
    Sum,
    allgather,
    allreduce,
    broadcast,
    broadcast_variables,
    grouped_allreduce,
)
from .context import is_chief, local_rank, local_size, rank, size
from .errors import (
    BackendError,
    ChannelError,
    ConfigError,
    DataError,
    JobTimeoutError,
    ResourceError,
    RingtrainError,
    WorkerError,
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
    "broadcast",
    "broadcast_variables",
    "data",
    "grouped_allreduce",
    "keras",
    "BackendError",
    "ChannelError",
    "ConfigError",
    "DataError",
    "JobTimeoutError",
    "ResourceError",
    "RingtrainError",
    "WorkerError",
    "__version__",
    "is_chief",
    "local_rank",
    "local_size",
    "rank",
    "run",
    "size",
    "tf",
]
