"""What lets a task agent watch and stop a worker: progress, stacks, SIGTERM, a bounded exit.

- The progress file: the collective hook records into it, and a sampler thread adds,
  once per heartbeat, whether the main thread is inside a TensorFlow call (the tf
  backend's collectives run there, out of ringtrain's sight) and where in user code it is.
- Stack dumps: faulthandler writes every thread's stack to the stacks file when the
  agent sends :data:`ringtrain.protocol.STACK_SIGNAL`; it works even while the main
  thread is stuck in native code.
- SIGTERM raises :class:`Stopped` in the main thread, so ``finally`` blocks and
  ``atexit`` handlers (checkpoint writers, TensorBoard) run before the worker exits.
- :func:`exit_process` runs ``atexit`` handlers and flushes output within a bound, then
  leaves without interpreter shutdown (TensorFlow's threads can stall it).
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import signal
import sys
import sysconfig
import threading
import time
from types import FrameType

from .. import progress
from ..protocol import STACK_SIGNAL, WorkDir


class Stopped(BaseException):
    """Raised in the worker's main thread when it gets SIGTERM (stop or preemption)."""


_stopping = False


def _on_sigterm(signum: int, frame: object) -> None:
    global _stopping
    if _stopping:  # the first one is being handled; the agent SIGKILLs after its grace
        return
    _stopping = True
    raise Stopped()


def stopping() -> bool:
    return _stopping


def install(files: WorkDir, rank: int, interval: float) -> progress.FileRecorder:
    """Set up stack dumps, SIGTERM handling and progress recording for this worker."""
    # The stack handler first: the agent signals only workers whose progress file exists.
    stacks = open(files.stacks(rank), "a")  # noqa: SIM115 - faulthandler keeps writing to it
    faulthandler.register(STACK_SIGNAL, file=stacks, all_threads=True, chain=False)
    signal.signal(signal.SIGTERM, _on_sigterm)
    recorder = progress.FileRecorder(files.progress(rank))
    progress.install(recorder)
    Sampler(recorder, interval).start()
    return recorder


def _package_dir(name: str) -> str | None:
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    return os.path.dirname(path) + os.sep if path else None


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep


class Sampler(threading.Thread):
    """Once per ``interval``, notes what the main thread is doing in the progress file.

    "In TensorFlow's runtime" means the innermost Python frame belongs to TensorFlow
    (an op, a ``tf.function`` call, a collective under the strategy). The same frame at
    the same instruction on consecutive samples is one call going on; a new call restarts
    the clock. "In Python" means neither there nor in a ringtrain collective.
    """

    def __init__(self, recorder: progress.FileRecorder, interval: float):
        super().__init__(name="ringtrain-sampler", daemon=True)
        self._recorder = recorder
        self._interval = interval
        self._main = threading.main_thread().ident
        self._last: tuple[FrameType, int] | None = None
        self._last_seq = -1
        self._runtime_since = 0.0
        self._python_since = 0.0

    def run(self) -> None:
        while True:
            self.sample()
            time.sleep(self._interval)

    def sample(self) -> None:
        frame = sys._current_frames().get(self._main)
        if frame is None:
            return
        now = time.monotonic()
        tf_dir = _package_dir("tensorflow")
        in_runtime = bool(tf_dir) and frame.f_code.co_filename.startswith(tf_dir)
        seq = self._recorder.seq
        busy = in_runtime or self._recorder.inside or seq != self._last_seq
        self._last_seq = seq
        current = (frame, frame.f_lasti)
        if in_runtime:
            same_call = self._last is not None and self._last[0] is frame and self._last[1] == frame.f_lasti
            if not same_call or not self._runtime_since:
                self._runtime_since = now
        else:
            self._runtime_since = 0.0
        if busy:
            self._python_since = 0.0
        elif not self._python_since:
            self._python_since = now
        # Holding the frame keeps its locals alive until the next sample; that is all it costs.
        self._last = current if in_runtime else None
        self._recorder.sample(self._runtime_since, self._python_since, user_frame(frame))


def user_frame(frame: FrameType | None) -> str:
    """``file:line in function`` of the innermost frame outside TF, Keras, ringtrain and the stdlib."""
    skip = tuple(
        d
        for d in (
            _package_dir("tensorflow"),
            _package_dir("tf_keras"),
            _package_dir("keras"),
            _PACKAGE_DIR,
            _STDLIB_DIR,
        )
        if d
    )
    innermost = frame
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(skip) and not name.startswith("<frozen"):
            return f"{name}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    if innermost is None:
        return ""
    return f"{innermost.f_code.co_filename}:{innermost.f_lineno} in {innermost.f_code.co_name}"


def exit_process(code: int, bound: float, by_signal: int | None = None) -> None:
    """Run ``atexit`` handlers and flush output, within ``bound`` seconds, then exit.

    ``by_signal`` ends the process by that signal instead (after the handlers), so its
    agent sees exactly how it ended. Past the bound, faulthandler prints where the
    handlers were stuck and exits with status 1.
    """
    faulthandler.dump_traceback_later(bound, exit=True)
    try:
        atexit._run_exitfuncs()
    except BaseException:  # a failing handler must not keep the worker alive
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    faulthandler.cancel_dump_traceback_later()
    if by_signal is not None:
        signal.signal(by_signal, signal.SIG_DFL)
        os.kill(os.getpid(), by_signal)
        time.sleep(1)  # the signal is delivered at once; this is only a fallback
    os._exit(code)
