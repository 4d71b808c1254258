"""ringtrain.run on a local Spark session: placement, results, logs, failures, clean-up."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

import ringtrain

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("spark", "no_leftover_workers")]


def _placement():
    return {
        "rank": ringtrain.rank(),
        "size": ringtrain.size(),
        "local_rank": ringtrain.local_rank(),
        "local_size": ringtrain.local_size(),
        "chief": ringtrain.is_chief(),
        "tf_config": json.loads(os.environ["TF_CONFIG"]),
        "pid": os.getpid(),
        "ppid": os.getppid(),
    }


def test_return_values_and_placement():
    assert ringtrain.run(lambda x: x * 10 + ringtrain.rank(), 4, num_proc=2) == 40
    placed = ringtrain.run(_placement, num_proc=2, return_all=True)
    assert [p["rank"] for p in placed] == [0, 1]
    assert all(p["size"] == 2 and p["local_size"] == 2 for p in placed)
    assert sorted(p["local_rank"] for p in placed) == [0, 1]
    assert [p["chief"] for p in placed] == [True, False]
    workers = placed[0]["tf_config"]["cluster"]["worker"]
    assert len(set(workers)) == 2
    assert [p["tf_config"]["task"]["index"] for p in placed] == [0, 1]
    # Fresh processes, never the PySpark worker itself: their parent is the task agent.
    assert len({p["pid"] for p in placed}) == 2
    assert all(p["ppid"] != os.getpid() for p in placed)


def test_kwargs_reach_fn():
    assert ringtrain.run(lambda a, b=0: a - b, 5, b=2, num_proc=1) == 3


def test_output_is_prefixed_with_rank(capfd):
    def talk():
        import sys

        print(f"hello from {ringtrain.rank()}")
        print(f"warning from {ringtrain.rank()}", file=sys.stderr)

    ringtrain.run(talk, num_proc=2)
    out, err = capfd.readouterr()
    assert "[0] hello from 0" in out.splitlines() and "[1] hello from 1" in out.splitlines()
    assert "[0] warning from 0" in err.splitlines() and "[1] warning from 1" in err.splitlines()


def _fail_on_rank_one():
    if ringtrain.rank() == 1:
        raise ValueError("bad batch on rank one")
    time.sleep(600)  # would hang the job if rank 0 were not stopped


def test_worker_exception_names_rank_and_stops_others():
    started = time.monotonic()
    with pytest.raises(ringtrain.WorkerError) as info:
        ringtrain.run(_fail_on_rank_one, num_proc=2)
    assert time.monotonic() - started < 60
    err = info.value
    assert err.ranks == [1]
    assert "rank 1" in str(err) and "exited with code 1" in str(err)
    assert "ValueError: bad batch on rank one" in str(err)
    assert "Traceback (most recent call last)" in str(err)
    assert isinstance(err, ringtrain.RingtrainError)


def _killed_by_signal():
    if ringtrain.rank() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)


def test_worker_killed_by_signal_is_named():
    with pytest.raises(ringtrain.WorkerError, match="rank 0 on .* was killed by signal SIGKILL"):
        ringtrain.run(_killed_by_signal, num_proc=2)


def test_system_exit_code_is_reported():
    def leave():
        raise SystemExit(7 if ringtrain.rank() == 1 else 0)

    with pytest.raises(ringtrain.WorkerError, match="rank 1 .* exited with code 7") as info:
        ringtrain.run(leave, num_proc=2)
    assert info.value.exitcode == 7


def test_too_many_workers_fails_fast_naming_slots():
    started = time.monotonic()
    with pytest.raises(ringtrain.ResourceError, match=r"num_proc=3 .* cluster has 2"):
        ringtrain.run(lambda: None, num_proc=3)
    assert time.monotonic() - started < 40


@pytest.mark.parametrize("num_proc", [0, -1])
def test_num_proc_below_one(num_proc):
    with pytest.raises(ringtrain.ConfigError, match="num_proc must be >= 1"):
        ringtrain.run(lambda: None, num_proc=num_proc)


def test_unknown_backend():
    with pytest.raises(ringtrain.ConfigError, match="unknown backend 'nccl2'"):
        ringtrain.run(lambda: None, num_proc=1, backend="nccl2")


def test_unpicklable_fn_fails_before_any_job(spark):
    lock = threading.Lock()
    tracker = spark.sparkContext.statusTracker()
    jobs_before = len(tracker.getJobIdsForGroup(None))
    with pytest.raises(ringtrain.ConfigError, match="cannot be pickled"):
        ringtrain.run(lambda: lock.locked(), num_proc=1)
    assert len(tracker.getJobIdsForGroup(None)) == jobs_before


def test_rank_outside_worker_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ringtrain.RingtrainError, match="only inside a ringtrain worker"):
        ringtrain.rank()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _peer_stays_after_returning(folder):
    from pathlib import Path

    from ringtrain.protocol import WorkDir

    peer = Path(folder) / "peer.json"
    if ringtrain.rank() == 1:
        result = WorkDir(os.environ["RINGTRAIN_WORKDIR"]).result(1)
        Path(folder, "peer.tmp").write_text(json.dumps({"pid": os.getpid(), "result": str(result)}))
        os.replace(Path(folder, "peer.tmp"), peer)
        return None  # done at once: its worker hands in the result, then must wait for rank 0
    deadline = time.monotonic() + 60
    while not peer.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    about = json.loads(peer.read_text())
    while not Path(about["result"]).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not Path(about["result"]).exists():
        return "rank 1 never handed in its result"
    # Rank 1 has returned from fn and handed in its result: from here a worker that did not
    # wait would exit at once. Watch it while this rank has not returned yet.
    watch_until = time.monotonic() + 1.0
    while time.monotonic() < watch_until:
        if not _alive(about["pid"]):
            return "rank 1 exited before every rank had a result"
        time.sleep(0.02)
    return True


def test_finished_ranks_wait_until_every_rank_has_a_result(tmp_path):
    # A rank that has returned must not exit yet: a TF peer may still be pulling the last
    # collective's buffers from its gRPC server.
    assert ringtrain.run(_peer_stays_after_returning, str(tmp_path), num_proc=2, backend="tf") is True
