"""The native shared-memory allreduce group, across real processes but without MPI.

The test process is local rank 0 and creates the segment; helpers/shm_peer.py plays
the other ranks. Covers every element kind and op against numpy (in the group's
documented order), several chunks per call, clean-up of the segment, and that a dead
or departed peer raises instead of hanging.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import shm_peer

from ringtrain import fusion
from ringtrain.collectives import _shm
from ringtrain.errors import BackendError

native = fusion._native
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        native is None or not getattr(native, "HAVE_SHM", False),
        reason=f"native extension with shared memory not built ({fusion._NATIVE_IMPORT_ERROR})",
    ),
]

HELPER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "helpers", "shm_peer.py")
SLOT = 64 << 10  # small, so the larger test tensors take several steps


def _name() -> str:
    return f"/{_shm.PREFIX}{os.getpid()}-{secrets.token_hex(6)}"


def _listed(name: str) -> bool:
    return os.path.exists(os.path.join(_shm.SHM_DIR, name.lstrip("/")))


class Peers:
    """Rank 0 here, ranks 1.. in helper processes, the segment unlinked once all attached."""

    def __init__(self, size: int, actions: list[str], slot: int = SLOT, algorithm: str = "auto") -> None:
        self.name = _name()
        self.group = native.ShmGroup(self.name, True, 0, size, slot)
        self.group.algorithm = algorithm
        self.procs = [
            subprocess.Popen(
                [sys.executable, HELPER, self.name, str(r), str(size), str(slot), action, algorithm],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r, action in enumerate(actions, start=1)
        ]
        for p in self.procs:
            line = p.stdout.readline()
            assert line.strip() == "READY", line + p.stdout.read()
        self.group.unlink()

    def finish(self, timeout: float = 60) -> list[tuple[int, str]]:
        out = []
        for p in self.procs:
            text, _ = p.communicate(timeout=timeout)
            out.append((p.returncode, text))
        return out

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
        self.group.close()


@pytest.mark.parametrize("algorithm", ["auto", "one_shot", "two_step"])
@pytest.mark.parametrize("size", [2, 3])
def test_every_kind_and_op_matches_numpy_bit_for_bit(size, algorithm):
    peers = Peers(size, ["cases"] * (size - 1), algorithm=algorithm)
    try:
        failures = shm_peer.check_all(peers.group, size)
        results = peers.finish()
    finally:
        peers.kill()
    assert not failures, failures
    for code, text in results:
        assert code == 0 and "CASES OK" in text, text


@pytest.mark.parametrize("algorithm", ["one_shot", "two_step"])
def test_exchange_gathers_every_rank_and_keeps_the_group_in_step(algorithm):
    """The argument check's barrier: each rank's pair, signatures that differ included, and
    allreduces before and after it stay in step (the phases interleave)."""
    peers = Peers(2, ["exchange"], algorithm=algorithm)
    try:
        mine = shm_peer.exchange_and_reduce(peers.group, 0)
        ((code, text),) = peers.finish()
    finally:
        peers.kill()
    want = "FIRST [[1, 10], [2, 11]] SUM [3.0] SECOND [[5, 20], [5, 21]]"
    assert mine == want
    assert code == 0 and want in text, text


def test_chunks_and_stats():
    peers = Peers(2, ["cases"])
    try:
        shm_peer.check_all(peers.group, 2)
        stats = peers.group.stats()
        peers.finish()
    finally:
        peers.kill()
    assert stats["calls"] == len(shm_peer.CASES)
    # The 40,001-element tensors need more than one 64 KiB step per call.
    assert stats["chunks"] > stats["calls"]
    assert all(stats[k] >= 0 for k in ("pack_s", "wait_s", "reduce_s", "unpack_s"))


def test_segment_is_unlinked_once_every_rank_has_mapped_it():
    peers = Peers(2, ["hang"])
    try:
        assert not _listed(peers.name)  # gone from /dev/shm while both still use it
        os.kill(peers.procs[0].pid, signal.SIGKILL)
        peers.procs[0].wait()
    finally:
        peers.kill()
    assert not _listed(peers.name)


def _allreduce(group, n: int = 1000) -> None:
    x = np.ones(n, np.float32)
    group.allreduce([x], [np.empty_like(x)], "f4", "sum")


def _expect_peer_lost(group, match: str, within: float) -> float:
    start = time.monotonic()
    with pytest.raises(native.PeerLost, match=match):
        _allreduce(group)
    elapsed = time.monotonic() - start
    assert elapsed < within, f"took {elapsed:.2f}s to notice"
    return elapsed


def test_dead_peer_raises_instead_of_hanging():
    peers = Peers(2, ["die"])
    try:
        peers.procs[0].wait()  # exited, not yet reaped by anyone but us: a zombie until now
        _expect_peer_lost(peers.group, r"local rank 1 \(pid \d+\) died", within=5)
        # The group is unusable afterwards, and says so at once.
        with pytest.raises(native.PeerLost, match="failed earlier"):
            _allreduce(peers.group)
    finally:
        peers.kill()


def test_peer_killed_while_waited_for():
    peers = Peers(2, ["hang"])
    try:
        victim = peers.procs[0]
        threading.Timer(0.3, victim.kill).start()
        elapsed = _expect_peer_lost(peers.group, "died while local rank 0 waited", within=10)
        assert elapsed >= 0.25  # it did wait for the live peer first
    finally:
        peers.kill()


def test_peer_that_gives_up_releases_the_others():
    peers = Peers(3, ["abandon", "hang"])
    try:
        quitter = peers.procs[0]

        def give_up() -> None:
            quitter.stdin.write("go\n")
            quitter.stdin.flush()

        threading.Timer(0.3, give_up).start()
        _expect_peer_lost(peers.group, "local rank 1 left", within=10)
    finally:
        peers.kill()


def test_dead_peer_becomes_a_backend_error_naming_world_ranks():
    peers = Peers(2, ["die"])
    try:
        peers.procs[0].wait()
        host = _shm.HostGroup(peers.group, local_ranks=[4, 9], hosts=1, cross_comm=None, MPI=None)
        x = np.ones(10, np.float32)
        with pytest.raises(BackendError, match=r"rank 4: the shared-memory allreduce failed: rank 9 \(pid"):
            host.allreduce([x], [np.empty_like(x)], "f4", "sum", "", 1.0, 1, world_rank=4)
    finally:
        peers.kill()


def test_setup_errors():
    name = _name()
    group = native.ShmGroup(name, True, 0, 2, 1 << 16)
    try:
        with pytest.raises(OSError, match="shm_open"):
            native.ShmGroup(name, True, 0, 2, 1 << 16)  # the name is taken
        with pytest.raises(native.ShmSetupError, match="size"):
            native.ShmGroup(name, False, 1, 2, 1 << 20)  # another slot size
        with pytest.raises(ValueError, match="rank"):
            native.ShmGroup(name, False, 2, 2, 1 << 16)
        ok, why = group.peers_visible()
        assert not ok and "local rank 1 has not attached" in why
    finally:
        group.unlink()
        group.close()
    assert not _listed(name)
    with pytest.raises(native.ShmSetupError, match="shm_open"):
        native.ShmGroup(name, False, 1, 2, 1 << 16)  # unlinked: nothing to attach to


def test_stale_segments_of_dead_creators_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    dead_pid = int(dead.stdout)
    old = time.time() - 3600
    files = {
        f"{_shm.PREFIX}{dead_pid}-abc123": True,  # creator gone, old: removed
        f"{_shm.PREFIX}{os.getpid()}-abc123": False,  # creator alive
        "mpich_shm_0": False,  # not ours
    }
    for name in files:
        path = tmp_path / name
        path.write_bytes(b"x")
        os.utime(path, (old, old))
    young = tmp_path / f"{_shm.PREFIX}{dead_pid}-def456"  # creator gone but just made: kept
    young.write_bytes(b"x")
    removed = _shm.remove_stale_segments(str(tmp_path), min_age_s=60)
    assert removed == [n for n, gone in files.items() if gone]
    assert young.exists()


class Interrupted(Exception):
    pass


def test_signal_handler_ends_a_wait_for_a_live_peer():
    # A live peer that never arrives (its rank was interrupted elsewhere): Python's signal
    # handlers still run within the liveness period, and the group is given up.
    peers = Peers(2, ["hang"])

    def handler(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        start = time.monotonic()
        with pytest.raises(Interrupted):
            _allreduce(peers.group)
        assert 0.25 <= time.monotonic() - start < 10
        assert peers.group.broken
    finally:
        signal.signal(signal.SIGUSR1, previous)
        peers.kill()
