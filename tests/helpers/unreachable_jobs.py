"""Jobs whose task agents cannot reach the process that called ``ringtrain.run``, shared by the
classic-session tests (test_unreachable.py) and the Spark Connect tests (test_connect.py).

The caller points RINGTRAIN_DRIVER_HOST at an address where nothing listens (127.0.0.2: the
control channel binds 127.0.0.1 only), so every agent's connection is refused and the job runs
detached: results, failures and each rank's last lines come back in the stage's output rows.
"""

from __future__ import annotations

import re
import time

import pytest

import ringtrain

NOWHERE = "127.0.0.2"


def greet(x):
    print(f"hello from {ringtrain.rank()}")
    return x * 10 + ringtrain.rank()


def check_results_arrive_with_the_last_lines(backend: str, capfd) -> None:
    values = ringtrain.run(greet, 4, num_proc=2, backend=backend, return_all=True)
    assert values == [40, 41]
    out, err = capfd.readouterr()
    assert "[0] hello from 0" in out.splitlines() and "[1] hello from 1" in out.splitlines()
    assert re.search(rf"reach(ed)? this process at {re.escape(NOWHERE)}:", err), err
    assert "logs/rank-N.log" in err


def fail_on_rank_one():
    print(f"rank {ringtrain.rank()} is loading")
    if ringtrain.rank() == 1:
        raise ValueError("bad batch on rank one")
    time.sleep(600)  # would hang the job if rank 0 were not stopped


def check_a_raising_rank_is_named_with_its_traceback_and_last_lines(backend: str) -> None:
    started = time.monotonic()
    with pytest.raises(ringtrain.WorkerError) as info:
        ringtrain.run(fail_on_rank_one, num_proc=2, backend=backend)
    # Rank 0 was stopped by the agents' hub, not by a timeout.
    assert time.monotonic() - started < 60
    text = str(info.value)
    assert info.value.ranks == [1]
    assert "ValueError: bad batch on rank one" in text and "Traceback (most recent call last)" in text
    assert "--- last lines of output from rank 1 ---\nrank 1 is loading" in text
    assert info.value.failures[0].output_tail == ("rank 1 is loading",)


def sleep():
    time.sleep(600)


def check_the_timeout_stops_every_worker(backend: str) -> None:
    started = time.monotonic()
    with pytest.raises(ringtrain.JobTimeoutError, match=r"within its 8 s timeout"):
        ringtrain.run(sleep, num_proc=2, backend=backend, timeout=8)
    took = time.monotonic() - started
    assert 8 <= took < 30, f"took {took:.1f} s"
