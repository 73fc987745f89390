"""Segments per short connection through the real tool (Linux TCP_INFO counters on the test's
own ends, no packet capture): the client's first bytes carry the handshake's last ACK to the
destination, the destination's first reply is still acknowledged at once, a reply that comes
with its FIN reaches the client in one segment, and a server that speaks first is dialled
as before. tcpfwd is stopped (SIGSTOP) while the test sets a scene up, so that what it finds
at its next read is decided by the test, not by scheduling."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import connect, free_port

from portfwd.runtime import sockets

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux")
                                or not hasattr(socket, "TCP_INFO"),
                                reason="Linux TCP_INFO counters")

# struct tcp_info (linux/tcp.h): byte offsets of the counters read here
UNACKED, SEGS_IN, DATA_SEGS_IN = 24, 140, 152


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def tcp_info(sock: socket.socket, offset: int) -> int:
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", raw, offset)[0]


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The tool stopped: the kernel goes on (handshakes, queues), the tool does nothing."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while process_state(pid) != "T":  # SIGSTOP takes effect asynchronously
        assert time.monotonic() < deadline, "the tool did not stop"
        time.sleep(0.001)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def forward(tool, *options: str) -> tuple:
    """(the tool, its port, the destination's listener), the destination in this test."""
    target = socket.create_server(("127.0.0.1", 0))
    target.settimeout(10)
    port = free_port()
    fwd = tool("tcpfwd", *options, f"127.0.0.1:{port}", f"127.0.0.1:{target.getsockname()[1]}")
    fwd.wait_for_log("forwarding")
    connect("127.0.0.1", port).close()  # bound and accepting
    with target.accept()[0]:
        pass
    return fwd, port, target


@pytest.fixture
def forwarded(tool):
    fwd, port, target = forward(tool)
    yield fwd, port, target
    target.close()


def request_in_hand(fwd, port: int, target: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A client whose request is queued before tcpfwd accepts it; (client, server end)."""
    with stopped(fwd.pid):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"hello")
    server, _ = target.accept()
    server.settimeout(10)
    assert server.recv(100) == b"hello"
    return client, server


def test_request_in_hand_carries_the_handshake_ack(forwarded):
    """The destination gets SYN, then the request with the ACK in it: two segments; a
    direct connection (ACK alone, then the request) takes three."""
    fwd, port, target = forwarded
    client, server = request_in_hand(fwd, port, target)
    assert tcp_info(server, DATA_SEGS_IN) == 1
    assert tcp_info(server, SEGS_IN) == 2
    with socket.create_connection(target.getsockname(), timeout=10) as direct:
        direct.sendall(b"hello")
        with target.accept()[0] as end:
            assert end.recv(100) == b"hello"
            assert tcp_info(end, SEGS_IN) == 3
    client.close()
    server.close()
    assert fwd.stop() == 0


def test_replies_are_acknowledged_at_once(forwarded):
    """After the deferred handshake ACK the dialled socket acknowledges as usual: each small
    write of the destination is acknowledged before its send() returns (on loopback the
    receiver's ACK is processed inline). Left in the deferring mode (TCP_QUICKACK off) the
    replies would wait for a delayed-ACK timer, and a Nagle sender's next write with them:
    a 40 ms stall that a direct connection does not have."""
    fwd, port, target = forwarded
    client, server = request_in_hand(fwd, port, target)
    # tcpfwd sets a connection up in one go, in accept order: once a second one reaches
    # the destination, the first's set-up (its send, then TCP_QUICKACK back on) is over.
    with socket.create_connection(("127.0.0.1", port), timeout=10), target.accept()[0]:
        pass
    for reply in (b"x" * 100, b"y" * 100):
        with stopped(fwd.pid):  # tcpfwd holds no socket lock: the kernel ACKs inline
            server.send(reply)
            # ACKed at once: on loopback within the send, unless softirqs were deferred;
            # 20 ms is still half the shortest delayed-ACK time, which a held ACK waits
            deadline = time.monotonic() + 0.02
            while tcp_info(server, UNACKED) and time.monotonic() < deadline:
                time.sleep(0.001)
            assert tcp_info(server, UNACKED) == 0
        assert client.recv(100) == reply
    client.close()
    server.close()
    assert fwd.stop() == 0


def test_proxy_header_carries_the_handshake_ack_and_replies_are_acknowledged_at_once(tool):
    """With --proxy-protocol the header is always in hand: the destination gets SYN, then
    header and request with the ACK in them (two segments, not three), and quick ACKs are
    back on after it."""
    fwd, port, target = forward(tool, "--proxy-protocol", "v1")
    with stopped(fwd.pid):  # the request is queued before tcpfwd accepts: one segment
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"hello")
    server, _ = target.accept()
    server.settimeout(10)
    data = b""
    while not data.endswith(b"hello"):
        data += server.recv(200)
    assert data.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ")
    assert tcp_info(server, DATA_SEGS_IN) == 1
    assert tcp_info(server, SEGS_IN) == 2
    # Once a second connection reaches the destination the first one's set-up (header,
    # then TCP_QUICKACK back on) is over: one greenlet runs at a time.
    with socket.create_connection(("127.0.0.1", port), timeout=10), target.accept()[0]:
        pass
    with stopped(fwd.pid):
        server.send(b"x" * 100)
        deadline = time.monotonic() + 0.02  # half the shortest delayed-ACK time
        while tcp_info(server, UNACKED) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert tcp_info(server, UNACKED) == 0
    assert client.recv(100) == b"x" * 100
    client.close()
    server.close()
    target.close()
    assert fwd.stop() == 0


def test_reply_with_its_fin_reaches_the_client_in_one_segment(forwarded):
    """A reply followed by close, both queued before tcpfwd reads: the client receives
    SYN-ACK, the ACK of its request, then reply and FIN together (direct, the destination's
    kernel sends the FIN apart)."""
    fwd, port, target = forwarded
    client, server = request_in_hand(fwd, port, target)
    with stopped(fwd.pid):
        server.sendall(b"world")
        server.close()
    received = b""
    while chunk := client.recv(100):
        received += chunk
    assert received == b"world"
    assert tcp_info(client, DATA_SEGS_IN) == 1
    assert tcp_info(client, SEGS_IN) == 3
    client.close()
    assert fwd.stop() == 0


def test_server_that_speaks_first_is_dialled_without_waiting_for_data(forwarded):
    """No client bytes at accept: a plain dial (no data to carry the handshake's ACK), and
    the destination's banner reaches the client before the client has sent anything; the
    client's later bytes and a half-close still go through. (That the ACK is not held here
    is the code's ``early=bool(first)``; a held one would only show as a 40 ms wait, which
    this test does not time.)"""
    fwd, port, target = forwarded
    with stopped(fwd.pid):
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
    server, _ = target.accept()  # the handshake's ACK came alone: nothing to carry it
    server.settimeout(10)
    assert tcp_info(server, DATA_SEGS_IN) == 0
    server.sendall(b"220 banner\r\n")
    assert client.recv(100) == b"220 banner\r\n"
    client.sendall(b"QUIT\r\n")
    client.shutdown(socket.SHUT_WR)
    assert server.recv(100) == b"QUIT\r\n"
    assert server.recv(100) == b""
    server.sendall(b"221 bye\r\n")
    server.close()
    assert client.recv(100) == b"221 bye\r\n"
    client.close()
    assert fwd.stop() == 0


def test_deferred_handshake_ack_and_quick_acks_switch_the_socket_mode():
    """TCP_QUICKACK reads 0 with an ``early`` dial's options (the ACK is deferred), 1 with a
    plain one's, and 1 again after quick_acks (before any connect: once connected the mode
    depends on what the handshake did)."""
    for early in (False, True):
        with socket.socket() as sock:
            for level, option, value in sockets.DIAL_OPTIONS[False, early]:
                sock.setsockopt(level, option, value)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == (not early)
            sockets.quick_acks(sock)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1


def test_client_reset_before_the_dial_is_a_failed_connection_and_nothing_is_dialled(tool):
    """The early read finds the client reset: no dial for it, counted as opened and failed;
    the next client is served."""
    target = socket.create_server(("127.0.0.1", 0))
    target.settimeout(10)
    port = free_port()
    fwd = tool("tcpfwd", "--stats-interval", "1", f"127.0.0.1:{port}",
               f"127.0.0.1:{target.getsockname()[1]}")
    fwd.wait_for_log("forwarding")
    with stopped(fwd.pid):
        gone = connect("127.0.0.1", port)
        gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        gone.close()  # RST into the accept queue
    fwd.wait_for_log(r"stats: 0 active, 1 opened, 1 closed \(1 by error")
    with connect("127.0.0.1", port) as client:
        client.sendall(b"next")
        with target.accept()[0] as server:  # the first connection to reach the destination
            assert server.recv(100) == b"next"
    target.close()
    assert fwd.stop() == 0
