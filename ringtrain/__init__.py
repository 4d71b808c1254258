"""ringtrain: ring-allreduce TensorFlow training on Apache Spark barrier mode.

import ringtrain

def train():
    strategy = ringtrain.tf.strategy()
    ...
    return ringtrain.rank()

ringtrain.run(train, num_proc=2)
"""

from . import tf
from .api import run
from .context import is_chief, local_rank, local_size, rank, size
from .errors import (
    BackendError,
    ChannelError,
    ConfigError,
    JobTimeoutError,
    ResourceError,
    RingtrainError,
    WorkerError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "ChannelError",
    "ConfigError",
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
