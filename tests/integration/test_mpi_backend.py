"""backend="mpi" through Spark: one MPI world across barrier tasks, failures, clean-up."""

from __future__ import annotations

import os
import signal
import time

import pytest
from procs import pids_matching

import ringtrain

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("spark", "no_leftover_workers")]


def _no_mpi_leftovers(timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = pids_matching("hydra_pmi_proxy") + pids_matching("-launcher manual")
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def _world():
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    values = np.full(3, float(comm.Get_rank() + 1))
    comm.Allreduce(MPI.IN_PLACE, values, op=MPI.SUM)
    print(f"mpi rank {comm.Get_rank()} of {comm.Get_size()}")
    return {
        "rank": ringtrain.rank(),
        "mpi_rank": comm.Get_rank(),
        "mpi_size": comm.Get_size(),
        "sum": values.tolist(),
    }


def test_workers_form_one_mpi_world(capfd):
    worlds = ringtrain.run(_world, num_proc=2, backend="mpi", return_all=True)
    assert [(w["rank"], w["mpi_rank"], w["mpi_size"]) for w in worlds] == [(0, 0, 2), (1, 1, 2)]
    assert all(w["sum"] == [3.0, 3.0, 3.0] for w in worlds)
    out = capfd.readouterr().out.splitlines()
    assert "[0] mpi rank 0 of 2" in out and "[1] mpi rank 1 of 2" in out
    assert not _no_mpi_leftovers()


def _raise_while_peer_waits():
    from mpi4py import MPI

    if ringtrain.rank() == 1:
        raise RuntimeError("rank one gives up")
    MPI.COMM_WORLD.Barrier()  # never completes: rank 1 is gone


def test_failing_rank_stops_the_world():
    started = time.monotonic()
    with pytest.raises(ringtrain.WorkerError) as info:
        ringtrain.run(_raise_while_peer_waits, num_proc=2, backend="mpi")
    assert time.monotonic() - started < 30
    assert info.value.failures[0].rank == 1
    assert "RuntimeError: rank one gives up" in str(info.value)
    assert not _no_mpi_leftovers()


def _killed_mid_collective():
    import numpy as np
    from mpi4py import MPI

    if ringtrain.rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    buf = np.ones(1 << 20)
    MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf)


def test_rank_killed_mid_collective_is_named():
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(ringtrain.WorkerError, match="rank 0 on .* was killed by signal SIGKILL"):
        ringtrain.run(_killed_mid_collective, num_proc=2, backend="mpi")
    assert not _no_mpi_leftovers()
    # MPICH removes its segments only in MPI_Finalize, which a killed world never reaches.
    assert not set(os.listdir("/dev/shm")) - before, "the job left shared memory behind"


def _early_clean_exit():
    if ringtrain.rank() == 0:
        raise SystemExit(0)  # a script's `sys.exit(main())`
    time.sleep(2)  # still working (say, saving a checkpoint) when rank 0 has left
    return "saved"


def test_clean_sys_exit_does_not_kill_the_other_ranks():
    assert ringtrain.run(_early_clean_exit, num_proc=2, backend="mpi", return_all=True) == [None, "saved"]
    assert not _no_mpi_leftovers()
