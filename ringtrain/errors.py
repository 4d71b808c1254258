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


@dataclass(frozen=True)
class Failure:
    """What one failed worker reported: its rank, where it ran and why it ended."""

    rank: int
    host: str
    exitcode: int | None
    signal_name: str | None
    traceback: str

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

    def _message(self) -> str:
        if not self.failures:
            return "a worker failed"
        lines = [f"{len(self.failures)} worker(s) failed: " + "; ".join(f.describe() for f in self.failures)]
        first = self.failures[0]
        if first.traceback:
            lines.append(f"--- traceback from rank {first.rank} ---")
            lines.append(first.traceback.rstrip())
        return "\n".join(lines)
