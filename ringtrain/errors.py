"""The ringtrain error hierarchy.

Every error raised by ringtrain derives from :class:`RingtrainError`. Each class
pickles cleanly, so an error raised in a worker or task agent can cross a process
boundary and still read the same on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass


class RingtrainError(Exception):
    """Base class of every error raised by ringtrain."""

    def __reduce__(self):
        return (type(self), self.args)


class ConfigError(RingtrainError, ValueError):
    """A bad argument, option or environment variable; the message names the fix."""


class DataError(ConfigError):
    """The data given to a job cannot be trained on as it is: a column type, an empty
    DataFrame, an unknown shard name, a batch size larger than a rank's share."""


class ResourceError(RingtrainError):
    """The cluster cannot supply what the job asked for (slots, GPUs)."""


class BackendError(RingtrainError):
    """A backend could not start or a collective failed."""


class JobTimeoutError(RingtrainError, TimeoutError):
    """The job ran past its timeout; every worker was stopped."""


class BackendStartError(BackendError):
    """A backend could not start on some task; backend "auto" then tries the next one."""


class ChannelError(RingtrainError):
    """The control channel between driver and task agents failed."""


class InfrastructureError(RingtrainError):
    """The job lost a process or a machine, or stalled, rather than failing in ``fn``.

    Retrying the job may succeed: ``except ringtrain.InfrastructureError`` catches an
    executor or task agent lost (:class:`AgentLostError`), a rank killed by a signal from
    outside (:class:`WorkerLostError`) and a stall (:class:`StallError`).
    """


class AgentLostError(InfrastructureError, ChannelError):
    """A task agent (the process that runs one barrier task's workers) was lost.

    ``partition`` and ``host`` say which; ``spark_reason`` is what Spark reported, if anything.
    """

    def __init__(self, message: str, partition: int | None = None, host: str = "", spark_reason: str = ""):
        super().__init__(message)
        self.partition = partition
        self.host = host
        self.spark_reason = spark_reason

    def __reduce__(self):
        return (type(self), (self.args[0], self.partition, self.host, self.spark_reason))


class StallError(InfrastructureError):
    """Some ranks waited in a collective that others never entered, for RINGTRAIN_STALL_TIMEOUT s.

    ``waiting`` and ``missing`` list the ranks on each side, ``collective`` names what the
    waiting ranks are in, ``stacks`` maps each missing rank to its Python stacks, and
    ``uneven_finish`` is true when a missing rank had already returned from ``fn``.
    """

    def __init__(
        self,
        message: str,
        waiting: tuple[int, ...] = (),
        missing: tuple[int, ...] = (),
        collective: str = "",
        stacks: dict[int, str] | None = None,
        uneven_finish: bool = False,
    ):
        super().__init__(message)
        self.waiting = tuple(waiting)
        self.missing = tuple(missing)
        self.collective = collective
        self.stacks = dict(stacks or {})
        self.uneven_finish = uneven_finish

    def __reduce__(self):
        return (
            type(self),
            (self.args[0], self.waiting, self.missing, self.collective, self.stacks, self.uneven_finish),
        )


# Signals that end a process from outside. A rank dying of SIGSEGV, SIGABRT, SIGBUS, SIGFPE or
# SIGILL crashed, which is a bug in the code it ran (or a library), so it is no "loss".
LOSS_SIGNALS = frozenset({"SIGKILL", "SIGTERM", "SIGHUP", "SIGINT", "SIGQUIT", "SIGPIPE", "SIGXCPU"})


@dataclass(frozen=True)
class Failure:
    """What one failed worker reported: its rank, where it ran and why it ended."""

    rank: int
    host: str
    exitcode: int | None
    signal_name: str | None
    traceback: str
    # The rank's last lines of output, when they could not stream to the driver live.
    output_tail: tuple[str, ...] = ()

    @property
    def lost(self) -> bool:
        """Killed by a signal from outside (the OOM killer, a stop, a lost machine), not a crash."""
        return self.signal_name in LOSS_SIGNALS

    def describe(self) -> str:
        if self.signal_name:
            why = f"was killed by signal {self.signal_name}"
        elif self.exitcode is None:
            why = "was stopped"
        else:
            why = f"exited with code {self.exitcode}"
        return f"rank {self.rank} on {self.host} {why}"


class WorkerError(RingtrainError):
    """One or more workers failed. ``failures`` lists them, first failure first.

    The message names each failing rank and carries the first one's remote
    traceback text.
    """

    def __init__(self, failures: list[Failure] | tuple[Failure, ...]):
        self.failures = tuple(failures)
        super().__init__(self._message())

    def __reduce__(self):
        return (type(self), (self.failures,))

    @property
    def ranks(self) -> list[int]:
        return [f.rank for f in self.failures]

    @property
    def exitcode(self) -> int:
        """The exit code a CLI should return: the first failing rank's, or 128+signal."""
        import signal

        first = self.failures[0]
        if first.signal_name:
            return 128 + int(signal.Signals[first.signal_name])
        return first.exitcode or 1

    @classmethod
    def of(cls, failures: list[Failure] | tuple[Failure, ...]) -> WorkerError:
        """The error for ``failures`` (first failure first): WorkerLostError when the first was lost."""
        if failures and failures[0].lost:
            return WorkerLostError(failures)
        return cls(failures)

    def _message(self) -> str:
        if not self.failures:
            return "a worker failed"
        lines = [f"{len(self.failures)} worker(s) failed: " + "; ".join(f.describe() for f in self.failures)]
        first = self.failures[0]
        if first.output_tail:
            lines.append(f"--- last lines of output from rank {first.rank} ---")
            lines.extend(first.output_tail)
        if first.traceback:
            lines.append(f"--- traceback from rank {first.rank} ---")
            lines.append(first.traceback.rstrip())
        return "\n".join(lines)


class WorkerLostError(WorkerError, InfrastructureError):
    """The first failing rank was killed by a signal from outside (see :data:`LOSS_SIGNALS`)."""
