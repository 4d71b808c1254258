"""The collective hook and the progress file: what a worker records, what its agent reads."""

from __future__ import annotations

import threading
import time

import pytest

from ringtrain import progress


class _Log:
    def __init__(self):
        self.events = []

    def enter(self, what):
        self.events.append(("enter", what))

    def leave(self):
        self.events.append(("leave",))


def test_recorder_sees_enter_and_leave_even_when_the_body_raises():
    log = _Log()
    progress.install(log)
    try:
        with progress.collective("allreduce(a)"):
            pass
        with pytest.raises(ValueError), progress.collective("broadcast"):
            raise ValueError("boom")
    finally:
        progress.install(None)
    assert log.events == [("enter", "allreduce(a)"), ("leave",), ("enter", "broadcast"), ("leave",)]


def test_nothing_is_recorded_without_a_recorder():
    log = _Log()
    progress.install(None)
    try:
        with progress.collective("allreduce"):
            progress.install(log)  # arrives mid-collective: must not get that collective's leave
        with progress.collective("allgather"):
            progress.install(None)  # gone mid-collective: the one that saw the enter sees the leave
        with progress.collective("broadcast"):
            pass  # none installed: nothing recorded anywhere
    finally:
        progress.install(None)
    assert log.events == [("enter", "allgather"), ("leave",)]


def test_file_recorder_round_trip(tmp_path):
    path = tmp_path / "progress-0"
    assert progress.read(path) is None  # not there yet
    recorder = progress.FileRecorder(path)
    snap = progress.read(path)
    assert snap.seq == 0 and snap.collective is None and snap.finished_at == 0
    assert snap.main_thread == threading.main_thread().ident
    before = time.monotonic()
    progress.install(recorder)
    try:
        with progress.collective("allreduce(grads)"):
            inside = progress.read(path)
            with progress.collective("inner"):  # part of the outer one
                nested = progress.read(path)
        after = progress.read(path)
    finally:
        progress.install(None)
    assert inside.seq == 1 and inside.collective == "allreduce(grads)" and inside.entered_at >= before
    assert nested.seq == 1 and nested.collective == "allreduce(grads)"
    assert after.seq == 1 and after.collective is None and after.left_at >= inside.entered_at
    recorder.sample(runtime_since=0.0, python_since=before, where="train.py:3 in step")
    recorder.finished()
    done = progress.read(path)
    assert done.where == "train.py:3 in step" and done.python_since == before and done.finished_at > 0


def test_snapshot_as_durations(tmp_path):
    recorder = progress.FileRecorder(tmp_path / "p")
    recorder.enter("allgather")
    recorder.sample(runtime_since=0.0, python_since=0.0, where="x.py:1 in f")
    snap = progress.read(tmp_path / "p")
    now = snap.entered_at + 5.0
    rp = snap.as_rank_progress(3, "host-a", now)
    assert (rp.rank, rp.host, rp.seq, rp.collective) == (3, "host-a", 1, "allgather")
    assert rp.in_collective_for == pytest.approx(5.0)
    assert rp.in_runtime_for is None and rp.in_python_for is None and rp.finished_for is None
    assert rp.silent_for is not None and rp.where == "x.py:1 in f"
    assert progress.no_progress(3, "h").silent_for is None


def test_long_names_are_cut_not_overflowing(tmp_path):
    recorder = progress.FileRecorder(tmp_path / "p")
    recorder.enter("x" * 500)
    recorder.sample(0.0, 0.0, "é" * 400)
    snap = progress.read(tmp_path / "p")
    assert snap.collective.endswith("...") and len(snap.collective.encode()) <= 96
    assert snap.where.endswith("...")


def test_reader_never_sees_a_torn_record(tmp_path):
    recorder = progress.FileRecorder(tmp_path / "p")
    stop = threading.Event()

    def churn():
        n = 0
        while not stop.is_set():
            n += 1
            recorder.enter(f"c{n}")
            recorder.leave()

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for _ in range(2000):
            snap = progress.read(tmp_path / "p")
            # Inside: the name matches the sequence number written with it.
            assert snap.collective is None or snap.collective == f"c{snap.seq}"
    finally:
        stop.set()
        writer.join()


def test_recording_costs_microseconds(tmp_path):
    recorder = progress.FileRecorder(tmp_path / "p")
    progress.install(recorder)
    try:
        n = 20000
        started = time.perf_counter()
        for _ in range(n):
            with progress.collective("allreduce(grads)"):
                pass
        per_call = (time.perf_counter() - started) / n
    finally:
        progress.install(None)
    # A training step makes a handful of collectives and takes milliseconds or more.
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} us per collective"
