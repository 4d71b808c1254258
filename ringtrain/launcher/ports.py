"""Port reservation with hand-over, so a published port is never free to be taken.

A reservation is a socket bound with SO_REUSEPORT and never listened on. While it
is held, a process that binds without SO_REUSEPORT (any other program) gets
EADDRINUSE, but the worker's server, which binds with SO_REUSEPORT under the same
user, takes the port over. TF's gRPC server sets SO_REUSEPORT when
TF_GRPC_REUSE_PORT=1, which the agent sets for every worker.
"""

from __future__ import annotations

import socket


class PortReservation:
    """A held port. Close it once the worker that uses the port has exited."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            self._sock.bind(("0.0.0.0", 0))
            self.port: int = self._sock.getsockname()[1]
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> PortReservation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reserve_ports(count: int) -> list[PortReservation]:
    """``count`` held ports; if one cannot be had, those already held are released first."""
    held: list[PortReservation] = []
    try:
        for _ in range(count):
            held.append(PortReservation())
    except BaseException:
        release_all(held)
        raise
    return held


def release_all(reservations: list[PortReservation]) -> None:
    """Close every reservation, even when closing one of them fails."""
    errors = []
    for reservation in reservations:
        try:
            reservation.close()
        except OSError as err:
            errors.append(err)
    if errors:
        raise errors[0]
