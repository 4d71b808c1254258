"""Runs a 4-worker job on local-cluster[2,2,1024] with fake GPUs; prints each rank's view as JSON.

Run in its own process: a local-cluster needs its own SparkContext.
"""

import json
import os
import sys

from pyspark.sql import SparkSession

import ringtrain


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
    spark = (
        SparkSession.builder.master("local-cluster[2,2,1024]")
        .config("spark.worker.resource.gpu.amount", "2")
        .config("spark.worker.resource.gpu.discoveryScript", script)
        .config("spark.executor.resource.gpu.amount", "2")
        .config("spark.executor.resource.gpu.discoveryScript", script)
        .config("spark.task.resource.gpu.amount", "2")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        result = ringtrain.run(view, num_proc=num_proc, return_all=True)
        print("RESULT " + json.dumps(result))
    except ringtrain.RingtrainError as err:
        print(f"ERROR {type(err).__name__}: {err}")
    finally:
        spark.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]))
