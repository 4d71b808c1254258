"""``ringtrain.run``: validate, package the function, hand it to the launcher."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from typing import Any

from .config import JobConfig
from .errors import ConfigError
from .launcher import driver
from .worker import FunctionTask, ScriptTask


def run(
    fn: Callable[..., Any],
    *args: Any,
    num_proc: int | None = None,
    backend: str = "auto",
    return_all: bool = False,
    timeout: float | None = None,
    max_restarts: int = 0,
    job_dir: str | None = None,
    data: Any = None,
    **kwargs: Any,
) -> Any:
    """Run ``fn(*args, **kwargs)`` on ``num_proc`` workers of a Spark barrier job.

    Each worker is a fresh Python process with its rank in the environment and a
    TF_CONFIG for MultiWorkerMirroredStrategy. ``backend`` is "tf" (the strategy's
    collectives: NCCL on GPU, RING on CPU), "mpi" (one MPI world for ringtrain's
    fused collectives) or "auto": tf where GPUs are assigned, mpi on CPU, each
    falling back to the other if it cannot start. Returns rank
    0's return value, or every rank's in rank order with ``return_all=True``
    (only the values asked for travel to the driver).

    ``timeout`` (seconds) bounds the whole call, restarts included: past it every
    worker is stopped and :class:`ringtrain.JobTimeoutError` is raised. A job whose
    worker fails (or whose executor is lost, or that stalls) is started again up to
    ``max_restarts`` times; inside ``fn``, :func:`ringtrain.restart_count` says which
    attempt this is, and :func:`ringtrain.job_dir` is a directory kept across attempts
    for checkpoints (``job_dir``: shared storage on a cluster; default
    ``RINGTRAIN_JOB_DIR`` or a new local directory). Raises
    :class:`ringtrain.WorkerError` naming the failing rank(s) if any worker fails;
    every other worker is stopped first.

    ``data`` is a Spark DataFrame (named ``"train"``) or a dict of named DataFrames to
    train on: their rows are dealt to the tasks and stored on each task's local disk
    before ``fn`` starts, and inside ``fn`` :func:`ringtrain.data.shard` gives each rank
    its rows, with the same number of steps per epoch on every rank. The job then runs on
    the DataFrames' Spark session. Bad data (not a DataFrame, an empty one, a column that
    cannot become a tensor) raises :class:`ringtrain.DataError` (a ConfigError for
    ``data`` of the wrong type) before any worker starts.

    Example::

        def train():
            import tensorflow as tf
            strategy = ringtrain.tf.strategy()
            with strategy.scope():
                model = tf.keras.Sequential([tf.keras.layers.Dense(1)])
                model.compile("sgd", "mse")
            return model.fit(x, y, epochs=2).history["loss"][-1]

        final_loss = ringtrain.run(train, num_proc=2)

        def fit(epochs):
            shard = ringtrain.data.shard()          # this rank's rows of df
            ...

        ringtrain.run(fit, 3, data=df, num_proc=2)
    """
    if not callable(fn):
        raise ConfigError(f"fn must be callable, got {type(fn).__name__}")
    config = JobConfig.from_env(
        num_proc=num_proc,
        backend=backend,
        timeout=timeout,
        max_restarts=max_restarts,
        job_dir=job_dir,
        results="all" if return_all else "0",
    )
    payload = serialize_task(FunctionTask(fn, args, kwargs))
    results = driver.launch(config, payload, data=data)
    values = [_load_result(results.get(rank)) for rank in sorted(results)]
    return values if return_all else values[0]


def run_script(
    script: str,
    *script_args: str,
    num_proc: int | None = None,
    backend: str = "auto",
    timeout: float | None = None,
    max_restarts: int = 0,
    job_dir: str | None = None,
    data: Any = None,
    worker_env: dict[str, str] | None = None,
) -> None:
    """Run a Python script on every worker, as ``ringtrain launch`` does, from Python.

    Each worker runs ``script`` as ``__main__`` with ``sys.argv = [script, *script_args]``,
    on the active Spark session (or ``SPARK_REMOTE``, or an embedded local one), like
    :func:`run`. ``data`` works as in :func:`run`: inside the script,
    ``ringtrain.data.shard()`` gives each rank its rows. ``worker_env`` is added to every
    worker's environment (``--env``). Returns when every rank has finished (``sys.exit(0)``
    counts as success); raises :class:`ringtrain.WorkerError` naming the failing rank(s)
    otherwise, and the other errors of :func:`run`. Unlike the command line, it leaves the
    Spark session running.

    Example::

        ringtrain.run_script("train.py", "--epochs", "3", data={"train": df}, num_proc=2)
    """
    from .cli import resolve_script

    if not isinstance(script, str | os.PathLike):
        raise ConfigError(f"script must be a path to a .py file, got {type(script).__name__}")
    path = resolve_script(os.fspath(script))
    if not all(isinstance(a, str) for a in script_args):
        raise ConfigError(f"script arguments must be str, got {[type(a).__name__ for a in script_args]}")
    config = JobConfig.from_env(
        num_proc=num_proc,
        backend=backend,
        timeout=timeout,
        max_restarts=max_restarts,
        job_dir=job_dir,
        worker_env=dict(worker_env or {}),
        results="none",
    )
    payload = serialize_task(ScriptTask.from_path(path, tuple(script_args)))
    driver.launch(config, payload, data=data)


def serialize_task(task: Any) -> bytes:
    """Pickle the worker task now, so an unpicklable fn fails before any job starts."""
    import cloudpickle

    try:
        return cloudpickle.dumps(task)
    except Exception as err:
        raise ConfigError(
            f"the function or its arguments cannot be pickled ({type(err).__name__}: {err}); "
            "workers run in separate processes, so create locks, sessions, sockets and open files "
            "inside fn rather than capturing them"
        ) from err


def _load_result(data: bytes | None) -> Any:
    if data is None:
        return None
    return pickle.loads(data)
