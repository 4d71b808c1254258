"""Where this rank stands in its collectives, for the stall inspector.

Every ringtrain collective runs inside :func:`collective`. Outside a ringtrain worker
nothing is recorded; a worker installs a :class:`Recorder` at start-up, which its
task agent reads to tell which ranks are waiting in which collective and which
ranks never arrived.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

__all__ = ["Recorder", "collective", "install"]


class Recorder(Protocol):
    """Receives each collective's entry and exit on the calling thread."""

    def enter(self, what: str) -> None: ...

    def leave(self) -> None: ...


_recorder: Recorder | None = None


def install(recorder: Recorder | None) -> None:
    """Make ``recorder`` receive every collective this process runs (None: record nothing)."""
    global _recorder
    _recorder = recorder


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Mark the body as one collective named ``what`` (e.g. ``"allreduce(loss)"``)."""
    recorder = _recorder
    if recorder is None:
        yield
        return
    recorder.enter(what)
    try:
        yield
    finally:
        recorder.leave()
