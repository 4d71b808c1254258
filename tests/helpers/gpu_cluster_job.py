"""Runs a 4-worker job on local-cluster[2,2,1024] with fake GPUs; prints each rank's view as JSON.

Run in its own process: a local-cluster needs its own SparkContext.
"""

import json
import os
import sys

import ringtrain
from ringtrain.launcher.spark import loopback_session


def view():
    import ringtrain.backends.tf as tf_backend

    return {
        "rank": ringtrain.rank(),
        "local_rank": ringtrain.local_rank(),
        "cuda": os.environ["CUDA_VISIBLE_DEVICES"],
        "communication": tf_backend.communication(tf_backend.gpu_assigned()),
    }


def fake_gpu_conf(task_gpus: str | None = None) -> dict[str, str]:
    """Settings giving each executor of a local-cluster 2 fake GPUs; tasks get ``task_gpus``
    each through the session-wide setting, or none when it is None."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_gpus.sh")
    conf = {
        "spark.worker.resource.gpu.amount": "2",
        "spark.worker.resource.gpu.discoveryScript": script,
        "spark.executor.resource.gpu.amount": "2",
        "spark.executor.resource.gpu.discoveryScript": script,
    }
    if task_gpus is not None:
        conf["spark.task.resource.gpu.amount"] = task_gpus
    return conf


def fake_gpu_cluster(app_name: str, task_gpus: str | None = None):
    """A local-cluster[2,2,1024] session with :func:`fake_gpu_conf`."""
    return loopback_session("local-cluster[2,2,1024]", app_name, fake_gpu_conf(task_gpus))


def main(num_proc: int) -> None:
    spark = fake_gpu_cluster("ringtrain-gpu-test", task_gpus="2")
    try:
        result = ringtrain.run(view, num_proc=num_proc, return_all=True)
        print("RESULT " + json.dumps(result))
    except ringtrain.RingtrainError as err:
        print(f"ERROR {type(err).__name__}: {err}")
    finally:
        spark.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]))
