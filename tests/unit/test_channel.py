"""The control channel authenticates before it unpickles anything."""

import logging
import os
import pickle
import socket
import struct

import pytest

from ringtrain.errors import ChannelError
from ringtrain.launcher.channel import ChannelServer, connect
from ringtrain.protocol import seal


class _Tripwire:
    """Unpickling this creates a file: proof that bytes were unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_authenticated_round_trip():
    with ChannelServer(b"k" * 32) as server:
        conn = connect(("127.0.0.1", server.port), b"k" * 32)
        conn.send(("log", 0, "stdout", "hi"))
        _, message = server.inbox.get(timeout=5)
        assert message == ("log", 0, "stdout", "hi")
        server.broadcast(("abort", "test"))
        assert conn.recv() == ("abort", "test")
        conn.close()
        _, closed = server.inbox.get(timeout=5)
        assert closed is None


def test_wrong_secret_is_refused_on_both_sides(caplog):
    with ChannelServer(b"k" * 32) as server:
        with caplog.at_level(logging.WARNING), pytest.raises(ChannelError):
            connect(("127.0.0.1", server.port), b"x" * 32)
        assert server.inbox.empty()
    assert "failed authentication" in caplog.text


def test_unauthenticated_bytes_are_never_unpickled(tmp_path, caplog):
    marker = tmp_path / "unpickled"
    evil = pickle.dumps(_Tripwire(str(marker)))
    with ChannelServer(b"k" * 32) as server, caplog.at_level(logging.WARNING):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.recv(4 + 32)  # magic and challenge
        # Answer with a pickle frame instead of the HMAC.
        sock.sendall(struct.pack("!I", len(evil)) + evil + os.urandom(64))
        try:
            assert sock.recv(100) == b""  # the server hangs up...
        except ConnectionResetError:
            pass  # ...or resets, since our extra bytes were never read
        sock.close()
        assert server.inbox.empty()
    assert not marker.exists()
    assert "refused a control connection" in caplog.text


def test_frames_injected_after_the_handshake_are_never_unpickled(tmp_path, caplog):
    marker = tmp_path / "unpickled"
    evil = pickle.dumps(_Tripwire(str(marker)))
    with ChannelServer(b"k" * 32) as server, caplog.at_level(logging.WARNING):
        conn = connect(("127.0.0.1", server.port), b"k" * 32)
        # A peer on the path that relayed the handshake, then writes its own frame.
        forged = b"RTS1" + os.urandom(32) + evil
        conn._sock.sendall(struct.pack("!I", len(forged)) + forged)
        _, closed = server.inbox.get(timeout=5)
        assert closed is None
        conn.close()
    assert not marker.exists()
    assert "failed its integrity check" in caplog.text


def test_replayed_frame_is_refused(caplog):
    with ChannelServer(b"k" * 32) as server, caplog.at_level(logging.WARNING):
        conn = connect(("127.0.0.1", server.port), b"k" * 32)
        blob = seal(conn._key, ("log", 0, "stdout", "once"), b"c" + struct.pack("!Q", 0))
        frame = struct.pack("!I", len(blob)) + blob
        conn._sock.sendall(frame)
        assert server.inbox.get(timeout=5)[1] == ("log", 0, "stdout", "once")
        conn._sock.sendall(frame)  # the same frame again
        assert server.inbox.get(timeout=5)[1] is None
        conn.close()
    assert "failed its integrity check" in caplog.text
