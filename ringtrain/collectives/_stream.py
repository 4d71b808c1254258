"""One communication thread per process that runs MPI work in submission order.

Every rank must issue its collectives in the same order. Work handed to :data:`STREAM`
runs on one thread, first in first out, so the order in which a rank submits is the
order in which it calls MPI. Two uses:

* pipelining inside one allreduce: the caller packs bucket k+1 and unpacks bucket k-1
  while the thread has bucket k in MPI (mpi4py releases the GIL inside MPI calls);
* overlap with backprop: inside ``tf.function`` a bucket of gradients is handed over as
  soon as it exists, and the graph goes on computing the rest.

A caller that runs MPI itself first waits for the thread to go idle (:meth:`Stream.drain`),
so its calls never interleave with queued ones. When MPI was initialised below
``MPI_THREAD_SERIALIZED`` the work runs inline on the submitting thread instead.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["STREAM", "Handle", "Stream"]


class Handle:
    """The pending result of one submitted piece of work."""

    __slots__ = ("_done", "_error", "_result")

    def __init__(self) -> None:
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None

    def _settle(self, fn: Callable[[], Any]) -> None:
        try:
            self._result = fn()
        except BaseException as exc:  # handed to whoever waits on the handle
            self._error = exc
        finally:
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self) -> Any:
        """Wait for the work; return its result or raise its exception."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result


class Stream:
    """A FIFO of work run by one daemon thread (or inline, see :meth:`configure`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[Callable[[], Any], Handle]] = collections.deque()
        self._pending = 0  # queued or running
        self._thread: threading.Thread | None = None
        self._threaded: bool | None = None  # decided by configure() before the first submit

    def configure(self, threaded: bool) -> None:
        """Run work on the thread (True) or inline in submit (False); set once MPI's thread level is known."""
        self._threaded = threaded

    @property
    def threaded(self) -> bool:
        return bool(self._threaded)

    def submit(self, fn: Callable[[], Any]) -> Handle:
        """Queue ``fn``; it runs after everything submitted before it."""
        handle = Handle()
        if not self._threaded:
            handle._settle(fn)
            return handle
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                if self._thread is None:
                    # Finish queued collectives before MPI is finalized: mpi4py registered its
                    # own exit hook when MPI was imported, earlier, and exit hooks run in reverse.
                    atexit.register(self.drain)
                self._thread = threading.Thread(target=self._run, name="ringtrain-comm", daemon=True)
                self._thread.start()
            self._queue.append((fn, handle))
            self._pending += 1
            self._cond.notify_all()
        return handle

    def drain(self) -> None:
        """Wait until everything submitted so far has run."""
        if self._thread is None or threading.current_thread() is self._thread:
            return
        with self._cond:
            while self._pending:
                self._cond.wait()

    def idle(self) -> bool:
        with self._cond:
            return self._pending == 0

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                fn, handle = self._queue.popleft()
            handle._settle(fn)
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()


STREAM = Stream()
