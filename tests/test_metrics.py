"""metrics() snapshots: each service runs in this process on 127.0.0.1 port 0 under gevent,
real traffic goes through it, and the snapshot is asserted exactly. The stats lines are
checked as pure renderings of hand-made snapshots."""

from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Callable, Iterator

import gevent
import gevent.server
import gevent.socket
import pytest

from portfwd.kcptcp.client import TunnelClient
from portfwd.kcptcp.config import ClientConfig, ServerConfig
from portfwd.kcptcp.metrics import (
    ConversationMetrics,
    TunnelClientMetrics,
    TunnelServerMetrics,
    render_client_totals,
    render_server_totals,
    render_stats,
)
from portfwd.kcptcp.server import TunnelServer
from portfwd.runtime.addr import Resolved
from portfwd.runtime.metrics import ErrorCounts, errno_name, flatten
from portfwd.runtime.sockets import ListenOptions, bind_socket
from portfwd.tcpfwd.config import TcpConfig
from portfwd.tcpfwd.forwarder import TcpForwarder
from portfwd.tcpfwd.metrics import TcpMetrics
from portfwd.tunnel.session import TunnelConfig
from portfwd.tunnel.stream import ConversationConfig
from portfwd.udpfwd.config import UdpConfig
from portfwd.udpfwd.forwarder import UdpForwarder
from portfwd.udpfwd.metrics import UdpMetrics, render_status

LOOPBACK = "127.0.0.1"
PSK = bytes(range(32))


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the hub run until ``condition()`` holds (the services count when they are done)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        gevent.sleep(0.005)


def loopback(port: int) -> Resolved:
    return Resolved(socket.AF_INET, (LOOPBACK, port))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@pytest.fixture
def echo() -> Iterator[int]:
    """A gevent TCP echo server (until EOF, then half-close); yields its port."""

    def handle(sock: gevent.socket.socket, _peer: tuple) -> None:
        while data := sock.recv(65536):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    server = gevent.server.StreamServer((LOOPBACK, 0), handle)
    server.start()
    yield server.server_port
    server.stop()


def exchange(port: int, payload: bytes, close: bool = True,
             sock: gevent.socket.socket | None = None) -> gevent.socket.socket:
    """Send ``payload`` and read as many bytes back; with ``close`` half-close and read EOF."""
    sock = sock or gevent.socket.create_connection((LOOPBACK, port), timeout=10)
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        data = sock.recv(65536)
        assert data, "EOF before the echo came back"
        received += data
    assert received == payload
    if close:
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""
        sock.close()
    return sock


# --- runtime.metrics ------------------------------------------------------------------------

def test_errno_name():
    assert errno_name(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) == "ECONNREFUSED"
    assert errno_name(OSError(errno.EMFILE, "too many")) == "EMFILE"
    assert errno_name(TimeoutError("timed out")) == "ETIMEDOUT"  # no errno from settimeout
    assert errno_name(OSError("odd")) == "EUNKNOWN"


def test_error_counts_snapshot_is_sorted_and_frozen():
    counts = ErrorCounts()
    for code in (errno.ETIMEDOUT, errno.ECONNREFUSED, errno.ETIMEDOUT):
        counts.add(OSError(code, "x"))
    snapshot = counts.snapshot()
    assert list(snapshot.items()) == [("ECONNREFUSED", 1), ("ETIMEDOUT", 2)]
    with pytest.raises(TypeError):
        snapshot["EMFILE"] = 1  # type: ignore[index]
    counts.add(OSError(errno.EMFILE, "x"))
    assert "EMFILE" not in snapshot  # a copy, not a view


def test_flatten_joins_nested_names():
    m = TcpMetrics(accepted=2, connections_opened=1, connections_active=0, connections_closed=1,
                   connections_reset=0, bytes_up=10, bytes_down=20,
                   dial_failures={"ECONNREFUSED": 1}, no_destination=0, accept_errors={})
    flat = flatten(m)
    assert flat["bytes_down"] == 20 and flat["dial_failures.ECONNREFUSED"] == 1
    assert "accept_errors" not in flat


# --- tcpfwd ---------------------------------------------------------------------------------

def start_tcpfwd(dest_port: int, listener: socket.socket | None = None) -> TcpForwarder:
    listener = listener or bind_socket(loopback(0), socket.SOCK_STREAM, ListenOptions())
    config = TcpConfig(listen=loopback(listener.getsockname()[1]), dest=loopback(dest_port))
    forwarder = TcpForwarder(config, listener)
    forwarder.start()
    return forwarder


def tcp_metrics(**changes: object) -> TcpMetrics:
    base = dict(accepted=0, connections_opened=0, connections_active=0, connections_closed=0,
                connections_reset=0, bytes_up=0, bytes_down=0, dial_failures={},
                no_destination=0, accept_errors={})
    return TcpMetrics(**{**base, **changes})


def test_tcpfwd_counts_connections_and_bytes(echo):
    fwd = start_tcpfwd(echo)
    port = fwd.accept_loop.address[1]
    try:
        assert fwd.metrics() == tcp_metrics()
        for size in (1000, 2000, 300_000):  # the last one goes through splice when available
            exchange(port, bytes(size))
        wait_until(lambda: fwd.metrics().connections_closed == 3)
        assert fwd.metrics() == tcp_metrics(accepted=3, connections_opened=3,
                                            connections_closed=3, bytes_up=303_000,
                                            bytes_down=303_000)
    finally:
        fwd.stop(1)


def test_tcpfwd_snapshot_includes_live_relays(echo):
    fwd = start_tcpfwd(echo)
    port = fwd.accept_loop.address[1]
    try:
        sock = exchange(port, b"x" * 500, close=False)
        assert fwd.metrics() == tcp_metrics(accepted=1, connections_opened=1,
                                            connections_active=1, bytes_up=500, bytes_down=500)
        exchange(port, b"y" * 250, sock=sock)
        wait_until(lambda: fwd.metrics().connections_active == 0)
        assert fwd.metrics() == tcp_metrics(accepted=1, connections_opened=1,
                                            connections_closed=1, bytes_up=750, bytes_down=750)
    finally:
        fwd.stop(1)


def test_tcpfwd_counts_dial_failures_by_errno():
    fwd = start_tcpfwd(closed_port())
    try:
        for _ in range(2):
            sock = gevent.socket.create_connection(fwd.accept_loop.address, timeout=10)
            assert sock.recv(1) == b""  # closed at once: the destination refused
            sock.close()
        wait_until(lambda: sum(fwd.metrics().dial_failures.values()) == 2)
        assert fwd.metrics() == tcp_metrics(accepted=2, dial_failures={"ECONNREFUSED": 2})
    finally:
        fwd.stop(1)


class AbortingListener(socket.socket):
    """A listener whose first accept() fails as if the connection died in the backlog."""

    failed = False

    def _accept(self) -> tuple[int, tuple]:  # the call under accept() that AcceptLoop makes
        if not self.failed:
            self.failed = True
            raise ConnectionAbortedError(errno.ECONNABORTED, "Software caused connection abort")
        return super()._accept()


def test_tcpfwd_counts_accept_errors(echo):
    listener = AbortingListener(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    fwd = start_tcpfwd(echo, listener)
    try:
        exchange(fwd.accept_loop.address[1], b"ping")
        wait_until(lambda: fwd.metrics().connections_closed == 1)
        assert fwd.metrics() == tcp_metrics(accepted=1, connections_opened=1,
                                            connections_closed=1, bytes_up=4, bytes_down=4,
                                            accept_errors={"ECONNABORTED": 1})
    finally:
        fwd.stop(1)


def test_tcpfwd_stop_counts_cut_connections(echo):
    fwd = start_tcpfwd(echo)
    sock = exchange(fwd.accept_loop.address[1], b"held open", close=False)
    fwd.stop(0.05)  # drain period over at once: the relay is cut with RST
    m = fwd.metrics()
    assert (m.connections_closed, m.connections_reset, m.connections_active) == (1, 1, 0)
    sock.close()


# --- udpfwd ---------------------------------------------------------------------------------

@pytest.fixture
def udp_echo() -> Iterator[int]:
    sock = gevent.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))

    def serve() -> None:
        while True:
            data, addr = sock.recvfrom(65536)
            sock.sendto(data, addr)

    server = gevent.spawn(serve)
    yield sock.getsockname()[1]
    server.kill()
    sock.close()


def start_udpfwd(dest_port: int, stats_interval: float = 0) -> UdpForwarder:
    listener = bind_socket(loopback(0), socket.SOCK_DGRAM, ListenOptions())
    fwd = UdpForwarder(UdpConfig(listen=loopback(listener.getsockname()[1]),
                                 dest=loopback(dest_port), stats_interval=stats_interval,
                                 gso=False), listener)
    fwd.start()
    return fwd


def udp_roundtrips(fwd: UdpForwarder, sizes: list[int]) -> None:
    client = gevent.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(10)
    try:
        for size in sizes:  # one at a time: the echo is not lost to a full queue
            client.sendto(b"d" * size, fwd.address)
            assert client.recvfrom(65536)[0] == b"d" * size
    finally:
        client.close()


def test_udpfwd_counts_datagrams(udp_echo):
    fwd = start_udpfwd(udp_echo)
    try:
        udp_roundtrips(fwd, [100, 200, 0, 1500])
        assert fwd.metrics() == UdpMetrics(
            sessions=1, opened=1, expired=0, evicted=0, datagrams_up=4, bytes_up=1800,
            datagrams_down=4, bytes_down=1800, dropped_up=0, dropped_down=0, upstream_errors=0,
            gso_sends=0)
        udp_roundtrips(fwd, [10])  # a second client port: a second session
        assert (fwd.metrics().sessions, fwd.metrics().opened, fwd.metrics().bytes_up) == (
            2, 2, 1810)
    finally:
        fwd.stop(1)


def test_udpfwd_status_line_is_rendered_from_the_snapshot_and_idle_stays_quiet(udp_echo, caplog):
    caplog.set_level(logging.INFO, logger="portfwd.udpfwd.forwarder")
    fwd = start_udpfwd(udp_echo, stats_interval=0.05)

    def status_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("status:")]

    try:
        udp_roundtrips(fwd, [64, 64])
        wait_until(lambda: bool(status_lines()))
        gevent.sleep(0.1)  # a line for anything still in flight at the first one
        lines = status_lines()
        assert lines[-1] == render_status(fwd.metrics())
        gevent.sleep(0.3)  # six intervals with nothing moving
        assert status_lines() == lines
    finally:
        fwd.stop(1)
    assert status_lines()[-1] == render_status(fwd.metrics())  # stop() always writes one


def test_render_status():
    m = UdpMetrics(sessions=0, opened=2000, expired=2000, evicted=0, datagrams_up=2000,
                   bytes_up=64000, datagrams_down=1990, bytes_down=63680, dropped_up=1,
                   dropped_down=2, upstream_errors=3, gso_sends=4, kernel_drops=5)
    assert render_status(m) == (
        "status: 0 sessions (2000 opened, 2000 expired, 0 evicted); up 2000 datagrams "
        "64000 bytes; down 1990 datagrams 63680 bytes; dropped 1 up 2 down; "
        "3 upstream errors; 4 GSO sends; 5 kernel drops")


# --- kcptcp ---------------------------------------------------------------------------------

def start_tunnel(target_port: int, tunnel: TunnelConfig) -> tuple[TunnelClient, TunnelServer]:
    config = ConversationConfig(tunnel=tunnel)
    udp = bind_socket(loopback(0), socket.SOCK_DGRAM, ListenOptions())
    server = TunnelServer(ServerConfig(listen=loopback(udp.getsockname()[1]),
                                       target=loopback(target_port), conversation=config,
                                       stats_interval=0), udp)
    server.start()
    listener = bind_socket(loopback(0), socket.SOCK_STREAM, ListenOptions())
    client = TunnelClient(ClientConfig(listen=loopback(listener.getsockname()[1]),
                                       remote=loopback(udp.getsockname()[1]), conversation=config,
                                       udp_buffer=1 << 20, stats_interval=0), listener)
    client.start()
    return client, server


def test_tunnel_counts_conversations_and_bytes(echo):
    client, server = start_tunnel(echo, TunnelConfig(psk=PSK))
    port = client.accept_loop.address[1]
    try:
        sock = exchange(port, b"k" * 5000, close=False)
        c, s = client.metrics(), server.metrics()
        assert (c.conversations, c.finished, c.accepted, dict(c.accept_errors)) == (1, 0, 1, {})
        assert (s.conversations, s.finished, s.handshakes, s.rejected_auth) == (1, 0, 1, 0)
        (cc,), (sc,) = c.per_conversation, s.per_conversation
        assert cc.conv == sc.conv
        assert (cc.up, cc.down, sc.up, sc.down) == (5000, 5000, 5000, 5000)
        assert (cc.epoch, cc.dropped_auth, cc.dropped_replay, cc.rekeys_started) == (0, 0, 0, 0)
        assert cc.dgrams_out >= sc.dgrams_in > 0 and sc.dgrams_out >= cc.dgrams_in > 0  # acks fly
        lines = render_stats(c, render_client_totals)
        assert lines[0].startswith(f"stats conv={cc.conv}: up=5000 down=5000 ")
        assert lines[1] == "stats total conversations=1 finished=0"
        assert render_stats(s, render_server_totals)[1].startswith(
            "stats total conversations=1 finished=0 handshakes=1 ")
        exchange(port, b"", sock=sock)
        wait_until(lambda: client.metrics().finished == 1 and server.metrics().finished == 1)
        c, s = client.metrics(), server.metrics()
        assert (c.conversations, c.per_conversation, s.conversations, s.per_conversation) == (
            0, (), 0, ())
        assert dict(s.dial_failures) == {} and s.dropped_unknown == 0
    finally:
        client.stop(1)
        server.stop(1)


def test_tunnel_server_counts_dial_failures():
    client, server = start_tunnel(closed_port(), TunnelConfig(psk=PSK))
    try:
        sock = gevent.socket.create_connection(client.accept_loop.address, timeout=10)
        assert sock.recv(1) == b""  # the server could not reach the target: closed
        sock.close()
        wait_until(lambda: server.metrics().finished == 1)
        assert dict(server.metrics().dial_failures) == {"ECONNREFUSED": 1}
    finally:
        client.stop(1)
        server.stop(1)


def test_tunnel_counts_rekeys_and_epoch_switches(echo):
    client, server = start_tunnel(echo, TunnelConfig(psk=PSK, rekey_seq_threshold=40))
    try:
        sock = exchange(client.accept_loop.address[1], bytes(200_000), close=False)
        (cc,), (sc,) = client.metrics().per_conversation, server.metrics().per_conversation
        assert cc.rekeys_started + sc.rekeys_started >= 1
        assert cc.epoch >= 1 and sc.epoch >= 1
        assert (cc.epoch_switches, sc.epoch_switches) == (cc.epoch, sc.epoch)
        assert cc.peer_address_changes == sc.peer_address_changes == 0
        exchange(0, b"", sock=sock)
    finally:
        client.stop(1)
        server.stop(1)


def conversation(conv: int = 7) -> ConversationMetrics:
    return ConversationMetrics(
        conv=conv, up=5000, down=4000, srtt=12, rto=200, inflight=3, queued=1, peer_wnd=1024,
        rcv_queue=0, retrans=2, fast_retrans=1, epoch=1, dgrams_out=40, dgrams_in=38,
        dropped_auth=0, dropped_replay=1, age=12.6, rekeys_started=1, epoch_switches=1,
        peer_address_changes=0)


def test_render_client_stats():
    m = TunnelClientMetrics(conversations=2, finished=5, accepted=7, accept_errors={},
                            udp_open_failures={}, per_conversation=(conversation(7),
                                                                    conversation(9)))
    conv_line = ("up=5000 down=4000 srtt=12ms rto=200ms inflight=3 queued=1 peer_wnd=1024 "
                 "rcv_queue=0 retrans=2 fast_retrans=1 epoch=1 dgrams_out=40 dgrams_in=38 "
                 "dropped_auth=0 dropped_replay=1 age=13s")
    assert render_stats(m, render_client_totals) == [
        f"stats conv=7: {conv_line}", f"stats conv=9: {conv_line}",
        "stats total conversations=2 finished=5"]


def test_render_server_totals():
    m = TunnelServerMetrics(
        conversations=1, finished=2, handshakes=3, rejected_auth=4, rejected_replay=5,
        rejected_stale=6, rejected_rate=7, rejected_before_start=0, rejected_load=0,
        cookies_sent=0, cookie_hellos=0, restarted=0, dropped_unknown=8, dropped_malformed=9,
        refused_pending=10, refused_full=11, evicted=12, send_errors=13, dial_failures={},
        per_conversation=(), kernel_drops=14)
    assert render_stats(m, render_server_totals) == [
        "stats total conversations=1 finished=2 handshakes=3 rejected_auth=4 "
        "rejected_replay=5 rejected_stale=6 rejected_rate=7 dropped_unknown=8 "
        "refused_pending=10 refused_full=11 evicted=12 kernel_drops=14 unknown_sent=0"]
