"""KeyboardInterrupt in the driver stops the Spark job and every worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from procs import wait_for_no_workers, worker_pids

pytestmark = pytest.mark.integration

HELPERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")


def test_ctrl_c_leaves_no_worker_behind():
    before = set(worker_pids())
    proc = subprocess.Popen(
        [sys.executable, "-u", os.path.join(HELPERS, "interrupt_job.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        seen = set()
        deadline = time.monotonic() + 120
        while len(seen) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.strip() in ("[0] started", "[1] started"):
                seen.add(line.strip())
        assert seen == {"[0] started", "[1] started"}
        # Two workers on tf; on mpi each rank is a shim and its child, beside mpiexec.
        assert len(set(worker_pids()) - before) >= 2
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        rest, _ = proc.communicate(timeout=30)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "driver interrupted" in rest
    assert proc.returncode == 130
    assert elapsed < 10, f"stopping took {elapsed:.1f} s"
    assert not wait_for_no_workers(exclude=before, timeout=2.0)
