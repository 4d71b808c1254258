"""The tf backend: TF_CONFIG plus MultiWorkerMirroredStrategy collective allreduce."""

from __future__ import annotations

import os

from ..errors import BackendError


def communication(gpu_assigned: bool) -> str:
    """Collective implementation: NCCL between GPUs, RING (gRPC) between CPU workers."""
    return "NCCL" if gpu_assigned else "RING"


def gpu_assigned(environ=os.environ) -> bool:
    return bool(environ.get("CUDA_VISIBLE_DEVICES", ""))


def make_strategy():
    """Build the job's MultiWorkerMirroredStrategy from TF_CONFIG."""
    if "TF_CONFIG" not in os.environ:
        raise BackendError(
            "TF_CONFIG is not set: ringtrain.tf.strategy() works only inside a ringtrain worker "
            "started with backend='tf'"
        )
    import tensorflow as tf

    implementation = getattr(
        tf.distribute.experimental.CommunicationImplementation, communication(gpu_assigned())
    )
    options = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except (RuntimeError, ValueError) as err:
        raise BackendError(
            f"rank {os.environ.get('RANK', '?')}: MultiWorkerMirroredStrategy could not start ({err}); "
            "call ringtrain.tf.strategy() before any other TensorFlow op in the worker"
        ) from err
