"""The task agent: runs inside one Spark barrier task and owns that task's workers.

It joins the rendezvous, starts one fresh Python worker per assigned GPU (one on
CPU), forwards their output and results to the driver, and stops every worker it
started, whatever way the task ends.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .. import rendezvous
from . import channel
from .ports import PortReservation

logger = logging.getLogger(__name__)

PAYLOAD_FILE = "payload.pkl"


def result_file(workdir: str | Path, rank: int) -> Path:
    return Path(workdir) / f"result-{rank}.pkl"


def error_file(workdir: str | Path, rank: int) -> Path:
    return Path(workdir) / f"error-{rank}.txt"


# TensorFlow's C++ start-up lines (absl/glog format) at INFO and WARNING level, the
# absl pre-init notice, and the cuInit error every CPU-only worker prints.
_TF_NOISE = re.compile(
    r"^(?:[IW]\d{4} [\d:.]+\s+\d+ \S+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|E\d{4} .*(?:failed call to cuInit|Unable to register cu(?:DNN|FFT|BLAS) factory))"
)


def is_tf_noise(line: str) -> bool:
    return bool(_TF_NOISE.match(line))


@dataclass(frozen=True)
class TaskJob:
    """What the driver hands every barrier task, inside the Spark closure."""

    driver: tuple[str, int]
    secret: bytes = field(repr=False)
    backend: str
    payload: bytes = field(repr=False)
    worker_env: Mapping[str, str]
    kill_grace: float
    show_tf_noise: bool
    gpus_per_worker: int = 1


class WorkerProcess:
    """One worker child: started in its own session, its output forwarded line by line."""

    def __init__(
        self,
        spec: rendezvous.WorkerSpec,
        argv: list[str],
        env: dict[str, str],
        send: Callable[[tuple], None],
        show_tf_noise: bool,
    ):
        self.spec = spec
        self._send = send
        self._show_tf_noise = show_tf_noise
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._readers = [
            threading.Thread(target=self._forward, args=(self.proc.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._forward, args=(self.proc.stderr, "stderr"), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.reported = False

    def _forward(self, pipe, stream: str) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if stream == "stderr" and not self._show_tf_noise and is_tf_noise(line):
                continue
            try:
                self._send(("log", self.spec.rank, stream, line))
            except OSError:
                pass
        pipe.close()

    def drain(self, timeout: float = 5.0) -> None:
        """Wait for the output readers, so every line is sent before the exit report."""
        for reader in self._readers:
            reader.join(timeout)

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_workers(workers: list[WorkerProcess], grace: float) -> None:
    """SIGTERM each worker's process group, then SIGKILL whatever is left after ``grace``."""
    for w in workers:
        if w.poll() is None:
            w.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for w in workers:
        try:
            w.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for w in workers:
        # Also reaches grandchildren the worker left in its group.
        w.signal_group(signal.SIGKILL)
        w.proc.wait()


def worker_environ(job: TaskJob, spec: rendezvous.WorkerSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if job.backend == "tf" and "TF_USE_LEGACY_KERAS" not in job.worker_env:
        env.setdefault("TF_USE_LEGACY_KERAS", os.environ.get("TF_USE_LEGACY_KERAS", "1"))
    env.update(job.worker_env)
    env.update(spec.environ())
    env.update(
        RINGTRAIN_BACKEND=job.backend,
        RINGTRAIN_PARENT_PID=str(os.getpid()),
        PYTHONUNBUFFERED="1",
        # Lets the gRPC server take over the port this agent holds (see ports.py).
        TF_GRPC_REUSE_PORT="1",
        # The child sees the modules this task sees, including files added with addPyFile.
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
    )
    return env


class TaskAgent:
    """Runs one barrier task's share of the job. ``all_gather`` is the barrier's allGather."""

    def __init__(
        self, job: TaskJob, partition: int, gpus: tuple[str, ...], all_gather: Callable[[str], list[str]]
    ):
        self.job = job
        self.partition = partition
        self.gpus = gpus
        self._all_gather = all_gather
        self._abort = threading.Event()

    def run(self) -> None:
        conn = channel.connect(self.job.driver, self.job.secret)
        reservations: list[PortReservation] = []
        workers: list[WorkerProcess] = []
        workdir = tempfile.mkdtemp(prefix=f"ringtrain-p{self.partition}-")
        try:
            threading.Thread(target=self._listen, args=(conn,), daemon=True).start()
            per_worker = self.job.gpus_per_worker
            count = rendezvous.workers_per_task(self.gpus, per_worker)
            reservations = [PortReservation() for _ in range(count)]
            offer = rendezvous.TaskOffer(
                self.partition, conn.local_host(), tuple(r.port for r in reservations), self.gpus, per_worker
            )
            offers = [rendezvous.TaskOffer.from_json(s) for s in self._all_gather(offer.to_json())]
            specs = [s for s in rendezvous.plan(offers) if s.partition == self.partition]
            Path(workdir, PAYLOAD_FILE).write_bytes(self.job.payload)
            argv = [sys.executable, "-m", "ringtrain.worker", workdir]
            for spec in specs:
                env = worker_environ(self.job, spec)
                workers.append(WorkerProcess(spec, argv, env, conn.send, self.job.show_tf_noise))
            self._supervise(workers, conn, workdir)
        finally:
            stop_workers(workers, self.job.kill_grace)
            for r in reservations:
                r.close()
            shutil.rmtree(workdir, ignore_errors=True)
            try:
                conn.send(("done", self.partition))
            except OSError:
                pass
            conn.close()

    def _listen(self, conn: channel.Connection) -> None:
        """Any message from the driver is an abort; so is losing the driver."""
        try:
            message = conn.recv()
            logger.info("partition %s: driver asked to stop: %s", self.partition, message)
        except (OSError, EOFError):
            pass
        self._abort.set()

    def _supervise(self, workers: list[WorkerProcess], conn: channel.Connection, workdir: str) -> None:
        pending = list(workers)
        while pending:
            if self._abort.wait(0.05):
                return
            for w in [w for w in pending if w.poll() is not None]:
                pending.remove(w)
                w.drain()
                conn.send(self._report(w, workdir))
                if w.proc.returncode != 0:
                    # The job is failing: stop this task's other workers now rather
                    # than leave them waiting in a collective for the driver's abort.
                    return

    @staticmethod
    def _report(w: WorkerProcess, workdir: str) -> tuple:
        rank, code = w.spec.rank, w.proc.returncode
        if code == 0:
            path = result_file(workdir, rank)
            return ("result", rank, path.read_bytes() if path.exists() else None)
        path = error_file(workdir, rank)
        text = path.read_text(errors="replace") if path.exists() else ""
        signal_name = signal.Signals(-code).name if code < 0 else None
        return ("failed", rank, w.spec.host, None if code < 0 else code, signal_name, text)


def run_barrier_task(job: TaskJob, _rows) -> list[int]:
    """Entry point of each barrier task (passed to ``mapPartitions``)."""
    from pyspark import BarrierTaskContext

    ctx = BarrierTaskContext.get()
    resources = ctx.resources()
    gpus = tuple(resources["gpu"].addresses) if "gpu" in resources else ()
    TaskAgent(job, ctx.partitionId(), gpus, ctx.allGather).run()
    return [ctx.partitionId()]
