"""The driver: launches one job and turns what the agents report into a result or an error."""

from __future__ import annotations

import logging
import os
import queue
import re
import secrets
import sys
import time
from dataclasses import replace
from functools import partial
from typing import TextIO

from .. import backends
from ..config import JobConfig
from ..errors import (
    BackendStartError,
    ChannelError,
    Failure,
    JobTimeoutError,
    RingtrainError,
    WorkerError,
)
from . import spark
from .agent import TaskJob, run_barrier_task
from .channel import ChannelServer
from .stage import BarrierStage

logger = logging.getLogger(__name__)


class LogPrinter:
    """Writes each worker line to the caller's stdout or stderr, prefixed with its rank."""

    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self._streams = {"stdout": stdout, "stderr": stderr}

    def __call__(self, rank: int, stream: str, line: str) -> None:
        out = self._streams.get(stream) or (sys.stdout if stream == "stdout" else sys.stderr)
        out.write(f"[{rank}] {line}\n")
        out.flush()


def launch(config: JobConfig, payload: bytes, printer: LogPrinter | None = None) -> dict[int, bytes | None]:
    """Run ``payload`` (a pickled worker task) on every worker; return pickled results by rank.

    With backend "auto", a backend that cannot start gives way to the next candidate,
    and the reason is logged; a named backend's failure is raised as it is.
    """
    session = spark.get_session(config)
    layout = spark.preflight(session, config)
    tried = backends.candidates(config.backend, layout.uses_gpus, backends.mpi_installed())
    for attempt, backend in enumerate(tried):
        try:
            return _launch_once(session, layout, replace(config, backend=backend), payload, printer)
        except BackendStartError as err:
            if attempt + 1 == len(tried):
                raise
            logger.warning(
                "backend %r could not start (%s); falling back to %r", backend, err, tried[attempt + 1]
            )
    raise AssertionError("unreachable: candidates() is never empty")


def _launch_once(
    session, layout: spark.Layout, config: JobConfig, payload: bytes, printer: LogPrinter | None
):
    driver_host = spark.driver_host(session)
    secret = secrets.token_bytes(32)
    with ChannelServer(secret) as server:
        job = TaskJob(
            driver=(driver_host, server.port),
            secret=secret,
            backend=config.backend,
            payload=payload,
            worker_env=_keras_env(config) | _thread_env(config) | dict(config.worker_env),
            kill_grace=config.kill_grace,
            show_tf_noise=config.show_tf_noise,
            gpus_per_worker=config.gpus_per_worker,
        )
        task_fn = partial(run_barrier_task, job)
        barrier = BarrierStage(session, layout.num_tasks, task_fn, profile=layout.profile)
        barrier.start()
        spark.await_slots(barrier, layout, config)
        supervisor = _Supervisor(server, barrier, layout, config, printer or LogPrinter())
        return supervisor.run()


def _keras_env(config: JobConfig) -> dict[str, str]:
    """tf.keras in workers is tf-keras unless the user chose otherwise (see RINGTRAIN_LEGACY_KERAS)."""
    default = "1" if config.legacy_keras else "0"
    return {"TF_USE_LEGACY_KERAS": os.environ.get("TF_USE_LEGACY_KERAS", default)}


def _thread_env(config: JobConfig) -> dict[str, str]:
    if not config.threads_per_worker:
        return {}
    n = str(config.threads_per_worker)
    return {"TF_NUM_INTRAOP_THREADS": n, "TF_NUM_INTEROP_THREADS": n, "OMP_NUM_THREADS": n}


class _Supervisor:
    """The driver's event loop: prints logs, gathers results, stops everything on failure."""

    def __init__(
        self,
        server: ChannelServer,
        barrier: BarrierStage,
        layout: spark.Layout,
        config: JobConfig,
        printer: LogPrinter,
    ):
        self.server = server
        self.barrier = barrier
        self.layout = layout
        self.config = config
        self.printer = printer
        self.results: dict[int, bytes | None] = {}
        self.failures: list[Failure] = []
        self.done_tasks: set[int] = set()
        self.backend_failure: str | None = None
        self.stopped = False
        self._barrier_done_at: float | None = None

    def run(self) -> dict[int, bytes | None]:
        try:
            self._wait(
                lambda: len(self.results) == self.layout.num_proc or self.failures or self.backend_failure,
                timeout=self.config.timeout,
            )
            if self.backend_failure:
                self._stop("the backend could not start")
                raise BackendStartError(f"backend {self.config.backend!r}: {self.backend_failure}")
            if not self.failures and len(self.results) < self.layout.num_proc:
                running = sorted(set(range(self.layout.num_proc)) - set(self.results))
                self._stop("the job timed out")
                raise JobTimeoutError(
                    f"the job did not finish within its {self.config.timeout:g} s timeout; ranks "
                    f"{running} were still running and have been stopped. Raise the timeout or look "
                    "for a rank stuck waiting on its peers"
                )
            if self.failures:
                self._stop("a worker failed")
                raise WorkerError(self._ordered_failures())
            # Every rank has a result: let the workers exit. Agents then drain their output
            # and say done; the Spark job ends with them.
            self.server.broadcast(("release",))
            self._wait(lambda: len(self.done_tasks) == self.layout.num_tasks, timeout=self.config.abort_wait)
            self._drain()
            # Let the stage end by itself: cancelling a finishing stage kills its Python
            # workers, and the session's next job then waits for fresh ones.
            self.barrier.join(self.config.abort_wait)
            return self.results
        except BaseException:
            self._stop("the driver is stopping the job")  # a no-op if already stopped
            raise
        finally:
            self.barrier.cancel()
            self.barrier.join(self.config.abort_wait)

    def _ordered_failures(self) -> list[Failure]:
        """First the failures that explain themselves (a traceback), then the rest, by arrival."""
        return sorted(self.failures, key=lambda f: 0 if f.traceback else 1)

    def _stop(self, reason: str) -> None:
        """Abort every agent and wait, briefly, for them to confirm their workers are gone."""
        if self.stopped:
            return
        self.stopped = True
        self.server.broadcast(("abort", reason))
        try:
            self._wait(
                lambda: len(self.done_tasks) == self.layout.num_tasks or self.barrier.done(),
                timeout=self.config.abort_wait,
            )
        except RingtrainError:
            pass
        self.barrier.cancel()

    def _wait(self, finished, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not finished():
            if deadline is not None and time.monotonic() >= deadline:
                return
            try:
                _, message = self.server.inbox.get(timeout=0.1)
            except queue.Empty:
                if self.barrier.done() and not finished() and self._agents_quiet():
                    self._drain()
                    if not finished():
                        raise self._job_ended_early() from None
                continue
            self._handle(message)

    def _agents_quiet(self) -> bool:
        """After the Spark job ended: have all agents finished sending (or had their chance)?

        An agent's last frames can still be in flight, or being unpickled, when its task
        has already ended, so the driver waits for every ``done``, up to ``abort_wait``.
        """
        if self._barrier_done_at is None:
            self._barrier_done_at = time.monotonic()
        if len(self.done_tasks) >= self.layout.num_tasks:
            return True
        return time.monotonic() - self._barrier_done_at >= self.config.abort_wait

    def _drain(self) -> None:
        while True:
            try:
                _, message = self.server.inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(message)

    def _handle(self, message) -> None:
        if message is None:
            return
        kind = message[0]
        if kind == "log":
            self.printer(*message[1:])
        elif kind == "result":
            self.results[message[1]] = message[2]
        elif kind == "failed":
            self.failures.append(Failure(*message[1:]))
        elif kind == "done":
            self.done_tasks.add(message[1])
        elif kind == "mpi_launch":
            # Partition 0's mpiexec printed one proxy command per task: hand them to every agent.
            self.server.broadcast(message)
        elif kind == "backend_failed":
            self.backend_failure = self.backend_failure or f"partition {message[1]}: {message[2]}"
        else:
            logger.warning("ignoring an unknown control message %r", kind)

    def _job_ended_early(self) -> RingtrainError:
        if self.failures:
            return WorkerError(self._ordered_failures())
        err = self.barrier.error
        if err is None:
            return ChannelError(
                f"the Spark job ended but only {len(self.results)} of {self.layout.num_proc} workers "
                "reported; see the executor logs"
            )
        return RingtrainError(f"the Spark barrier job failed before the workers finished: {_first_line(err)}")


def _first_line(err: BaseException) -> str:
    """The most telling line of a Spark job error: the Python exception raised in a task, if any."""
    text = str(err).strip()
    raised = re.findall(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception)): (.+)$", text, re.MULTILINE)
    python_side = [f"{name}: {msg}" for name, msg in raised if not name.startswith("Py4J")]
    if python_side:
        return python_side[-1]
    return text.splitlines()[0] if text else type(err).__name__
