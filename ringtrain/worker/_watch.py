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
import ctypes
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
_recorder: progress.FileRecorder | None = None


def _on_sigterm(signum: int, frame: object) -> None:
    global _stopping
    if _stopping:  # the first one is being handled; the agent SIGKILLs after its grace
        return
    _stopping = True
    if _recorder is not None:
        _recorder.stopping()  # tells the agent this worker can still act: it gets the full grace
    raise Stopped()


def stopping() -> bool:
    return _stopping


def _forward_sigterm_to_main_thread() -> None:
    """Make SIGTERM interrupt the main thread even when another thread receives it.

    Linux hands a process-directed signal to any thread that does not block it, and
    TensorFlow runs dozens. Python then runs the handler only when the main thread next
    executes bytecode, so a main thread in ``time.sleep`` or a blocking read would never
    notice. Python's C-level handler writes the signal number to the wakeup fd from
    whichever thread got it; this watcher re-sends SIGTERM to the main thread, whose
    blocking call then returns with EINTR and runs the handler.
    """
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    main = threading.main_thread().ident

    def watch() -> None:
        while True:
            data = os.read(read_fd, 64)
            if signal.SIGTERM in data:
                time.sleep(0.05)  # the main thread may have got it itself
                if not _stopping and main is not None:
                    signal.pthread_kill(main, signal.SIGTERM)

    threading.Thread(target=watch, name="ringtrain-sigterm", daemon=True).start()


class _Sigaction(ctypes.Structure):
    """glibc's ``struct sigaction`` on 64-bit Linux."""

    _fields_ = [
        ("handler", ctypes.c_void_p),
        ("mask", ctypes.c_ulong * 16),
        ("flags", ctypes.c_int),
        ("restorer", ctypes.c_void_p),
    ]


class SigtermGuard:
    """Keeps ringtrain's SIGTERM handler in place at the C level.

    TensorFlow's coordination service (MultiWorkerMirroredStrategy starts it) installs
    its own C++ SIGTERM handler, which only logs "SIGTERM caught", so a stopped worker
    would run no clean-up and wait for SIGKILL. Python's signal table still holds
    ringtrain's handler; :meth:`restore` puts Python's C-level handler back, from any thread.
    """

    def __init__(self) -> None:
        try:
            self._libc = ctypes.CDLL(None, use_errno=True)
            self._saved = self._read()
        except (OSError, AttributeError):
            self._saved = None

    def _read(self) -> _Sigaction:
        current = _Sigaction()
        if self._libc.sigaction(signal.SIGTERM, None, ctypes.byref(current)) != 0:
            raise OSError(ctypes.get_errno(), "sigaction")
        return current

    def restore(self) -> bool:
        """Put the handler back if something replaced it; True if it did."""
        if self._saved is None:
            return False
        try:
            current = self._read()
        except OSError:
            return False
        if current.handler == self._saved.handler:
            return False
        return self._libc.sigaction(signal.SIGTERM, ctypes.byref(self._saved), None) == 0


def install(files: WorkDir, rank: int, interval: float, inspect: bool = True) -> progress.FileRecorder:
    """Set up stack dumps, SIGTERM handling and progress recording for this worker.

    With ``inspect`` False, collectives are not recorded and the main thread is not
    sampled (no stall detection); the progress file then only says when ``fn`` returned.
    """
    global _recorder
    # The stack handler first: the agent signals only workers whose progress file exists.
    stacks = open(files.stacks(rank), "a")  # noqa: SIM115 - faulthandler keeps writing to it
    faulthandler.register(STACK_SIGNAL, file=stacks, all_threads=True, chain=False)
    recorder = _recorder = progress.FileRecorder(files.progress(rank))
    signal.signal(signal.SIGTERM, _on_sigterm)
    _forward_sigterm_to_main_thread()
    if inspect:
        progress.install(recorder)
    Sampler(recorder, interval, SigtermGuard(), sample=inspect).start()
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

    def __init__(
        self,
        recorder: progress.FileRecorder,
        interval: float,
        guard: SigtermGuard | None = None,
        sample: bool = True,
    ):
        super().__init__(name="ringtrain-sampler", daemon=True)
        self._recorder = recorder
        self._interval = interval
        self._guard = guard
        self._sample = sample
        self._main = threading.main_thread().ident
        self._last: tuple[FrameType, int] | None = None
        self._last_seq = recorder.seq
        self._runtime_since = 0.0
        self._python_since = 0.0

    def run(self) -> None:
        while True:
            if self._guard is not None and not _stopping:
                self._guard.restore()
            if self._sample:
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
