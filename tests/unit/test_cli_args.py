"""The CLI's argument parsing, RINGTRAIN_* merging and error mapping, without Spark."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from ringtrain import cli, config
from ringtrain.errors import ConfigError, Failure, JobTimeoutError, ResourceError, WorkerError
from ringtrain.launcher.spark import check_master_reachable

NO_BAR = {"spark.ui.showConsoleProgress": "false"}
CLI_VARS = [*cli.FLAG_VARS.values(), "RINGTRAIN_CONF", "RINGTRAIN_ENV"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in CLI_VARS:
        monkeypatch.delenv(name, raising=False)


def parse(*argv: str):
    ns = cli.build_parser().parse_args(["launch", *argv])
    return ns, cli.config_from_args(ns)


def test_flags_fill_the_job_config():
    ns, cfg = parse(
        "-np",
        "2",
        "--conf",
        "spark.a=1",
        "--conf",
        "spark.b=x=y",
        "--env",
        "A=1",
        "--timeout",
        "30",
        "--gpus-per-proc",
        "2",
        "--threads",
        "3",
        "--master",
        "local[2]",
        "train.py",
    )
    assert cfg.num_proc == 2 and cfg.master == "local[2]" and cfg.timeout == 30.0
    assert dict(cfg.spark_conf) == {**NO_BAR, "spark.a": "1", "spark.b": "x=y"}
    assert dict(cfg.worker_env) == {"A": "1"}
    assert cfg.gpus_per_worker == 2 and cfg.threads_per_worker == 3
    assert ns.script == "train.py" and ns.script_args == []


def test_script_args_may_look_like_launcher_flags():
    ns, cfg = parse("-np", "2", "train.py", "-np", "5", "--conf", "--epochs=3")
    assert cfg.num_proc == 2
    assert ns.script_args == ["-np", "5", "--conf", "--epochs=3"]


def test_defaults_come_from_job_config():
    ns, cfg = parse("train.py")
    assert cfg.num_proc is None and cfg.master is None and cfg.timeout is None
    assert cfg.backend == config.JobConfig().backend
    assert dict(cfg.spark_conf) == NO_BAR and dict(cfg.worker_env) == {}


def test_backend_choices_follow_config_backends():
    for backend in config.BACKENDS:
        assert parse("--backend", backend, "train.py")[1].backend == backend


def test_environment_supplies_defaults_and_flags_win(monkeypatch):
    monkeypatch.setenv("RINGTRAIN_NP", "3")
    monkeypatch.setenv("RINGTRAIN_MASTER", "local[4]")
    monkeypatch.setenv("RINGTRAIN_TIMEOUT", "12.5")
    monkeypatch.setenv("RINGTRAIN_TF_THREADS", "2")
    monkeypatch.setenv("RINGTRAIN_CONF", "spark.a=1,spark.opts=-Dx=1,2\nspark.b=2")
    monkeypatch.setenv("RINGTRAIN_ENV", "A=env, B=env")
    _, cfg = parse("train.py")
    assert (cfg.num_proc, cfg.master, cfg.timeout, cfg.threads_per_worker) == (3, "local[4]", 12.5, 2)
    assert dict(cfg.spark_conf) == {**NO_BAR, "spark.a": "1", "spark.opts": "-Dx=1,2", "spark.b": "2"}
    assert dict(cfg.worker_env) == {"A": "env", "B": "env"}

    _, cfg = parse(
        "-np",
        "1",
        "--master",
        "local[1]",
        "--threads",
        "0",
        "--conf",
        "spark.a=flag",
        "--env",
        "B=flag",
        "train.py",
    )
    assert (cfg.num_proc, cfg.master, cfg.threads_per_worker) == (1, "local[1]", 0)
    assert dict(cfg.spark_conf) == {**NO_BAR, "spark.a": "flag", "spark.opts": "-Dx=1,2", "spark.b": "2"}
    assert dict(cfg.worker_env) == {"A": "env", "B": "flag"}


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["-np", "0"], {}, "-np must be at least 1"),
        ([], {"RINGTRAIN_NP": "0"}, "-np must be at least 1"),
        ([], {"RINGTRAIN_NP": "two"}, "RINGTRAIN_NP='two' is not valid"),
        (["--conf", "spark.a"], {}, "--conf 'spark.a' is not KEY=VALUE"),
        (["--conf", "=1"], {}, "is not KEY=VALUE"),
        ([], {"RINGTRAIN_CONF": "spark.a"}, "RINGTRAIN_CONF entry 'spark.a'"),
        (["--env", "NOVALUE"], {}, "--env 'NOVALUE' is not KEY=VALUE"),
        (["--env", "1BAD=x"], {}, "not a valid environment variable name"),
        (["--timeout", "-1"], {}, "timeout must be a finite number of seconds > 0"),
        (["--timeout", "nan"], {}, "timeout must be a finite number of seconds > 0, got nan"),
        ([], {"RINGTRAIN_TIMEOUT": "inf"}, "timeout must be a finite number of seconds > 0, got inf"),
        (["--max-restarts", "-1"], {}, "max_restarts must be a whole number >= 0"),
        ([], {"RINGTRAIN_MAX_RESTARTS": "x"}, "RINGTRAIN_MAX_RESTARTS='x' is not valid"),
        ([], {"RINGTRAIN_KILL_GRACE": "nan"}, "RINGTRAIN_KILL_GRACE='nan' is not valid"),
        ([], {"RINGTRAIN_FUSION_THRESHOLD": "lots"}, "RINGTRAIN_FUSION_THRESHOLD='lots' is not valid"),
        (["--env", "RINGTRAIN_FUSION_IMPL=fast"], {}, "RINGTRAIN_FUSION_IMPL='fast' is not valid"),
        ([], {"RINGTRAIN_BACKEND": "nccl"}, "unknown backend 'nccl'"),
        (["--gpus-per-proc", "0"], {}, "gpus_per_worker must be >= 1"),
    ],
)
def test_bad_values_raise_config_error(monkeypatch, argv, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse(*argv, "train.py")


@pytest.mark.parametrize(
    "argv",
    [
        ["launch", "--bogus", "x.py"],
        ["launch", "-np", "x", "x.py"],
        ["launch"],
        ["launch", "--backend", "nope", "x.py"],
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(argv)
    assert info.value.code == 2
    assert "usage: ringtrain" in capsys.readouterr().err


def test_split_list_keeps_commas_inside_values():
    assert cli.split_list("a=1, b=2,3\n\nc=x,y=z") == ["a=1", "b=2,3", "c=x", "y=z"]
    assert cli.split_list("  ") == []


def test_resolve_script(tmp_path, monkeypatch):
    script = tmp_path / "train.py"
    script.write_text("pass\n")
    monkeypatch.chdir(tmp_path)
    assert cli.resolve_script("train.py") == str(script)
    with pytest.raises(ConfigError, match="'missing.py' does not exist"):
        cli.resolve_script("missing.py")
    with pytest.raises(ConfigError, match="is not a file"):
        cli.resolve_script(str(tmp_path))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_master_reachability():
    for ok in ("local", "local[2]", "local[*]", "local[2,3]", "local-cluster[2,1,1024]", "mesos://x:5050"):
        check_master_reachable(ok)
    port = _closed_port()
    started = time.monotonic()
    with pytest.raises(ResourceError, match=f"cannot reach the Spark master spark://127.0.0.1:{port}"):
        check_master_reachable(f"spark://127.0.0.1:{port}")
    with pytest.raises(ResourceError, match="cannot reach"):
        check_master_reachable(f"k8s://http://127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        # HA form: one reachable master is enough.
        check_master_reachable(f"spark://127.0.0.1:{port},127.0.0.1:{server.getsockname()[1]}")
    for bad in ("spark://nohost", "spark://", "localhost[2]", "k8s://"):
        with pytest.raises(ConfigError):
            check_master_reachable(bad)


def test_yarn_needs_its_config_dir(monkeypatch):
    monkeypatch.delenv("HADOOP_CONF_DIR", raising=False)
    monkeypatch.delenv("YARN_CONF_DIR", raising=False)
    with pytest.raises(ConfigError, match="HADOOP_CONF_DIR or YARN_CONF_DIR"):
        check_master_reachable("yarn")
    monkeypatch.setenv("YARN_CONF_DIR", "/etc/hadoop")
    check_master_reachable("yarn")


@pytest.mark.parametrize(
    ("error", "code", "last_line"),
    [
        (
            WorkerError(
                [Failure(1, "h1", 3, None, "SystemExit: 3\n"), Failure(0, "h0", None, "SIGTERM", "")]
            ),
            3,
            "ringtrain: rank 1 on h1 exited with code 3 (and 1 more)",
        ),
        (
            WorkerError([Failure(2, "h2", None, "SIGKILL", "")]),
            128 + 9,
            "ringtrain: rank 2 on h2 was killed by signal SIGKILL",
        ),
        (JobTimeoutError("the job did not finish"), 124, "ringtrain: the job did not finish"),
        (ResourceError("no slots"), 1, "ringtrain: error: no slots"),
        (ConfigError("bad thing"), 2, "ringtrain: error: bad thing"),
        (KeyboardInterrupt(), 130, None),
        (RuntimeError("java gateway exited"), 1, "ringtrain: error: RuntimeError: java gateway exited"),
    ],
)
def test_errors_map_to_exit_codes(monkeypatch, tmp_path, capsys, error, code, last_line):
    script = tmp_path / "s.py"
    script.write_text("")

    def fail(*_):
        raise error

    monkeypatch.setattr(cli, "launch", fail)
    assert cli.main(["launch", "-np", "2", str(script)]) == code
    err = capsys.readouterr().err.strip()
    if last_line:
        assert err.splitlines()[-1] == last_line


def test_main_passes_an_absolute_script_and_its_args(monkeypatch, tmp_path):
    (tmp_path / "s.py").write_text("")
    monkeypatch.chdir(tmp_path)
    seen = {}
    monkeypatch.setattr(
        cli, "launch", lambda cfg, script, args: seen.update(cfg=cfg, script=script, args=args) or 0
    )
    assert cli.main(["launch", "-np", "2", "s.py", "--", "x", "-v"]) == 0
    assert seen["script"] == str(tmp_path / "s.py") and seen["args"] == ["x", "-v"]
    assert seen["cfg"].num_proc == 2


def test_stop_signals_raise_keyboard_interrupt_and_restore():
    before = signal.getsignal(signal.SIGTERM)
    stop = cli.StopSignals()
    with pytest.raises(KeyboardInterrupt), stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted at once by the handler
    assert stop.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before
    assert cli.StopSignals().exit_code == 130


def test_smoke_test_registry():
    assert "tf" in cli.SMOKE_TESTS
    tf_test = cli.SMOKE_TESTS["tf"]
    assert tf_test.verify([[3.0] * 4, [3.0] * 4]) is None
    assert "expected" in tf_test.verify([[3.0] * 4, [2.0] * 4])
    assert set(cli.SMOKE_TESTS) >= set(b for b in config.BACKENDS if b in ("tf", "mpi"))


def test_check_findings_without_spark():
    found = {f.name: f for f in cli.collect_findings()}
    assert {
        "python",
        "java",
        "pyspark",
        "tensorflow",
        "tf.keras",
        "keras",
        "mpi4py",
        "fusion",
        "gpus",
    } <= set(found)
    assert found["python"].ok and found["pyspark"].ok and found["tensorflow"].ok
    assert found["fusion"].value in ("native", "numpy")


def test_check_reports_missing_java(monkeypatch, capsys):
    monkeypatch.setenv("JAVA_HOME", "/nonexistent-jdk")
    assert cli.main(["check", "--no-smoke"]) == 1
    out = capsys.readouterr()
    assert "JDK 17" in out.out and "missing java" in out.err


def test_restart_and_job_dir_flags(monkeypatch, tmp_path):
    _, cfg = parse("--max-restarts", "2", "--job-dir", str(tmp_path), "train.py")
    assert cfg.max_restarts == 2 and cfg.job_dir == str(tmp_path)
    assert cfg.results == "none"  # a script's exit is its result: no return value travels
    monkeypatch.setenv("RINGTRAIN_MAX_RESTARTS", "3")
    monkeypatch.setenv("RINGTRAIN_JOB_DIR", "/shared/jobs/a")
    _, cfg = parse("train.py")
    assert cfg.max_restarts == 3 and cfg.job_dir == "/shared/jobs/a"
    _, cfg = parse("--max-restarts", "0", "--job-dir", "/other", "train.py")
    assert cfg.max_restarts == 0 and cfg.job_dir == "/other"  # flags win
    _, cfg = parse("train.py")
    assert cfg.max_restarts == 3
    monkeypatch.delenv("RINGTRAIN_MAX_RESTARTS")
    monkeypatch.delenv("RINGTRAIN_JOB_DIR")
    _, cfg = parse("train.py")
    assert cfg.max_restarts == 0 and cfg.job_dir is None


def test_help_lists_the_new_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["launch", "--help"])
    out = capsys.readouterr().out
    for text in ("--max-restarts N", "--job-dir DIR", "RINGTRAIN_MAX_RESTARTS", "RINGTRAIN_JOB_DIR"):
        assert text in out
