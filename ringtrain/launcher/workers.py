"""A task's workers behind one interface: plain processes, or the MPI ranks of a Hydra proxy.

:class:`WorkerGroup` is what the task agent supervises: start the workers, poll each
rank's exit status, drain its output, stop them all. :class:`ProcessGroup` starts one
``python -m ringtrain.worker`` per rank itself (tf backend). :class:`MpiGroup` forms the
MPI world with Hydra's manual launcher (partition 0 runs mpiexec, every task its own
proxy); the proxy, not the agent, starts the ranks, so each rank's launcher shim
reports its exit status in a file and its output comes through FIFOs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from .. import progress
from ..errors import BackendError, BackendStartError
from ..protocol import STACK_SIGNAL, MpiLaunch, WorkDir
from ..rendezvous import TaskOffer, WorkerSpec
from ..worker import PLACEMENT_ARG

logger = logging.getLogger(__name__)

# What a worker learns only with its placement, after the rendezvous; everything else in its
# environment is fixed before, when it starts (CUDA_VISIBLE_DEVICES included: TF reads it
# when it first looks for devices, and a spare worker has imported TF already).
PLACEMENT_KEYS = frozenset(
    {
        "RANK",
        "SIZE",
        "LOCAL_RANK",
        "LOCAL_SIZE",
        "TF_CONFIG",
        "RINGTRAIN_RESTART_COUNT",
        "RINGTRAIN_JOB_DIR",
        "RINGTRAIN_RESULTS",
        "RINGTRAIN_DATA_DIR",
    }
)

# Receives each line a worker writes: (rank, "stdout" | "stderr", line without newline).
OutputSink = Callable[[int, str, str], None]


class _LineReaders:
    """Threads that read a worker's pipes line by line into an :data:`OutputSink`.

    A worker started before the rendezvous has no rank yet: its lines wait here until
    :meth:`place` gives it one.
    """

    def __init__(self, rank: int | None, sink: OutputSink):
        self._rank = rank
        self._sink = sink
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._early: list[tuple[str, str]] = []

    def place(self, rank: int) -> None:
        with self._lock:
            self._rank = rank
            early, self._early = self._early, []
        for stream, line in early:
            self._sink(rank, stream, line)

    def follow(self, open_pipe: Callable[[], BinaryIO], stream: str) -> None:
        thread = threading.Thread(target=self._read, args=(open_pipe, stream), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _read(self, open_pipe: Callable[[], BinaryIO], stream: str) -> None:
        pipe = open_pipe()
        for raw in iter(pipe.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            with self._lock:
                rank = self._rank
                if rank is None:
                    self._early.append((stream, line))
                    continue
            self._sink(rank, stream, line)
        pipe.close()

    def join(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class WorkerGroup(ABC):
    """The workers of one task. Ranks are those of ``specs``; exit codes follow Popen's
    convention (negative: killed by that signal)."""

    def __init__(self, specs: Sequence[WorkerSpec], files: WorkDir, sink: OutputSink):
        self.specs = list(specs)
        self.files = files
        self.sink = sink

    @property
    def ranks(self) -> list[int]:
        return [s.rank for s in self.specs]

    def spec(self, rank: int) -> WorkerSpec:
        return next(s for s in self.specs if s.rank == rank)

    @abstractmethod
    def start(self) -> bool:
        """Start every worker; False if the job was aborted first. BackendStartError if it cannot."""

    @abstractmethod
    def poll(self, rank: int) -> int | None:
        """The rank's exit code, or None while it runs."""

    @abstractmethod
    def drain(self, rank: int) -> None:
        """Wait (briefly) until every line the ended rank wrote has reached the sink."""

    def stop(self, grace: float) -> None:
        """SIGTERM every worker still running, SIGKILL whatever is left after ``grace`` seconds.

        A worker that is blocked (see :func:`is_blocked`) cannot run its SIGTERM handler,
        since its peers are being stopped too; it is SIGKILLed as soon as that is clear
        rather than after the whole grace.
        """
        sent_at = time.monotonic()
        signalled = [r for r in self.ranks if self.poll(r) is None and self._signal(r, signal.SIGTERM)]
        deadline = sent_at + grace
        while time.monotonic() < deadline:
            live = [r for r in signalled if self.poll(r) is None]
            if not live:
                break
            now = time.monotonic()
            for rank in live:
                if is_blocked(progress.read(self.files.progress(rank)), sent_at, now):
                    self._signal(rank, signal.SIGKILL)
            time.sleep(0.05)
        self._finish_stop()

    @abstractmethod
    def _signal(self, rank: int, sig: int) -> bool:
        """Send ``sig`` to the rank's process (and what it started in its group); False if gone."""

    @abstractmethod
    def _finish_stop(self) -> None:
        """SIGKILL whatever is left of the group and wait for it."""

    def pid(self, rank: int) -> int | None:
        """The pid of the process running the rank's ``fn``, from its progress file."""
        snap = progress.read(self.files.progress(rank))
        return snap.pid if snap else None

    def stacks(self, rank: int, wait: float = 2.0) -> str:
        """Every Python thread's stack of a running rank, main thread first (faulthandler).

        Works while the rank is stuck in native code. Only a rank whose progress file exists
        is signalled: it registered the stack handler before creating that file.
        """
        snap = progress.read(self.files.progress(rank))
        if snap is None or self.poll(rank) is not None:
            return "(no stack: the worker has not started Python yet, or has ended)"
        path = self.files.stacks(rank)
        path.write_bytes(b"")
        try:
            os.kill(snap.pid, STACK_SIGNAL)
        except ProcessLookupError:
            return "(no stack: the worker has ended)"
        deadline = time.monotonic() + wait
        size = -1
        while time.monotonic() < deadline:  # done once the dump stops growing
            time.sleep(0.05)
            now_size = path.stat().st_size if path.exists() else 0
            if now_size and now_size == size:
                break
            size = now_size
        text = path.read_text(errors="replace") if path.exists() else ""
        return format_stacks(text, snap.main_thread) if text else "(no stack: the worker did not answer)"


def format_stacks(dump: str, main_thread: int) -> str:
    """faulthandler's dump with the main thread first and ringtrain's own threads left out."""
    blocks = [b.strip("\n") for b in re.split(r"\n\s*\n", dump) if b.strip()]
    marker = f"0x{main_thread:016x}"
    main = [b for b in blocks if marker in b.splitlines()[0]]
    others = [b for b in blocks if b not in main and "ringtrain/worker/_watch.py" not in b]
    return "\n\n".join(main + others)


# How long after SIGTERM a worker may take to start handling it.
BLOCKED_AFTER = 1.5


def is_blocked(snap: progress.Snapshot | None, sigterm_at: float, now: float) -> bool:
    """Whether a worker sent SIGTERM at ``sigterm_at`` cannot act on it (times: monotonic).

    Its handler has not run ``BLOCKED_AFTER`` seconds later, and it is inside a ringtrain
    collective or (by a sample taken after the signal) inside a TensorFlow call. Python
    runs signal handlers only between bytecodes, so such a worker cannot even start its
    clean-up, and with its peers stopping, the call will not return. A worker that is
    running Python (a user's own handler writing a checkpoint, say) is never "blocked".
    """
    if snap is None or now - sigterm_at < BLOCKED_AFTER or snap.stopping_at >= sigterm_at:
        return False
    if snap.entered_at:
        return True
    return bool(snap.runtime_since) and snap.beat_at > sigterm_at


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Waiting:
    """A worker process started ahead of its placement (see :class:`WorkerPool`)."""

    proc: subprocess.Popen
    env: dict[str, str]  # what it was started with: its early environment
    readers: _LineReaders
    spare: bool = False  # started by a spare keeper, before its job was known


class WorkerPool:
    """Worker interpreters started before the rendezvous, one per slot of the task, each
    waiting on stdin for its placement (``python -m ringtrain.worker --placement``).

    Their interpreter start, and the imports named in RINGTRAIN_PREIMPORT, so overlap the
    rendezvous. A spare keeper fills a pool between jobs (:meth:`spare`); the next job takes
    a spare worker only if it was started with exactly the environment that job's worker
    would get (the placement adds only rank, size, TF_CONFIG and the job's own paths), so a
    worker never runs under settings it was not started with. Everything not taken is killed.
    """

    def __init__(self, sink: OutputSink | None = None):
        self.sink: OutputSink = sink or (lambda rank, stream, line: None)
        self._waiting: dict[int, Waiting] = {}
        self.adopted = 0  # spares taken by a job (for logs and tests)

    def spare(self, envs: Sequence[dict[str, str]]) -> None:
        """Start one waiting worker per environment, for a job that has not come yet."""
        for slot, env in enumerate(envs):
            self._waiting[slot] = self._start(env, spare=True)

    def prepare(self, envs: Sequence[dict[str, str]]) -> None:
        """Make slot ``i`` a worker started with ``envs[i]``: a matching spare, else a fresh one."""
        for slot, env in enumerate(envs):
            self._waiting[slot] = self._matching(self._waiting.pop(slot, None), env, slot)
        for slot in sorted(set(self._waiting) - set(range(len(envs)))):
            _kill_waiting(self._waiting.pop(slot))

    def take(self, slot: int, env: dict[str, str]) -> Waiting:
        """Slot ``slot``'s worker if it was started with ``env``, else a fresh one that is."""
        return self._matching(self._waiting.pop(slot, None), env, slot)

    def _matching(self, waiting: Waiting | None, env: dict[str, str], slot: int) -> Waiting:
        if waiting is not None and waiting.proc.poll() is None and waiting.env == env:
            if waiting.spare:
                waiting.spare = False
                self.adopted += 1
            return waiting
        if waiting is not None:
            differ = sorted(k for k in set(env) | set(waiting.env) if env.get(k) != waiting.env.get(k))
            logger.info("worker of slot %d started anew: its environment differs in %s", slot, differ)
            _kill_waiting(waiting)
        return self._start(env)

    def _start(self, env: dict[str, str], spare: bool = False) -> Waiting:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ringtrain.worker", PLACEMENT_ARG],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        readers = _LineReaders(None, lambda rank, stream, line: self.sink(rank, stream, line))
        readers.follow(lambda: proc.stdout, "stdout")
        readers.follow(lambda: proc.stderr, "stderr")
        return Waiting(proc, dict(env), readers, spare)

    def close(self) -> None:
        """Kill every worker nobody took (they have run no user code)."""
        for slot in list(self._waiting):
            _kill_waiting(self._waiting.pop(slot))


def _kill_waiting(waiting: Waiting) -> None:
    _signal_group(waiting.proc.pid, signal.SIGKILL)
    waiting.proc.wait()


class ProcessGroup(WorkerGroup):
    """One worker process per rank, each in its own session (tf backend).

    ``pool`` holds the workers started ahead (slot ``i`` is the task's ``i``-th rank);
    ``environ(spec)`` is each worker's whole environment, of which the pool's worker already
    has everything but :data:`PLACEMENT_KEYS`, sent with its placement.
    """

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        files: WorkDir,
        sink: OutputSink,
        environ: Callable[[WorkerSpec], dict[str, str]],
        pool: WorkerPool | None = None,
    ):
        super().__init__(specs, files, sink)
        self._environ = environ
        self._pool = pool or WorkerPool()
        self._procs: dict[int, subprocess.Popen] = {}
        self._readers: dict[int, _LineReaders] = {}

    def start(self) -> bool:
        self._pool.sink = self.sink
        for slot, spec in enumerate(self.specs):
            env = self._environ(spec)
            waiting = self._pool.take(slot, {k: v for k, v in env.items() if k not in PLACEMENT_KEYS})
            placement = {
                "workdir": str(self.files.path),
                "env": {k: env[k] for k in PLACEMENT_KEYS if k in env},
            }
            try:
                assert waiting.proc.stdin is not None
                waiting.proc.stdin.write(json.dumps(placement).encode() + b"\n")
                waiting.proc.stdin.close()
            except OSError:
                pass  # it died waiting: poll() reports how
            self._procs[spec.rank] = waiting.proc
            waiting.readers.place(spec.rank)
            self._readers[spec.rank] = waiting.readers
        return True

    def poll(self, rank: int) -> int | None:
        return self._procs[rank].poll()

    def drain(self, rank: int) -> None:
        self._readers[rank].join()

    def pid(self, rank: int) -> int | None:
        proc = self._procs.get(rank)
        return proc.pid if proc is not None and proc.poll() is None else None

    def _signal(self, rank: int, sig: int) -> bool:
        proc = self._procs.get(rank)
        if proc is None or proc.poll() is not None:
            return False
        _signal_group(proc.pid, sig)
        return True

    def _finish_stop(self) -> None:
        for proc in self._procs.values():
            _signal_group(proc.pid, signal.SIGKILL)  # also reaches what a worker left in its group
            proc.wait()
        self._pool.close()


class MpiRelay(ABC):
    """How partition 0's proxy commands reach every agent (through the driver)."""

    @abstractmethod
    def publish(self, launch: MpiLaunch) -> None: ...

    @abstractmethod
    def wait(self) -> MpiLaunch | None:
        """The relayed launch, or None if the job is aborted first."""


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
    without this they (and the ranks under them) would outlive an agent that is killed.
    """
    return [sys.executable, "-S", "-c", _EXEC_WITH_PARENT_DEATH, str(os.getpid()), *argv]


class MpiGroup(WorkerGroup):
    """This task's MPI ranks: partition 0 runs mpiexec, every task runs its own Hydra proxy.

    ``index`` is this task's position among the partitions, ``counts`` every partition's
    rank count in partition order; ``environ`` is the environment all local ranks share.
    """

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        files: WorkDir,
        sink: OutputSink,
        offers: Sequence[TaskOffer],
        partition: int,
        environ: dict[str, str],
        relay: MpiRelay,
        control_host: str,
    ):
        super().__init__(specs, files, sink)
        ordered = sorted(offers, key=lambda o: o.partition)
        self._counts = [o.num_workers for o in ordered]
        self._index = [o.partition for o in ordered].index(partition)
        self._environ = environ
        self._relay = relay
        self._control_host = control_host
        self._mpiexec = None
        self._proxy: subprocess.Popen | None = None
        self._proxy_log: list[str] = []
        self._codes: dict[int, int] = {}
        self._readers: dict[int, _LineReaders] = {}

    def start(self) -> bool:
        from ..backends import _hydra

        if self._index == 0:
            try:
                cmd = with_parent_death(
                    _hydra.build_mpiexec_command(
                        self._counts,
                        [sys.executable, "-m", "ringtrain.worker"],
                        control_host=self._control_host,
                    )
                )
                self._mpiexec = _hydra.start_mpiexec(
                    cmd, on_line=lambda line: logger.info("mpiexec: %s", line)
                )
                launch = MpiLaunch(proxies=tuple(tuple(p) for p in self._mpiexec.proxies))
            except BackendError as err:
                launch = MpiLaunch(error=str(err))
            self._relay.publish(launch)
        relayed = self._relay.wait()
        if relayed is None:
            return False
        if relayed.error:
            raise BackendStartError(relayed.error)
        env = dict(self._environ)
        env.update(
            RINGTRAIN_WORKDIR=str(self.files.path),
            # Hydra starts every local rank with this one environment; each rank's shim
            # picks its own placement from this table by PMI_RANK.
            RINGTRAIN_LOCAL_ENVS=json.dumps({str(s.rank): s.environ() for s in self.specs}),
            RINGTRAIN_PARENT_PID="0",
        )
        # The FIFOs exist before the proxy starts: each rank's shim opens them at once.
        for spec in self.specs:
            readers = _LineReaders(spec.rank, self.sink)
            for stream in ("stdout", "stderr"):
                fifo = self.files.fifo(spec.rank, stream)
                os.mkfifo(fifo)
                # Opening a FIFO for reading blocks until the rank opens it, so do it in the reader.
                readers.follow(lambda fifo=fifo: open(fifo, "rb"), stream)
            self._readers[spec.rank] = readers
        self._proxy = _hydra.start_proxy(
            with_parent_death(list(relayed.proxies[self._index])),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        # Hydra's own diagnostics (teardown complaints included) go to the executor log, not
        # into the user's output; the tail explains a rank that never reported.
        threading.Thread(target=self._log_proxy, daemon=True).start()
        return True

    def _log_proxy(self) -> None:
        assert self._proxy is not None and self._proxy.stdout is not None
        for raw in iter(self._proxy.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip()
            logger.info("hydra proxy: %s", line)
            self._proxy_log.append(line)
            del self._proxy_log[:-50]
        self._proxy.stdout.close()

    def poll(self, rank: int) -> int | None:
        if rank in self._codes:
            return self._codes[rank]
        status = self.files.status(rank)
        proxy_gone = self._proxy is None or self._proxy.poll() is not None
        # Read the status after checking the proxy: a shim reports before its proxy exits.
        if status.exists():
            self._codes[rank] = int(status.read_text())
        elif proxy_gone:
            # The proxy is gone and the rank's shim never reported: killed, or never started.
            self._codes[rank] = -signal.SIGKILL
            tail = "\n".join(self._proxy_log[-20:])
            error = self.files.error(rank)
            if tail and not error.exists():
                error.write_text(
                    f"hydra_pmi_proxy ended before this rank reported; its last lines:\n{tail}\n"
                )
        return self._codes.get(rank)

    def drain(self, rank: int) -> None:
        for stream in ("stdout", "stderr"):
            # Unblocks a reader still waiting in open() for a rank that never started.
            try:
                os.close(os.open(self.files.fifo(rank, stream), os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        readers = self._readers.get(rank)
        if readers is not None:
            readers.join()

    def _signal(self, rank: int, sig: int) -> bool:
        # The rank itself, so it can handle SIGTERM (checkpoint, atexit) before Hydra tears
        # the world down; Hydra ignores SIGTERM, and the rank's shim only reports.
        pid = self.pid(rank)
        if not pid:
            return False
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _finish_stop(self) -> None:
        from ..backends import _hydra

        if self._proxy is not None:
            _hydra.terminate_group(self._proxy, grace=1.0)
        if self._mpiexec is not None:
            self._mpiexec.terminate(1.0)
        remove_mpi_segments(self.files)


def remove_mpi_segments(files: WorkDir) -> list[str]:
    """Unlink the shared-memory files the MPI library of the (ended) ranks of this working
    directory left in /dev/shm.

    MPICH removes its segments in MPI_Finalize only; a job whose ranks were killed or
    stopped would otherwise leave them behind for good (about 1 MB each, two per host and
    job here), until a small /dev/shm (64 MiB in many containers) is full. Each name is
    unique to one MPI job, and every rank of it on this host has ended, so nothing else
    uses them. Returns what was removed.
    """
    removed: list[str] = []
    for noted in files.every_mpi_segments():
        try:
            names = noted.read_text().split()
        except OSError:
            continue
        for name in names:
            if not name.startswith("/dev/shm/") or "/" in name[len("/dev/shm/") :]:
                continue  # only files directly in /dev/shm
            try:
                os.unlink(name)
            except OSError:
                continue  # already gone: MPI_Finalize removed it, or a peer task's agent did
            removed.append(name)
    if removed:
        logger.info("removed the MPI library's shared memory left by ended ranks: %s", removed)
    return removed
