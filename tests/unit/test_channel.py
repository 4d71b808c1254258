"""The control channel authenticates before it unpickles anything."""

import logging
import os
import pickle
import socket
import struct
import time

import pytest

from ringtrain.errors import ChannelError
from ringtrain.launcher import channel
from ringtrain.launcher.channel import ChannelServer, connect
from ringtrain.protocol import Log, LogsDropped, Result, seal


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


def test_a_slow_handshake_is_cut_off_at_one_deadline(caplog):
    with ChannelServer(b"k" * 32, handshake_timeout=1.0) as server, caplog.at_level(logging.WARNING):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.recv(4 + 32)
        started = time.monotonic()
        try:
            # A byte every 0.3 s would reset a per-read timeout forever; one deadline ends it.
            for _ in range(20):
                sock.sendall(b"x")
                time.sleep(0.3)
        except OSError:
            pass
        sock.settimeout(10)
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 5
        sock.close()
    assert "failed authentication" in caplog.text


def test_pending_handshakes_are_capped(monkeypatch, caplog):
    monkeypatch.setattr(channel, "MAX_PENDING", 2)
    with ChannelServer(b"k" * 32) as server, caplog.at_level(logging.WARNING):
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(2)]
        for sock in idle:
            sock.recv(4 + 32)  # both are mid-handshake
        extra = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        assert extra.recv(100) == b""  # refused at once
        extra.close()
        for sock in idle:
            sock.close()
        # Once they are gone, agents get in again.
        deadline = time.monotonic() + 5
        while True:
            try:
                connect(("127.0.0.1", server.port), b"k" * 32).close()
                break
            except ChannelError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    assert "handshakes are already pending" in caplog.text


def test_recv_enforces_the_frame_limit(caplog):
    with ChannelServer(b"k" * 32) as server, caplog.at_level(logging.WARNING):
        conn = connect(("127.0.0.1", server.port), b"k" * 32)
        conn._sock.sendall(struct.pack("!I", channel.MAX_FRAME + 1))
        _, closed = server.inbox.get(timeout=5)
        assert closed is None
        conn.close()
    assert "over the" in caplog.text and "limit" in caplog.text


def test_accept_loop_survives_an_error(monkeypatch, caplog):
    with ChannelServer(b"k" * 32) as server, caplog.at_level(logging.WARNING):
        real = server._admit
        calls = []

        def flaky(sock, peer):
            calls.append(peer)
            if len(calls) == 1:
                raise RuntimeError("something odd")
            real(sock, peer)

        monkeypatch.setattr(server, "_admit", flaky)
        first = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        assert first.recv(100) == b""
        first.close()
        conn = connect(("127.0.0.1", server.port), b"k" * 32)
        conn.send("still serving")
        assert server.inbox.get(timeout=5)[1] == "still serving"
        conn.close()
    assert "something odd" in caplog.text


def test_bind_address_and_port_range():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        taken = probe.getsockname()[1]
        probe.listen()
        with pytest.raises(ChannelError, match=f"no free port .* in {taken}-{taken}"):
            ChannelServer(b"k" * 32, "127.0.0.1", (taken, taken))
    with ChannelServer(b"k" * 32) as server:
        assert server._listener.getsockname()[0] == "127.0.0.1"  # loopback unless told otherwise
    low = taken + 1 if taken < 65000 else 40000
    with ChannelServer(b"k" * 32, "127.0.0.1", (low, low + 20)) as server:
        assert low <= server.port <= low + 20


def test_channel_address_follows_spark():
    from ringtrain.launcher.driver import channel_address

    assert channel_address(None, None) == ("127.0.0.1", "127.0.0.1")
    assert channel_address(None, "10.0.0.5") == ("10.0.0.5", "10.0.0.5")
    assert channel_address("0.0.0.0", "driver.example") == ("0.0.0.0", "driver.example")


def test_inbox_bounds_each_connections_log_lines_and_counts_what_it_drops():
    inbox = channel.Inbox(max_logs=3)
    fast, other = object(), object()
    for i in range(8):
        inbox.put(fast, Log(i % 2, "stdout", f"line {i}"))
    inbox.put(other, Log(5, "stdout", "another agent"))  # its own bound
    inbox.put(fast, Result(0, b"r"))  # control messages are always kept
    taken = [inbox.get_nowait() for _ in range(6)]
    assert [m.line for c, m in taken[:3]] == ["line 0", "line 1", "line 2"]
    assert taken[3] == (other, Log(5, "stdout", "another agent"))
    # The counts come ahead of the connection's next kept message, by rank.
    assert {m for c, m in taken[4:]} == {LogsDropped(1, 3), LogsDropped(0, 2)}
    assert inbox.get_nowait() == (fast, Result(0, b"r"))
    assert inbox.empty()
    # Taking lines frees room again; a close still carries what was dropped before it.
    for i in range(4):
        inbox.put(fast, Log(0, "stderr", f"again {i}"))
    inbox.put(fast, None)
    rest = []
    while not inbox.empty():
        rest.append(inbox.get_nowait()[1])
    assert rest == [*(Log(0, "stderr", f"again {i}") for i in range(3)), LogsDropped(0, 1), None]


def test_a_fast_printing_agent_cannot_grow_the_servers_inbox_without_limit():
    with ChannelServer(b"k" * 32, max_queued_logs=5) as server:
        conn = connect(("127.0.0.1", server.port), b"k" * 32)
        for i in range(200):
            conn.send(Log(1, "stdout", f"line {i}"))
        conn.send(Result(1, None))
        # Nothing is taken until the server has read every frame: 5 lines, the count, the result.
        deadline = time.monotonic() + 10
        while server.inbox._queue.qsize() < 7:
            assert time.monotonic() < deadline, server.inbox._queue.qsize()
            time.sleep(0.01)
        messages = [server.inbox.get_nowait()[1] for _ in range(7)]
        conn.close()
    lines = [m for m in messages if isinstance(m, Log)]
    assert [m.line for m in lines] == [f"line {i}" for i in range(5)]
    assert messages[5:] == [LogsDropped(1, 195), Result(1, None)]
