"""The worker process: a fresh Python started by a task agent for one rank.

``python -m ringtrain.worker WORKDIR`` loads the job's payload from WORKDIR, runs
it, and leaves the return value or the traceback there for the agent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
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
    """Run a Python script as ``__main__`` with the given argv."""

    path: str
    argv: tuple[str, ...] = ()

    def __call__(self) -> None:
        import runpy

        sys.argv = [self.path, *self.argv]
        sys.path.insert(0, str(Path(self.path).resolve().parent))
        runpy.run_path(self.path, run_name="__main__")


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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(workdir: str) -> int:
    import cloudpickle

    from ..launcher.agent import PAYLOAD_FILE, error_file, result_file

    die_with_parent()
    rank = int(os.environ["RANK"])
    code = 0
    try:
        task = cloudpickle.loads(Path(workdir, PAYLOAD_FILE).read_bytes())
        result = task()
        _write_atomic(result_file(workdir, rank), cloudpickle.dumps(result))
    except SystemExit as stop:
        if stop.code not in (0, None):
            code = stop.code if isinstance(stop.code, int) else 1
            _write_atomic(error_file(workdir, rank), f"SystemExit: {stop.code}\n".encode())
    except BaseException:
        _write_atomic(error_file(workdir, rank), traceback.format_exc().encode())
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown: TF's collective threads can stall it.
    os._exit(code)
