"""Restarts on the driver: what is retried, how often, what each attempt is told; job dir; worker env."""

from __future__ import annotations

import pytest

from ringtrain import env
from ringtrain.config import JobConfig
from ringtrain.errors import (
    AgentLostError,
    BackendStartError,
    ConfigError,
    Failure,
    JobTimeoutError,
    ResourceError,
    RingtrainError,
    StallError,
    WorkerError,
)
from ringtrain.launcher import driver, spark


@pytest.fixture
def cluster(monkeypatch, tmp_path):
    """A fake 2-slot cluster; ``outcomes`` says what each attempt raises (None: success)."""

    class _Conf:
        def get(self, key, default=None):
            return {"spark.master": "local[2]"}.get(key, default)

    class _Session:
        conf = _Conf()

    state = {"outcomes": [], "attempts": [], "deadlines": [], "preflights": 0, "preflight_error": None}

    def preflight(session, config):
        state["preflights"] += 1
        if state["preflight_error"] and state["preflights"] > 1:
            raise state["preflight_error"]
        return spark.Layout(2, 1, False)

    def launch_once(session, layout, config, payload, printer, attempt, job_dir, deadline, prepared=None):
        state["attempts"].append((attempt, job_dir))
        state["deadlines"].append(deadline)
        outcome = state["outcomes"].pop(0) if state["outcomes"] else None
        if outcome is not None:
            raise outcome
        return {0: b"ok"}

    monkeypatch.setattr(spark, "get_session", lambda config: _Session())
    monkeypatch.setattr(spark, "preflight", preflight)
    monkeypatch.setattr(driver, "_launch_once", launch_once)
    monkeypatch.setattr(driver, "default_job_dir", lambda: tmp_path / "job")
    return state


def _lost():
    return WorkerError.of([Failure(1, "h", None, "SIGKILL", "")])


def test_failures_are_retried_up_to_max_restarts_with_the_cause_logged(cluster, capsys):
    cluster["outcomes"] = [_lost(), StallError("rank 1 stalled")]
    assert driver.launch(JobConfig(num_proc=2, backend="tf", max_restarts=2, timeout=100), b"") == {0: b"ok"}
    assert [a for a, _ in cluster["attempts"]] == [0, 1, 2]
    assert len({d for _, d in cluster["attempts"]}) == 1  # one job directory for every attempt
    assert len(set(cluster["deadlines"])) == 1  # the timeout covers all attempts
    err = capsys.readouterr().err
    assert (
        "restart 1 of 2 after: WorkerLostError: 1 worker(s) failed: rank 1 on h was killed by signal SIGKILL"
        in err
    )
    assert "restart 2 of 2 after: StallError: rank 1 stalled" in err


def test_the_last_failure_is_raised_when_restarts_run_out(cluster):
    cluster["outcomes"] = [_lost(), AgentLostError("partition 1 lost", 1, "h")]
    with pytest.raises(AgentLostError, match="partition 1 lost"):
        driver.launch(JobConfig(num_proc=2, backend="tf", max_restarts=1), b"")
    assert len(cluster["attempts"]) == 2


def test_no_restart_by_default(cluster):
    cluster["outcomes"] = [_lost()]
    with pytest.raises(WorkerError):
        driver.launch(JobConfig(num_proc=2, backend="tf"), b"")
    assert len(cluster["attempts"]) == 1


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("bad"),
        ResourceError("no slots"),
        JobTimeoutError("too slow"),
        BackendStartError("no mpiexec"),
    ],
)
def test_preflight_timeout_and_backend_errors_are_never_retried(cluster, error):
    cluster["outcomes"] = [error]
    with pytest.raises(type(error)):
        driver.launch(JobConfig(num_proc=2, backend="tf", max_restarts=3), b"")
    assert len(cluster["attempts"]) == 1


def test_a_restart_that_cannot_get_the_slots_fails_like_a_first_start(cluster):
    cluster["outcomes"] = [_lost()]
    cluster["preflight_error"] = ResourceError("num_proc=2 needs 2 barrier task slots, but the cluster has 1")
    with pytest.raises(ResourceError, match="cluster has 1"):
        driver.launch(JobConfig(num_proc=2, backend="tf", max_restarts=3), b"")
    assert cluster["preflights"] == 2 and len(cluster["attempts"]) == 1


def test_what_is_retryable():
    assert driver.is_retryable(WorkerError([Failure(0, "h", 1, None, "Traceback")]))
    assert driver.is_retryable(_lost()) and driver.is_retryable(StallError("x"))
    assert driver.is_retryable(RingtrainError("the Spark barrier job failed"))
    for fatal in (ConfigError("x"), ResourceError("x"), JobTimeoutError("x"), BackendStartError("x")):
        assert not driver.is_retryable(fatal)
    assert not driver.is_retryable(KeyboardInterrupt())


def test_job_dir_is_created_or_refused(tmp_path):
    made = driver.prepare_job_dir(str(tmp_path / "a" / "b"), "local[2]")
    assert (tmp_path / "a" / "b" / "logs").is_dir() and made == str(tmp_path / "a" / "b")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot create the job directory"):
        driver.prepare_job_dir(str(blocker / "sub"), "local[2]")


def test_worker_env_forwards_checked_settings(monkeypatch):
    monkeypatch.setenv("RINGTRAIN_FUSION_THRESHOLD", "16M")
    config = JobConfig.from_env(num_proc=2, worker_env={"RINGTRAIN_FUSION_THREADS": "2", "MINE": "x"})
    worker = driver.worker_env(config, attempt=3, job_dir="/jobs/j1")
    assert worker["RINGTRAIN_FUSION_THRESHOLD"] == "16M"  # the driver's value reaches every rank
    assert worker["RINGTRAIN_FUSION_THREADS"] == "2" and worker["MINE"] == "x"  # the job's own wins
    assert worker["RINGTRAIN_FUSION_IMPL"] == "auto"  # defaults travel too
    assert worker["RINGTRAIN_RESTART_COUNT"] == "3" and worker["RINGTRAIN_JOB_DIR"] == "/jobs/j1"
    assert worker["RINGTRAIN_RESULTS"] == "all"
    assert float(worker["RINGTRAIN_KILL_GRACE"]) == config.kill_grace
    monkeypatch.setenv("RINGTRAIN_FUSION_THRESHOLD", "huge")
    with pytest.raises(ConfigError, match="RINGTRAIN_FUSION_THRESHOLD='huge'"):
        JobConfig.from_env(num_proc=2)


def test_env_parsers():
    assert env.byte_size("128M") == 128 << 20 and env.byte_size("0") == 0 and env.byte_size("1GiB") == 1 << 30
    assert env.port_range("") is None and env.port_range("40000-40010") == (40000, 40010)
    assert env.port_range("5000") == (5000, 5000)
    for bad in ("9-1", "0-5", "70000"):
        with pytest.raises(ValueError):
            env.port_range(bad)
    assert env.seconds("2.5", "x") == 2.5 and env.seconds(0, "x", allow_zero=True) == 0
    for bad in (float("nan"), float("inf"), -1, 0, "soon"):
        with pytest.raises(ConfigError, match="x must be"):
            env.seconds(bad, "x")


def test_max_restarts_and_job_dir_are_checked():
    with pytest.raises(ConfigError, match="max_restarts must be a whole number >= 0"):
        JobConfig(max_restarts=-1)
    with pytest.raises(ConfigError, match="max_restarts"):
        JobConfig(max_restarts=1.5)
    with pytest.raises(ConfigError, match="job_dir must be a non-empty path"):
        JobConfig(job_dir=" ")
    with pytest.raises(ConfigError, match="stall_timeout"):
        JobConfig(stall_timeout=float("inf"))
    assert JobConfig(stall_timeout=0).stall_timeout == 0


@pytest.mark.parametrize("where", ["await_slots", "supervisor"])
def test_a_stage_submitted_before_supervision_fails_is_cancelled(monkeypatch, tmp_path, where):
    """Anything that raises between submitting the barrier stage and the supervisor taking
    over cancels the stage, and waits for it, before the error propagates."""

    class _Conf:
        def get(self, key, default=None):
            return {"spark.master": "local[2]", "spark.driver.host": "127.0.0.1"}.get(key, default)

    class _Session:
        conf = _Conf()

    stages = []

    class _Stage:
        def __init__(self, session, num_tasks, task_fn, data=None, profile=None):
            self.events = []
            stages.append(self)

        def start(self):
            self.events.append("start")

        def cancel(self):
            self.events.append("cancel")

        def join(self, timeout=None):
            self.events.append("join")

    def broken(*args, **kwargs):
        raise RuntimeError(f"{where} broke")

    monkeypatch.setattr(driver, "BarrierStage", _Stage)
    if where == "await_slots":
        monkeypatch.setattr(spark, "await_slots", broken)
    else:
        monkeypatch.setattr(spark, "await_slots", lambda stage, layout, config: None)
        monkeypatch.setattr(driver, "_Supervisor", broken)
    with pytest.raises(RuntimeError, match=f"{where} broke"):
        driver._launch_once(
            _Session(), spark.Layout(2, 1), JobConfig(), b"", driver.LogPrinter(), 0, str(tmp_path), None
        )
    (stage,) = stages
    assert stage.events == ["start", "cancel", "join"]
