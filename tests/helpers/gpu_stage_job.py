"""Stage-level GPUs on local-cluster[2,2,1024] with fake GPUs and no task GPU amount set.

Executors have 2 GPUs each; the session gives tasks none, so ringtrain's training stage
asks for its GPUs through its own resource profile. Prints one JSON line:

- ``four``: each rank's view of a 4-worker job (one GPU each);
- ``too_many``: the error for 6 workers;
- ``held``: a 2-worker job with 2 GPUs per worker, which holds every GPU of the cluster
  until released, while a plain Spark job of the same session runs on the free cores.

Run in its own process: a local-cluster needs its own SparkContext. With ``--connect``,
the same cluster runs behind a Spark Connect server, and ``four`` and ``too_many`` come
through a Connect session.
"""

import json
import os
import pickle
import sys
import threading
import time
from pathlib import Path

from gpu_cluster_job import fake_gpu_cluster, fake_gpu_conf

import ringtrain
from ringtrain.api import serialize_task
from ringtrain.config import JobConfig
from ringtrain.launcher import driver
from ringtrain.worker import FunctionTask

HELD_SECONDS = 120


def view():
    import ringtrain.backends.tf as tf_backend

    return {
        "rank": ringtrain.rank(),
        "cuda": os.environ["CUDA_VISIBLE_DEVICES"],
        "communication": tf_backend.communication(tf_backend.gpu_assigned()),
    }


def hold_gpus(directory):
    """Say this rank holds its GPUs, then keep them until the driver releases the job."""
    Path(directory, f"holding-{ringtrain.rank()}").write_text(os.environ["CUDA_VISIBLE_DEVICES"])
    deadline = time.monotonic() + HELD_SECONDS
    while not Path(directory, "release").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return os.environ["CUDA_VISIBLE_DEVICES"]


def held_job(spark, directory):
    """Run hold_gpus on 2 workers x 2 GPUs; meanwhile run a plain job and time it."""
    config = JobConfig.from_env(num_proc=2, gpus_per_worker=2, backend="mpi")
    outcome = {}

    def train():
        try:
            results = driver.launch(config, serialize_task(FunctionTask(hold_gpus, (directory,))))
            outcome["cuda"] = [pickle.loads(results[r]) for r in sorted(results)]
        except Exception as err:  # reported in the JSON
            outcome["error"] = f"{type(err).__name__}: {err}"

    training = threading.Thread(target=train, daemon=True)
    training.start()
    holding = [Path(directory, f"holding-{rank}") for rank in (0, 1)]
    deadline = time.monotonic() + HELD_SECONDS
    while not all(p.exists() for p in holding) and time.monotonic() < deadline and training.is_alive():
        time.sleep(0.1)
    outcome["holding"] = all(p.exists() for p in holding)
    plain = {}

    def plain_job():
        plain["sum"] = spark.range(100, numPartitions=2).selectExpr("sum(id) AS s").collect()[0]["s"]

    started = time.monotonic()
    job = threading.Thread(target=plain_job, daemon=True)
    job.start()
    job.join(60)
    outcome["plain_sum"] = plain.get("sum")
    outcome["plain_seconds"] = round(time.monotonic() - started, 1)
    outcome["training_still_holding"] = training.is_alive()
    Path(directory, "release").touch()
    training.join(HELD_SECONDS)
    return outcome


def main(directory: str) -> None:
    spark = fake_gpu_cluster("ringtrain-stage-gpu-test")  # no task GPU amount
    report = {}
    try:
        report["four"] = ringtrain.run(view, num_proc=4, return_all=True)
        report["too_many"] = too_many()
        report["held"] = held_job(spark, directory)
    finally:
        print("REPORT " + json.dumps(report), flush=True)
        spark.stop()


def too_many() -> str:
    try:
        ringtrain.run(view, num_proc=6)
    except ringtrain.RingtrainError as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def main_connect() -> None:
    """The same cluster behind a Spark Connect server; this process is only its client."""
    from connect_server import LocalConnectServer
    from pyspark.sql import SparkSession

    with LocalConnectServer("local-cluster[2,2,1024]", fake_gpu_conf()) as server:
        spark = SparkSession.builder.remote(server.url).getOrCreate()
        report = {}
        try:
            report["four"] = ringtrain.run(view, num_proc=4, return_all=True)
            report["too_many"] = too_many()
        finally:
            print("REPORT " + json.dumps(report), flush=True)
            spark.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--connect"]:
        main_connect()
    else:
        main(sys.argv[1])
