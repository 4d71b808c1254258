"""Never hang, never orphan: stalls, uneven finish, timeouts, lost agents, exits, logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from procs import pids_matching

import ringtrain
from ringtrain.backends._hydra import _alive

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("spark", "no_leftover_workers")]

STALL_TIMEOUT = 8.0
# Detection runs on heartbeats (1 s), the driver asks the missing ranks for their stacks
# (up to 3 s), then every worker is stopped (a blocked one 1.5 s after SIGTERM).
STALL_SLACK = 7.0


def _sleep_in_python():
    time.sleep(600)  # the line a stalled rank is stuck on


SLEEP_LINE = _sleep_in_python.__code__.co_firstlineno + 1


def _stall_one_rank(backend, mark):
    import numpy as np

    if backend == "tf":
        import tensorflow as tf

        strategy = ringtrain.tf.strategy()
        value = tf.ones([4])

        @tf.function
        def reduce():
            return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", value))

    if ringtrain.rank() == 1:
        _sleep_in_python()
    Path(mark).write_text(repr(time.time()))  # the stall starts now
    if backend == "tf":
        reduce()
    else:
        ringtrain.allreduce(np.ones(4, np.float32), name="grads")


@pytest.mark.parametrize("backend", ["mpi", "tf"])
def test_rank_that_never_enters_the_collective_is_named(backend, monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("RINGTRAIN_STALL_WARNING", "4")
    monkeypatch.setenv("RINGTRAIN_STALL_TIMEOUT", str(STALL_TIMEOUT))
    mark = tmp_path / "stall-started"
    with pytest.raises(ringtrain.StallError) as info:
        ringtrain.run(_stall_one_rank, backend, str(mark), num_proc=2, backend=backend)
    took = time.time() - float(mark.read_text())
    assert STALL_TIMEOUT <= took < STALL_TIMEOUT + STALL_SLACK, (
        f"StallError {took:.1f} s after the stall began"
    )
    err = info.value
    assert isinstance(err, ringtrain.InfrastructureError)
    assert err.waiting == (0,) and err.missing == (1,) and not err.uneven_finish
    assert f"line {SLEEP_LINE} in _sleep_in_python" in err.stacks[1]
    assert f"line {SLEEP_LINE} in _sleep_in_python" in str(err)
    if backend == "mpi":
        assert err.collective == "allreduce(grads) (collective #1)"
    else:
        assert "TensorFlow call" in err.collective
    assert "rank(s) [0] have waited" in str(err) and "which rank(s) [1] have not entered" in str(err)
    # The warning came first, with the same facts.
    assert "stall warning: rank(s) [0] have waited" in capfd.readouterr().err


def _finish_early():
    import numpy as np

    if ringtrain.rank() == 1:
        return "done early"
    ringtrain.allreduce(np.ones(4, np.float32), name="last")


def test_uneven_finish_is_reported_as_a_stall(monkeypatch):
    monkeypatch.setenv("RINGTRAIN_STALL_TIMEOUT", str(STALL_TIMEOUT))
    started = time.monotonic()
    with pytest.raises(
        ringtrain.StallError, match=r"uneven finish: rank\(s\) \[1\] returned from fn"
    ) as info:
        ringtrain.run(_finish_early, num_proc=2, backend="mpi")
    assert time.monotonic() - started < 90
    assert info.value.uneven_finish and info.value.missing == (1,) and info.value.waiting == (0,)
    assert "allreduce(last)" in str(info.value)


def test_timeout_stops_a_sleeping_job():
    started = time.monotonic()
    with pytest.raises(ringtrain.JobTimeoutError, match=r"within its 20 s timeout; ranks \[0, 1\]"):
        ringtrain.run(_sleep_in_python, num_proc=2, backend="tf", timeout=20)
    took = time.monotonic() - started
    assert 20 <= took < 26, f"took {took:.1f} s"


def _spawn_grandchild_and_wait(folder):
    """Leaves a setsid grandchild behind, records the process tree, then sleeps."""
    helper = subprocess.Popen(["sleep", "1234"], start_new_session=True)

    def parent(pid):
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])

    keeper = os.getppid()
    while b"ringtrain.launcher.keeper" not in Path(f"/proc/{keeper}/cmdline").read_bytes():
        keeper = parent(keeper)
    tree = {
        "worker": os.getpid(),
        "keeper": keeper,
        "task": parent(keeper),
        "grandchild": helper.pid,
        "workdir": os.environ["RINGTRAIN_WORKDIR"],
    }
    target = Path(folder, f"rank-{ringtrain.rank()}.json")
    target.with_suffix(".tmp").write_text(json.dumps(tree))
    target.with_suffix(".tmp").replace(target)
    time.sleep(600)


@pytest.mark.parametrize(
    ("backend", "victim"),
    # "task": the PySpark worker running the barrier task, as Spark kills it.
    # "keeper": the process the task agent runs in.
    [("tf", "task"), ("mpi", "task"), ("mpi", "keeper")],
)
def test_killed_agent_leaves_no_process_or_directory(backend, victim, tmp_path):
    def kill_rank_one_host():
        deadline = time.monotonic() + 120
        # Both ranks running (each with its grandchild), then rank 1's host goes.
        while not all((tmp_path / f"rank-{r}.json").exists() for r in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(json.loads((tmp_path / "rank-1.json").read_text())[victim], signal.SIGKILL)

    threading.Thread(target=kill_rank_one_host, daemon=True).start()
    with pytest.raises(ringtrain.AgentLostError) as info:
        ringtrain.run(_spawn_grandchild_and_wait, str(tmp_path), num_proc=2, backend=backend)
    raised = time.monotonic()
    err = info.value
    assert err.partition == 1 and err.host and "partition 1 on " in str(err)
    assert "Spark reported:" in str(err)
    trees = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    ours = [tree[k] for tree in trees for k in ("worker", "keeper", "grandchild")]
    while time.monotonic() - raised < 15:
        left = [p for p in ours if _alive(p)]
        dirs = [tree["workdir"] for tree in trees if os.path.exists(tree["workdir"])]
        if not left and not dirs:
            break
        time.sleep(0.2)
    assert not left, f"processes of the job outlived it by 15 s: {left}"
    assert not dirs, f"working directories outlived the job by 15 s: {dirs}"


def _exit_without_returning():
    if ringtrain.rank() == 1:
        os._exit(0)
    return "fine"


def test_os_exit_zero_is_a_failure_not_a_success():
    with pytest.raises(ringtrain.WorkerError, match="rank 1 on .* exited with code 0") as info:
        ringtrain.run(_exit_without_returning, num_proc=2, backend="tf")
    assert "os._exit(0)" in str(info.value)
    assert not isinstance(info.value, ringtrain.InfrastructureError)


def _chatty(lines):
    for i in range(lines):
        print(f"line {i}")
    return ringtrain.job_dir()


def test_rank_logs_hold_every_line(tmp_path):
    lines = 20000
    job_dir = ringtrain.run(_chatty, lines, num_proc=2, backend="tf", job_dir=str(tmp_path))
    assert job_dir == str(tmp_path)
    for rank in (0, 1):
        logged = (tmp_path / "logs" / f"rank-{rank}.log").read_text().splitlines()
        assert logged[0].startswith(f"==== ringtrain rank {rank}, restart 0")
        assert [line for line in logged if line.startswith("line ")] == [f"line {i}" for i in range(lines)]


def _checkpoint_on_stop(folder):
    import atexit

    atexit.register(lambda: Path(folder, f"atexit-{ringtrain.rank()}").write_text("flushed"))
    try:
        time.sleep(600)
    finally:
        Path(folder, f"finally-{ringtrain.rank()}").write_text("ran")


def test_stopped_workers_run_finally_and_atexit(tmp_path):
    with pytest.raises(ringtrain.JobTimeoutError):
        ringtrain.run(_checkpoint_on_stop, str(tmp_path), num_proc=2, backend="mpi", timeout=20)
    for rank in (0, 1):
        assert (tmp_path / f"finally-{rank}").read_text() == "ran"
        assert (tmp_path / f"atexit-{rank}").read_text() == "flushed"


def _unpicklable_on_rank_one():
    import threading

    return threading.Lock() if ringtrain.rank() == 1 else "rank 0's value"


def test_only_requested_results_travel():
    # Rank 1's value cannot be pickled, but nobody asked for it.
    assert ringtrain.run(_unpicklable_on_rank_one, num_proc=2, backend="tf") == "rank 0's value"
    with pytest.raises(ringtrain.WorkerError, match=r"rank 1: fn's return value cannot be pickled"):
        ringtrain.run(_unpicklable_on_rank_one, num_proc=2, backend="tf", return_all=True)


def _report_agent_then_sleep(folder):
    Path(folder, f"keeper-{ringtrain.rank()}").write_text(str(os.getppid()))
    time.sleep(600)


def test_silent_agent_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("RINGTRAIN_HEARTBEAT_TIMEOUT", "5")
    frozen: list[int] = []

    def freeze_rank_one_agent():
        deadline = time.monotonic() + 120
        while not (tmp_path / "keeper-1").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        frozen.append(int((tmp_path / "keeper-1").read_text()))
        os.kill(frozen[0], signal.SIGSTOP)

    threading.Thread(target=freeze_rank_one_agent, daemon=True).start()
    try:
        with pytest.raises(ringtrain.AgentLostError, match=r"partition 1 on \S+ was lost: its agent") as info:
            ringtrain.run(_report_agent_then_sleep, str(tmp_path), num_proc=2, backend="tf")
        assert "has sent nothing for" in str(info.value) and "Spark reported:" in str(info.value)
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)  # let it see its task is gone and clean up
    deadline = time.monotonic() + 30
    while pids_matching("ringtrain.launcher.keeper") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pids_matching("ringtrain.launcher.keeper")


def test_bad_fusion_variable_does_not_break_import_and_fails_before_start(monkeypatch):
    env = dict(os.environ, RINGTRAIN_FUSION_IMPL="turbo")
    done = subprocess.run([sys.executable, "-c", "import ringtrain"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("RINGTRAIN_FUSION_IMPL", "turbo")
    with pytest.raises(ringtrain.ConfigError, match="RINGTRAIN_FUSION_IMPL='turbo' is not valid"):
        ringtrain.run(lambda: None, num_proc=1)
    monkeypatch.delenv("RINGTRAIN_FUSION_IMPL")
    with pytest.raises(
        ringtrain.ConfigError, match="timeout must be a finite number of seconds > 0, got nan"
    ):
        ringtrain.run(lambda: None, num_proc=1, timeout=float("nan"))
