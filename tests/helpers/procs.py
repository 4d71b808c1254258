"""Finding the processes this test session started, for leak checks.

conftest.py puts a per-session marker in the environment; executors, task agents,
workers and MPI proxies inherit it, so other sessions' processes on the same machine
are never mistaken for ours, and orphans adopted by init are still found.
"""

from __future__ import annotations

import os
import time

MARKER = "RINGTRAIN_TEST_SESSION"
WORKER = "-m ringtrain.worker"
KEEPER = "-m ringtrain.launcher.keeper"


def _read(pid: str, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def cmdline(pid: int | str) -> str:
    return _read(str(pid), "cmdline").replace(b"\0", b" ").decode(errors="replace")


def pids_matching(pattern: str) -> list[int]:
    """Live processes of this session whose command line contains ``pattern``."""
    me = os.getpid()
    tag = f"{MARKER}={os.environ.get(MARKER, '')}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        if pattern in cmdline(pid) and tag in _read(pid, "environ").split(b"\0"):
            found.append(int(pid))
    return found


def worker_pids(pattern: str = WORKER) -> list[int]:
    return pids_matching(pattern)


def wait_for_no_workers(
    exclude: set[int] = frozenset(), timeout: float = 2.0, pattern: str = WORKER
) -> list[int]:
    """Poll until no matching process (other than ``exclude``) is alive; return survivors."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids_matching(pattern) if p not in exclude]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)
