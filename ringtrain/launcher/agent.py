"""The task agent: runs inside one Spark barrier task and owns that task's workers.

It joins the rendezvous, starts one fresh Python worker per assigned GPU (one on
CPU), forwards their output and results to the driver, and stops every worker it
started, whatever way the task ends.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
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
from typing import TYPE_CHECKING

from .. import rendezvous
from ..errors import BackendError
from . import channel
from .ports import PortReservation

if TYPE_CHECKING:
    from .stage import StageTask

logger = logging.getLogger(__name__)

PAYLOAD_FILE = "payload.pkl"


def result_file(workdir: str | Path, rank: int) -> Path:
    return Path(workdir) / f"result-{rank}.pkl"


def error_file(workdir: str | Path, rank: int) -> Path:
    return Path(workdir) / f"error-{rank}.txt"


def release_file(workdir: str | Path) -> Path:
    """Created once every rank of the job has a result: until then finished workers wait."""
    return Path(workdir) / "release"


def status_file(workdir: str | Path, rank: int) -> Path:
    """Where an MPI rank's launcher shim records the rank's exit status."""
    return Path(workdir) / f"status-{rank}"


def output_fifo(workdir: str | Path, rank: int, stream: str) -> Path:
    """The FIFO an MPI rank writes its stdout or stderr into, read by its task agent."""
    return Path(workdir) / f"{stream}-{rank}.fifo"


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


class _OutputForwarder:
    """Sends a worker's output to the driver line by line, minus TF's start-up noise."""

    def __init__(self, rank: int, send: Callable[[tuple], None], show_tf_noise: bool):
        self._rank = rank
        self._send = send
        self._show_tf_noise = show_tf_noise
        self._readers: list[threading.Thread] = []

    def follow(self, open_pipe: Callable[[], object], stream: str) -> None:
        thread = threading.Thread(target=self._forward, args=(open_pipe, stream), daemon=True)
        thread.start()
        self._readers.append(thread)

    def _forward(self, open_pipe, stream: str) -> None:
        pipe = open_pipe()
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if stream == "stderr" and not self._show_tf_noise and is_tf_noise(line):
                continue
            try:
                self._send(("log", self._rank, stream, line))
            except OSError:
                pass
        pipe.close()

    def drain(self, timeout: float = 5.0) -> None:
        """Wait for the readers, so every line is sent before the worker's exit report."""
        for reader in self._readers:
            reader.join(timeout)


class WorkerProcess:
    """One worker child of the agent (tf backend), in its own session."""

    def __init__(
        self,
        spec: rendezvous.WorkerSpec,
        argv: list[str],
        env: dict[str, str],
        send: Callable[[tuple], None],
        show_tf_noise: bool,
    ):
        self.spec = spec
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._output = _OutputForwarder(spec.rank, send, show_tf_noise)
        self._output.follow(lambda: self.proc.stdout, "stdout")
        self._output.follow(lambda: self.proc.stderr, "stderr")

    def drain(self) -> None:
        self._output.drain()

    def poll(self) -> int | None:
        return self.proc.poll()

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class MpiRank:
    """One MPI rank of this task. Hydra's proxy starts it, not the agent, so the rank's
    launcher shim reports its exit status in a file and its output comes through FIFOs.

    Create it before the proxy starts (the shim opens the FIFOs at once), then attach the proxy.
    """

    def __init__(
        self, spec: rendezvous.WorkerSpec, workdir: str, send: Callable[[tuple], None], show_tf_noise: bool
    ):
        self.spec = spec
        self._workdir = workdir
        self._proxy: subprocess.Popen | None = None
        self._proxy_log: list[str] = []
        self._returncode: int | None = None
        self._fifos = [output_fifo(workdir, spec.rank, stream) for stream in ("stdout", "stderr")]
        for fifo in self._fifos:
            os.mkfifo(fifo)
        self._output = _OutputForwarder(spec.rank, send, show_tf_noise)
        for fifo, stream in zip(self._fifos, ("stdout", "stderr"), strict=True):
            # Opening a FIFO for reading blocks until the rank opens it, so do it in the reader.
            self._output.follow(lambda fifo=fifo: open(fifo, "rb"), stream)

    def attach(self, proxy: subprocess.Popen, proxy_log: list[str]) -> None:
        self._proxy = proxy
        self._proxy_log = proxy_log

    def poll(self) -> int | None:
        if self._returncode is None:
            status = status_file(self._workdir, self.spec.rank)
            proxy_gone = self._proxy is None or self._proxy.poll() is not None
            # Read the status after checking the proxy: a shim reports before its proxy exits.
            if status.exists():
                self._returncode = int(status.read_text())
            elif proxy_gone:
                # The proxy is gone and the rank's shim never reported: killed, or never started.
                self._returncode = -signal.SIGKILL
                tail = "\n".join(self._proxy_log[-20:])
                error = error_file(self._workdir, self.spec.rank)
                if tail and not error.exists():
                    error.write_text(
                        f"hydra_pmi_proxy ended before this rank reported; its last lines:\n{tail}\n"
                    )
        return self._returncode

    def drain(self) -> None:
        for fifo in self._fifos:
            # Unblocks a reader still waiting in open() for a rank that never started.
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        self._output.drain()


# Execs argv[2:] after asking Linux to SIGKILL it when the process that started it dies
# (the death signal survives exec). Run with -S, so it starts in milliseconds.
_EXEC_WITH_PARENT_DEATH = (
    "import ctypes, os, sys; "
    "ctypes.CDLL(None).prctl(1, 9); "
    "os.getppid() == int(sys.argv[1]) or os._exit(137); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def with_parent_death(argv: list[str]) -> list[str]:
    """``argv`` wrapped so it dies with this agent even if the agent is SIGKILLed.

    Hydra's mpiexec and proxies start in their own sessions and set no death signal, so
    without this they (and the ranks under them) would outlive an agent that Spark kills.
    """
    return [sys.executable, "-S", "-c", _EXEC_WITH_PARENT_DEATH, str(os.getpid()), *argv]


def _log_lines(pipe, source: str, keep: list[str]) -> None:
    for raw in iter(pipe.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip()
        logger.info("%s: %s", source, line)
        keep.append(line)
        del keep[:-50]
    pipe.close()


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
    env.update(job.worker_env)
    env.update(spec.environ())
    env.update(
        RINGTRAIN_BACKEND=job.backend,
        RINGTRAIN_PARENT_PID=str(os.getpid()),
        PYTHONUNBUFFERED="1",
        # Lets the gRPC server take over the port this agent holds (see ports.py).
        TF_GRPC_REUSE_PORT="1",
        # The child sees the modules this task sees, including files added with addPyFile,
        # after any PYTHONPATH the user gave the workers.
        PYTHONPATH=os.pathsep.join(p for p in [job.worker_env.get("PYTHONPATH", ""), *sys.path] if p),
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
        self._release = threading.Event()
        self._launch: queue.Queue = queue.Queue()
        self._cleanups: list[Callable[[], None]] = []

    def run(self) -> None:
        conn = channel.connect(self.job.driver, self.job.secret)
        workdir = tempfile.mkdtemp(prefix=f"ringtrain-p{self.partition}-")
        try:
            threading.Thread(target=self._listen, args=(conn,), daemon=True).start()
            per_worker = self.job.gpus_per_worker
            reservations = [
                PortReservation() for _ in range(rendezvous.workers_per_task(self.gpus, per_worker))
            ]
            self._cleanups.append(lambda: [r.close() for r in reservations])
            offer = rendezvous.TaskOffer(
                self.partition, conn.local_host(), tuple(r.port for r in reservations), self.gpus, per_worker
            )
            offers = [rendezvous.TaskOffer.from_json(s) for s in self._all_gather(offer.to_json())]
            specs = [s for s in rendezvous.plan(offers) if s.partition == self.partition]
            Path(workdir, PAYLOAD_FILE).write_bytes(self.job.payload)
            if self.job.backend == "mpi":
                workers = self._start_mpi(specs, offers, conn, workdir)
            elif importlib.util.find_spec("tensorflow") is None:
                conn.send(
                    ("backend_failed", self.partition, f"tensorflow is not installed for {sys.executable}")
                )
                workers = []
            else:
                workers = self._start_processes(specs, conn, workdir)
            if workers:
                self._supervise(workers, conn, workdir)
        finally:
            # Last registered, first undone: workers stop before their ports are released.
            for cleanup in reversed(self._cleanups):
                cleanup()
            shutil.rmtree(workdir, ignore_errors=True)
            try:
                conn.send(("done", self.partition))
            except OSError:
                pass
            conn.close()

    def _start_processes(self, specs, conn: channel.Connection, workdir: str) -> list[WorkerProcess]:
        argv = [sys.executable, "-m", "ringtrain.worker", workdir]
        workers: list[WorkerProcess] = []
        self._cleanups.append(lambda: stop_workers(workers, self.job.kill_grace))
        for spec in specs:
            env = worker_environ(self.job, spec)
            workers.append(WorkerProcess(spec, argv, env, conn.send, self.job.show_tf_noise))
        return workers

    def _start_mpi(self, specs, offers, conn: channel.Connection, workdir: str) -> list[MpiRank]:
        """Form the MPI world: partition 0 runs mpiexec, every task runs its own Hydra proxy."""
        from ..backends import _hydra

        ordered = sorted(offers, key=lambda o: o.partition)
        index = [o.partition for o in ordered].index(self.partition)
        if index == 0:
            try:
                cmd = with_parent_death(
                    _hydra.build_mpiexec_command(
                        [o.num_workers for o in ordered],
                        [sys.executable, "-m", "ringtrain.worker"],
                        control_host=conn.local_host(),
                    )
                )
                launch = _hydra.start_mpiexec(cmd, on_line=lambda line: logger.info("mpiexec: %s", line))
                self._cleanups.append(lambda: launch.terminate(self.job.kill_grace))
                launch_info = json.dumps({"proxies": launch.proxies})
            except BackendError as err:
                launch_info = json.dumps({"error": str(err)})
            # Relayed to every agent by the driver: a barrier allGather would cost a second,
            # since Spark checks its barrier futures once a second.
            conn.send(("mpi_launch", launch_info))
        info = self._wait_for_launch()
        if info is None:
            return []
        if "error" in info:
            conn.send(("backend_failed", self.partition, info["error"]))
            return []
        env = worker_environ(self.job, specs[0])
        env.update(
            RINGTRAIN_WORKDIR=workdir,
            # Hydra starts every local rank with this one environment; each rank's shim
            # picks its own placement from this table by PMI_RANK.
            RINGTRAIN_LOCAL_ENVS=json.dumps({str(s.rank): s.environ() for s in specs}),
            RINGTRAIN_PARENT_PID="0",
        )
        ranks = [MpiRank(spec, workdir, conn.send, self.job.show_tf_noise) for spec in specs]
        try:
            proxy = _hydra.start_proxy(
                with_parent_death(info["proxies"][index]),
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except BackendError as err:
            conn.send(("backend_failed", self.partition, str(err)))
            return []
        self._cleanups.append(lambda: _hydra.terminate_group(proxy, self.job.kill_grace))
        # Hydra's own diagnostics (teardown complaints included) go to the executor log, not
        # into the user's output; the tail explains a rank that never reported.
        proxy_log: list[str] = []
        threading.Thread(
            target=_log_lines, args=(proxy.stdout, "hydra proxy", proxy_log), daemon=True
        ).start()
        for rank in ranks:
            rank.attach(proxy, proxy_log)
        return ranks

    def _listen(self, conn: channel.Connection) -> None:
        """Takes the driver's release and MPI launch relay; anything else is an abort, and so is
        losing the driver."""
        try:
            while True:
                message = conn.recv()
                if message[0] == "release":
                    self._release.set()
                    continue
                if message[0] != "mpi_launch":
                    logger.info("partition %s: driver asked to stop: %s", self.partition, message)
                    break
                self._launch.put(json.loads(message[1]))
        except (OSError, EOFError):
            pass
        self._abort.set()

    def _wait_for_launch(self) -> dict | None:
        """Partition 0's proxy commands (or why there are none); None if the job is aborted first."""
        while not self._abort.is_set():
            try:
                return self._launch.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def _supervise(self, workers: list, conn: channel.Connection, workdir: str) -> None:
        """Report each worker's result as soon as it is written, and failures as they happen.

        A worker with a result stays alive until the driver releases the job (every rank
        has a result): a peer may still be pulling the last collective's buffers from it.
        """
        pending = list(workers)
        reported: set[int] = set()
        while pending:
            aborted = self._abort.wait(0.05)
            if self._release.is_set() and not release_file(workdir).exists():
                release_file(workdir).touch()
            for w in pending:
                if w.spec.rank not in reported and result_file(workdir, w.spec.rank).exists():
                    reported.add(w.spec.rank)
                    conn.send(("result", w.spec.rank, result_file(workdir, w.spec.rank).read_bytes()))
            # Report what already ended even when aborting: it may be the root cause.
            for w in [w for w in pending if w.poll() is not None]:
                pending.remove(w)
                w.drain()
                if w.spec.rank not in reported:
                    conn.send(self._report(w, workdir))
                if w.poll() != 0:
                    # The job is failing: stop this task's other workers now rather
                    # than leave them waiting in a collective for the driver's abort.
                    return
            if aborted:
                return

    @staticmethod
    def _report(w: WorkerProcess | MpiRank, workdir: str) -> tuple:
        rank, code = w.spec.rank, w.poll()
        if code == 0:
            path = result_file(workdir, rank)
            return ("result", rank, path.read_bytes() if path.exists() else None)
        path = error_file(workdir, rank)
        text = path.read_text(errors="replace") if path.exists() else ""
        signal_name = signal.Signals(-code).name if code < 0 else None
        return ("failed", rank, w.spec.host, None if code < 0 else code, signal_name, text)


def run_barrier_task(job: TaskJob, task: StageTask) -> None:
    """Entry point of each barrier task (run by the launch stage, see stage.py)."""
    TaskAgent(job, task.partition, task.gpus, task.all_gather).run()
