"""What the driver, the task agents and the workers tell each other, and the files they share.

Three parts, each the one home of its contract:

- **Sealing.** :func:`seal` turns a message into bytes carrying an HMAC-SHA256 over the
  pickle; :func:`unseal` checks the HMAC before it unpickles anything. The control channel
  seals every frame; the same bytes can travel any other way (a Spark result row).
- **Messages.** Frozen dataclasses, one per kind, agent to driver and driver to agent.
- **The worker directory.** :class:`WorkDir` names every file a task agent and its
  workers exchange (payload, results, errors, exit status, output FIFOs, progress, stacks).

The worker, the task agent and the driver import this module; it imports nothing from them.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ChannelError, Failure

__all__ = [
    "MAX_RESULT_BYTES",
    "STACK_SIGNAL",
    "Abort",
    "AgentFailed",
    "BackendFailed",
    "Done",
    "Failed",
    "Heartbeat",
    "Hello",
    "Log",
    "LogsDropped",
    "MpiLaunch",
    "Notice",
    "Offer",
    "Ping",
    "RankProgress",
    "Release",
    "Rendezvous",
    "Result",
    "StackDump",
    "StackRequest",
    "Tail",
    "TaskLost",
    "Verdict",
    "WorkDir",
    "seal",
    "seal_row",
    "unseal",
    "unseal_row",
]

# ------------------------------------------------------------------------------ sealing

_SEAL_MAGIC = b"RTS1"
_DIGEST = hashlib.sha256().digest_size
SEAL_OVERHEAD = len(_SEAL_MAGIC) + _DIGEST


def _seal_mac(key: bytes, context: bytes, data: bytes) -> bytes:
    return hmac.new(key, context + data, hashlib.sha256).digest()


def seal(key: bytes, message: Any, context: bytes = b"") -> bytes:
    """``message`` pickled, behind an HMAC over ``context`` and the pickle.

    ``context`` binds the bytes to where they may be used (the channel passes the
    direction and the frame's sequence number, so a frame cannot be replayed).
    """
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _SEAL_MAGIC + _seal_mac(key, context, data) + data


def unseal(key: bytes, blob: bytes, context: bytes = b"", source: str = "a peer") -> Any:
    """The message :func:`seal` wrapped; ChannelError, before any unpickling, if the HMAC fails."""
    view = memoryview(blob)
    if len(blob) < SEAL_OVERHEAD or bytes(view[: len(_SEAL_MAGIC)]) != _SEAL_MAGIC:
        raise ChannelError(f"bytes from {source} are not a sealed ringtrain message; dropped them")
    mac = bytes(view[len(_SEAL_MAGIC) : SEAL_OVERHEAD])
    data = view[SEAL_OVERHEAD:]
    if not hmac.compare_digest(mac, _seal_mac(key, context, bytes(data))):
        raise ChannelError(f"a message from {source} failed its integrity check; dropped it")
    return pickle.loads(data)


# What a sealed output row of the launch stage is bound to: it can only ever be read as a row.
ROW_CONTEXT = b"ringtrain-row"


def seal_row(key: bytes, message: Any) -> bytes:
    """``message`` sealed for the launch stage's output rows (see :func:`seal`)."""
    return seal(key, message, ROW_CONTEXT)


def unseal_row(key: bytes, blob: bytes) -> Any:
    """A message :func:`seal_row` wrapped; ChannelError before unpickling if its HMAC fails."""
    return unseal(key, blob, ROW_CONTEXT, "a launch stage row")


# ------------------------------------------------------------------------------ messages

# The largest pickled return value one rank may send. The channel's frame limit is 2 GiB;
# the driver holds every rank's result in memory at once, so the cap is well below it.
MAX_RESULT_BYTES = 1 << 30


@dataclass(frozen=True)
class RankProgress:
    """Where one rank stood when its agent last looked (all durations in seconds).

    ``seq`` counts the ringtrain collectives the rank has entered; ``collective`` is the
    one it is inside now, if any. ``in_runtime_for`` is how long its main thread has been
    inside one TensorFlow call (sampled once per heartbeat), ``in_python_for`` how long it
    has been outside both. ``where`` is the innermost frame of user code.
    """

    rank: int
    host: str
    seq: int = 0
    collective: str | None = None
    in_collective_for: float = 0.0
    in_runtime_for: float | None = None
    in_python_for: float | None = None
    where: str = ""
    finished_for: float | None = None
    silent_for: float | None = None


# Agent to driver.


@dataclass(frozen=True)
class Hello:
    """First message on every connection: who this agent is."""

    partition: int
    host: str
    pid: int


@dataclass(frozen=True)
class Offer:
    """This task's part of the rendezvous: its :class:`~ringtrain.rendezvous.TaskOffer` as JSON,
    passed on unparsed, so fields the driver does not know about still reach every agent."""

    partition: int
    offer: str


@dataclass(frozen=True)
class Log:
    rank: int
    stream: str
    line: str


@dataclass(frozen=True)
class LogsDropped:
    """The live stream fell behind and skipped lines; the rank's log file has them all."""

    rank: int
    count: int


@dataclass(frozen=True)
class Result:
    """A rank's pickled return value; None when the caller did not ask for it."""

    rank: int
    data: bytes | None


@dataclass(frozen=True)
class Failed:
    failure: Failure


@dataclass(frozen=True)
class Heartbeat:
    partition: int
    ranks: tuple[RankProgress, ...] = ()


@dataclass(frozen=True)
class StackDump:
    """A rank's Python stacks (faulthandler's dump of every thread), main thread first."""

    rank: int
    text: str


@dataclass(frozen=True)
class BackendFailed:
    partition: int
    reason: str


@dataclass(frozen=True)
class AgentFailed:
    """The agent itself failed (before or beside its workers): ``error`` if it pickles, and its text."""

    partition: int
    error: BaseException | None
    text: str


@dataclass(frozen=True)
class TaskLost:
    """The Spark task that started this agent vanished (killed by Spark, executor lost)."""

    partition: int
    reason: str


@dataclass(frozen=True)
class Done:
    """Everything this agent started has ended and its working directory is gone."""

    partition: int


# Only in the output rows, when the agents could not reach the driver (see agent.py).


@dataclass(frozen=True)
class Tail:
    """A rank's last lines of output (its whole output is in the job directory's rank log)."""

    rank: int
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Notice:
    """Something the agents' hub would have told the user live (a stall warning)."""

    text: str


@dataclass(frozen=True)
class Verdict:
    """How the agents' hub saw the job end: None when every rank succeeded, else the error
    the driver would have raised."""

    error: BaseException | None


# Both ways: partition 0's agent sends it, the driver relays it to every agent.


@dataclass(frozen=True)
class MpiLaunch:
    """Hydra's proxy commands, one per partition, or why mpiexec could not start."""

    proxies: tuple[tuple[str, ...], ...] = ()
    error: str | None = None


# Driver to agent.


@dataclass(frozen=True)
class Rendezvous:
    """Every task's offer, in partition order; or, with ``gather``, go through the barrier's
    allGather instead (some task could not reach the driver)."""

    offers: tuple[str, ...] = ()
    gather: bool = False


@dataclass(frozen=True)
class Release:
    """Every rank has a result: finished workers may exit."""


@dataclass(frozen=True)
class Abort:
    reason: str


@dataclass(frozen=True)
class Ping:
    """The driver's heartbeat."""


@dataclass(frozen=True)
class StackRequest:
    ranks: tuple[int, ...]


# ------------------------------------------------------------------------------ worker directory

# Asks a worker to write every thread's Python stack into its stacks file (faulthandler).
# A real-time signal, so it cannot clash with a handler a user installs for SIGUSR1/2.
# Send it only to a worker whose progress file exists: the worker registers the handler
# before it creates that file, and an unhandled real-time signal kills the process.
STACK_SIGNAL = signal.SIGRTMIN + 6


class WorkDir:
    """The files a task agent shares with its workers, all in one private directory.

    The agent writes ``payload`` and, once every rank has a result, ``release``. Each
    worker writes ``result-N`` (its pickled return value, empty when not asked for) or
    ``error-N`` (its traceback), and keeps ``progress-N`` current. An MPI rank's launcher
    shim writes ``status-N`` (the rank's exit status) and routes its output through the
    ``stdout-N.fifo``/``stderr-N.fifo`` pipes. ``stacks-N`` receives a rank's stack dump,
    ``mpi-segments-N`` lists the MPI library's shared-memory files, and ``imports-N`` lists
    the slow modules a rank had imported when ``fn`` returned.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def payload(self) -> Path:
        return self.path / "payload.pkl"

    @property
    def release(self) -> Path:
        return self.path / "release"

    def result(self, rank: int) -> Path:
        return self.path / f"result-{rank}.pkl"

    def error(self, rank: int) -> Path:
        return self.path / f"error-{rank}.txt"

    def status(self, rank: int) -> Path:
        return self.path / f"status-{rank}"

    def fifo(self, rank: int, stream: str) -> Path:
        return self.path / f"{stream}-{rank}.fifo"

    def progress(self, rank: int) -> Path:
        return self.path / f"progress-{rank}"

    def stacks(self, rank: int) -> Path:
        return self.path / f"stacks-{rank}.txt"

    def mpi_segments(self, rank: int) -> Path:
        """The shared-memory files the rank's MPI library mapped when it joined the world."""
        return self.path / f"mpi-segments-{rank}"

    def every_mpi_segments(self) -> list[Path]:
        """Every rank's :meth:`mpi_segments` file that exists."""
        return sorted(self.path.glob("mpi-segments-*"))

    def imports(self, rank: int) -> Path:
        """The slow modules the rank had imported when fn returned (comma-separated)."""
        return self.path / f"imports-{rank}"

    def script_dir(self, rank: int) -> Path:
        return self.path / f"script-{rank}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so a reader sees the whole file or none of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
