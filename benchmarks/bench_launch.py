"""Launch overhead: ringtrain.run against spark-tensorflow-distributor, side by side.

Both run on one warm local[2] session, alternating, so machine noise hits both alike:
a trivial function, and a 50-step tiny Keras fit (tf-keras, since Keras 3's fit fails
under MultiWorkerMirroredStrategy). spark-tensorflow-distributor is installed only for
this benchmark:

    pip install --no-deps spark-tensorflow-distributor==1.0.0
    python -m benchmarks.bench_launch [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

STEPS = 50


def trivial():
    return 1


def tiny_fit():
    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        import ringtrain

        strategy = ringtrain.tf.strategy()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * 16, 8)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    with strategy.scope():
        model = tf.keras.Sequential([tf.keras.Input((8,)), tf.keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=1, steps_per_epoch=STEPS, verbose=0)
    return float(history.history["loss"][-1])


def _std_run(fn):
    from spark_tensorflow_distributor import MirroredStrategyRunner

    # use_custom_strategy=False: the runner builds MWMS itself and calls fn in its scope.
    return MirroredStrategyRunner(num_slots=2, use_gpu=False).run(fn)


def _ringtrain_run(fn):
    import ringtrain

    # The tf backend: the same MultiWorkerMirroredStrategy collectives as the runner beside it.
    return ringtrain.run(fn, num_proc=2, backend="tf")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # spark-tensorflow-distributor needs it for fit
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from ringtrain.launcher.spark import loopback_session

    spark = loopback_session("local[2]", "bench-launch")
    spark.sparkContext.parallelize(range(2), 2).count()  # warm the Python workers

    runners = {"ringtrain": _ringtrain_run, "spark-tensorflow-distributor": _std_run}
    jobs = {"trivial fn": trivial, f"tiny Keras fit, {STEPS} steps": tiny_fit}
    times: dict[str, dict[str, list[float]]] = {job: {r: [] for r in runners} for job in jobs}
    for job, fn in jobs.items():
        for runner in runners.values():
            runner(fn)  # one untimed warm-up each
        for _ in range(args.repeats):
            for name, runner in runners.items():
                start = time.perf_counter()
                runner(fn)
                times[job][name].append(time.perf_counter() - start)

    report = []
    print(f"{'job':28} {'ringtrain s':>12} {'std s':>10} {'std / ringtrain':>16}")
    for job, by_runner in times.items():
        ours = statistics.median(by_runner["ringtrain"])
        theirs = statistics.median(by_runner["spark-tensorflow-distributor"])
        print(f"{job:28} {ours:12.2f} {theirs:10.2f} {theirs / ours:16.2f}")
        report.append(
            {
                "job": job,
                "ringtrain_s": by_runner["ringtrain"],
                "std_s": by_runner["spark-tensorflow-distributor"],
                "median_ratio_std_over_ringtrain": theirs / ours,
            }
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "launch", "repeats": args.repeats, "results": report}, f, indent=2)
    spark.stop()


if __name__ == "__main__":
    main()
