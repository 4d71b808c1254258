"""Launch overhead, side by side on warm sessions.

Default: ringtrain.run against spark-tensorflow-distributor on one warm local[2] session,
alternating, so machine noise hits all alike: a trivial function, and a 50-step tiny Keras
fit (tf-keras, since Keras 3's fit fails under MultiWorkerMirroredStrategy). ringtrain runs
three ways each round, in this order: RINGTRAIN_PREWARM=0; RINGTRAIN_PREWARM=1 right after
it, so with no spare task agent yet (what the first job pays); then, once the spare workers
that job left have finished their imports and sit idle (so they take no CPU from the run
that follows), spark-tensorflow-distributor, and RINGTRAIN_PREWARM=1 again, which finds
the spares.
spark-tensorflow-distributor is installed only for this benchmark:

    pip install --no-deps spark-tensorflow-distributor==1.0.0
    python -m benchmarks.bench_launch [--repeats 3] [--json out.json]

``--paths``: two comparisons, each alternating its pair in one process. First, on a warm
classic local[2] session, ringtrain's launch stage (a barrier ``mapInArrow``) against the
RDD stage it replaced (``rdd.barrier().mapPartitions``), with no Connect server running.
Then the same stage on a warm Spark Connect session (a local[2] Connect server in its own
process, tests/helpers/connect_server.py) against the classic one. Each times the bare
barrier stage (a task that returns at once) and ringtrain.run of a trivial function
(backend auto, so mpi on CPU). Needs the connect extra:

    python -m benchmarks.bench_launch --paths [--repeats 10] [--json out.json]
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


def _ringtrain_runner(prewarm: str):
    def run(fn):
        import ringtrain

        os.environ["RINGTRAIN_PREWARM"] = prewarm
        # The tf backend: the same MultiWorkerMirroredStrategy collectives as the runner beside it.
        return ringtrain.run(fn, num_proc=2, backend="tf")

    return run


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return -1
    return int(fields[11]) + int(fields[12])  # utime + stime


def _wait_for_idle_spares(count: int = 2, timeout: float = 120.0) -> None:
    """Until ``count`` spare workers (this machine: local[2]) exist and used no CPU for 0.5 s."""
    deadline = time.monotonic() + timeout
    before: dict[int, int] = {}
    while time.monotonic() < deadline:
        pids = [
            int(p)
            for p in os.listdir("/proc")
            if p.isdigit() and _cmdline(p).endswith("-m ringtrain.worker --placement")
        ]
        now = {pid: _cpu_ticks(pid) for pid in pids}
        if len(pids) >= count and now == before:
            return
        before = now
        time.sleep(0.5)
    print(f"warning: spare workers not idle after {timeout:.0f} s", file=sys.stderr)


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


STD = "spark-tensorflow-distributor"
# In the order each round runs them (see the module notes).
RUNNERS = {
    "ringtrain prewarm=0": _ringtrain_runner("0"),
    "ringtrain prewarm=1, no spare": _ringtrain_runner("1"),
    STD: _std_run,
    "ringtrain prewarm=1, spare": _ringtrain_runner("1"),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument(
        "--paths", action="store_true", help="compare launch stages (DataFrame, RDD, Connect) instead"
    )
    args = parser.parse_args()
    if args.paths:
        compare_paths(args.repeats, args.json)
        return

    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # spark-tensorflow-distributor needs it for fit
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from ringtrain.launcher.spark import loopback_session

    spark = loopback_session("local[2]", "bench-launch")
    spark.sparkContext.parallelize(range(2), 2).count()  # warm the Python workers

    jobs = {"trivial fn": trivial, f"tiny Keras fit, {STEPS} steps": tiny_fit}
    times: dict[str, dict[str, list[float]]] = {job: {r: [] for r in RUNNERS} for job in jobs}
    for job, fn in jobs.items():
        for runner in RUNNERS.values():
            runner(fn)  # one untimed warm-up each
        for _ in range(args.repeats):
            for name, runner in RUNNERS.items():
                if name == STD:
                    _wait_for_idle_spares()
                start = time.perf_counter()
                runner(fn)
                times[job][name].append(time.perf_counter() - start)
    report = _print_comparison(f"warm local[2], {args.repeats} repeats", times, STD)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "launch", "repeats": args.repeats, "results": report}, f, indent=2)
    spark.stop()


# ------------------------------------------------------------------ --paths: launch stages


def _returns_at_once(task):
    return None


def _rdd_task(task_fn, rows):
    """The RDD stage's task: what ringtrain ran in each barrier task before the DataFrame stage."""
    from pyspark import BarrierTaskContext

    from ringtrain.launcher.stage import StageTask

    ctx = BarrierTaskContext.get()
    resources = ctx.resources()
    gpus = tuple(resources["gpu"].addresses) if "gpu" in resources else ()
    task_fn(StageTask(ctx.partitionId(), gpus, ctx.allGather, iter(())))
    return [ctx.partitionId()]


def _rdd_stage_class():
    """BarrierStage with the previous RDD job in place of mapInArrow (classic sessions only)."""
    from functools import partial

    from ringtrain.launcher.stage import BarrierStage

    class RddBarrierStage(BarrierStage):
        def _run(self) -> None:
            try:
                with self._tagged():
                    sc = self._session.sparkContext
                    rdd = sc.parallelize(range(self.num_tasks), self.num_tasks)
                    rdd.barrier().mapPartitions(partial(_rdd_task, self._task_fn)).collect()
            except BaseException as err:
                self.error = err

    return RddBarrierStage


class _Path:
    """One way to launch: a session and the stage class ringtrain runs on it."""

    def __init__(self, session, stage_class, connect: bool = False):
        self.session = session
        self.stage_class = stage_class
        self.connect = connect

    def bare_stage(self) -> None:
        stage = self.stage_class(self.session, 2, _returns_at_once)
        stage.start()
        stage.join()
        if stage.error is not None:
            raise stage.error

    def run_trivial(self) -> None:
        from unittest import mock

        import ringtrain
        from ringtrain.launcher import driver

        # This process holds both kinds of session; pyspark's Connect mode picks which one
        # ringtrain.run finds active.
        if self.connect:
            os.environ["SPARK_CONNECT_MODE_ENABLED"] = "1"
        try:
            with mock.patch.object(driver, "BarrierStage", self.stage_class):
                assert ringtrain.run(trivial, num_proc=2) == 1
        finally:
            os.environ.pop("SPARK_CONNECT_MODE_ENABLED", None)


MEASURES = {"bare stage": _Path.bare_stage, "ringtrain.run trivial fn": _Path.run_trivial}


def _alternate(paths: dict[str, _Path], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Seconds per measure and path: one untimed warm-up each, then ``repeats`` rounds in turn."""
    times: dict[str, dict[str, list[float]]] = {m: {p: [] for p in paths} for m in MEASURES}
    for measure, call in MEASURES.items():
        for path in paths.values():
            call(path)
        for _ in range(repeats):
            for name, path in paths.items():
                start = time.perf_counter()
                call(path)
                times[measure][name].append(time.perf_counter() - start)
    return times


def _print_comparison(title: str, times: dict[str, dict[str, list[float]]], baseline: str) -> list[dict]:
    print(f"{title}: seconds, median (min-max), and the median's ratio to {baseline}")
    report = []
    for measure, by_path in times.items():
        base = statistics.median(by_path[baseline])
        for path, values in by_path.items():
            median = statistics.median(values)
            print(
                f"  {measure:26} {path:24} {median:6.3f} ({min(values):.3f}-{max(values):.3f})"
                f"  x{median / base:.2f}"
            )
            report.append(
                {"comparison": title, "measure": measure, "path": path, "seconds": values,
                 "median_ratio": median / base}
            )  # fmt: skip
    return report


def compare_paths(repeats: int, json_path: str | None) -> None:
    """Classic DataFrame stage against the RDD stage first, with no Connect server running;
    then Connect against classic, with the server up. Each pair alternates in one run."""
    from ringtrain.launcher.spark import loopback_session
    from ringtrain.launcher.stage import BarrierStage

    helpers = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "helpers")
    sys.path.insert(0, helpers)
    from connect_server import LocalConnectServer

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("RINGTRAIN_TF_THREADS", "1")
    classic = loopback_session("local[2]", "bench-launch-paths")
    classic_df = _Path(classic, BarrierStage)
    print(f"{repeats} repeats of each, alternating", flush=True)
    report = _print_comparison(
        "classic session",
        _alternate(
            {"RDD stage (previous)": _Path(classic, _rdd_stage_class()), "DataFrame stage": classic_df},
            repeats,
        ),
        "RDD stage (previous)",
    )
    with LocalConnectServer("local[2]") as server:
        from pyspark.sql.connect.session import SparkSession as RemoteSession

        connect = RemoteSession.builder.remote(server.url).getOrCreate()
        paths = {"classic DataFrame": classic_df, "Connect DataFrame": _Path(connect, BarrierStage, True)}
        report += _print_comparison("Connect session", _alternate(paths, repeats), "classic DataFrame")
        connect.stop()
    classic.stop()
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"benchmark": "launch-paths", "repeats": repeats, "results": report}, f, indent=2)


if __name__ == "__main__":
    main()
