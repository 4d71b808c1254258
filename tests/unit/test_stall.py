"""Stall detection, as pure logic over per-rank progress."""

import pickle

from ringtrain.errors import StallError
from ringtrain.launcher.stall import SAMPLED, StallInspector, find_stall
from ringtrain.protocol import RankProgress


def _in(rank, seq, name, secs, **kw):
    return RankProgress(
        rank, f"h{rank}", seq=seq, collective=name, in_collective_for=secs, silent_for=0.5, **kw
    )


def _python(rank, seq, secs, **kw):
    return RankProgress(
        rank, f"h{rank}", seq=seq, in_python_for=secs, silent_for=0.5, where="t.py:9 in f", **kw
    )


def test_rank_that_never_entered_the_collective_is_missing():
    ranks = [_in(0, 5, "allreduce(g)", 61.0), _in(1, 5, "allreduce(g)", 61.0), _python(2, 4, 70.0)]
    report = find_stall(ranks, after=60)
    assert report.collective == "allreduce(g) (collective #5)"
    assert [r.rank for r in report.waiting] == [0, 1] and [r.rank for r in report.missing] == [2]
    assert report.waited == 61.0 and not report.uneven_finish
    text = report.describe({2: "Current thread 0x1:\n  File t.py, line 9 in f"}, "advice")
    assert "rank(s) [0, 1] have waited 61 s in allreduce(g) (collective #5), which rank(s) [2]" in text
    assert "rank 2 on h2: running Python for 70 s at t.py:9 in f, after 4 ringtrain collective(s)" in text
    assert "--- rank 2 stack" in text and "line 9 in f" in text and text.endswith("advice")


def test_not_yet_long_enough_is_no_stall():
    assert find_stall([_in(0, 5, "allreduce", 59.0), _python(1, 4, 70.0)], after=60) is None


def test_everyone_in_the_same_collective_is_slow_not_stalled():
    assert find_stall([_in(0, 5, "allreduce", 600.0), _in(1, 5, "allreduce", 600.0)], after=60) is None


def test_a_rank_in_another_collective_is_missing_and_says_where():
    # Rank 1 is stuck in #4 (e.g. a broadcast rank 0 already left); rank 0 waits in #5.
    report = find_stall([_in(0, 5, "allgather", 90.0), _in(1, 4, "broadcast", 95.0)], after=60)
    assert [r.rank for r in report.missing] == [1]
    assert "inside another collective, broadcast (#4), for 95 s" in report.describe({}, "")


def test_uneven_finish():
    ranks = [_in(0, 3, "allreduce(last)", 70.0), _python(1, 2, 0.0, finished_for=71.0)]
    report = find_stall(ranks, after=60)
    assert report.uneven_finish and [r.rank for r in report.missing] == [1]
    text = report.describe({}, "")
    assert text.startswith("uneven finish: rank(s) [1] returned from fn while rank(s) [0] have waited 70 s")
    assert "returned from fn 71 s ago" in text


def test_tf_collectives_are_judged_by_samples():
    waiting = RankProgress(0, "h0", in_runtime_for=65.0, silent_for=0.5, where="train.py:40 in step")
    sleeping = _python(1, 0, 80.0)
    report = find_stall([waiting, sleeping], after=60)
    assert report.collective == SAMPLED and [r.rank for r in report.missing] == [1]
    # A peer that is busy in TF too, or only briefly in Python, is not missing.
    assert find_stall([waiting, RankProgress(1, "h1", in_runtime_for=3.0, silent_for=0.1)], after=60) is None
    assert find_stall([waiting, _python(1, 0, 2.0)], after=60) is None
    # A peer that has not started reporting yet is starting up, not stalled.
    assert find_stall([waiting, RankProgress(1, "h1")], after=60) is None


def test_inspector_warns_once_then_fails():
    inspector = StallInspector(warning=60, timeout=600)
    inspector.update([_in(0, 5, "allreduce", 30.0), _python(1, 4, 30.0)])
    assert inspector.check() is None
    inspector.update([_in(0, 5, "allreduce", 61.0), _python(1, 4, 61.0)])
    kind, report = inspector.check()
    assert kind == "warn" and report.waited == 61.0
    inspector.update([_in(0, 5, "allreduce", 120.0), _python(1, 4, 120.0)])
    assert inspector.check() is None  # already warned about this one
    inspector.update([_in(0, 5, "allreduce", 600.0), _python(1, 4, 600.0)])
    assert inspector.check()[0] == "fail"


def test_timeout_below_warning_and_zero_timeout():
    ranks = [_in(0, 1, "allreduce", 10.0), _python(1, 0, 10.0)]
    early = StallInspector(warning=60, timeout=8)
    early.update(ranks)
    assert early.check()[0] == "fail"
    never = StallInspector(warning=5, timeout=0)
    never.update([_in(0, 1, "allreduce", 10_000.0), _python(1, 0, 10_000.0)])
    assert never.check()[0] == "warn"
    assert never.check() is None


def test_a_failed_rank_is_forgotten():
    inspector = StallInspector(warning=1, timeout=2)
    inspector.update([_in(0, 1, "allreduce", 10.0), _python(1, 0, 10.0)])
    inspector.forget(1)
    assert inspector.check() is None


def test_stall_error_carries_the_facts_and_pickles():
    report = find_stall([_in(0, 2, "allreduce", 9.0), _python(1, 1, 9.0)], after=8)
    err = report.error({1: "stack of rank 1"}, "advice")
    assert isinstance(err, StallError)
    back = pickle.loads(pickle.dumps(err))
    assert (back.waiting, back.missing, back.collective) == ((0,), (1,), "allreduce (collective #2)")
    assert back.stacks == {1: "stack of rank 1"} and str(back) == str(err)
