"""Task functions for launch-stage tests, shared by the classic and the Connect tests."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

from ringtrain.launcher.stage import CHUNK_BYTES, BarrierStage, StageTask


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


def check_cancel_kills_the_running_tasks(session, directory: str) -> None:
    """Start a 2-task stage whose tasks sleep, cancel it, and see their Python processes go."""
    task = SleepAndRecordPid(directory)
    stage = BarrierStage(session, 2, task)
    stage.start()
    assert stage.wait_started(120)
    pids = task.wait_for_pids(2)
    stage.cancel()
    stage.join(30)
    assert stage.done() and stage.error is not None
    assert not wait_until_dead(pids), "a cancelled task's Python process is still running"


def check_a_stage_without_enough_slots_never_starts(session, wait: float) -> None:
    """On local[2], a 3-task barrier stage never starts; cancelling it ends it."""
    stage = BarrierStage(session, 3, lambda task: None)
    stage.start()
    try:
        assert not stage.wait_started(wait)
        assert not stage.done()
    finally:
        stage.cancel()
        stage.join(30)
    assert stage.done()
