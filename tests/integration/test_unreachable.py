"""Task agents that cannot reach the process that called ``run`` (a classic session here; the
same checks run under Spark Connect in test_connect.py): results, errors, timeouts and stalls
still come back, through the stage's output rows and the agents' hub."""

from __future__ import annotations

import socket
import time

import pytest
from unreachable_jobs import (
    NOWHERE,
    check_a_raising_rank_is_named_with_its_traceback_and_last_lines,
    check_results_arrive_with_the_last_lines,
    check_the_timeout_stops_every_worker,
    greet,
)

import ringtrain
from ringtrain.launcher.agent import REACH_TIMEOUT

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("spark", "no_leftover_workers")]


@pytest.fixture
def nowhere(monkeypatch):
    monkeypatch.setenv("RINGTRAIN_DRIVER_HOST", NOWHERE)


@pytest.mark.parametrize("backend", ["tf", "mpi"])
def test_results_arrive_with_each_ranks_last_lines(nowhere, backend, capfd):
    check_results_arrive_with_the_last_lines(backend, capfd)


def test_a_raising_rank_is_named_with_its_traceback_and_last_lines(nowhere):
    check_a_raising_rank_is_named_with_its_traceback_and_last_lines("mpi")


def test_the_timeout_stops_every_worker(nowhere):
    check_the_timeout_stops_every_worker("tf")


def test_an_address_that_drops_packets_costs_one_reach_timeout(monkeypatch):
    # A listener on another loopback address, at the channel's own port, whose accept queue
    # is full: the kernel drops further SYNs, as a firewall that drops packets would.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hole = socket.socket()
    hole.bind(("127.0.0.3", port))
    hole.listen(0)
    filler = socket.create_connection(("127.0.0.3", port))
    monkeypatch.setenv("RINGTRAIN_CHANNEL_PORTS", str(port))
    monkeypatch.setenv("RINGTRAIN_DRIVER_HOST", "127.0.0.3")
    try:
        started = time.monotonic()
        assert ringtrain.run(greet, 1, num_proc=2, backend="mpi", return_all=True) == [10, 11]
        assert time.monotonic() - started >= REACH_TIMEOUT
    finally:
        filler.close()
        hole.close()


def test_driver_host_none_skips_the_attempt(monkeypatch, capfd):
    monkeypatch.setenv("RINGTRAIN_DRIVER_HOST", "none")
    assert ringtrain.run(greet, 2, num_proc=2, backend="mpi") == 20
    assert "(RINGTRAIN_DRIVER_HOST=none)" in capfd.readouterr().err


STALL_TIMEOUT = 6.0


def _rank_one_never_joins():
    import numpy as np

    if ringtrain.rank() == 1:
        time.sleep(600)
    ringtrain.allreduce(np.ones(4, np.float32), name="grads")


def test_the_agents_hub_finds_a_stall(nowhere, monkeypatch, capfd):
    monkeypatch.setenv("RINGTRAIN_STALL_WARNING", "3")
    monkeypatch.setenv("RINGTRAIN_STALL_TIMEOUT", str(STALL_TIMEOUT))
    started = time.monotonic()
    with pytest.raises(ringtrain.StallError) as info:
        ringtrain.run(_rank_one_never_joins, num_proc=2, backend="mpi")
    assert time.monotonic() - started < 60
    assert info.value.waiting == (0,) and info.value.missing == (1,)
    assert "in _rank_one_never_joins" in info.value.stacks[1]
    # The hub's warning came back with the rows, marked as seen by the hub.
    assert "(seen by the agents' hub) stall warning: rank(s) [0] have waited" in capfd.readouterr().err


def _shard_ids():
    return sorted(int(i) for i in ringtrain.data.shard().to_numpy(["id"])["id"])


def test_a_dataframe_reaches_detached_ranks(nowhere, spark):
    from data_jobs import sized_frame

    # Partitions of 5, 0 and 3 rows: the offers' data summaries travel by allGather, and the
    # ranks' shares differ by at most one row per non-empty source partition.
    frame = sized_frame(spark, [5, 0, 3])
    ids = ringtrain.run(_shard_ids, data=frame, num_proc=2, backend="mpi", return_all=True)
    assert abs(len(ids[0]) - len(ids[1])) <= 2 and min(map(len, ids)) >= 3
    assert sorted(ids[0] + ids[1]) == list(range(8))
