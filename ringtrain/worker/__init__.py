"""The worker process: a fresh Python started by a task agent for one rank.

``python -m ringtrain.worker WORKDIR`` loads the job's payload from WORKDIR, runs
it, and leaves the return value or the traceback there for the agent.

``python -m ringtrain.worker --placement`` is started before the rendezvous: it imports
what RINGTRAIN_PREIMPORT names (the heavy modules the task's previous job used, such as
tensorflow), then waits for one JSON line on stdin, ``{"workdir": ..., "env": {...}}``,
which gives it its place in the job (rank, TF_CONFIG, ...). Its interpreter start and
imports so overlap the rendezvous, or, in a spare worker, happen between jobs.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RingtrainError
from ..protocol import MAX_RESULT_BYTES, WorkDir, write_atomic
from . import _watch

PR_SET_PDEATHSIG = 1

# The argument that starts a worker which waits for its placement on stdin.
PLACEMENT_ARG = "--placement"

# Modules slow enough to import that a worker started ahead of its job imports them early
# if the task's previous job used them (tensorflow alone takes 2.5-6 s here). mpi4py is
# never among them: importing it joins an MPI world.
PREIMPORTABLE = ("numpy", "tensorflow", "tf_keras", "keras")


@dataclass(frozen=True)
class FunctionTask:
    """Call ``fn(*args, **kwargs)`` and return its value to the driver."""

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __call__(self) -> Any:
        return self.fn(*self.args, **self.kwargs)


@dataclass(frozen=True)
class ScriptTask:
    """Run a Python script as ``__main__`` with the given argv.

    The script's source travels with the task: an executor host without the file at
    ``path`` runs the shipped copy from the worker's directory instead.
    """

    path: str
    argv: tuple[str, ...] = ()
    source: bytes = field(default=b"", repr=False)

    @classmethod
    def from_path(cls, path: str, argv: tuple[str, ...] = ()) -> ScriptTask:
        resolved = str(Path(path).resolve())
        return cls(resolved, tuple(argv), Path(resolved).read_bytes())

    def __call__(self) -> None:
        import runpy

        path = self.path
        if not Path(path).is_file() and self.source:
            # Each rank its own copy, written atomically: local ranks share the workdir.
            folder = WorkDir(os.environ["RINGTRAIN_WORKDIR"]).script_dir(int(os.environ["RANK"]))
            folder.mkdir(exist_ok=True)
            path = str(folder / Path(self.path).name)
            write_atomic(Path(path), self.source)
        sys.argv = [path, *self.argv]
        sys.path.insert(0, str(Path(path).parent))
        runpy.run_path(path, run_name="__main__")


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its task agent dies, however it dies."""
    parent = int(os.environ.get("RINGTRAIN_PARENT_PID", "0"))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    # The agent may have died before prctl took effect.
    if parent and os.getppid() != parent:
        os._exit(128 + signal.SIGKILL)


# glibc mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


def tune_malloc() -> bool:
    """Keep freed large blocks in the heap, so per-step gradient buffers reuse faulted pages.

    By default glibc maps every block over 128 KiB fresh and unmaps it on free, so each
    training step's new gradient arrays page-fault all over again: unpacking a 102 MB
    fused buffer into fresh arrays took 33.7 ms against 10.4 ms into reused ones. Blocks
    up to 32 MiB then come from the heap, and the heap is not trimmed back.
    RINGTRAIN_MALLOC_REUSE=0 turns this off. Returns whether it was applied.
    """
    from .. import env

    if not env.get("RINGTRAIN_MALLOC_REUSE"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def become_mpi_rank() -> str:
    """Shim for a rank started by a Hydra proxy; returns the workdir in the rank itself.

    Hydra gives all of a task's ranks one environment, and keeps their exit status and
    output from the task agent. So the process the proxy starts takes its own placement
    from RINGTRAIN_LOCAL_ENVS, routes output into the agent's FIFOs, and forks: the child
    carries on as the MPI rank (it inherits the PMI connection), while this parent waits
    and writes the child's exact exit status, signals included, for the agent.
    """
    rank = int(os.environ["PMI_RANK"])
    workdir = os.environ["RINGTRAIN_WORKDIR"]
    files = WorkDir(workdir)
    try:
        placement = json.loads(os.environ.pop("RINGTRAIN_LOCAL_ENVS"))[str(rank)]
        os.environ.update(placement)
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            fifo = os.open(files.fifo(rank, stream), os.O_WRONLY)
            os.dup2(fifo, fd)
            os.close(fifo)
    except Exception:
        # Tell the agent rather than die silently under the proxy.
        write_atomic(files.error(rank), traceback.format_exc().encode())
        write_atomic(files.status(rank), b"1")
        os._exit(1)
    die_with_parent()  # the proxy
    os.environ["RINGTRAIN_PARENT_PID"] = str(os.getpid())
    child = os.fork()
    if child == 0:
        return workdir
    # A stop reaches the rank itself; this shim only reports how it ended.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGTERM))
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(devnull, fd)  # so the FIFOs reach EOF when the rank exits
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    code = os.waitstatus_to_exitcode(status)
    write_atomic(files.status(rank), str(code).encode())
    os._exit(code if code >= 0 else 128 - code)


def await_placement() -> str:
    """Import what RINGTRAIN_PREIMPORT names, then wait for this worker's placement on stdin;
    returns the workdir. Exits quietly if the agent closes stdin first (the job never came)."""
    die_with_parent()
    for name in filter(None, os.environ.pop("RINGTRAIN_PREIMPORT", "").split(",")):
        try:
            importlib.import_module(name)
        except Exception:  # fn's own import of it will raise, where the user sees it
            sys.modules.pop(name, None)
    line = sys.stdin.readline()
    if not line:
        os._exit(0)
    placement = json.loads(line)
    os.environ.update(placement["env"])
    return placement["workdir"]


def heavy_imports() -> list[str]:
    """Which of the slow modules this worker has imported (the next job's workers import
    them ahead; see PREIMPORTABLE)."""
    return [name for name in PREIMPORTABLE if name in sys.modules]


def _join_backend(files: WorkDir, rank: int) -> None:
    """Set up what the backend needs before user code runs."""
    if os.environ.get("RINGTRAIN_BACKEND") == "mpi":
        from ..backends.mpi import world

        world()  # joins COMM_WORLD now, and checks it matches RANK/SIZE
        write_atomic(files.mpi_segments(rank), "\n".join(mapped_shm_files()).encode())


def mapped_shm_files(maps: str = "/proc/self/maps") -> list[str]:
    """The files under /dev/shm this process maps that still have a name.

    Right after MPI_Init these are the MPI library's own segments. MPICH unlinks them in
    MPI_Finalize, so a rank that dies (or is stopped) leaves them in /dev/shm for good; the
    task agent removes them once the job's ranks on its host have ended.
    """
    found: list[str] = []
    try:
        with open(maps) as lines:
            for line in lines:
                path = line.rstrip("\n").split(maxsplit=5)[5:]
                if path and path[0].startswith("/dev/shm/") and not path[0].endswith("(deleted)"):
                    if path[0] not in found:
                        found.append(path[0])
    except OSError:
        pass
    return found


def result_bytes(value: Any, rank: int) -> bytes:
    """``value`` pickled for the driver, or b"" when the caller did not ask for this rank's value.

    Checked here, so an oversized or unpicklable value fails on its rank, naming it,
    instead of somewhere in the channel.
    """
    wanted = os.environ.get("RINGTRAIN_RESULTS", "all")
    if wanted == "none" or (wanted != "all" and str(rank) not in wanted.split(",")):
        return b""
    import cloudpickle

    try:
        data = cloudpickle.dumps(value)
    except Exception as err:
        raise RingtrainError(
            f"rank {rank}: fn's return value cannot be pickled ({type(err).__name__}: {err}); "
            "return plain Python values or numpy arrays, and save anything else to ringtrain.job_dir()"
        ) from err
    if len(data) > MAX_RESULT_BYTES:
        raise RingtrainError(
            f"rank {rank}: fn's return value pickles to {len(data)} bytes, over the {MAX_RESULT_BYTES} "
            "byte limit for results; save it to ringtrain.job_dir() and return its path instead"
        )
    return data


def _finish(files: WorkDir, rank: int, value: Any, recorder: Any) -> None:
    """Hand the result to the agent, then stay until the driver releases the job.

    Exiting at once could cut off a peer that is still pulling this worker's share of the
    last collective (TF's ring reads buffers from the sender's gRPC server).
    """
    data = result_bytes(value, rank)
    sys.stdout.flush()
    sys.stderr.flush()
    recorder.finished()
    write_atomic(files.imports(rank), ",".join(heavy_imports()).encode())
    write_atomic(files.result(rank), data)
    while not files.release.exists():
        time.sleep(0.02)


def _leave_backend() -> None:
    """Finalize MPI after a clean run, so Hydra sees an orderly exit."""
    if os.environ.get("RINGTRAIN_BACKEND") == "mpi":
        from ..backends.mpi import mpi_module

        stream = sys.modules.get("ringtrain.collectives._stream")
        if stream is not None:  # collectives still queued on the communication thread finish first
            stream.STREAM.drain()
        MPI = mpi_module()
        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()


def _failure_text(err: BaseException) -> str:
    """The failing rank's traceback. SIGTERM (the agent stopping every rank after this one's
    peer died, say) may land while it is formatted: then the exception's own lines do."""
    try:
        return traceback.format_exc()
    except _watch.Stopped:  # only the first SIGTERM raises, so this cannot recur
        return "".join(traceback.format_exception_only(type(err), err))


def main(workdir: str | None = None) -> int:
    if "RINGTRAIN_LOCAL_ENVS" in os.environ:
        workdir = become_mpi_rank()
    elif workdir == PLACEMENT_ARG:
        workdir = await_placement()
    if workdir is None:
        sys.exit("usage: python -m ringtrain.worker WORKDIR (started by a ringtrain task agent)")
    die_with_parent()
    files = WorkDir(workdir)
    os.environ["RINGTRAIN_WORKDIR"] = workdir
    rank = int(os.environ["RANK"])
    code, by_signal, exit_bound = 0, None, 3.0
    try:
        try:
            from .. import env

            exit_bound = env.get("RINGTRAIN_KILL_GRACE")
            recorder = _watch.install(
                files, rank, env.get("RINGTRAIN_HEARTBEAT_INTERVAL"), env.get("RINGTRAIN_STALL_INSPECTOR")
            )
            tune_malloc()
            _join_backend(files, rank)
            import cloudpickle

            task = cloudpickle.loads(files.payload.read_bytes())
            try:
                value = task()
            except SystemExit as stop:
                if stop.code not in (0, None):
                    raise
                value = None  # a script's sys.exit(0) is a success
            _finish(files, rank, value, recorder)
        except _watch.Stopped:
            by_signal = signal.SIGTERM
            write_atomic(files.error(rank), f"rank {rank} was stopped by SIGTERM\n".encode())
        except SystemExit as stop:
            # Exit statuses are one byte; keep a failure a failure.
            code = stop.code if isinstance(stop.code, int) and 0 < stop.code < 256 else 1
            write_atomic(files.error(rank), f"SystemExit: {stop.code}\n".encode())
        except BaseException as err:
            code = 1
            write_atomic(files.error(rank), _failure_text(err).encode())
        if code == 0 and by_signal is None:
            # Also after sys.exit(0): an unfinalized exit makes Hydra kill the other ranks.
            _leave_backend()
    finally:
        # Skip interpreter shutdown (TF's collective threads can stall it, and so can MPI's
        # finalize with a dead peer), not atexit handlers; also when a stop signal lands
        # while a failure is being reported.
        _watch.exit_process(code, exit_bound, by_signal)
    return code
