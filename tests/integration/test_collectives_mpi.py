"""Collectives across real MPI processes: each case runs a helper script under mpiexec."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from procs import pids_matching

from ringtrain import fusion

pytestmark = pytest.mark.integration

HELPERS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers")
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


SHM = fusion.native_available() and getattr(fusion._native, "HAVE_SHM", False)
needs_shm = pytest.mark.skipif(not SHM, reason="the native extension with shared memory is not built")


def mpirun(
    n: int, script: str, *args: str, timeout: float = 60, **extra_env: str
) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        TF_CPP_MIN_LOG_LEVEL="3",
        TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="1",
        OMP_NUM_THREADS="1",
        **extra_env,
    )
    for name in ("RANK", "SIZE", "LOCAL_RANK", "LOCAL_SIZE"):
        env.pop(name, None)
    cmd = [MPIEXEC, "-n", str(n), sys.executable, os.path.join(HELPERS, script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize(
    ("n", "mode", "impl"),
    [
        pytest.param(2, "shm", "native", marks=needs_shm),
        pytest.param(3, "shm", "native", marks=needs_shm),
        pytest.param(4, "hier", "native", marks=needs_shm),
        pytest.param(2, "mpi", "native", marks=needs_shm),
        (2, "mpi", "numpy"),
        (3, "mpi", "numpy"),
    ],
)
def test_collectives_match_numpy(n, mode, impl):
    """Every path: shared memory, shared memory within fake hosts and MPI between, MPI only
    (with the native kernels and with the numpy twin)."""
    proc = mpirun(n, "mpi_collectives.py", mode, timeout=180, RINGTRAIN_FUSION_IMPL=impl)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert f"COLLECTIVES OK size={n} mode={mode}" in proc.stdout
    assert not leftover_segments()


def leftover_segments() -> list[str]:
    """ringtrain shared-memory segments whose creator is gone (the name holds its pid)."""
    left = []
    for name in os.listdir("/dev/shm"):
        parts = name.split("-")
        if len(parts) == 3 and parts[0] == "ringtrain" and parts[1].isdigit():
            try:
                os.kill(int(parts[1]), 0)
            except ProcessLookupError:
                left.append(name)
            except PermissionError:
                pass
    return left


@needs_shm
def test_gradient_buckets_are_reduced_during_backprop():
    proc = mpirun(2, "mpi_overlap.py", timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "OVERLAP OK" in proc.stdout


def test_mismatch_raises_on_every_rank_without_hanging():
    start = time.monotonic()
    proc = mpirun(2, "mpi_mismatch.py", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert time.monotonic() - start < 30
    out = proc.stdout
    for r in (0, 1):
        assert f"MISMATCH OK rank {r}" in out
        assert (
            f"allreduce: rank 1 has shape (3,) float32 but rank 0 has (4,) float32 (raised on rank {r})"
            in out
        )
    assert "rank 1 has shape (4,) float64 but rank 0 has (4,) float32" in out
    assert "rank 1 passes 3 tensors but rank 0 passes 2" in out
    assert "rank 1 uses compression=None but rank 0 uses 'fp16'" in out


def test_dead_rank_ends_the_job_and_leaves_no_process():
    before = set(os.listdir("/dev/shm"))
    start = time.monotonic()
    try:
        proc = mpirun(2, "mpi_die.py", timeout=60)
    finally:
        # Under a plain mpiexec no task agent removes what MPICH's own shared memory leaves
        # when a rank dies (it unlinks it in MPI_Finalize only); the test tidies up after itself.
        for name in set(os.listdir("/dev/shm")) - before:
            if name.startswith("mpich_shm"):
                os.unlink(os.path.join("/dev/shm", name))
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "should not happen" not in proc.stdout
    assert elapsed < 20, f"job took {elapsed:.1f}s to end after a rank died"
    deadline = time.monotonic() + 5
    while pids_matching("mpi_die.py") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pids_matching("mpi_die.py")
    assert not leftover_segments()


@pytest.mark.parametrize("flavour", ["keras3", "legacy"])
def test_keras_fit_ends_with_identical_trained_weights(flavour):
    proc = mpirun(2, "mpi_keras_fit.py", flavour, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert f"KERAS OK {flavour}" in proc.stdout
