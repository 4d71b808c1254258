"""Where this rank stands in its collectives, for the stall inspector.

Every ringtrain collective runs inside :func:`collective`. Outside a ringtrain worker
nothing is recorded; a worker installs a :class:`FileRecorder` at start-up, which keeps
a few fields of a small memory-mapped file current (how many collectives the rank has
entered, which one it is in and since when). Its task agent reads the file with
:func:`read` to tell which ranks wait in which collective and which never arrived.

The same file holds what the worker's sampler thread sees once per heartbeat (is the
main thread inside a TensorFlow call, and where in user code it is) and when ``fn``
returned. Recording a collective costs about a microsecond.

The file is shared only between processes of one host, so its times are
``time.monotonic()`` readings, which every process of a host shares.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .protocol import RankProgress

__all__ = ["FileRecorder", "Recorder", "Snapshot", "collective", "install", "no_progress", "read"]


class Recorder(Protocol):
    """Receives each collective's entry and exit on the calling thread."""

    def enter(self, what: str) -> None: ...

    def leave(self) -> None: ...


_recorder: Recorder | None = None


def install(recorder: Recorder | None) -> None:
    """Make ``recorder`` receive every collective this process runs (None: record nothing)."""
    global _recorder
    _recorder = recorder


class collective:  # noqa: N801 - used like a function: ``with progress.collective(what):``
    """Mark the body as one collective named ``what`` (e.g. ``"allreduce(loss)"``).

    A class rather than a generator-based context manager: it runs on every collective,
    and this costs a fraction of a microsecond when no recorder is installed.
    """

    __slots__ = ("_recorder", "_what")

    def __init__(self, what: str):
        self._what = what
        self._recorder: Recorder | None = None

    def __enter__(self) -> None:
        recorder = self._recorder = _recorder
        if recorder is not None:
            recorder.enter(self._what)

    def __exit__(self, *exc: object) -> None:
        if self._recorder is not None:
            self._recorder.leave()


# ------------------------------------------------------------------------------ the file

_MAGIC = b"RTP1"
_SIZE = 512
# Each block starts with a version that is odd while its writer is mid-update (a seqlock).
_HEADER = struct.Struct("<4sIQ")  # magic, pid, main thread ident
_COLLECTIVE = struct.Struct("<QQdd96s")  # version, seq, entered_at (0: outside), left_at, name
_SAMPLE = struct.Struct("<Qddd160s")  # version, beat_at, runtime_since, python_since, where
_LIFE = struct.Struct("<Qdd")  # version, finished_at, stopping_at
_AT_COLLECTIVE = _HEADER.size
_AT_SAMPLE = _AT_COLLECTIVE + _COLLECTIVE.size
_AT_LIFE = _AT_SAMPLE + _SAMPLE.size
_VERSION = struct.Struct("<Q")


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", errors="replace")


def _fit(text: str, size: int) -> bytes:
    data = text.encode("utf-8", errors="replace")
    return data if len(data) <= size else data[: size - 3] + b"..."


class FileRecorder:
    """Keeps this process's progress in ``path``; the collective hook and the sampler write it.

    Each block has one writer at a time: collectives (any thread, under a lock), the
    sampler thread, and the life events (``fn`` returned, SIGTERM handled; the latter runs
    on the main thread, maybe in the middle of ``enter``, hence its own lock).
    """

    def __init__(self, path: str | Path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE)
        finally:
            os.close(fd)
        self._lock = threading.Lock()
        self._life_lock = threading.RLock()
        self._depth = 0
        self._seq = 0
        self._versions = [0, 0, 0]  # collective, sample, life
        self._names: dict[str, bytes] = {}
        self._finished_at = 0.0
        self._stopping_at = 0.0
        _HEADER.pack_into(self._map, 0, _MAGIC, os.getpid(), threading.main_thread().ident or 0)

    def _write(self, slot: int, block: struct.Struct, at: int, *fields) -> None:
        # Odd version while writing: a reader that sees it, or a changed one, reads again.
        version = self._versions[slot] + 1
        _VERSION.pack_into(self._map, at, version)
        block.pack_into(self._map, at, version, *fields)
        self._versions[slot] = version + 1
        _VERSION.pack_into(self._map, at, version + 1)

    def _name(self, what: str) -> bytes:
        name = self._names.get(what)
        if name is None:
            if len(self._names) > 1024:  # names are few (one per call site); never grow unbounded
                self._names.clear()
            name = self._names[what] = _fit(what, 96)
        return name

    def enter(self, what: str) -> None:
        with self._lock:
            self._depth += 1
            if self._depth == 1:  # a collective inside another is part of it
                self._seq += 1
                self._write(
                    0, _COLLECTIVE, _AT_COLLECTIVE, self._seq, time.monotonic(), 0.0, self._name(what)
                )

    def leave(self) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._write(0, _COLLECTIVE, _AT_COLLECTIVE, self._seq, 0.0, time.monotonic(), b"")

    @property
    def inside(self) -> bool:
        return self._depth > 0

    @property
    def seq(self) -> int:
        """How many collectives this process has entered."""
        return self._seq

    def sample(self, runtime_since: float, python_since: float, where: str) -> None:
        """The sampler thread's view of the main thread (0 for a state it is not in)."""
        self._write(1, _SAMPLE, _AT_SAMPLE, time.monotonic(), runtime_since, python_since, _fit(where, 160))

    def finished(self) -> None:
        """``fn`` has returned (its result is written)."""
        with self._life_lock:
            self._finished_at = time.monotonic()
            self._write(2, _LIFE, _AT_LIFE, self._finished_at, self._stopping_at)

    def stopping(self) -> None:
        """The worker's SIGTERM handler ran: it is cleaning up and will exit."""
        with self._life_lock:
            self._stopping_at = time.monotonic()
            self._write(2, _LIFE, _AT_LIFE, self._finished_at, self._stopping_at)


@dataclass(frozen=True)
class Snapshot:
    """One consistent reading of a progress file (times are ``time.monotonic()``; 0 means never)."""

    pid: int
    main_thread: int
    seq: int
    collective: str | None
    entered_at: float
    left_at: float
    beat_at: float
    runtime_since: float
    python_since: float
    where: str
    finished_at: float
    stopping_at: float = 0.0

    def as_rank_progress(self, rank: int, host: str, now: float) -> RankProgress:
        """The snapshot as durations up to ``now`` (``time.monotonic()`` on this host)."""

        def since(t: float) -> float | None:
            return max(0.0, now - t) if t else None

        return RankProgress(
            rank=rank,
            host=host,
            seq=self.seq,
            collective=self.collective,
            in_collective_for=since(self.entered_at) or 0.0,
            in_runtime_for=since(self.runtime_since),
            in_python_for=since(self.python_since),
            where=self.where,
            finished_for=since(self.finished_at),
            silent_for=since(self.beat_at),
        )


def no_progress(rank: int, host: str) -> RankProgress:
    """A rank whose worker has not created its progress file yet (still starting up)."""
    return RankProgress(rank=rank, host=host)


def _read_block(view: bytes | mmap.mmap, block: struct.Struct, at: int) -> tuple | None:
    for _ in range(100):
        fields = block.unpack_from(view, at)
        if fields[0] % 2 == 0 and _VERSION.unpack_from(view, at)[0] == fields[0]:
            return fields[1:]
        time.sleep(0)  # a writer is mid-update
    return None


def read(path: str | Path) -> Snapshot | None:
    """A consistent snapshot of the progress file at ``path``; None if it is missing or unreadable."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), _SIZE, access=mmap.ACCESS_READ) as view:
            magic, pid, main_thread = _HEADER.unpack_from(view, 0)
            if magic != _MAGIC:
                return None
            coll = _read_block(view, _COLLECTIVE, _AT_COLLECTIVE)
            sample = _read_block(view, _SAMPLE, _AT_SAMPLE)
            life = _read_block(view, _LIFE, _AT_LIFE)
    except (OSError, ValueError):
        return None
    if coll is None or sample is None or life is None:
        return None
    seq, entered_at, left_at, name = coll
    beat_at, runtime_since, python_since, where = sample
    return Snapshot(
        pid=pid,
        main_thread=main_thread,
        seq=seq,
        collective=_text(name) if entered_at else None,
        entered_at=entered_at,
        left_at=left_at,
        beat_at=beat_at,
        runtime_since=runtime_since,
        python_since=python_since,
        where=_text(where),
        finished_at=life[0],
        stopping_at=life[1],
    )
