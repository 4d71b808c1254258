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


def main(num_proc: int) -> None:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_gpus.sh")
    spark = loopback_session(
        "local-cluster[2,2,1024]",
        "ringtrain-gpu-test",
        {
            "spark.worker.resource.gpu.amount": "2",
            "spark.worker.resource.gpu.discoveryScript": script,
            "spark.executor.resource.gpu.amount": "2",
            "spark.executor.resource.gpu.discoveryScript": script,
            "spark.task.resource.gpu.amount": "2",
        },
    )
    try:
        result = ringtrain.run(view, num_proc=num_proc, return_all=True)
        print("RESULT " + json.dumps(result))
    except ringtrain.RingtrainError as err:
        print(f"ERROR {type(err).__name__}: {err}")
    finally:
        spark.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]))
