"""Reliability figures: how fast failures surface, and what watching for them costs.

Three measurements, each through ``ringtrain.run`` on an embedded local Spark, 2 workers:

- ``kill``: time from a rank's SIGKILL to ``run`` raising, per backend. Both ranks make
  one collective, then rank 1 records the time and SIGKILLs itself while rank 0 waits
  in the next collective.
- ``stall``: time from the start of a stall to ``StallError``, with
  ``RINGTRAIN_STALL_TIMEOUT`` (default here 20 s). Rank 1 sleeps in Python; rank 0
  records the time and enters a collective.
- ``orphans``: SIGKILL the PySpark task process hosting rank 1 (as Spark does when it kills a
  task), whose worker has started a setsid grandchild; time until ``run`` raises, until the
  keeper (the task agent's process) has exited, and until no process of the job is left.
- ``hook``: in this process, the cost of one collective's progress record (enter + leave,
  against an empty ``with``) and of one sampler tick (with TensorFlow imported), from which
  the overhead per training step follows without the noise of a whole run.
- ``overhead``: step time of the ``benchmarks.cnn`` Inception v1 run on mpi with the
  stall inspector on (``RINGTRAIN_STALL_INSPECTOR=1``, the default: every collective
  recorded, the main thread sampled every heartbeat) and off, alternating in one session
  so machine noise hits both alike. Heartbeats between agents and driver run either way.

Usage::

    python -m benchmarks.bench_reliability [kill] [stall] [orphans] [hook] [overhead] [--repeats N]
        [--stall-timeout S] [--steps K] [--json FILE]

Times of day are ``time.time()`` in the worker and the driver, which share one host here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _collective(backend: str):
    """One collective of ``backend``, as a function to call repeatedly."""
    import numpy as np

    import ringtrain

    if backend == "mpi":
        return lambda: ringtrain.allreduce(np.ones(4, np.float32), name="bench")
    import tensorflow as tf

    strategy = ringtrain.tf.strategy()
    value = tf.ones([4])

    @tf.function
    def reduce():
        return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", value))

    return reduce


def kill_one_rank(backend: str, mark: str) -> None:
    import ringtrain

    collective = _collective(backend)
    collective()  # the world works
    if ringtrain.rank() == 1:
        Path(mark).write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    collective()  # never completes: rank 1 is gone


def stall_one_rank(backend: str, mark: str) -> None:
    import ringtrain

    collective = _collective(backend)
    collective()
    if ringtrain.rank() == 1:
        time.sleep(3600)
    Path(mark).write_text(repr(time.time()))
    collective()


def leave_a_grandchild(folder: str) -> None:
    import subprocess

    import ringtrain

    helper = subprocess.Popen(["sleep", "3600"], start_new_session=True)
    keeper = os.getppid()
    while b"ringtrain.launcher.keeper" not in Path(f"/proc/{keeper}/cmdline").read_bytes():
        keeper = _parent(keeper)
    tree = {"worker": os.getpid(), "keeper": keeper, "task": _parent(keeper), "grandchild": helper.pid}
    target = Path(folder, f"rank-{ringtrain.rank()}.json")
    target.with_suffix(".tmp").write_text(json.dumps(tree))
    target.with_suffix(".tmp").replace(target)
    time.sleep(3600)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def measure_orphans(repeats: int) -> list[dict[str, Any]]:
    import threading

    import ringtrain
    from ringtrain.backends._hydra import _alive

    records = []
    for _ in range(repeats):
        for backend in ("mpi", "tf"):
            with tempfile.TemporaryDirectory() as folder:
                killed: dict[str, float] = {}
                keeper_gone: dict[str, float] = {}

                def kill_task(folder: str = folder, killed: dict = killed, gone: dict = keeper_gone) -> None:
                    # Both ranks running: rank 0's tree is checked for leftovers too.
                    while not all(Path(folder, f"rank-{r}.json").exists() for r in (0, 1)):
                        time.sleep(0.05)
                    tree = json.loads(Path(folder, "rank-1.json").read_text())
                    killed["at"] = time.time()
                    os.kill(tree["task"], signal.SIGKILL)
                    while _alive(tree["keeper"]):
                        time.sleep(0.01)
                    gone["at"] = time.time()

                watcher = threading.Thread(target=kill_task, daemon=True)
                watcher.start()
                try:
                    ringtrain.run(leave_a_grandchild, folder, num_proc=2, backend=backend)
                except ringtrain.AgentLostError:
                    raised = time.time()
                trees = [json.loads(Path(folder, f"rank-{r}.json").read_text()) for r in (0, 1)]
                pids = [t[k] for t in trees for k in ("worker", "keeper", "grandchild")]
                while any(_alive(p) for p in pids) and time.time() - raised < 60:
                    time.sleep(0.01)
                clean = time.time()
                watcher.join(60)
                records.append(
                    {
                        "what": "task_killed",
                        "backend": backend,
                        "kill_to_raise_s": raised - killed["at"],
                        "kill_to_keeper_exit_s": keeper_gone["at"] - killed["at"],
                        "raise_to_nothing_left_s": max(0.0, clean - raised),
                    }
                )
    return records


def measure_hook(repeats: int) -> list[dict[str, Any]]:
    import contextlib
    import timeit

    from ringtrain import progress
    from ringtrain.worker import _watch

    records = []
    with tempfile.TemporaryDirectory() as folder:
        recorder = progress.FileRecorder(Path(folder, "progress-0"))
        progress.install(recorder)
        try:
            for _ in range(repeats):
                n = 200_000

                def recorded() -> None:
                    with progress.collective("grouped_allreduce(gradients)"):
                        pass

                def bare() -> None:
                    with contextlib.nullcontext():
                        pass

                per_call = (timeit.timeit(recorded, number=n) - timeit.timeit(bare, number=n)) / n
                records.append({"what": "hook", "seconds_per_collective": per_call})
        finally:
            progress.install(None)
        import tensorflow as tf

        tf.reduce_sum(tf.ones(3))  # TF's threads exist, as in a worker
        sampler = _watch.Sampler(recorder, 1.0, _watch.SigtermGuard())

        def tick() -> None:
            sampler._guard.restore()
            sampler.sample()

        for _ in range(repeats):
            records.append(
                {"what": "sampler_tick", "seconds_per_tick": timeit.timeit(tick, number=2000) / 2000}
            )
    return records


def _time_failure(fn, backend: str, expected: type) -> dict[str, Any]:
    import ringtrain

    with tempfile.TemporaryDirectory() as folder:
        mark = os.path.join(folder, "mark")
        started = time.time()
        try:
            ringtrain.run(fn, backend, mark, num_proc=2, backend=backend)
        except expected as err:
            raised = time.time()
            return {
                "backend": backend,
                "seconds": raised - float(Path(mark).read_text()),
                "run_seconds": raised - started,
                "error": type(err).__name__,
            }
        raise RuntimeError(f"the {backend} job did not fail with {expected.__name__}")


def measure_kill(repeats: int) -> list[dict[str, Any]]:
    import ringtrain

    return [
        {"what": "sigkill_to_raise", **_time_failure(kill_one_rank, backend, ringtrain.WorkerError)}
        for _ in range(repeats)
        for backend in ("mpi", "tf")
    ]


def measure_stall(repeats: int, timeout: float) -> list[dict[str, Any]]:
    import ringtrain

    os.environ["RINGTRAIN_STALL_TIMEOUT"] = repr(timeout)
    try:
        records = []
        for _ in range(repeats):
            for backend in ("mpi", "tf"):
                record = _time_failure(stall_one_rank, backend, ringtrain.StallError)
                records.append({"what": "stall_to_error", "stall_timeout": timeout, **record})
        return records
    finally:
        del os.environ["RINGTRAIN_STALL_TIMEOUT"]


def measure_overhead(repeats: int, steps: int) -> list[dict[str, Any]]:
    from benchmarks.cnn import BenchConfig, run_benchmark

    cfg = BenchConfig(
        model="inception1",
        backend="mpi",
        np=2,
        batch_size=16,
        image_size=112,
        steps=steps,
        warmup=2,
        threads=1,
    )
    records = []
    for repeat in range(repeats):
        # Alternate which goes first, so a drift in machine load does not favour one side.
        order = ("1", "0") if repeat % 2 == 0 else ("0", "1")
        pair = {}
        for inspector in order:
            os.environ["RINGTRAIN_STALL_INSPECTOR"] = inspector
            record = run_benchmark(cfg)
            pair[inspector] = record["step_time_mean_s"]
        del os.environ["RINGTRAIN_STALL_INSPECTOR"]
        records.append(
            {
                "what": "inspector_overhead",
                "repeat": repeat,
                "step_time_on_s": pair["1"],
                "step_time_off_s": pair["0"],
                "on_over_off": pair["1"] / pair["0"],
                "config": {
                    "model": cfg.model,
                    "backend": cfg.backend,
                    "np": cfg.np,
                    "batch": cfg.batch_size,
                    "image_size": cfg.image_size,
                    "steps": cfg.steps,
                    "threads": cfg.threads,
                },
            }
        )
    return records


def _summary(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for what, key in (("sigkill_to_raise", "seconds"), ("stall_to_error", "seconds")):
        for backend in ("mpi", "tf"):
            values = [r[key] for r in records if r["what"] == what and r["backend"] == backend]
            if values:
                lines.append(
                    f"{what:<18} {backend:<4} "
                    + ", ".join(f"{v:.2f}" for v in values)
                    + " s"
                    + (f"  (median {statistics.median(values):.2f})" if len(values) > 1 else "")
                )
    for r in records:
        if r["what"] == "task_killed":
            lines.append(
                f"task killed        {r['backend']:<4} run raised after {r['kill_to_raise_s']:.2f} s, "
                f"keeper exited after {r['kill_to_keeper_exit_s']:.2f} s, "
                f"nothing left {r['raise_to_nothing_left_s']:.2f} s after the raise"
            )
    hooks = [r["seconds_per_collective"] * 1e6 for r in records if r["what"] == "hook"]
    if hooks:
        lines.append("collective record  " + ", ".join(f"{v:.2f}" for v in hooks) + " us per collective")
    ticks = [r["seconds_per_tick"] * 1e6 for r in records if r["what"] == "sampler_tick"]
    if ticks:
        lines.append("sampler tick       " + ", ".join(f"{v:.1f}" for v in ticks) + " us, once per heartbeat")
    ratios = [r["on_over_off"] for r in records if r["what"] == "inspector_overhead"]
    if ratios:
        pairs = ", ".join(
            f"{r['step_time_on_s'] * 1e3:.1f}/{r['step_time_off_s'] * 1e3:.1f} ms"
            for r in records
            if r["what"] == "inspector_overhead"
        )
        lines.append(
            f"inspector on/off step time: {pairs}; ratios "
            + ", ".join(f"{x:.4f}" for x in ratios)
            + f" (median {statistics.median(ratios):.4f}, min {min(ratios):.4f}, max {max(ratios):.4f})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "which", nargs="*", choices=["kill", "stall", "orphans", "hook", "overhead"], default=[]
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--stall-timeout", type=float, default=20.0)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per overhead run")
    parser.add_argument("--json", help="append one JSON line per measurement here")
    ns = parser.parse_args(argv)
    which = ns.which or ["kill", "stall", "orphans", "hook", "overhead"]
    os.environ.setdefault("RINGTRAIN_TF_THREADS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if _ROOT not in paths:  # workers import this module by name
        os.environ["PYTHONPATH"] = os.pathsep.join([_ROOT, *paths])
    records: list[dict[str, Any]] = []
    if "kill" in which:
        records += measure_kill(ns.repeats)
    if "stall" in which:
        records += measure_stall(ns.repeats, ns.stall_timeout)
    if "orphans" in which:
        records += measure_orphans(ns.repeats)
    if "hook" in which:
        records += measure_hook(max(ns.repeats, 3))
    if "overhead" in which:
        records += measure_overhead(ns.repeats, ns.steps)
    if ns.json:
        with open(ns.json, "a") as out:
            for record in records:
                out.write(
                    json.dumps({**record, "cpu_count": os.cpu_count(), "date": time.strftime("%F %T")}) + "\n"
                )
    print("\n".join(_summary(records)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
