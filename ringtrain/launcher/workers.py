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
from typing import BinaryIO

from .. import progress
from ..errors import BackendError, BackendStartError
from ..protocol import STACK_SIGNAL, MpiLaunch, WorkDir
from ..rendezvous import TaskOffer, WorkerSpec

logger = logging.getLogger(__name__)

# Receives each line a worker writes: (rank, "stdout" | "stderr", line without newline).
OutputSink = Callable[[int, str, str], None]


class _LineReaders:
    """Threads that read a worker's pipes line by line into an :data:`OutputSink`."""

    def __init__(self, rank: int, sink: OutputSink):
        self._rank = rank
        self._sink = sink
        self._threads: list[threading.Thread] = []

    def follow(self, open_pipe: Callable[[], BinaryIO], stream: str) -> None:
        thread = threading.Thread(target=self._read, args=(open_pipe, stream), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _read(self, open_pipe: Callable[[], BinaryIO], stream: str) -> None:
        pipe = open_pipe()
        for raw in iter(pipe.readline, b""):
            self._sink(self._rank, stream, raw.decode("utf-8", errors="replace").rstrip("\n"))
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


class ProcessGroup(WorkerGroup):
    """One worker process per rank, each in its own session (tf backend)."""

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        files: WorkDir,
        sink: OutputSink,
        environ: Callable[[WorkerSpec], dict[str, str]],
    ):
        super().__init__(specs, files, sink)
        self._environ = environ
        self._procs: dict[int, subprocess.Popen] = {}
        self._readers: dict[int, _LineReaders] = {}

    def start(self) -> bool:
        argv = [sys.executable, "-m", "ringtrain.worker", str(self.files.path)]
        for spec in self.specs:
            proc = subprocess.Popen(
                argv,
                env=self._environ(spec),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            self._procs[spec.rank] = proc
            readers = _LineReaders(spec.rank, self.sink)
            readers.follow(lambda proc=proc: proc.stdout, "stdout")
            readers.follow(lambda proc=proc: proc.stderr, "stderr")
            self._readers[spec.rank] = readers
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
