"""The keeper: the process a task agent runs in, out of Spark's reach, reaper of all it starts.

Spark kills a task by SIGKILLing the PySpark worker process that runs it, and an
executor going away takes that process's whole process group with it. Neither may
leave a worker, a grandchild or a working directory behind, so the task agent does
not run in that process:

```
PySpark worker (the barrier task: run(), a child subreaper while it runs)
  └─ keeper: python -m ringtrain.launcher.keeper (own session, child subreaper)
       └─ TaskAgent → workers / mpiexec / Hydra proxy → ranks → anything they start
```

- The keeper is a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``): whatever a
  worker starts, including grandchildren that call setsid or daemonize, is re-parented
  to the keeper when its parent exits, so the keeper can always find and stop it.
- It runs in its own session, so Spark's signals to the task's process group miss it.
- The PySpark side relays ``BarrierTaskContext.allGather`` over a socketpair. When that
  process vanishes (Spark killed the task, the executor was lost), the keeper sees EOF,
  tells the driver, stops the workers (SIGTERM, then SIGKILL after the grace), stops
  every other descendant, removes the working directory and exits.
- If the keeper itself is killed, its orphans re-parent to the PySpark worker, which is
  a subreaper for as long as the task runs and stops them the same way before it returns.

**Spare keepers.** With RINGTRAIN_PREWARM=1 (off by default), each task whose agent
finished leaves one spare keeper behind in its PySpark worker (a reused Python worker, which runs the next
task sent to it): a keeper already started, its modules imported, that has started the
task's workers again (fresh interpreters, waiting for their placement, see
:class:`~.workers.WorkerPool`) and made them import the slow modules the job's workers
used, such as tensorflow. The next ringtrain task of that PySpark worker hands its job to
the spare instead of starting a keeper, and its agent takes each waiting worker whose
environment is exactly the one it would start (else it starts a fresh one). A spare runs
no user code, dies with its PySpark worker (a parent-death signal, so with the executor,
and when Spark stops an idle Python worker), and is replaced, never reused, by each task.
A waiting worker that has imported tensorflow holds about 700 MB of memory, so the
setting is off by default.
"""

from __future__ import annotations

import ctypes
import logging
import os
import pickle
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..data.spill import make_task_dir, spill
from ..errors import AgentLostError, DataError
from ..protocol import Done, WorkDir, seal_row
from .channel import _recv_exact

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
_FRAME = struct.Struct("!Q")


def set_subreaper(on: bool) -> bool:
    """Make this process a child subreaper (or not); return whether it was one before."""
    libc = ctypes.CDLL(None, use_errno=True)
    was = ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_CHILD_SUBREAPER) failed: errno %s", ctypes.get_errno())
    return bool(was.value)


def stop_descendants(grace: float) -> list[int]:
    """SIGTERM every descendant of this process, SIGKILL what is left after ``grace``; reap them.

    Returns the pids that got SIGTERM. Children already reaped by their owners are not seen.
    """
    from ..backends._hydra import _alive, descendants

    me = os.getpid()
    first = [p for p in descendants(me) if _alive(p)]
    for pid in first:
        _kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in descendants(me)):
        _reap()
        time.sleep(0.05)
    # Again from the tree: something may have forked meanwhile.
    for pid in descendants(me):
        _kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(_alive(p) for p in descendants(me)):
        time.sleep(0.02)
    _reap()
    return first


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap() -> None:
    """Collect every exited child, adopted orphans included, so none stays a zombie."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _send(sock: socket.socket, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_FRAME.pack(len(data)) + data)


def _recv(sock: socket.socket) -> Any:
    """One message from the other end of the socketpair (only ever our own process's
    parent or child, so no seal); EOFError when it is gone."""
    (length,) = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    return pickle.loads(_recv_exact(sock, length))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        return f"was killed by signal {signal.Signals(-code).name}"
    return f"exited with code {code}"


# ------------------------------------------------------------------ the PySpark side


@dataclass
class _Spare:
    """A keeper started ahead for this PySpark worker's next task."""

    proc: subprocess.Popen
    sock: socket.socket
    env: dict[str, str]  # what it was started with; a task whose keeper would differ starts its own

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.sock.close()  # EOF: it stops its waiting workers and exits
        if _wait(self.proc, 5.0) is None:
            self.proc.kill()
            _wait(self.proc, 5.0)


# This PySpark worker's spare keeper, and the slow modules its last ringtrain task's workers
# imported (PySpark reuses its Python workers, so these live from one task to the next).
_spare: _Spare | None = None
_imports = ""


def _keeper_env() -> dict[str, str]:
    """The environment a keeper started now gets: this task's, with the modules this task
    sees (addPyFile included) on its path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [env.get("PYTHONPATH", ""), *sys.path] if p)
    return env


def _start_keeper(env: dict[str, str], spare: bool) -> tuple[subprocess.Popen, socket.socket]:
    ours, theirs = socket.socketpair()
    argv = [sys.executable, "-m", "ringtrain.launcher.keeper", str(theirs.fileno())]
    proc = subprocess.Popen(
        [*argv, "--spare"] if spare else argv,
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )
    theirs.close()
    return proc, ours


def _hand_to_spare(spare: _Spare | None, env: dict[str, str], message: tuple) -> _Spare | None:
    """Send the task's job to this PySpark worker's spare keeper if it may run it; return the
    spare if it took the job. A spare that is dead, started with another environment, or
    gone before it took the job is closed, and the task starts its own keeper."""
    if spare is None:
        return None
    if not spare.alive():
        logger.info("spare task agent (pid %s) had exited; starting a new one", spare.proc.pid)
    elif spare.env != env:
        differ = sorted(k for k in set(env) | set(spare.env) if env.get(k) != spare.env.get(k))
        logger.info("spare task agent not used: its environment differs in %s", differ)
    else:
        try:
            _send(spare.sock, message)
            return spare
        except OSError as err:  # it died just now
            logger.info("spare task agent (pid %s) could not take the job: %s", spare.proc.pid, err)
    spare.close()
    return None


def run(
    job,
    partition: int,
    gpus: tuple[str, ...],
    all_gather: Callable[[str], list[str]],
    batches: Iterable[Any] = (),
) -> list[bytes]:
    """Run a task agent for ``partition`` in a keeper process; return the task's output rows.

    Called inside the barrier task. Blocks until the keeper has finished (every process it
    started has ended and its working directory is gone), relaying allGather meanwhile.
    For a job with data, this process first stores the task's input ``batches`` on local
    disk while the keeper starts and connects, then hands it the summary (or the error).
    Raises AgentLostError if the keeper dies before it finishes. The keeper is this PySpark
    worker's spare if it has a live one (and the job allows it); afterwards a new spare is
    started for the next task.
    """
    global _spare, _imports
    workdir = tempfile.mkdtemp(prefix=f"ringtrain-p{partition}-")
    data_dir: str | None = None
    was_subreaper = set_subreaper(True)
    spare, _spare = _spare, None
    proc: subprocess.Popen | None = None
    ours: socket.socket | None = None
    next_spare: list[dict[str, str]] | None = None
    env = _keeper_env()
    try:
        if job.data_names:
            data_dir = str(make_task_dir(partition, job.worker_env.get("RINGTRAIN_DATA_SPILL_DIR")))
        # With RINGTRAIN_PREWARM off nothing of an earlier job is used: no spare, no imports ahead.
        message = (job, partition, gpus, workdir, data_dir, _imports if job.prewarm else "")
        taken = _hand_to_spare(spare if job.prewarm else _closed(spare), env, message)
        if taken is not None:
            proc, ours = taken.proc, taken.sock
        else:
            proc, ours = _start_keeper(env, spare=False)
            _send(ours, message)
        if data_dir is not None:
            # Here, not in the keeper: the rows arrive in this process, and moving them on
            # to the keeper would copy every byte once more.
            try:
                _send(ours, _store_rows(batches, data_dir, partition, job.data_names))
            except OSError:  # the keeper is gone; the loop below reports it
                pass
        while True:
            try:
                kind, body = _recv(ours)
            except EOFError:
                code = _wait(proc, 5.0)
                raise AgentLostError(
                    f"partition {partition}: the ringtrain task agent (keeper pid {proc.pid}) "
                    f"{_describe_exit(code)} before it finished; its workers were stopped. Look for "
                    "an out-of-memory kill or a signal sent to it on that host",
                    partition=partition,
                    host=socket.gethostname(),
                ) from None
            if kind == "gather":
                _send(ours, ("gathered", all_gather(body)))
            elif kind == "finished":
                rows, next_spare, _imports = body
                return rows
    finally:
        if ours is not None:
            ours.close()  # EOF: a keeper still running stops everything and exits
        if proc is not None and _wait(proc, job.kill_grace + 10.0) is None:
            proc.kill()
            _wait(proc, 5.0)
        stop_descendants(min(job.kill_grace, 5.0))  # orphans adopted if the keeper died
        set_subreaper(was_subreaper)
        from .workers import remove_mpi_segments

        remove_mpi_segments(WorkDir(workdir))  # the keeper's own clean-up, if it died first
        shutil.rmtree(workdir, ignore_errors=True)
        if data_dir is not None:  # last: every worker reading it has ended
            shutil.rmtree(data_dir, ignore_errors=True)
        if job.prewarm and next_spare is not None:
            _spare = _prepare_spare(env, next_spare)


def _closed(spare: _Spare | None) -> None:
    if spare is not None:
        spare.close()


def _prepare_spare(env: dict[str, str], worker_envs: list[dict[str, str]]) -> _Spare | None:
    """Start the spare keeper for this PySpark worker's next task (see the module notes)."""
    try:
        proc, ours = _start_keeper(env, spare=True)
        _send(ours, worker_envs)
    except OSError as err:
        logger.info("no spare task agent: %s", err)
        return None
    return _Spare(proc, ours, env)


def _store_rows(batches: Iterable[Any], directory: str, partition: int, names: tuple[str, ...]) -> tuple:
    """("stored", summary JSON), or ("store_failed", the DataError) for the keeper."""
    started = time.monotonic()
    try:
        summary = spill(batches, directory, partition, names)
    except DataError as err:
        return "store_failed", err
    except Exception as err:
        # An Arrow error on a corrupt block, say: the user must see it, as a DataError.
        return "store_failed", DataError(
            f"partition {partition} could not store its rows ({type(err).__name__}: {err})"
        )
    logger.info("partition %s stored its rows in %.1f s", partition, time.monotonic() - started)
    return "stored", summary.to_json()


def _wait(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


# ------------------------------------------------------------------ the keeper process


class _Relay:
    """The keeper's end of the socketpair: allGather through the PySpark side, the stored
    rows' summary from it, and its loss."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._replies: queue.Queue = queue.Queue()
        self._stored: queue.Queue = queue.Queue()
        self._send_lock = threading.Lock()
        self.on_lost: Callable[[], None] = lambda: None
        self.lost = threading.Event()
        threading.Thread(target=self._listen, name="ringtrain-keeper-relay", daemon=True).start()

    def _listen(self) -> None:
        try:
            while True:
                message = _recv(self._sock)
                stored = message[0] in ("stored", "store_failed")
                (self._stored if stored else self._replies).put(message)
        except (EOFError, OSError):
            self.lost.set()
            self._replies.put(None)
            self._stored.put(None)
            self.on_lost()

    def stored_rows(self, timeout: float) -> str | None:
        """The summary (JSON) of this task's stored rows; None if not complete within ``timeout`` s.

        Raises the DataError the store failed with, or AgentLostError when the Spark task is gone.
        """
        try:
            reply = self._stored.get(timeout=timeout)
        except queue.Empty:
            return None
        if reply is None:
            self._stored.put(None)  # for any later call
            raise AgentLostError("the Spark task hosting this agent vanished while it stored its rows")
        kind, body = reply
        if kind == "store_failed":
            raise body
        return body

    def all_gather(self, payload: str) -> list[str]:
        with self._send_lock:
            _send(self._sock, ("gather", payload))
        reply = self._replies.get()
        if reply is None:
            raise AgentLostError("the Spark task hosting this agent vanished during the rendezvous")
        return reply[1]

    def finish(self, rows: tuple[list[bytes], list[dict[str, str]], str]) -> None:
        """The task's output rows, the environments of its workers (for a spare keeper), and
        the slow modules they imported."""
        try:
            with self._send_lock:
                _send(self._sock, ("finished", rows))
        except OSError:
            pass


def _die_with_parent() -> None:
    """A spare keeper dies with its PySpark worker (and so with the executor)."""
    parent = os.getppid()
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)


def main(fd: int, spare: bool = False) -> None:
    """Entry point of the keeper process (``python -m ringtrain.launcher.keeper FD [--spare]``).

    A spare first starts the workers it is sent the environments of, then waits for its job.
    """
    from .agent import TaskAgent
    from .workers import WorkerPool

    set_subreaper(True)
    # The PySpark worker's stop signals are not ours; SIGTERM still ends the agent cleanly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spare:
        _die_with_parent()
    sock = socket.socket(fileno=fd)
    pool = WorkerPool()
    try:
        if spare:
            me = str(os.getpid())
            pool.spare([{**env, "RINGTRAIN_PARENT_PID": me} for env in _recv(sock)])
        job, partition, gpus, workdir, data_dir, imports = _recv(sock)
    except (EOFError, OSError):  # the PySpark worker went away before a job came
        pool.close()
        os._exit(0)
    relay = _Relay(sock)
    agent = TaskAgent(
        job,
        partition,
        gpus,
        relay.all_gather,
        workdir,
        sweep=stop_descendants,
        data_dir=data_dir,
        stored_rows=relay.stored_rows,
        pool=pool,
        preimport=imports,
    )

    def task_lost() -> None:
        agent.lose_task(
            "the Spark task process that started it vanished (Spark killed the task, or its executor "
            "was lost)"
        )

    relay.on_lost = task_lost
    if relay.lost.is_set():
        task_lost()
    signal.signal(signal.SIGTERM, lambda *_: agent.lose_task("the task agent got SIGTERM"))
    try:
        agent.run()
    except BaseException:
        logger.exception("partition %s: the task agent failed", partition)
    finally:
        stop_descendants(job.kill_grace)
        shutil.rmtree(workdir, ignore_errors=True)
        if data_dir is not None:  # also here: the PySpark side may be gone
            shutil.rmtree(data_dir, ignore_errors=True)
        rows = [*agent.rows, seal_row(job.secret, Done(partition))]
        relay.finish((rows, agent.spare_envs, agent.preimport_names()))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    # Through the package, so the agent and this module share one copy of it.
    from ringtrain.launcher import keeper

    keeper.main(int(sys.argv[1]), spare="--spare" in sys.argv[2:])
