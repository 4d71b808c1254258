"""``ringtrain launch`` and ``ringtrain check`` driven as a user would, in a subprocess."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from procs import cmdline

from ringtrain.backends._hydra import descendants

HELPERS = Path(__file__).resolve().parent.parent / "helpers"
PYTHON_M = [sys.executable, "-m", "ringtrain"]


def _console_script() -> list[str]:
    found = Path(sys.executable).parent / "ringtrain"
    return [str(found)] if found.exists() else [shutil.which("ringtrain") or "ringtrain"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RINGTRAIN_NP", "RINGTRAIN_MASTER"))}
    env.update(extra)
    return env


def _run(argv: list[str], timeout: float = 240, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env(**env), check=False)
    return done, time.monotonic() - started


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ bad input: no Spark starts


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["launch", "--bogus", "x.py"], 2, "unrecognized arguments: --bogus"),
        (["launch", "-np", "2", "no/such/script.py"], 2, "script 'no/such/script.py' does not exist"),
        (["launch", "-np", "0", str(HELPERS / "cli_hello.py")], 2, "-np must be at least 1"),
        (["launch", "--conf", "spark.executor.cores", str(HELPERS / "cli_hello.py")], 2, "is not KEY=VALUE"),
        (["launch", "--env", "NO_EQUALS", str(HELPERS / "cli_hello.py")], 2, "is not KEY=VALUE"),
        (["launch", "--env", "9X=1", str(HELPERS / "cli_hello.py")], 2, "not a valid environment variable"),
        (
            ["launch", "--master", "spark://127.0.0.1:{port}", str(HELPERS / "cli_hello.py")],
            1,
            "cannot reach the Spark master spark://127.0.0.1:{port}",
        ),
        (
            ["launch", "--master", "spark://nohost", str(HELPERS / "cli_hello.py")],
            2,
            "is not spark://HOST:PORT",
        ),
    ],
)
def test_bad_input_fails_fast_with_a_clear_message(args, code, message):
    port = str(_closed_port())
    args = [a.replace("{port}", port) for a in args]
    done, took = _run(PYTHON_M + args, timeout=60)
    assert done.returncode == code, done.stderr
    assert message.replace("{port}", port) in done.stderr
    assert took < 30
    assert "Traceback" not in done.stderr


def test_help_shows_examples_and_variables():
    done, took = _run(_console_script() + ["launch", "--help"], timeout=60)
    assert done.returncode == 0
    assert "examples:" in done.stdout and "RINGTRAIN_NP" in done.stdout and "RINGTRAIN_CONF" in done.stdout
    assert took < 10


# ------------------------------------------------------------------ real jobs on a local Spark


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = {p for p in pids if _alive(p)}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


@pytest.mark.integration
def test_console_script_runs_every_rank_with_prefixed_output():
    done, _ = _run(
        _console_script()
        + ["launch", "--env", "GREETING=hi", str(HELPERS / "cli_hello.py"), "a", "-np", "9"],
        RINGTRAIN_NP="2",  # -np from the environment
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    for rank in (0, 1):
        assert f"[{rank}] hello rank={rank} size=2 workers=2 argv=['a', '-np', '9']" in out
        assert f"[{rank}] GREETING=hi" in out
        assert f"[{rank}] to stderr from {rank}" in done.stderr.splitlines()


@pytest.mark.integration
def test_failing_rank_exit_code_is_passed_through():
    done, took = _run(PYTHON_M + ["launch", "-np", "2", str(HELPERS / "cli_exit.py"), "3"])
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("ringtrain: rank 1 on ")
    assert done.stderr.strip().endswith("exited with code 3")
    assert "SystemExit: 3" in done.stderr
    assert took < 90


def _wait_for_lines(proc: subprocess.Popen, wanted: set[str], timeout: float) -> list[str]:
    # A reader thread, not select(): readline can pull two lines into Python's buffer while
    # select() only sees the (then empty) pipe.
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not wanted <= set(seen):
        if time.monotonic() >= deadline:
            raise AssertionError(f"never saw {wanted - set(seen)}; got {seen}")
        try:
            seen.append(lines.get(timeout=0.5).rstrip("\n"))
        except queue.Empty:
            if proc.poll() is not None:
                raise AssertionError(
                    f"the CLI exited ({proc.returncode}) before {wanted - set(seen)}"
                ) from None
    return seen


@pytest.mark.integration
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_the_job_and_every_worker(sig, code):
    proc = subprocess.Popen(
        PYTHON_M + ["launch", "-np", "2", str(HELPERS / "cli_sleep.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        _wait_for_lines(proc, {"[0] ready 0", "[1] ready 1"}, timeout=120)
        tree = set(descendants(proc.pid))
        workers = {p for p in tree if "-m ringtrain.worker" in cmdline(p)}
        assert len(workers) >= 2, "expected both workers to be running"
        started = time.monotonic()
        proc.send_signal(sig)
        proc.wait(timeout=15)
        took = time.monotonic() - started
        assert proc.returncode == code, proc.stderr.read()
        assert took < 10, f"exit took {took:.1f} s"
        # Every worker, and the Spark JVM and Python workers under it, are gone.
        assert not _wait_gone(workers, timeout=2.0), "worker processes outlived the CLI"
        left = _wait_gone(tree, timeout=5.0)
        assert not left, f"processes outlived the CLI: {[cmdline(p)[:80] for p in left]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_check_reports_and_smoke_tests_pass():
    done, _ = _run(PYTHON_M + ["check"])
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.startswith("  ")}
    for name in ("python", "java", "pyspark", "tensorflow", "tf.keras", "mpi4py", "fusion", "gpus"):
        assert name in rows, done.stdout
    assert rows["tf"].split()[1] == "pass", done.stdout


@pytest.mark.integration
def test_max_restarts_runs_the_script_again_in_one_job_dir(tmp_path):
    done, _ = _run(
        PYTHON_M
        + [
            "launch",
            "-np",
            "2",
            "--max-restarts",
            "1",
            "--job-dir",
            str(tmp_path),
            str(HELPERS / "cli_restart.py"),
        ]
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert f"[1] attempt 0 job_dir {tmp_path}" in out and f"[1] attempt 1 job_dir {tmp_path}" in out
    assert "ringtrain: restart 1 of 1 after: WorkerError: 1 worker(s) failed: rank 1 on" in done.stderr
    log = (tmp_path / "logs" / "rank-1.log").read_text()
    assert "attempt 0" in log and "attempt 1" in log
