"""Shared-memory allreduce: which ranks share a host, and the segment they reduce through.

On the first allreduce every rank takes part in :func:`layout`, which decides from
the gathered facts (identical on every rank) whether the job reduces through shared
memory: the native extension is built and ``RINGTRAIN_FUSION_SHM`` is not ``off`` on
every rank, and the ranks of each host can map one POSIX shared-memory segment and see
each other's processes. Ranks share a host when they share a kernel boot and a
``/dev/shm``; hostnames are not trusted, because MPI launches may give one machine
several names. With several hosts, each must hold the same number of ranks: rank r of
each host then allreduces its slice of every chunk with rank r of the other hosts over
MPI (hierarchical), and the rest stays in shared memory.

The segment's name is unlinked as soon as every rank of the host has mapped it, so it
vanishes with the last rank however the ranks end. Segments left by a job killed
during that short window are removed by the next job on the host.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ringtrain import env, fusion
from ringtrain.errors import BackendError

from . import _control

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "ringtrain-"
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)-[0-9a-f]+$")
_HOST_KEY_ENV = "RINGTRAIN_SHM_HOST_KEY"
_CROSS_TYPES = {"float32": "FLOAT", "float64": "DOUBLE", "int32": "INT32_T", "int64": "INT64_T"}
_CROSS_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}
_LOCAL_RANK_RE = re.compile(r"local rank (\d+)")


def host_key() -> str | None:
    """What ranks on one host share: the kernel's boot id and the /dev/shm file system."""
    override = os.environ.get(_HOST_KEY_ENV)
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        st = os.stat(SHM_DIR)
    except OSError:
        return None
    return f"{boot}:{st.st_dev}:{st.st_ino}"


def remove_stale_segments(directory: str = SHM_DIR, min_age_s: float = 60.0) -> list[str]:
    """Unlink segments of ours whose creating process is gone (a job killed during set-up)."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        match = _NAME_RE.match(name)
        if not match:
            continue
        path = os.path.join(directory, name)
        try:
            os.kill(int(match.group(1)), 0)
            continue  # creator alive: its job may still be setting up
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's process
        try:
            if now - os.stat(path).st_mtime >= min_age_s:
                os.unlink(path)
                removed.append(name)
        except OSError:
            continue
    if removed:
        logger.info("removed %d stale shared-memory segment(s) of killed jobs: %s", len(removed), removed)
    return removed


class HostGroup:
    """This rank's shared-memory group, and for several hosts the communicator to its peers there."""

    def __init__(self, group: Any, local_ranks: list[int], hosts: int, cross_comm: Any, MPI: Any) -> None:
        self.group = group
        self.local_ranks = local_ranks  # world rank of each local rank
        self.hosts = hosts
        self.cross_comm = cross_comm
        self._MPI = MPI

    @property
    def hierarchical(self) -> bool:
        return self.cross_comm is not None

    def allreduce(
        self,
        srcs: Sequence[np.ndarray],
        dsts: Sequence[np.ndarray],
        kind: str,
        op: str,
        compress: str,
        scale: float,
        divisor: int,
        world_rank: int,
    ) -> None:
        """Reduce ``srcs`` into ``dsts`` (see native/shm.cpp); BackendError if a peer is lost."""
        cross = self._cross(op, compress) if self.cross_comm is not None else None
        with self._peer_errors(world_rank):
            self.group.allreduce(list(srcs), list(dsts), kind, op, compress, scale, divisor, cross)

    def exchange(self, signature: int, extra: int, world_rank: int) -> np.ndarray:
        """Every local rank's ``(signature, extra)``, as a (local size, 2) int64 array."""
        with self._peer_errors(world_rank):
            return self.group.exchange(signature, extra)

    @contextmanager
    def _peer_errors(self, world_rank: int) -> Iterator[None]:
        try:
            yield
        except fusion._native.PeerLost as exc:
            text = _LOCAL_RANK_RE.sub(lambda m: f"rank {self.local_ranks[int(m.group(1))]}", str(exc))
            raise BackendError(
                f"rank {world_rank}: the shared-memory allreduce failed: {text}. The job cannot "
                "continue; look for the first error of the ranks named"
            ) from None

    def _cross(self, op: str, compress: str) -> Any:
        from ._engine import half_sum_op  # one cache of the user-defined MPI ops

        MPI, comm = self._MPI, self.cross_comm

        def cross(view: np.ndarray) -> None:
            if compress:
                wire = fusion.wire_dtype(np.float32, compress)
                comm.Allreduce(MPI.IN_PLACE, [view, MPI.UINT16_T], op=half_sum_op(MPI, wire))
            else:
                mpi_type = getattr(MPI, _CROSS_TYPES[view.dtype.name])
                comm.Allreduce(MPI.IN_PLACE, [view, mpi_type], op=getattr(MPI, _CROSS_OPS[op]))

        return cross

    def close(self) -> None:
        self.group.close()


def auto_chunk(local_size: int) -> int:
    """Bytes per rank per step: 1 MiB, less above 16 ranks, so 2 x ranks x chunk stays <= 32 MiB.

    Measured with 2 ranks (benchmarks/RESULTS.md, "How the settings were chosen"): each rank's own work per
    102 MB allreduce was about half with 1 MiB steps of what it was with 4 MiB ones (the
    slots stay in the cache); larger steps only saved barrier waits on an overloaded
    machine. The cap keeps the segment within small /dev/shm mounts (64 MiB is a common
    container default).

    >>> [auto_chunk(n) >> 10 for n in (2, 16, 32, 64, 256)]
    [1024, 1024, 512, 256, 256]
    """
    budget = 32 << 20
    return max(256 << 10, min(1 << 20, budget // (2 * local_size) // 4096 * 4096))


@dataclass(frozen=True)
class Layout:
    """How the job's ranks sit on hosts, and the shared-memory group if the job uses one."""

    group: HostGroup | None
    local_size: int  # ranks on this rank's host (1 when hosts cannot be told apart)
    hosts: int


def layout(comm: Any, MPI: Any) -> Layout:
    """Find the hosts and set up shared memory, collectively (every rank at the same point).

    The group is None when the job reduces over MPI alone; raises BackendError on every
    rank when ``RINGTRAIN_FUSION_SHM=on`` and shared memory cannot be used.
    """
    size = comm.Get_size()
    mode = env.get("RINGTRAIN_FUSION_SHM")
    chunk = env.get("RINGTRAIN_FUSION_SHM_CHUNK")
    native = fusion._native
    can = native is not None and getattr(native, "HAVE_SHM", False) and fusion.selected().name == "native"
    if mode == "off":
        why = "RINGTRAIN_FUSION_SHM=off"
    elif not can:
        why = "the native extension is not in use (or has no shared-memory support on this OS)"
    else:
        why = ""
    key = host_key()
    if not why and key is None:
        why = f"{SHM_DIR} or the kernel's boot id cannot be read"
    facts = [
        _facts(f, r) for r, f in enumerate(_control.allgather_json(comm, [why, mode, key, chunk], "layout"))
    ]
    keys = [k for _, _, k, _ in facts]
    local_size = keys.count(key) if key is not None else 1
    hosts = len(set(keys)) if None not in keys else size
    return Layout(_group(comm, MPI, facts), local_size, hosts)


def _facts(raw: Any, rank: int) -> tuple[str, str, str | None, int | str]:
    """One rank's gathered (why not, mode, host key, chunk), checked; BackendError if malformed."""
    ok = (
        isinstance(raw, list)
        and len(raw) == 4
        and isinstance(raw[0], str)
        and isinstance(raw[1], str)
        and (raw[2] is None or isinstance(raw[2], str))
        and (raw[3] == "auto" or (type(raw[3]) is int and raw[3] > 0))
    )
    if not ok:
        raise BackendError(
            f"rank {rank} sent malformed shared-memory facts {raw!r}; every rank of the job must "
            "run the same ringtrain version"
        )
    return raw[0], raw[1], raw[2], raw[3]


def _group(comm: Any, MPI: Any, facts: list[tuple[str, str, str | None, int | str]]) -> HostGroup | None:
    rank, size = comm.Get_rank(), comm.Get_size()
    native = fusion._native
    chunk = facts[rank][3]

    def give_up(reason: str) -> None:
        if any(m == "on" for _, m, _, _ in facts):
            raise BackendError(
                f"rank {rank}: RINGTRAIN_FUSION_SHM=on but the shared-memory allreduce cannot be used: "
                f"{reason}. Set RINGTRAIN_FUSION_SHM=auto to fall back to MPI"
            )
        logger.info("allreduce over MPI only: %s", reason)

    if size < 2:
        return None
    reasons = [f"rank {r}: {w}" for r, (w, _, _, _) in enumerate(facts) if w]
    if reasons:
        give_up("; ".join(reasons[:4]))
        return None
    if len({c for _, _, _, c in facts}) != 1:
        give_up("ranks disagree on RINGTRAIN_FUSION_SHM_CHUNK")
        return None
    keys = [k for _, _, k, _ in facts]
    hosts = list(dict.fromkeys(keys))  # in order of first rank
    members = [[r for r in range(size) if keys[r] == h] for h in hosts]
    counts = {len(m) for m in members}
    if len(counts) != 1:
        give_up(f"hosts hold different numbers of ranks ({sorted(len(m) for m in members)})")
        return None
    local_size = counts.pop()
    if local_size < 2:
        give_up("every host holds a single rank")
        return None
    if chunk == "auto":
        chunk = auto_chunk(local_size)
    host = hosts.index(keys[rank])
    local_ranks = members[host]
    local_rank = local_ranks.index(rank)
    if len(hosts) == 1:
        local_comm, cross_comm = comm, None
    else:
        local_comm = comm.Split(color=host, key=rank)
        cross_comm = comm.Split(color=local_rank, key=rank)

    group, error = None, ""
    if local_rank == 0:
        remove_stale_segments()
        name = f"/{PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        try:
            group = native.ShmGroup(name, True, 0, local_size, chunk)
        except (OSError, ValueError) as exc:
            error, name = f"rank {rank} could not create {name}: {exc}", ""
        _control.bcast_json(local_comm, name, 0, "segment name")
    else:
        name = _control.bcast_json(local_comm, None, 0, "segment name")
        if not isinstance(name, str):
            error, name = f"rank {rank} got no segment name from the host's first rank: {name!r}", ""
        if name:
            try:
                group = native.ShmGroup(name, False, local_rank, local_size, chunk)
            except (OSError, ValueError) as exc:
                error = f"rank {rank} could not attach to {name}: {exc}"
        else:
            error = "the host's first rank could not create the segment"
    # Doubles as the barrier before unlink: every rank has mapped the segment.
    errors = _control.allgather_json(comm, error, "set-up error")
    problem = ""
    if local_rank == 0 and group is not None:
        try:
            group.unlink()
        except OSError as exc:  # the others must hear of it in the exchange below, not wait
            problem = f"rank {rank} could not unlink {group.name}: {exc}"
    if not any(errors):
        visible, why = group.peers_visible()
        if not visible and not problem:
            problem = f"rank {rank}: {why}"
    errors = errors + _control.allgather_json(comm, problem, "set-up error")
    if any(errors):
        if group is not None:
            group.close()
        _free_split(local_comm, cross_comm, comm)
        give_up("; ".join(str(e) for e in errors if e)[:500])
        return None
    logger.info(
        "allreduce through shared memory: %d rank(s) per host, %d host(s), %d KiB per rank per step",
        local_size,
        len(hosts),
        chunk >> 10,
    )
    if local_comm is not comm:
        local_comm.Free()
    return HostGroup(group, local_ranks, len(hosts), cross_comm, MPI)


def _free_split(local_comm: Any, cross_comm: Any, comm: Any) -> None:
    for c in (local_comm, cross_comm):
        if c is not None and c is not comm:
            c.Free()
