"""The worker's side of supervision: SIGTERM reaches the main thread, exits are bounded, results
are checked on their rank, stacks can be dumped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ringtrain import progress
from ringtrain.errors import RingtrainError
from ringtrain.protocol import STACK_SIGNAL, WorkDir


def _worker_like(tmp_path, body: str) -> subprocess.Popen:
    """A process that installs the worker's watch (as a worker does) and then runs ``body``."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys, threading, time
        from ringtrain.protocol import WorkDir
        from ringtrain.worker import _watch
        files = WorkDir({str(tmp_path)!r})
        recorder = _watch.install(files, 0, 0.2)
        """
    ) + textwrap.dedent(body)
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_line(proc: subprocess.Popen, wanted: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == wanted:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {wanted!r}: {proc.stderr.read()}")
    raise AssertionError(f"never printed {wanted!r}")


def test_sigterm_delivered_to_another_thread_still_stops_the_main_thread(tmp_path):
    proc = _worker_like(
        tmp_path,
        """
        other = threading.Thread(target=time.sleep, args=(600,), daemon=True)
        other.start()
        print("ready", flush=True)
        try:
            # As when Linux picks one of TensorFlow's threads for a process-directed signal.
            threading.Timer(0.2, signal.pthread_kill, (other.ident, signal.SIGTERM)).start()
            time.sleep(600)
        except _watch.Stopped:
            print("stopped", flush=True)
            _watch.exit_process(0, 5.0, signal.SIGTERM)
        """,
    )
    try:
        _wait_line(proc, "ready")
        started = time.monotonic()
        _wait_line(proc, "stopped", timeout=10)
        assert proc.wait(10) == -signal.SIGTERM  # it ends by the signal, after its clean-up
        assert time.monotonic() - started < 5
    finally:
        proc.kill()


def test_a_replaced_sigterm_handler_is_taken_back(tmp_path):
    # TensorFlow's coordination service installs a C++ handler that only logs; here a C-level
    # SIG_IGN stands in for it. The sampler restores ringtrain's handler within a sample.
    proc = _worker_like(
        tmp_path,
        """
        import ctypes
        libc = ctypes.CDLL(None)
        libc.signal(signal.SIGTERM, ctypes.c_void_p(1))  # SIG_IGN, behind Python's back
        current = _watch._Sigaction()
        deadline = time.monotonic() + 10
        while True:  # the sampler (one sample per 0.2 s here) puts the handler back
            libc.sigaction(signal.SIGTERM, None, ctypes.byref(current))
            if current.handler != 1:
                break
            if time.monotonic() > deadline:
                sys.exit("SIGTERM was still ignored after 10 s")
            time.sleep(0.02)
        try:
            print("ready", flush=True)
            time.sleep(600)
        except _watch.Stopped:
            print("stopped", flush=True)
        """,
    )
    try:
        _wait_line(proc, "ready")
        proc.send_signal(signal.SIGTERM)
        _wait_line(proc, "stopped", timeout=10)
    finally:
        proc.kill()
        proc.wait()


def test_exit_runs_atexit_within_a_bound(tmp_path):
    proc = _worker_like(
        tmp_path,
        """
        import atexit
        atexit.register(lambda: time.sleep(600))   # registered first, runs last
        atexit.register(lambda: print("flushed", flush=True))
        _watch.exit_process(0, 2.0)
        """,
    )
    try:
        started = time.monotonic()
        _wait_line(proc, "flushed")
        code = proc.wait(20)
        assert time.monotonic() - started < 10
        assert code == 1  # faulthandler ended the stuck handler
        assert "Timeout" in proc.stderr.read()
    finally:
        proc.kill()


def test_stack_signal_dumps_every_thread_to_the_stacks_file(tmp_path):
    proc = _worker_like(
        tmp_path,
        """
        def stuck_here():
            print("ready", flush=True)
            time.sleep(600)
        stuck_here()
        """,
    )
    try:
        _wait_line(proc, "ready")
        snap = progress.read(WorkDir(tmp_path).progress(0))
        assert snap is not None and snap.pid == proc.pid
        os.kill(proc.pid, STACK_SIGNAL)
        stacks = WorkDir(tmp_path).stacks(0)
        deadline = time.monotonic() + 10
        while "stuck_here" not in stacks.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "in stuck_here" in stacks.read_text()
        assert proc.poll() is None  # the signal did not end it
        # The sampler (every 0.2 s here) saw it in plain Python, at that line.
        time.sleep(0.5)
        snap = progress.read(WorkDir(tmp_path).progress(0))
        assert snap.python_since > 0 and "in stuck_here" in snap.where
    finally:
        proc.kill()
        proc.wait()


def test_result_is_checked_on_its_rank(monkeypatch):
    import ringtrain.worker as worker

    monkeypatch.setenv("RINGTRAIN_RESULTS", "all")
    assert worker.result_bytes([1, 2], 0)
    monkeypatch.setattr(worker, "MAX_RESULT_BYTES", 10)
    with pytest.raises(
        RingtrainError, match=r"rank 3: fn's return value pickles to \d+ bytes, over the 10 byte"
    ):
        worker.result_bytes(list(range(100)), 3)
    monkeypatch.setenv("RINGTRAIN_RESULTS", "0")
    assert worker.result_bytes(list(range(100)), 3) == b""  # not asked for: never pickled
    with pytest.raises(RingtrainError, match="rank 0: fn's return value cannot be pickled"):
        worker.result_bytes(__import__("threading").Lock(), 0)
    monkeypatch.setenv("RINGTRAIN_RESULTS", "none")
    assert worker.result_bytes("x", 0) == b""


def test_sigterm_while_a_failure_is_reported_still_reports_it_and_exits_at_once(tmp_path):
    # The agent stops every rank as soon as one fails; the SIGTERM can land while a rank is
    # still formatting its own traceback. It must still write its error and exit through
    # the worker's bounded exit, not escape into interpreter shutdown (where MPI's finalize
    # with a dead peer would hold it until the agent's SIGKILL).
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        import cloudpickle
        from ringtrain.protocol import WorkDir
        from ringtrain.worker import FunctionTask, main

        import linecache
        read_line = linecache.getline

        def slow_read(*args, **kwargs):  # as when reading a source line from a slow disk
            if not os.environ.get("SENT"):
                os.environ["SENT"] = "1"
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)
            return read_line(*args, **kwargs)

        class PeerGone(Exception):
            pass

        def fn():
            linecache.getline = slow_read
            raise PeerGone("rank 1 died")

        files = WorkDir({str(tmp_path)!r})
        files.payload.write_bytes(cloudpickle.dumps(FunctionTask(fn)))
        os.environ.update(RANK="0", RINGTRAIN_KILL_GRACE="30")
        main({str(tmp_path)!r})
        print("main returned", flush=True)
        """
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "main returned" not in done.stdout and "Stopped" not in done.stderr
    assert time.monotonic() - started < 20  # not the 30 s exit bound
    assert "PeerGone: rank 1 died" in WorkDir(tmp_path).error(0).read_text()


def test_the_mpi_librarys_shared_memory_is_noted_and_removed_after_the_ranks(tmp_path):
    from ringtrain.launcher.workers import remove_mpi_segments
    from ringtrain.worker import mapped_shm_files

    mine = f"/dev/shm/ringtrain-test-{os.getpid()}"
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 rw-s 00000000 00:1a 11 " + mine + "\n"
        "7f01-7f02 rw-s 00000000 00:1a 12 " + mine + "\n"  # mapped twice: noted once
        "7f02-7f03 rw-s 00000000 00:1a 13 /dev/shm/psm2 (deleted)\n"  # already unlinked
        "7f03-7f04 r-xp 00000000 08:01 14 /usr/lib/libmpi.so.12\n"
        "7ffc-7ffd rw-p 00000000 00:00 0 [stack]\n"
    )
    assert mapped_shm_files(str(maps)) == [mine]
    files = WorkDir(tmp_path)
    with open(mine, "wb") as segment:
        segment.write(b"x")
    files.mpi_segments(3).write_text(f"{mine}\n/etc/hostname\n/dev/shm/../etc/passwd")
    try:
        # Only files directly in /dev/shm go.
        assert remove_mpi_segments(files) == [mine]
        assert not os.path.exists(mine) and os.path.exists("/etc/hostname")
        assert remove_mpi_segments(files) == []  # already gone: nothing to do
    finally:
        if os.path.exists(mine):
            os.unlink(mine)
