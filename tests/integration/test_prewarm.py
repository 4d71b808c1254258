"""Spare task agents on a real Spark session: the next job runs in the workers they started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from procs import KEEPER, WORKER, pids_matching

import ringtrain
from ringtrain.backends._hydra import _alive

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftover_workers")]


def _where():
    numpy_ahead = "numpy" in sys.modules
    import numpy  # noqa: F401  (the next job's workers import it ahead)

    return os.getpid(), numpy_ahead


def _spares(count: int, timeout: float = 60.0) -> tuple[set[int], set[int]]:
    """Wait until ``count`` spare keepers each have their waiting worker; (keepers, workers)."""
    deadline = time.monotonic() + timeout
    while True:
        keepers = set(pids_matching(f"{KEEPER} ")) & set(pids_matching("--spare"))
        waiting = set(pids_matching(f"{WORKER} --placement"))
        if (len(keepers) >= count and len(waiting) >= count) or time.monotonic() >= deadline:
            return keepers, waiting
        time.sleep(0.1)


@pytest.mark.usefixtures("spark")
def test_the_next_job_runs_in_spare_workers_and_turning_it_off_leaves_nothing(monkeypatch):
    monkeypatch.setenv("RINGTRAIN_PREWARM", "1")
    first = ringtrain.run(_where, num_proc=2, backend="tf", return_all=True)
    assert not any(ahead for _, ahead in first)
    keepers, waiting = _spares(2)
    assert len(keepers) == 2 and len(waiting) == 2, (keepers, waiting)
    second = ringtrain.run(_where, num_proc=2, backend="tf", return_all=True)
    # Each rank ran in a worker its spare started before this job, with numpy imported ahead
    # (the first job's workers had used it); the first job's workers are all gone.
    assert {pid for pid, _ in second} == waiting
    assert all(ahead for _, ahead in second)
    assert not {pid for pid, _ in first} & set(pids_matching(WORKER))
    # With RINGTRAIN_PREWARM=0 a job takes no spare and leaves none (the leak check agrees).
    monkeypatch.setenv("RINGTRAIN_PREWARM", "0")
    third = ringtrain.run(_where, num_proc=2, backend="tf", return_all=True)
    assert not {pid for pid, _ in third} & waiting


def test_spares_end_when_the_session_stops():
    """Spares live in the session's Python workers: stopping the session ends them all."""
    helpers = os.path.join(os.path.dirname(os.path.dirname(__file__)), "helpers")
    done = subprocess.run(
        [sys.executable, os.path.join(helpers, "prewarm_session.py")],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([helpers, *sys.path])),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    spares = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(spares["keepers"]) == 2 and len(spares["waiting"]) == 2, spares
    pids = [*spares["keepers"], *spares["waiting"]]
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a spare outlived its Spark session"
    assert not pids_matching(KEEPER) and not pids_matching(WORKER)
