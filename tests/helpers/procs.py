"""Finding ringtrain processes by their command line, for leak checks."""

from __future__ import annotations

import os
import time


def _cmdline(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_matching(pattern: str) -> list[int]:
    me = os.getpid()
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != me and pattern in _cmdline(p)]


def worker_pids() -> list[int]:
    return pids_matching("-m ringtrain.worker")


def wait_for_no_workers(
    exclude: set[int] = frozenset(), timeout: float = 2.0, pattern: str = "-m ringtrain.worker"
) -> list[int]:
    """Poll until no matching process (other than ``exclude``) is alive; return survivors."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids_matching(pattern) if p not in exclude]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)
