"""The worker process: a fresh Python started by a task agent for one rank.

``python -m ringtrain.worker WORKDIR`` loads the job's payload from WORKDIR, runs
it, and leaves the return value or the traceback there for the agent.
"""

from __future__ import annotations

import ctypes
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

PR_SET_PDEATHSIG = 1


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
            folder = Path(os.environ["RINGTRAIN_WORKDIR"], f"script-{os.environ['RANK']}")
            folder.mkdir(exist_ok=True)
            path = str(folder / Path(self.path).name)
            _write_atomic(Path(path), self.source)
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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def become_mpi_rank() -> str:
    """Shim for a rank started by a Hydra proxy; returns the workdir in the rank itself.

    Hydra gives all of a task's ranks one environment, and keeps their exit status and
    output from the task agent. So the process the proxy starts takes its own placement
    from RINGTRAIN_LOCAL_ENVS, routes output into the agent's FIFOs, and forks: the child
    carries on as the MPI rank (it inherits the PMI connection), while this parent waits
    and writes the child's exact exit status, signals included, for the agent.
    """
    from ..launcher.agent import error_file, output_fifo, status_file

    rank = int(os.environ["PMI_RANK"])
    workdir = os.environ["RINGTRAIN_WORKDIR"]
    try:
        placement = json.loads(os.environ.pop("RINGTRAIN_LOCAL_ENVS"))[str(rank)]
        os.environ.update(placement)
        for fd, stream in ((1, "stdout"), (2, "stderr")):
            fifo = os.open(output_fifo(workdir, rank, stream), os.O_WRONLY)
            os.dup2(fifo, fd)
            os.close(fifo)
    except Exception:
        # Tell the agent rather than die silently under the proxy.
        _write_atomic(error_file(workdir, rank), traceback.format_exc().encode())
        _write_atomic(status_file(workdir, rank), b"1")
        os._exit(1)
    die_with_parent()  # the proxy
    os.environ["RINGTRAIN_PARENT_PID"] = str(os.getpid())
    child = os.fork()
    if child == 0:
        return workdir
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
    _write_atomic(status_file(workdir, rank), str(code).encode())
    os._exit(code if code >= 0 else 128 - code)


def _join_backend() -> None:
    """Set up what the backend needs before user code runs."""
    if os.environ.get("RINGTRAIN_BACKEND") == "mpi":
        from ..backends.mpi import world

        world()  # joins COMM_WORLD now, and checks it matches RANK/SIZE


def _finish(workdir: str, rank: int, result: bytes) -> None:
    """Hand the result to the agent, then stay until the driver releases the job.

    Exiting at once could cut off a peer that is still pulling this worker's share of the
    last collective (TF's ring reads buffers from the sender's gRPC server).
    """
    from ..launcher.agent import release_file, result_file

    sys.stdout.flush()
    sys.stderr.flush()
    _write_atomic(result_file(workdir, rank), result)
    release = release_file(workdir)
    while not release.exists():
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


def main(workdir: str | None = None) -> int:
    if "RINGTRAIN_LOCAL_ENVS" in os.environ:
        workdir = become_mpi_rank()
    if workdir is None:
        sys.exit("usage: python -m ringtrain.worker WORKDIR (started by a ringtrain task agent)")
    import cloudpickle

    from ..launcher.agent import PAYLOAD_FILE, error_file

    die_with_parent()
    tune_malloc()
    os.environ["RINGTRAIN_WORKDIR"] = workdir
    rank = int(os.environ["RANK"])
    code = 0
    try:
        _join_backend()
        task = cloudpickle.loads(Path(workdir, PAYLOAD_FILE).read_bytes())
        _finish(workdir, rank, cloudpickle.dumps(task()))
    except SystemExit as stop:
        if stop.code in (0, None):
            _finish(workdir, rank, cloudpickle.dumps(None))
        else:
            # Exit statuses are one byte; keep a failure a failure.
            code = stop.code if isinstance(stop.code, int) and 0 < stop.code < 256 else 1
            _write_atomic(error_file(workdir, rank), f"SystemExit: {stop.code}\n".encode())
    except BaseException:
        _write_atomic(error_file(workdir, rank), traceback.format_exc().encode())
        code = 1
    if code == 0:
        # Also after sys.exit(0): an unfinalized exit makes Hydra kill the other ranks.
        _leave_backend()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown: TF's collective threads can stall it.
    os._exit(code)
