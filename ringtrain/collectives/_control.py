"""Small control messages between ranks (set-up facts, mismatch descriptions) as bytes over MPI.

Nothing here unpickles: the MPI world's membership is not authenticated, and unpickling
a peer's bytes would run whatever code they name. Messages are JSON (or raw bytes),
moved with buffer calls: an Allgather of the lengths, then an Allgatherv of the bytes
(or a Bcast of the length, then of the bytes). A message that is not valid JSON raises
BackendError naming the rank that sent it, on every rank alike.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ringtrain.backends.mpi import mpi_module
from ringtrain.errors import BackendError


def allgather_bytes(comm: Any, data: bytes) -> list[bytes]:
    """Every rank's ``data``, in rank order."""
    MPI = mpi_module()
    lengths = np.empty(comm.Get_size(), np.int64)
    comm.Allgather(np.array([len(data)], np.int64), lengths)
    displs = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    gathered = np.empty(int(lengths.sum()), np.uint8)
    mine = np.frombuffer(bytearray(data), np.uint8)
    comm.Allgatherv([mine, MPI.BYTE], [gathered, lengths, displs, MPI.BYTE])
    raw = gathered.tobytes()
    return [raw[start : start + n] for start, n in zip(displs.tolist(), lengths.tolist(), strict=True)]


def bcast_bytes(comm: Any, data: bytes | None, root: int) -> bytes:
    """``root``'s ``data`` on every rank (the others pass None)."""
    MPI = mpi_module()
    mine = comm.Get_rank() == root
    length = np.array([len(data) if mine and data is not None else 0], np.int64)
    comm.Bcast(length, root=root)
    buf = np.frombuffer(bytearray(data), np.uint8) if mine and data else np.empty(int(length[0]), np.uint8)
    if buf.size:
        comm.Bcast([buf, MPI.BYTE], root=root)
    return buf.tobytes()


def _loads(data: bytes, sender: int, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BackendError(
            f"rank {sender} sent a malformed {what} ({exc}); every rank of the job must run the same "
            "ringtrain version, and nothing else may join its MPI world"
        ) from None


def allgather_json(comm: Any, value: Any, what: str) -> list[Any]:
    """Every rank's ``value`` (JSON data: dicts, lists, str, numbers, bools, None), in rank order.

    Tuples come back as lists. ``what`` names the message in errors.
    """
    gathered = allgather_bytes(comm, json.dumps(value, separators=(",", ":")).encode())
    return [_loads(data, rank, what) for rank, data in enumerate(gathered)]


def bcast_json(comm: Any, value: Any, root: int, what: str) -> Any:
    """``root``'s ``value`` (JSON data) on every rank; the others' ``value`` is ignored."""
    data = json.dumps(value, separators=(",", ":")).encode() if comm.Get_rank() == root else None
    return _loads(bcast_bytes(comm, data, root), root, what)
