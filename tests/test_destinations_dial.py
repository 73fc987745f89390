"""The gevent side of destinations and admission, in this process on loopback: Happy Eyeballs
(runtime.upstream.dial_any), background re-resolution that keeps the last good answer
(Upstreams), and the policy counters in tcpfwd's metrics() snapshot."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import gevent
import gevent.server
import gevent.socket
import pytest
from conftest import needs_ipv6

from portfwd.policy.cidr import AccessList
from portfwd.runtime.addr import HostPort, Resolved
from portfwd.runtime.admission import Admission
from portfwd.runtime.sockets import ListenOptions, bind_socket
from portfwd.runtime.upstream import Balancing, Destination, Upstreams, dial_any
from portfwd.tcpfwd.config import RelayLimits, TcpConfig
from portfwd.tcpfwd.forwarder import TcpForwarder

V4, V6 = socket.AF_INET, socket.AF_INET6


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        gevent.sleep(0.005)


@pytest.fixture
def echo() -> Iterator[int]:
    def handle(sock: gevent.socket.socket, _peer: tuple) -> None:
        while data := sock.recv(65536):
            sock.sendall(data)

    server = gevent.server.StreamServer(("127.0.0.1", 0), handle)
    server.start()
    yield server.server_port
    server.stop()


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A [::1] port where connects hang: its accept queue (backlog 0) is full, so the kernel
    drops further SYNs."""
    listener = socket.socket(V6)
    listener.bind(("::1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname()[:2])
    yield listener.getsockname()[1]
    filler.close()
    listener.close()


def closed_port(family: int = V4) -> int:
    with socket.socket(family) as s:
        s.bind(("::1" if family == V6 else "127.0.0.1", 0))
        return s.getsockname()[1]


@needs_ipv6
def test_happy_eyeballs_falls_back_to_ipv4_after_250_ms(echo, black_hole):
    addresses = [Resolved(V4, ("127.0.0.1", echo)), Resolved(V6, ("::1", black_hole, 0, 0))]
    started = time.monotonic()
    sock, winner = dial_any(addresses, timeout=10)
    elapsed = time.monotonic() - started
    sock.close()
    assert winner.family == V4
    assert elapsed >= 0.25  # IPv6 went first; IPv4 only after the attempt delay


@needs_ipv6
def test_happy_eyeballs_a_refused_ipv6_attempt_falls_back(echo):
    addresses = [Resolved(V6, ("::1", closed_port(V6), 0, 0)), Resolved(V4, ("127.0.0.1", echo))]
    sock, winner = dial_any(addresses, timeout=10)
    sock.close()
    assert winner.family == V4  # (the timing itself is Attempts', tested on a virtual clock)


@needs_ipv6
def test_happy_eyeballs_all_fail_raises_the_last_error():
    addresses = [Resolved(V6, ("::1", closed_port(V6), 0, 0)),
                 Resolved(V4, ("127.0.0.1", closed_port()))]
    with pytest.raises(ConnectionRefusedError):
        dial_any(addresses, timeout=10)


def test_failed_re_resolution_keeps_the_last_good_answer(echo):
    name = Destination(HostPort("no-such-host.invalid", echo), (Resolved(V4, ("127.0.0.1", echo)),))
    upstreams = Upstreams([name], Balancing(), connect_timeout=5)
    cache = upstreams.caches[0]
    assert cache is not None
    cache.expires = 0.0  # its lifetime is over: the next dial starts a lookup in the background
    sock, dest = upstreams.dial()  # not delayed by the lookup
    sock.close()
    assert cache.resolving
    wait_until(lambda: not cache.resolving)
    assert upstreams.lookups_failed == 1 and cache.addresses == name.addresses
    sock, _ = upstreams.dial()
    sock.close()


def test_re_resolution_picks_up_the_new_answer(echo):
    stale = Destination(HostPort("localhost", echo), (Resolved(V4, ("127.0.0.9", echo)),))
    upstreams = Upstreams([stale], Balancing(), connect_timeout=5)
    cache = upstreams.caches[0]
    cache.expires = 0.0
    with pytest.raises(OSError):
        upstreams.dial()  # 127.0.0.9 refuses; the lookup runs meanwhile
    wait_until(lambda: not cache.resolving)
    assert Resolved(V4, ("127.0.0.1", echo)) in cache.addresses
    sock, dest = upstreams.dial()
    sock.close()


def start_forwarder(dest_port: int, **changes) -> TcpForwarder:
    listener = bind_socket(Resolved(V4, ("127.0.0.1", 0)), socket.SOCK_STREAM, ListenOptions())
    config = TcpConfig(listen=Resolved(V4, ("127.0.0.1", listener.getsockname()[1])),
                       dest=Resolved(V4, ("127.0.0.1", dest_port)), **changes)
    forwarder = TcpForwarder(config, listener)
    forwarder.start()
    return forwarder


def test_metrics_count_denials_limits_and_idle_timeouts(echo):
    fwd = start_forwarder(echo, admission=Admission(access=AccessList.of(deny=["127.0.0.2"]),
                                                    max_conns=1),
                          relay=RelayLimits(idle_timeout=1, half_close_timeout=0))
    address = fwd.accept_loop.address
    try:
        denied = gevent.socket.socket()
        denied.bind(("127.0.0.2", 0))
        denied.connect(address)
        assert denied.recv(1) == b""
        held = gevent.socket.create_connection(address, timeout=10)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        refused = gevent.socket.create_connection(address, timeout=10)
        assert refused.recv(1) == b""
        held.settimeout(10)
        assert held.recv(1) == b""  # the idle timeout
        wait_until(lambda: fwd.metrics().connections_closed == 1)
        m = fwd.metrics()
        assert (m.accepted, m.denied, m.over_limit, m.idle_timeouts, m.connections_opened) == \
            (3, 1, 1, 1, 1)
        for sock in (denied, held, refused):
            sock.close()
    finally:
        fwd.stop(1)


def test_tunnel_metrics_count_client_and_server_refusals(echo):
    from portfwd.kcptcp.client import TunnelClient
    from portfwd.kcptcp.config import ClientConfig, ServerConfig
    from portfwd.kcptcp.server import TunnelServer

    loopback = lambda port: Resolved(V4, ("127.0.0.1", port))  # noqa: E731
    udp = bind_socket(loopback(0), socket.SOCK_DGRAM, ListenOptions())
    server = TunnelServer(ServerConfig(listen=loopback(udp.getsockname()[1]),
                                       target=loopback(echo), stats_interval=0,
                                       access=AccessList.of(deny=["127.0.0.3"])), udp)
    server.start()
    listener = bind_socket(loopback(0), socket.SOCK_STREAM, ListenOptions())
    client = TunnelClient(ClientConfig(listen=loopback(listener.getsockname()[1]),
                                       remote=loopback(udp.getsockname()[1]), stats_interval=0,
                                       admission=Admission(
                                           access=AccessList.of(deny=["127.0.0.2"]))), listener)
    client.start()
    try:
        refused = gevent.socket.socket()
        refused.bind(("127.0.0.2", 0))
        refused.connect(client.accept_loop.address)
        assert refused.recv(1) == b""
        refused.close()
        ok = gevent.socket.create_connection(client.accept_loop.address, timeout=10)
        ok.sendall(b"x")
        assert ok.recv(1) == b"x"
        ok.close()
        assert (client.metrics().denied, server.metrics().denied) == (1, 0)
        # a HELLO from a denied UDP source: dropped unread, counted
        hello_from_denied = gevent.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        hello_from_denied.bind(("127.0.0.3", 0))
        hello_from_denied.sendto(bytes([1]) + bytes(127), udp.getsockname())
        wait_until(lambda: server.metrics().denied == 1)
        assert server.metrics().rejected_auth == 0  # never looked at
        hello_from_denied.close()
    finally:
        client.stop(1)
        server.stop(1)
