"""The control channel between the driver and the task agents.

Framed messages over TCP. Each connection first proves knowledge of the per-job
secret with a mutual HMAC-SHA256 challenge; only then are frames unpickled. A peer
that fails the challenge is logged and dropped before any of its bytes are parsed.
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
from typing import Any

from ..errors import ChannelError

logger = logging.getLogger(__name__)

_MAGIC = b"RTC1"
_NONCE = 32
_DIGEST = 32
_HEADER = struct.Struct("!I")
_SEQ = struct.Struct("!Q")
_MAX_FRAME = 1 << 31
HANDSHAKE_TIMEOUT = 10.0


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
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

    Every frame carries an HMAC over its direction, its sequence number and its bytes,
    keyed by this connection's session key, and is checked before it is unpickled: a
    frame injected or replayed after the handshake is refused.
    """

    def __init__(self, sock: socket.socket, peer: str, key: bytes, is_server: bool):
        self._sock = sock
        self.peer = peer
        self._key = key
        self._send_tag, self._recv_tag = (b"s", b"c") if is_server else (b"c", b"s")
        self._sent = 0
        self._received = 0
        self._send_lock = threading.Lock()

    def _frame_mac(self, tag: bytes, seq: int, data: bytes) -> bytes:
        return hmac.new(self._key, tag + _SEQ.pack(seq) + data, hashlib.sha256).digest()

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) >= _MAX_FRAME:
            raise ChannelError(f"message of {len(data)} bytes is too large for the control channel")
        with self._send_lock:
            mac = self._frame_mac(self._send_tag, self._sent, data)
            self._sent += 1
            self._sock.sendall(_HEADER.pack(len(data)) + mac + data)

    def recv(self) -> Any:
        (length,) = _HEADER.unpack(_recv_exact(self._sock, _HEADER.size))
        mac = _recv_exact(self._sock, _DIGEST)
        data = _recv_exact(self._sock, length)
        if not hmac.compare_digest(mac, self._frame_mac(self._recv_tag, self._received, data)):
            raise ChannelError(
                f"a control frame from {self.peer} failed its integrity check; dropped the connection"
            )
        self._received += 1
        return pickle.loads(data)

    def local_host(self) -> str:
        return self._sock.getsockname()[0]

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def connect(address: tuple[str, int], secret: bytes, timeout: float = HANDSHAKE_TIMEOUT) -> Connection:
    """Connect to the driver and run the client side of the mutual challenge."""
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as err:
        raise ChannelError(
            f"cannot reach the ringtrain driver at {address[0]}:{address[1]} ({err}); check that "
            "executors can open connections to the driver host (spark.driver.host)"
        ) from None
    try:
        if _recv_exact(sock, len(_MAGIC)) != _MAGIC:
            raise ChannelError("the driver endpoint does not speak the ringtrain control protocol")
        server_nonce = _recv_exact(sock, _NONCE)
        my_nonce = os.urandom(_NONCE)
        sock.sendall(_mac(secret, server_nonce) + my_nonce)
        if not hmac.compare_digest(_recv_exact(sock, _DIGEST), _mac(secret, my_nonce)):
            raise ChannelError("the driver failed authentication; the job secret does not match")
    except (OSError, EOFError) as err:
        sock.close()
        raise ChannelError(f"control channel handshake with {address} failed: {err}") from None
    sock.settimeout(None)
    key = _session_key(secret, server_nonce, my_nonce)
    return Connection(sock, f"{address[0]}:{address[1]}", key, is_server=False)


class ChannelServer:
    """The driver's end: accepts agents, authenticates them, queues what they send.

    Messages arrive on :attr:`inbox` as ``(connection, message)``; a closed
    connection arrives as ``(connection, None)``.
    """

    def __init__(self, secret: bytes, bind_host: str = "0.0.0.0"):
        self._secret = secret
        self.inbox: queue.Queue = queue.Queue()
        self._connections: list[Connection] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._listener = socket.create_server((bind_host, 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept_loop, name="ringtrain-channel", daemon=True)
        self._accepter.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError:
                return
            peer = f"{addr[0]}:{addr[1]}"
            threading.Thread(target=self._serve, args=(sock, peer), daemon=True).start()

    def _authenticate(self, sock: socket.socket) -> bytes | None:
        """The session key if the peer proves it knows the secret, else None."""
        sock.settimeout(HANDSHAKE_TIMEOUT)
        nonce = os.urandom(_NONCE)
        sock.sendall(_MAGIC + nonce)
        answer = _recv_exact(sock, _DIGEST)
        if not hmac.compare_digest(answer, _mac(self._secret, nonce)):
            return None
        client_nonce = _recv_exact(sock, _NONCE)
        sock.sendall(_mac(self._secret, client_nonce))
        sock.settimeout(None)
        return _session_key(self._secret, nonce, client_nonce)

    def _serve(self, sock: socket.socket, peer: str) -> None:
        try:
            key = self._authenticate(sock)
        except (OSError, EOFError):
            key = None
        if key is None:
            logger.warning("refused a control connection from %s: it failed authentication", peer)
            sock.close()
            return
        conn = Connection(sock, peer, key, is_server=True)
        with self._lock:
            self._connections.append(conn)
        try:
            while True:
                self.inbox.put((conn, conn.recv()))
        except ChannelError as err:
            logger.warning("%s", err)
        except (OSError, EOFError, pickle.UnpicklingError):
            pass
        finally:
            with self._lock:
                if conn in self._connections:
                    self._connections.remove(conn)
            conn.close()
            self.inbox.put((conn, None))

    def broadcast(self, message: Any) -> None:
        """Send ``message`` to every connected agent; a dead connection is skipped."""
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
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
