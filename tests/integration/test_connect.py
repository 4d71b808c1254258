"""ringtrain on a Spark Connect session: one local Connect server (local[2]) for the module.

The server runs in its own process (started with spark-submit), so this test process stays
a pure Connect client beside the classic session other modules use. Each test switches
pyspark into Connect mode for its duration, as a Connect-only process would be.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from connect_server import LocalConnectServer
from procs import wait_for_no_workers, worker_pids
from stage_tasks import (
    big_records,
    check_a_stage_without_enough_slots_never_starts,
    check_cancel_kills_the_running_tasks,
    expected_big_records,
)
from unreachable_jobs import (
    NOWHERE,
    check_a_raising_rank_is_named_with_its_traceback_and_last_lines,
    check_results_arrive_with_the_last_lines,
    check_the_timeout_stops_every_worker,
)

import ringtrain
from ringtrain.launcher.stage import CHUNK_BYTES, BarrierStage

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("no_leftover_workers")]

HELPERS = Path(__file__).resolve().parent.parent / "helpers"
# Set in the Connect server's environment only: a worker that sees it ran under that server.
SERVER_MARK = "RT_TEST_CONNECT_SERVER"


@pytest.fixture(scope="module")
def connect_server():
    previous = os.environ.get(SERVER_MARK)
    os.environ[SERVER_MARK] = "1"
    try:
        server = LocalConnectServer("local[2]")
        server.start()
    finally:
        if previous is None:
            del os.environ[SERVER_MARK]
    try:
        yield server
    finally:
        server.stop()
        assert not wait_for_no_workers(timeout=10.0, pattern="SparkConnectServer")


@pytest.fixture(scope="module")
def connect_client(connect_server):
    from pyspark.sql.connect.session import SparkSession as RemoteSession

    session = RemoteSession.builder.remote(connect_server.url).getOrCreate()
    yield session
    session.stop()


@pytest.fixture
def connect(connect_client, monkeypatch):
    """The shared Connect session, with pyspark in Connect mode for this test."""
    monkeypatch.setenv("SPARK_CONNECT_MODE_ENABLED", "1")
    from ringtrain.launcher.spark import active_session

    assert active_session() is connect_client
    return connect_client


def _value(x):
    return {"value": x * 10 + ringtrain.rank(), "server": os.environ.get(SERVER_MARK)}


@pytest.mark.parametrize("backend", ["tf", "mpi"])
def test_run_returns_rank_zero_and_every_rank_in_order(connect, backend):
    first = ringtrain.run(_value, 4, num_proc=2, backend=backend)
    assert first == {"value": 40, "server": "1"}  # it ran under the Connect server
    every = ringtrain.run(_value, 5, num_proc=2, backend=backend, return_all=True)
    assert [v["value"] for v in every] == [50, 51]


def _fail_on_rank_one():
    if ringtrain.rank() == 1:
        raise ValueError("bad batch on rank one")
    time.sleep(600)  # would hang the job if rank 0 were not stopped


@pytest.mark.parametrize("backend", ["tf", "mpi"])
def test_raising_rank_gives_worker_error_with_traceback(connect, backend):
    started = time.monotonic()
    with pytest.raises(ringtrain.WorkerError) as info:
        ringtrain.run(_fail_on_rank_one, num_proc=2, backend=backend)
    assert time.monotonic() - started < 60
    assert info.value.ranks == [1]
    assert "rank 1" in str(info.value) and "ValueError: bad batch on rank one" in str(info.value)
    assert "Traceback (most recent call last)" in str(info.value)


def test_worker_output_streams_live_with_rank_prefix(connect, capfd):
    def talk():
        print(f"hello from {ringtrain.rank()}")

    ringtrain.run(talk, num_proc=2, backend="mpi")
    out = capfd.readouterr().out.splitlines()
    assert "[0] hello from 0" in out and "[1] hello from 1" in out


def test_too_many_workers_fail_fast_naming_slots(connect):
    started = time.monotonic()
    with pytest.raises(ringtrain.ResourceError, match=r"num_proc=3 .* cluster has 2"):
        ringtrain.run(lambda: None, num_proc=3)
    assert time.monotonic() - started < 30


def test_results_larger_than_an_arrow_batch_arrive_intact(connect):
    # Connect's Arrow batches hold about 70 % of 4 MiB by default; the big record is 9 MiB.
    stage = BarrierStage(connect, 2, big_records)
    rows = stage.dataframe().toArrow()
    assert max(len(d) for d in rows.column("data").to_pylist()) <= CHUNK_BYTES
    stage.start()
    stage.join(120)
    assert stage.done() and stage.error is None, stage.error
    assert stage.records == {p: expected_big_records(p) for p in (0, 1)}


def test_a_large_return_value_reaches_the_caller(connect):
    value = ringtrain.run(lambda: os.urandom(1) * (6 << 20), num_proc=2, backend="mpi")
    assert len(value) == 6 << 20 and len(set(value)) == 1


def _shard_ids():
    shard = ringtrain.data.shard()
    return {"ids": sorted(int(i) for i in shard.to_numpy(["id"])["id"]), "steps": shard.steps_per_epoch(32)}


def test_run_trains_on_a_dataframe_of_the_connect_session(connect):
    from data_jobs import sized_frame

    results = ringtrain.run(
        _shard_ids, data=sized_frame(connect, [700, 200, 100, 0]), num_proc=2, backend="mpi", return_all=True
    )
    assert [len(r["ids"]) for r in results] == [500, 500]
    assert sorted(results[0]["ids"] + results[1]["ids"]) == list(range(1000))
    assert [r["steps"] for r in results] == [15, 15]
    # A null found on the server's executors comes back as the DataError it is.
    nulls = connect.range(10).selectExpr("id", "IF(id = 7, NULL, CAST(id AS DOUBLE)) AS y")
    with pytest.raises(ringtrain.DataError, match="column 'y' has null values"):
        ringtrain.run(_shard_ids, data=nulls, num_proc=2, backend="mpi")


def test_cancel_kills_the_running_tasks(connect, tmp_path):
    check_cancel_kills_the_running_tasks(connect, str(tmp_path))


def test_a_stage_without_enough_slots_never_starts(connect):
    check_a_stage_without_enough_slots_never_starts(connect, wait=8)


# A Connect client the executors cannot reach (see unreachable_jobs.py): the same results and errors.


@pytest.fixture
def unreachable(connect, monkeypatch):
    monkeypatch.setenv("RINGTRAIN_DRIVER_HOST", NOWHERE)
    return connect


def test_unreachable_client_gets_results_and_last_lines(unreachable, capfd):
    check_results_arrive_with_the_last_lines("mpi", capfd)


def test_unreachable_client_gets_the_raising_rank_with_traceback(unreachable):
    check_a_raising_rank_is_named_with_its_traceback_and_last_lines("tf")


def test_unreachable_client_timeout_stops_every_worker(unreachable):
    check_the_timeout_stops_every_worker("mpi")


def _launch(*args: str, **env: str) -> subprocess.CompletedProcess:
    """``ringtrain launch ARGS`` in a fresh process: a Connect client and nothing else."""
    skip = ("RINGTRAIN_NP", "RINGTRAIN_MASTER", "SPARK_CONNECT_MODE_ENABLED")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(skip)} | env
    argv = [sys.executable, "-m", "ringtrain", "launch", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=240, env=environ, check=False)


def test_launch_remote_runs_a_script(connect_server):
    done = _launch(
        "-np", "2", "--remote", connect_server.url, "--env", "GREETING=hi",
        str(HELPERS / "cli_hello.py"), "--epochs", "3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for rank in (0, 1):
        assert f"[{rank}] hello rank={rank} size=2 workers=2 argv=['--epochs', '3']" in lines
        assert f"[{rank}] GREETING=hi" in lines
    assert "[1] to stderr from 1" in done.stderr.splitlines()


@pytest.mark.slow  # starts a second Connect server, inside the CLI's process
def test_launch_remote_local_starts_a_quiet_server_of_its_own():
    done = _launch("-np", "2", "--remote", "local[2]", str(HELPERS / "cli_hello.py"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines().count("[0] GREETING=None") == 1
    assert "[1] hello rank=1 size=2 workers=2 argv=[]" in done.stdout.splitlines()
    assert "[Stage" not in done.stdout + done.stderr  # no progress bar over the workers' lines
    assert "Failed to set spark" not in done.stderr


def test_launch_through_spark_remote_reports_the_failing_rank(connect_server):
    done = _launch("-np", "2", str(HELPERS / "cli_exit.py"), "3", SPARK_REMOTE=connect_server.url)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "exited with code 3" in done.stderr.splitlines()[-1]


def test_launch_remote_timeout_stops_every_worker(connect_server):
    started = time.monotonic()
    script = str(HELPERS / "cli_sleep.py")
    done = _launch("-np", "2", "--remote", connect_server.url, "--timeout", "5", script)
    assert done.returncode == 124, done.stderr[-3000:]
    assert time.monotonic() - started < 120


def test_ctrl_c_under_connect_stops_the_job_and_every_worker(connect_server):
    before = set(worker_pids())
    skip = ("RINGTRAIN_NP", "RINGTRAIN_MASTER", "SPARK_CONNECT_MODE_ENABLED")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringtrain", "launch", "-np", "2", "--remote", connect_server.url,
         str(HELPERS / "cli_sleep.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith(skip)},
    )  # fmt: skip
    try:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x.strip()) for x in proc.stdout], daemon=True).start()
        seen: set[str] = set()
        deadline = time.monotonic() + 120
        while not {"[0] ready 0", "[1] ready 1"} <= seen and time.monotonic() < deadline:
            try:
                seen.add(lines.get(timeout=0.5))
            except queue.Empty:
                assert proc.poll() is None, f"the CLI exited early ({proc.returncode})"
        assert len(set(worker_pids()) - before) >= 2, seen
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        assert proc.returncode == 130
        assert time.monotonic() - sent < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not wait_for_no_workers(exclude=before, timeout=10.0)


def test_concurrent_runs_share_the_session(connect):
    # Two jobs from two threads of one Connect client: each stage has its own tag and thread.
    results: dict[int, object] = {}

    def run(i: int) -> None:
        results[i] = ringtrain.run(_value, i, num_proc=1, backend="mpi")

    threads = [threading.Thread(target=run, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert results == {1: {"value": 10, "server": "1"}, 2: {"value": 20, "server": "1"}}
