"""The control channel between the driver and the task agents.

Framed messages over TCP. Each connection first proves knowledge of the per-job
secret with a mutual HMAC-SHA256 challenge; only then are frames unpickled. A peer
that fails the challenge is logged and dropped before any of its bytes are parsed.
Every frame is then sealed (:func:`ringtrain.protocol.seal`) with the connection's
session key, its direction and its sequence number.

The server binds the driver's own address and, if asked, a port from a range; the
whole handshake has one deadline, at most :data:`MAX_PENDING` handshakes run at once,
and the accept loop outlives any error.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import pickle
import queue
import socket
import struct
import threading
import time
from typing import Any

from ..errors import ChannelError
from ..protocol import Log, LogsDropped, seal, unseal

logger = logging.getLogger(__name__)

_MAGIC = b"RTC1"
_NONCE = 32
_DIGEST = 32
_HEADER = struct.Struct("!I")
_SEQ = struct.Struct("!Q")
MAX_FRAME = (1 << 31) - 1
HANDSHAKE_TIMEOUT = 10.0
MAX_PENDING = 64
# Log lines one connection may have waiting in the server's inbox; more are counted, not kept.
MAX_QUEUED_LOGS = 10_000


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """``n`` bytes; with ``deadline`` (time.monotonic()), all before it, or TimeoutError."""
    chunks = []
    while n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("handshake deadline passed")
            sock.settimeout(left)
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _mac(secret: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, nonce, hashlib.sha256).digest()


def _session_key(secret: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return _mac(secret, b"ringtrain-session" + server_nonce + client_nonce)


class Connection:
    """An authenticated, framed, thread-safe-for-send connection.

    Every frame is sealed over its direction, its sequence number and its bytes with
    this connection's session key, and is checked before it is unpickled: a frame
    injected or replayed after the handshake is refused. ``last_heard`` is the
    ``time.monotonic()`` of the last frame received (liveness).
    """

    def __init__(self, sock: socket.socket, peer: str, key: bytes, is_server: bool):
        self._sock = sock
        self.peer = peer
        self._key = key
        self._send_tag, self._recv_tag = (b"s", b"c") if is_server else (b"c", b"s")
        self._sent = 0
        self._received = 0
        self._send_lock = threading.Lock()
        self.last_heard = time.monotonic()

    def _context(self, tag: bytes, seq: int) -> bytes:
        return tag + _SEQ.pack(seq)

    def send(self, message: Any) -> None:
        with self._send_lock:
            blob = seal(self._key, message, self._context(self._send_tag, self._sent))
            if len(blob) > MAX_FRAME:
                raise ChannelError(f"message of {len(blob)} bytes is too large for the control channel")
            self._sent += 1
            self._sock.sendall(_HEADER.pack(len(blob)) + blob)

    def recv(self) -> Any:
        (length,) = _HEADER.unpack(_recv_exact(self._sock, _HEADER.size))
        if length > MAX_FRAME:
            raise ChannelError(
                f"a control frame from {self.peer} claims {length} bytes, over the {MAX_FRAME} byte "
                "limit; dropped the connection"
            )
        blob = _recv_exact(self._sock, length)
        message = unseal(
            self._key, blob, self._context(self._recv_tag, self._received), f"control peer {self.peer}"
        )
        self._received += 1
        self.last_heard = time.monotonic()
        return message

    def local_host(self) -> str:
        return self._sock.getsockname()[0]

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def connect(
    address: tuple[str, int],
    secret: bytes,
    timeout: float = HANDSHAKE_TIMEOUT,
    connect_timeout: float | None = None,
) -> Connection:
    """Connect to the driver and run the client side of the mutual challenge, within ``timeout``.

    ``connect_timeout`` bounds the TCP connection alone (default: ``timeout``): an address
    that drops packets is given up on sooner, while a slow handshake still has ``timeout``.
    """
    try:
        sock = socket.create_connection(address, timeout=connect_timeout or timeout)
    except OSError as err:
        raise ChannelError(
            f"cannot reach the ringtrain driver at {address[0]}:{address[1]} ({err}); check that "
            "executors can open connections to the driver host (spark.driver.host)"
        ) from None
    deadline = time.monotonic() + timeout
    try:
        if _recv_exact(sock, len(_MAGIC), deadline) != _MAGIC:
            raise ChannelError("the driver endpoint does not speak the ringtrain control protocol")
        server_nonce = _recv_exact(sock, _NONCE, deadline)
        my_nonce = os.urandom(_NONCE)
        sock.sendall(_mac(secret, server_nonce) + my_nonce)
        if not hmac.compare_digest(_recv_exact(sock, _DIGEST, deadline), _mac(secret, my_nonce)):
            raise ChannelError("the driver failed authentication; the job secret does not match")
    except (OSError, EOFError) as err:
        sock.close()
        raise ChannelError(f"control channel handshake with {address} failed: {err}") from None
    except ChannelError:
        sock.close()
        raise
    sock.settimeout(None)
    key = _session_key(secret, server_nonce, my_nonce)
    return Connection(sock, f"{address[0]}:{address[1]}", key, is_server=False)


def _bind(host: str, ports: tuple[int, int] | None) -> socket.socket:
    """A listening socket on ``host``, on a free port of ``ports`` (any free port if None)."""
    if ports is None:
        return socket.create_server((host, 0), backlog=128)
    for port in range(ports[0], ports[1] + 1):
        try:
            return socket.create_server((host, port), backlog=128)
        except OSError:
            continue
    raise ChannelError(
        f"no free port for the control channel on {host} in {ports[0]}-{ports[1]} "
        "(RINGTRAIN_CHANNEL_PORTS); widen the range or free a port"
    )


class Inbox:
    """What the agents sent, in arrival order, as ``(connection, message)``.

    Control messages are always kept. Log lines are bounded per connection: while
    ``max_logs`` of one connection's lines wait to be taken, its further lines are
    counted by rank and dropped, so a rank that prints faster than the driver shows
    cannot grow the driver's memory without limit. The counts arrive as
    :class:`~ringtrain.protocol.LogsDropped`, ahead of that connection's next kept
    message (or its close); the rank's log file in the job directory keeps every line.
    """

    def __init__(self, max_logs: int = MAX_QUEUED_LOGS):
        self._queue: queue.Queue = queue.Queue()
        self._max_logs = max_logs
        self._lock = threading.Lock()
        self._queued_logs: dict[Any, int] = {}
        self._dropped: dict[Any, dict[int, int]] = {}

    def put(self, conn: Any, message: Any) -> None:
        with self._lock:
            if isinstance(message, Log):
                queued = self._queued_logs.get(conn, 0)
                if queued >= self._max_logs:
                    counts = self._dropped.setdefault(conn, {})
                    counts[message.rank] = counts.get(message.rank, 0) + 1
                    return
                self._queued_logs[conn] = queued + 1
            for rank, count in self._dropped.pop(conn, {}).items():
                self._queue.put((conn, LogsDropped(rank, count)))
            self._queue.put((conn, message))

    def get(self, block: bool = True, timeout: float | None = None) -> tuple[Any, Any]:
        """The next ``(connection, message)``; queue.Empty when there is none in time."""
        conn, message = self._queue.get(block, timeout)
        if isinstance(message, Log):
            with self._lock:
                left = self._queued_logs[conn] - 1
                if left:
                    self._queued_logs[conn] = left
                else:
                    del self._queued_logs[conn]
        return conn, message

    def get_nowait(self) -> tuple[Any, Any]:
        return self.get(block=False)

    def empty(self) -> bool:
        return self._queue.empty()


class ChannelServer:
    """The driver's end: accepts agents, authenticates them, queues what they send.

    Messages arrive on :attr:`inbox` (an :class:`Inbox`, which bounds each connection's
    waiting log lines to ``max_queued_logs``) as ``(connection, message)``; a closed
    connection arrives as ``(connection, None)``. ``bind_host`` should be the driver's
    own address (loopback for a local session); ``ports`` an inclusive range, or None.
    """

    def __init__(
        self,
        secret: bytes,
        bind_host: str = "127.0.0.1",
        ports: tuple[int, int] | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_queued_logs: int = MAX_QUEUED_LOGS,
    ):
        self._secret = secret
        self._handshake_timeout = handshake_timeout
        self.inbox = Inbox(max_queued_logs)
        self._connections: list[Connection] = []
        self._lock = threading.Lock()
        self._pending = threading.BoundedSemaphore(MAX_PENDING)
        self._closed = threading.Event()
        self._listener = _bind(bind_host, ports)
        self.port = self._listener.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept_loop, name="ringtrain-channel", daemon=True)
        self._accepter.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError as err:
                if self._closed.is_set():
                    return
                # e.g. EMFILE: out of file descriptors. Keep serving the agents already in.
                logger.warning("control channel: accept failed (%s); retrying", err)
                time.sleep(0.1)
                continue
            try:
                self._admit(sock, f"{addr[0]}:{addr[1]}")
            except Exception as err:  # the loop must outlive anything one peer causes
                logger.warning("control channel: dropped a connection from %s: %s", addr, err)
                sock.close()

    def _admit(self, sock: socket.socket, peer: str) -> None:
        if not self._pending.acquire(blocking=False):
            logger.warning(
                "refused a control connection from %s: %d handshakes are already pending", peer, MAX_PENDING
            )
            sock.close()
            return
        threading.Thread(target=self._serve, args=(sock, peer), daemon=True).start()

    def _authenticate(self, sock: socket.socket) -> bytes | None:
        """The session key if the peer proves it knows the secret in time, else None."""
        deadline = time.monotonic() + self._handshake_timeout
        nonce = os.urandom(_NONCE)
        sock.settimeout(self._handshake_timeout)
        sock.sendall(_MAGIC + nonce)
        answer = _recv_exact(sock, _DIGEST, deadline)
        if not hmac.compare_digest(answer, _mac(self._secret, nonce)):
            return None
        client_nonce = _recv_exact(sock, _NONCE, deadline)
        sock.sendall(_mac(self._secret, client_nonce))
        sock.settimeout(None)
        return _session_key(self._secret, nonce, client_nonce)

    def _serve(self, sock: socket.socket, peer: str) -> None:
        try:
            try:
                key = self._authenticate(sock)
            except (OSError, EOFError):
                key = None
        finally:
            self._pending.release()
        if key is None:
            logger.warning("refused a control connection from %s: it failed authentication", peer)
            sock.close()
            return
        conn = Connection(sock, peer, key, is_server=True)
        with self._lock:
            self._connections.append(conn)
        try:
            while True:
                self.inbox.put(conn, conn.recv())
        except ChannelError as err:
            logger.warning("%s", err)
        except (OSError, EOFError, pickle.UnpicklingError):
            pass
        except Exception as err:  # an unpicklable class, a bad frame: this peer is done, not the driver
            logger.warning("control channel: dropped %s: %s: %s", peer, type(err).__name__, err)
        finally:
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)
            conn.close()
            self.inbox.put(conn, None)

    def connections(self) -> list[Connection]:
        with self._lock:
            return list(self._connections)

    def broadcast(self, message: Any) -> None:
        """Send ``message`` to every connected agent; a dead connection is skipped."""
        for conn in self.connections():
            try:
                conn.send(message)
            except OSError:
                pass

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            connections, self._connections = list(self._connections), []
        for conn in connections:
            conn.close()

    def __enter__(self) -> ChannelServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
