"""Task functions for launch-stage tests, shared by the classic and the Connect tests."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from ringtrain.launcher.stage import CHUNK_BYTES, StageTask


def big_records(task: StageTask) -> list[bytes]:
    """Three records: one of 9 MiB (more than a Connect Arrow batch), an empty one, a small one."""
    payload = random.Random(task.partition).randbytes(9 * CHUNK_BYTES + 123)
    return [payload, b"", f"small {task.partition}".encode()]


def expected_big_records(partition: int) -> list[bytes]:
    return big_records(StageTask(partition, (), lambda message: [], iter(())))


class SleepAndRecordPid:
    """Writes this task's pid to ``directory/pid-<partition>``, then sleeps until killed."""

    def __init__(self, directory: str):
        self.directory = directory

    def __call__(self, task: StageTask) -> None:
        Path(self.directory, f"pid-{task.partition}").write_text(str(os.getpid()))
        time.sleep(600)

    def wait_for_pids(self, partitions: int, timeout: float = 60.0) -> list[int]:
        files = [Path(self.directory, f"pid-{p}") for p in range(partitions)]
        deadline = time.monotonic() + timeout
        while not all(f.exists() and f.read_text() for f in files) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [int(f.read_text()) for f in files]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until_dead(pids: list[int], timeout: float = 30.0) -> list[int]:
    """Poll until none of ``pids`` runs; return those still running at the deadline."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if alive(p)]
