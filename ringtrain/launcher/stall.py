"""Stall detection: which ranks wait in a collective that which others never entered.

Pure logic over the per-rank progress the task agents send with each heartbeat
(:class:`ringtrain.protocol.RankProgress`); the driver feeds it and acts on the verdict.

Two kinds of evidence, best first:

- **ringtrain's collectives** (the mpi backend) are exact: each rank counts the
  collectives it has entered. A rank inside collective #s waits for every rank whose
  count is still below s; a rank whose ``fn`` returned will never arrive.
- **TensorFlow's collectives** (the tf backend, or the strategy on any backend) run
  inside TF's runtime, out of ringtrain's sight. Each worker samples its main thread
  once per heartbeat: a rank stuck inside one TF call for the threshold while another
  has been in plain Python as long (or has returned from ``fn``) is reported as a stall.

All ranks inside the same collective is a slow collective, not a stall, and is never reported.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import StallError
from ..protocol import RankProgress

__all__ = ["StallInspector", "StallReport", "find_stall"]

SAMPLED = "a TensorFlow call (sampled; most likely a collective under the strategy)"


@dataclass(frozen=True)
class StallReport:
    """One stall: who waits, in what, for how long, and who is missing."""

    collective: str
    waited: float
    waiting: tuple[RankProgress, ...]
    missing: tuple[RankProgress, ...]

    @property
    def key(self) -> tuple:
        """Identifies the stall across heartbeats, so it is warned about once."""
        return (self.collective, tuple(r.rank for r in self.waiting), tuple(r.rank for r in self.missing))

    @property
    def uneven_finish(self) -> bool:
        return any(r.finished_for is not None for r in self.missing)

    def describe(self, stacks: Mapping[int, str], advice: str) -> str:
        """The report as text: a summary line, one line per rank, each missing rank's stack."""
        waiting = [r.rank for r in self.waiting]
        missing = [r.rank for r in self.missing]
        finished = [r.rank for r in self.missing if r.finished_for is not None]
        if finished:
            head = (
                f"uneven finish: rank(s) {finished} returned from fn while rank(s) {waiting} have waited "
                f"{self.waited:.0f} s in {self.collective}"
            )
            others = sorted(set(missing) - set(finished))
            if others:
                head += f"; rank(s) {others} have not entered it either"
        else:
            head = (
                f"rank(s) {waiting} have waited {self.waited:.0f} s in {self.collective}, which rank(s) "
                f"{missing} have not entered"
            )
        lines = [head]
        for r in self.waiting:
            lines.append(f"  rank {r.rank} on {r.host}: waiting for {_waited(r):.0f} s{_at(r)}")
        for r in self.missing:
            lines.append(f"  rank {r.rank} on {r.host}: {_doing(r)}")
        for r in self.missing:
            stack = stacks.get(r.rank)
            lines.append(f"--- rank {r.rank} stack (most recent call first) ---")
            lines.append(stack.rstrip() if stack else "(no stack: the rank did not answer in time)")
        lines.append(advice)
        return "\n".join(lines)

    def error(self, stacks: Mapping[int, str], advice: str) -> StallError:
        return StallError(
            self.describe(stacks, advice),
            waiting=tuple(r.rank for r in self.waiting),
            missing=tuple(r.rank for r in self.missing),
            collective=self.collective,
            stacks={r.rank: stacks.get(r.rank, "") for r in self.missing},
            uneven_finish=self.uneven_finish,
        )


def _waited(r: RankProgress) -> float:
    return r.in_collective_for if r.collective is not None else (r.in_runtime_for or 0.0)


def _at(r: RankProgress) -> str:
    return f", called from {r.where}" if r.where else ""


def _doing(r: RankProgress) -> str:
    if r.finished_for is not None:
        return f"returned from fn {r.finished_for:.0f} s ago, after {r.seq} ringtrain collective(s)"
    if r.collective is not None:
        return (
            f"inside another collective, {r.collective} (#{r.seq}), for {r.in_collective_for:.0f} s{_at(r)}"
        )
    if r.silent_for is None:
        return "has not started its progress reporting yet (still starting up)"
    if r.in_runtime_for is not None:
        return f"inside a TensorFlow call for {r.in_runtime_for:.0f} s{_at(r)}"
    where = f" at {r.where}" if r.where else ""
    python = f" for {r.in_python_for:.0f} s" if r.in_python_for is not None else ""
    return f"running Python{python}{where}, after {r.seq} ringtrain collective(s)"


def find_stall(ranks: Sequence[RankProgress], after: float) -> StallReport | None:
    """The stall among ``ranks`` that has lasted at least ``after`` seconds, if there is one."""
    exact = [r for r in ranks if r.collective is not None and r.in_collective_for >= after]
    if exact:
        top = max(r.seq for r in exact)
        waiting = [r for r in ranks if r.collective is not None and r.seq == top]
        missing = [r for r in ranks if r.seq < top or (r.finished_for is not None and r.collective is None)]
        if missing:
            name = next(r.collective for r in waiting if r.collective)
            waited = max(r.in_collective_for for r in waiting)
            return StallReport(f"{name} (collective #{top})", waited, tuple(waiting), tuple(missing))
    sampled = [
        r
        for r in ranks
        if r.collective is None and r.in_runtime_for is not None and r.in_runtime_for >= after
    ]
    if sampled:
        missing = [
            r
            for r in ranks
            if r.finished_for is not None or (r.in_python_for is not None and r.in_python_for >= after)
        ]
        if missing:
            waited = max(r.in_runtime_for or 0.0 for r in sampled)
            return StallReport(SAMPLED, waited, tuple(sampled), tuple(missing))
    return None


class StallInspector:
    """Keeps each rank's latest progress and says when to warn about a stall and when to fail.

    ``timeout`` 0 never fails. Each distinct stall is warned about once.
    """

    def __init__(self, warning: float, timeout: float):
        self.warning = warning
        self.timeout = timeout
        self._latest: dict[int, RankProgress] = {}
        self._warned: set[tuple] = set()

    def update(self, ranks: Iterable[RankProgress]) -> None:
        for r in ranks:
            self._latest[r.rank] = r

    def forget(self, rank: int) -> None:
        self._latest.pop(rank, None)

    def check(self) -> tuple[str, StallReport] | None:
        """``("fail", report)``, ``("warn", report)`` or None."""
        after = min(self.warning, self.timeout) if self.timeout else self.warning
        report = find_stall(list(self._latest.values()), after)
        if report is None:
            return None
        if self.timeout and report.waited >= self.timeout:
            return "fail", report
        if report.waited >= self.warning and report.key not in self._warned:
            self._warned.add(report.key)
            return "warn", report
        return None
