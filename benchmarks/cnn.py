"""Synthetic-ImageNet training throughput of Inception v1 / VGG through ``ringtrain.run``.

Usage::

    python -m benchmarks.cnn --model inception1|vgg16|vgg19 --backend tf|mpi -np N \\
        --batch-size B --image-size S --steps K --warmup W [--threads T] [--classes C] \\
        [--results FILE] [--fixed-head] [--quick]

Each worker builds the model with ``tf.keras`` (tf-keras inside ringtrain workers) and
trains it with ``model.fit`` on random images and labels generated in the worker.
tf backend: built and compiled inside ``ringtrain.tf.strategy().scope()`` (RING on CPU,
NCCL where GPUs are assigned). mpi backend: the same model with
``ringtrain.keras.DistributedOptimizer`` and ``BroadcastGlobalVariablesCallback``.
A callback times every step (perf_counter around each batch); warmup steps are dropped.
A step's time is the slowest rank's. Global images/sec = batch per worker x N / step time.
One JSON record per run is appended to ``--results`` (JSON lines).

Allreduce share (mpi only): the benchmark wraps ringtrain's reduction from the outside.
Inside ``tf.function`` the optimizer hands gradient buckets to a communication thread as
backprop produces them and waits for all of them before applying; ``allreduce_share`` is
the time the step spends in that wait (communication not hidden behind backprop) over
the step time, and ``allreduce_busy_share`` the time the reductions ran at all (check,
pack, MPI or shared memory, unpack), overlapped or not. Under the tf backend the
reduction runs inside TF's collective executor and cannot be timed apart, so the share is
null with a reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["REQUIRED_KEYS", "BenchConfig", "append_record", "check_record", "main", "run_benchmark"]

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Keys every record has; numbers among them must be positive (quick mode checks this).
REQUIRED_KEYS = (
    "model",
    "backend",
    "np",
    "batch_per_worker",
    "image_size",
    "threads_per_worker",
    "params",
    "images_per_sec",
    "step_time_mean_s",
    "step_time_p50_s",
    "step_time_p90_s",
    "allreduce_share",
    "cpu_count",
    "platform",
    "tf_version",
    "date",
)
_POSITIVE = ("np", "batch_per_worker", "image_size", "params", "images_per_sec", "step_time_mean_s")


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run; ``threads`` = TF threads per worker (0 keeps TF's default)."""

    model: str = "inception1"
    backend: str = "mpi"
    np: int = 2
    batch_size: int = 8
    image_size: int = 224
    steps: int = 10
    warmup: int = 2
    threads: int = 0
    classes: int = 1000
    fixed_head: bool = False

    def validate(self) -> None:
        from benchmarks.models import BUILDERS

        if self.model not in BUILDERS:
            raise SystemExit(f"--model {self.model!r}: choose one of {', '.join(BUILDERS)}")
        if self.backend not in ("tf", "mpi"):
            raise SystemExit(f"--backend {self.backend!r}: choose tf or mpi")
        for name in ("np", "batch_size", "image_size", "steps", "classes"):
            if getattr(self, name) < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise SystemExit("--warmup and --threads must be >= 0")


QUICK = BenchConfig(
    model="inception1", np=2, batch_size=4, image_size=32, steps=3, warmup=1, threads=1, classes=10
)


# ------------------------------------------------------------------ worker side


class _Timer:
    """Accumulates seconds spent in wrapped functions since the last ``reset``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, key: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

        return timed

    def reset(self) -> None:
        self.seconds = {}


def _hook_mpi_reduction(timer: _Timer) -> None:
    """Time ringtrain's gradient reduction from outside: collectives expose counts, not times.

    The optimizer's numpy_functions call ``_tf.collect`` (the wait for all buckets) and
    ``_tf.fused_allreduce`` (eagerly, or shapes unknown) by module global at run time, so
    replacing the attributes reaches them; likewise ``_engine._allreduce`` (one reduction,
    on whichever thread), ``_engine.check`` and ``fusion.pack``/``unpack``.
    """
    from ringtrain import fusion
    from ringtrain.collectives import _engine, _tf

    _tf.fused_allreduce = timer.wrap("blocking", _tf.fused_allreduce)
    _tf.collect = timer.wrap("wait", _tf.collect)
    _engine._allreduce = timer.wrap("busy", _engine._allreduce)
    _engine.check = timer.wrap("signature_check", _engine.check)
    fusion.pack = timer.wrap("pack", fusion.pack)
    fusion.unpack = timer.wrap("unpack", fusion.unpack)


def _shm_stats() -> dict[str, float]:
    """Cumulative seconds of the shared-memory allreduce's parts (empty on the MPI path)."""
    from ringtrain.collectives import _engine

    host = _engine.host_group()
    if host is None:
        return {}
    stats = host.group.stats()
    return {f"shm_{k[:-2]}": stats[k] for k in ("pack_s", "wait_s", "reduce_s", "cross_s", "unpack_s")}


def _worker(cfg: BenchConfig) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf

    import ringtrain
    from benchmarks.models import build

    strategy = ringtrain.tf.strategy() if cfg.backend == "tf" else None  # before any other TF op
    rank, size = ringtrain.rank(), ringtrain.size()
    keras = tf.keras  # tf-keras (TF_USE_LEGACY_KERAS=1): Keras 3's fit fails under MWMS
    if not keras.layers.Dense.__module__.startswith("tf_keras"):
        raise RuntimeError("tf.keras is not tf-keras in this worker; is TF_USE_LEGACY_KERAS=1 set?")
    timer = _Timer()
    if cfg.backend == "mpi":
        _hook_mpi_reduction(timer)

    # Synthetic data made here, once: input cost stays out of the step time.
    # MWMS splits each global batch across workers (sharding off: the data are random anyway).
    per_dataset_batch = cfg.batch_size * (size if strategy is not None else 1)
    rng = np.random.default_rng(rank)
    images = rng.random((per_dataset_batch, cfg.image_size, cfg.image_size, 3), dtype=np.float32)
    labels = rng.integers(0, cfg.classes, per_dataset_batch).astype(np.int32)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    dataset = (
        tf.data.Dataset.from_tensor_slices((images, labels))
        .repeat()
        .batch(per_dataset_batch, drop_remainder=True)
        .prefetch(2)
        .with_options(options)
    )

    def compiled_model() -> Any:
        model = build(
            cfg.model, cfg.image_size, cfg.classes, keras, **({"fixed_head": True} if cfg.fixed_head else {})
        )
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        if strategy is None:
            optimizer = ringtrain.keras.DistributedOptimizer(optimizer)
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", jit_compile=False)
        return model

    if strategy is not None:
        with strategy.scope():
            model = compiled_model()
    else:
        model = compiled_model()

    times: list[float] = []
    reduction: list[dict[str, float]] = []
    global_batch = cfg.batch_size * size

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            timer.reset()
            self.shm = _shm_stats()
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            # tf-keras hands this callback numpy logs, so the step has finished by now.
            elapsed = time.perf_counter() - self.start
            times.append(elapsed)
            shm = {k: v - self.shm.get(k, 0.0) for k, v in _shm_stats().items()}
            reduction.append(dict(timer.seconds) | shm)
            if rank == 0:
                tag = "warmup" if batch < cfg.warmup else "step"
                print(
                    f"{tag} {batch}: {elapsed * 1e3:.1f} ms, "
                    f"{global_batch / elapsed:.1f} images/sec (global)",
                    flush=True,
                )

    callbacks: list[Any] = [StepTimer()]
    if strategy is None:
        callbacks.insert(0, ringtrain.keras.BroadcastGlobalVariablesCallback(0))
    model.fit(dataset, epochs=1, steps_per_epoch=cfg.warmup + cfg.steps, verbose=0, callbacks=callbacks)
    return {
        "times": times[cfg.warmup :],
        "reduction": reduction[cfg.warmup :],
        "params": int(model.count_params()),
        "tf_version": tf.__version__,
    }


# ------------------------------------------------------------------ driver side


def _summarise(cfg: BenchConfig, per_rank: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    import numpy as np

    # Ranks meet in every allreduce, so the slowest rank sets each step's pace.
    steps = np.max(np.array([r["times"] for r in per_rank]), axis=0)
    global_batch = cfg.batch_size * cfg.np
    record: dict[str, Any] = {
        "model": cfg.model,
        "backend": cfg.backend,
        "np": cfg.np,
        "batch_per_worker": cfg.batch_size,
        "global_batch": global_batch,
        "image_size": cfg.image_size,
        "classes": cfg.classes,
        "fixed_head": cfg.fixed_head,
        "threads_per_worker": cfg.threads,
        "steps": cfg.steps,
        "warmup": cfg.warmup,
        "params": per_rank[0]["params"],
        "images_per_sec": global_batch / float(steps.mean()),
        "images_per_sec_per_step": [global_batch / float(t) for t in steps],
        "step_time_mean_s": float(steps.mean()),
        "step_time_p50_s": float(np.percentile(steps, 50)),
        "step_time_p90_s": float(np.percentile(steps, 90)),
    }
    if cfg.backend == "mpi":
        # Shares per rank = seconds / own step seconds; report the mean over ranks.
        exposed, busy, parts = [], [], {}
        keys = ("wait", "blocking", "busy", "signature_check", "pack", "unpack")
        keys += ("shm_pack", "shm_wait", "shm_reduce", "shm_cross", "shm_unpack")
        for r in per_rank:
            own = float(np.sum(r["times"]))
            total = {k: sum(s.get(k, 0.0) for s in r["reduction"]) for k in keys}
            exposed.append((total["wait"] + total["blocking"]) / own)
            busy.append(total["busy"] / own)
            for key in keys:
                parts.setdefault(key, []).append(total[key] / len(r["times"]))
        breakdown = {k: float(np.mean(v)) for k, v in parts.items()}
        record["allreduce_share"] = float(np.mean(exposed))
        record["allreduce_share_reason"] = (
            "time the training step waits for ringtrain's gradient reduction (communication not "
            "overlapped with backprop) / step time, mean over ranks"
        )
        record["allreduce_busy_share"] = float(np.mean(busy))
        record["allreduce_s_per_step"] = breakdown
    else:
        record["allreduce_share"] = None
        record["allreduce_share_reason"] = (
            "tf backend: MWMS runs the gradient all-reduce inside TF's collective executor, "
            "overlapped with backprop, with no hook to time it from Python"
        )
    record.update(
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        python=platform.python_version(),
        tf_version=per_rank[0]["tf_version"],
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        wall_s=wall,
    )
    return record


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Run one benchmark job and return its record (nothing is written)."""
    import ringtrain

    cfg.validate()
    # Workers inherit the environment: thread limit, quiet TF, and this checkout on the path
    # so they can import benchmarks.* (the worker function is pickled by reference).
    os.environ["RINGTRAIN_TF_THREADS"] = str(cfg.threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # ringtrain sets it for tf jobs only; the mpi run must train the same tf-keras model.
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if _ROOT not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([_ROOT, *[p for p in paths if p]])
    start = time.perf_counter()
    per_rank = ringtrain.run(_worker, cfg, num_proc=cfg.np, backend=cfg.backend, return_all=True)
    return _summarise(cfg, per_rank, time.perf_counter() - start)


def append_record(path: str, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (folders are created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def check_record(record: dict[str, Any]) -> None:
    """Raise ValueError unless ``record`` has every required key and sane positive numbers."""
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"benchmark record lacks {missing}")
    bad = [k for k in _POSITIVE if not (isinstance(record[k], int | float) and record[k] > 0)]
    if bad:
        raise ValueError(f"benchmark record has non-positive {bad}: {[record[k] for k in bad]}")
    share = record["allreduce_share"]
    if share is None:
        if not record.get("allreduce_share_reason"):
            raise ValueError("allreduce_share is null without a reason")
    elif not 0 <= share <= 1:
        raise ValueError(f"allreduce_share {share} is outside [0, 1]")


def format_record(r: dict[str, Any]) -> str:
    share = "n/a" if r["allreduce_share"] is None else f"{100 * r['allreduce_share']:.1f}%"
    if r.get("allreduce_busy_share") is not None:
        share += f" waited, {100 * r['allreduce_busy_share']:.1f}% busy"
    return (
        f"{r['model']} {r['backend']} N={r['np']} batch={r['batch_per_worker']}/worker {r['image_size']}px "
        f"threads={r['threads_per_worker']}: {r['images_per_sec']:.2f} images/sec, step mean "
        f"{r['step_time_mean_s'] * 1e3:.1f} ms (p50 {r['step_time_p50_s'] * 1e3:.1f}, "
        f"p90 {r['step_time_p90_s'] * 1e3:.1f}), allreduce share {share}"
    )


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, str, bool]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cnn", description=__doc__.splitlines()[0])
    d = BenchConfig()
    p.add_argument("--model", default=d.model, help="inception1, vgg16 or vgg19")
    p.add_argument("--backend", default=d.backend, help="tf or mpi")
    p.add_argument("-np", "--np", dest="np", type=int, default=d.np, help="worker processes")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per worker per step")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first")
    p.add_argument("--threads", type=int, default=d.threads, help="TF threads per worker (0: TF default)")
    p.add_argument("--classes", type=int, default=d.classes)
    p.add_argument(
        "--fixed-head", action="store_true", help="VGG: keep the canonical 7x7x512 classifier input"
    )
    p.add_argument("--results", default=os.path.join(_ROOT, "benchmarks", "results", "cnn.jsonl"))
    p.add_argument("--quick", action="store_true", help="tiny CI run (32 px, batch 4, 3 steps) with checks")
    ns = p.parse_args(argv)
    fields = {k: getattr(ns, k) for k in asdict(d)}
    cfg = replace(QUICK, backend=ns.backend, np=min(ns.np, 2)) if ns.quick else BenchConfig(**fields)
    return cfg, ns.results, ns.quick


def main(argv: list[str] | None = None) -> int:
    cfg, results, quick = parse_args(argv)
    record = run_benchmark(cfg)
    record["command"] = " ".join(["python -m benchmarks.cnn", *(sys.argv[1:] if argv is None else argv)])
    if quick:
        check_record(record)
    append_record(results, record)
    print(format_record(record), flush=True)
    return 0


if __name__ == "__main__":
    # Run the copy imported as benchmarks.cnn, so workers unpickle _worker by module name.
    from benchmarks import cnn

    sys.exit(cnn.main())
