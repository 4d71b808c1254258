"""The collective hook: a recorder sees each collective's entry and exit, even on error."""

from __future__ import annotations

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
    with progress.collective("allreduce"):
        pass  # no recorder installed: the hook is a no-op
