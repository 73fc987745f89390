"""tcpfwd's traffic policy end to end (the real process on loopback): --allow/--deny before any
dial, --max-conns, --idle-timeout, --half-close-timeout, several destinations with failover
and round robin."""

from __future__ import annotations

import select
import socket
import time

import pytest
from conftest import EchoServer, connect, free_port, needs_ipv6
from proxy_peers import (
    connect_from,
    half_close_ends,
    half_closing_target,
    idle_and_busy,
    roundtrip,
)


def start_tcpfwd(tool, *args: str):
    process = tool("tcpfwd", *args)
    process.wait_for_log(r"forwarding ")
    return process


def closed_at_once(sock: socket.socket) -> bool:
    """True when the forwarder closed the connection without relaying (EOF or reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# --- allow / deny ------------------------------------------------------------------------------

def test_denied_client_never_reaches_the_target(tool):
    echo = EchoServer()
    port = free_port()
    fwd = start_tcpfwd(tool, "--allow", "127.0.0.0/8", "--deny", "127.0.0.2/32",
                       f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}")
    with connect("127.0.0.1", port) as sock:  # the listener is up (allowed: relayed)
        assert roundtrip(sock) == b"ping"
    before = echo.accepted
    for _ in range(5):
        with connect_from("127.0.0.2", port) as sock:
            assert closed_at_once(sock)
    fwd.wait_for_log(r"connection from 127.0.0.2:\d+ denied by --allow/--deny")
    with connect_from("127.0.0.3", port) as sock:  # allowed, not denied
        assert roundtrip(sock) == b"ping"
    assert echo.accepted == before + 1  # the denied five never reached it
    # one line per 10 s, however many were denied
    assert fwd.log().count("denied by --allow/--deny") == 1
    echo.close()


@needs_ipv6
def test_v4_clients_of_a_dual_stack_listener_match_ipv4_rules(tool):
    echo = EchoServer()
    port = free_port(socket.AF_INET6)
    start_tcpfwd(tool, "--deny", "127.0.0.2", f"[::]:{port}", f"127.0.0.1:{echo.port}")
    connect("::1", port).close()
    with connect_from("127.0.0.2", port) as sock:  # arrives as ::ffff:127.0.0.2
        assert closed_at_once(sock)
    with connect_from("::1", port, host="::1") as sock:
        assert roundtrip(sock) == b"ping"
    echo.close()


def test_bad_cidr_is_a_usage_error(tool):
    process = tool("tcpfwd", "--allow", "10.0.0.1/8", "127.0.0.1:1", "127.0.0.1:2")
    assert process.proc.wait(20) == 2
    assert process.log().strip().startswith("tcpfwd: error: --allow: bad CIDR '10.0.0.1/8'")


# --- max-conns -------------------------------------------------------------------------------

def test_max_conns_10_of_50_holds_10_and_refuses_40(tool):
    echo = EchoServer()
    port = free_port()
    fwd = start_tcpfwd(tool, "--max-conns", "10", f"127.0.0.1:{port}",
                       f"127.0.0.1:{echo.port}")
    connect("127.0.0.1", port).close()
    time.sleep(0.2)  # that probe's relay is over
    held = [connect("127.0.0.1", port) for _ in range(10)]
    for sock in held:
        assert roundtrip(sock) == b"ping"
    extra = [connect("127.0.0.1", port) for _ in range(40)]
    refused = 0
    deadline = time.monotonic() + 20
    pending = list(extra)
    while pending and time.monotonic() < deadline:
        readable, _, _ = select.select(pending, [], [], 1.0)
        for sock in readable:
            assert closed_at_once(sock)
            refused += 1
            pending.remove(sock)
    assert refused == 40
    for sock in held:  # the ten are untouched
        assert roundtrip(sock, b"still here") == b"still here"
    assert fwd.log().count("--max-conns 10 reached") == 1  # rate-limited: one line
    for sock in held + extra:
        sock.close()
    # below the limit again: served
    deadline = time.monotonic() + 10
    while True:
        with connect("127.0.0.1", port) as sock:
            try:
                if roundtrip(sock) == b"ping":
                    break
            except ConnectionResetError:  # the closes of the fifty are still being seen
                pass
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert fwd.stop() == 0
    echo.close()


# --- timeouts --------------------------------------------------------------------------------

def test_idle_relay_closes_at_its_timeout_and_a_busy_one_does_not(tool):
    echo = EchoServer()
    port = free_port()
    fwd = start_tcpfwd(tool, "--log-level", "debug", "--idle-timeout", "2", f"127.0.0.1:{port}",
                       f"127.0.0.1:{echo.port}")
    idle, busy = idle_and_busy(port, 3.5, fwd.log)  # busy: never idle for 2 s
    fwd.wait_for_log(r"conn \d+ closed: 4 bytes up, 4 down, [\d.]+ s \(idle timeout\)")
    idle.close()
    busy.close()
    echo.close()


def test_half_close_timeout_ends_a_relay_whose_other_side_never_closes(tool):
    with half_closing_target() as target_port:
        port = free_port()
        fwd = start_tcpfwd(tool, "--log-level", "debug", "--half-close-timeout", "1",
                           f"127.0.0.1:{port}", f"127.0.0.1:{target_port}")
        half_close_ends(port)
        fwd.wait_for_log(r"\(half-close timeout\)")


# --- several destinations --------------------------------------------------------------------

def test_first_skips_a_dead_destination(tool):
    live = EchoServer()
    dead = free_port()
    port = free_port()
    fwd = start_tcpfwd(tool, f"127.0.0.1:{port}", f"127.0.0.1:{dead}", f"127.0.0.1:{live.port}")
    for _ in range(10):
        with connect("127.0.0.1", port) as sock:
            assert roundtrip(sock) == b"ping"
    assert live.accepted == 10
    assert f"destination 127.0.0.1:{dead} down for 10 s" in fwd.log()
    live.close()


def test_roundrobin_lands_on_the_live_one_then_uses_the_returned_one_again(tool):
    live = EchoServer()
    dead_port = free_port()
    port = free_port()
    fwd = start_tcpfwd(tool, "--balance", "roundrobin", "--fail-timeout", "1",
                       f"127.0.0.1:{port}", f"127.0.0.1:{dead_port}", f"127.0.0.1:{live.port}")
    for _ in range(10):
        with connect("127.0.0.1", port) as sock:
            assert roundtrip(sock) == b"ping"
    assert live.accepted == 10  # every connection landed on the live one
    revived = EchoServer(port=dead_port)
    time.sleep(1.2)  # past --fail-timeout: the returned one is tried again
    for _ in range(10):
        with connect("127.0.0.1", port) as sock:
            assert roundtrip(sock) == b"ping"
    assert revived.accepted == 5 and live.accepted == 15, fwd.log()
    revived.close()
    live.close()


def test_name_destination_and_several_given_in_order(tool):
    echo = EchoServer()
    port = free_port()
    start_tcpfwd(tool, f"127.0.0.1:{port}", f"localhost:{echo.port}")
    with connect("127.0.0.1", port) as sock:
        assert roundtrip(sock) == b"ping"
    echo.close()


@pytest.mark.parametrize("args, message", [
    (["--balance", "random"], "--balance expects one of first, roundrobin, got 'random'"),
    (["--proxy-protocol", "v3"], "--proxy-protocol expects one of v1, v2, got 'v3'"),
    (["--proxy-from", "127.0.0.1"], "--proxy-from needs --accept-proxy"),
    (["--max-conns", "-1"], "--max-conns must be 0-1048576, got -1"),
    (["--idle-timeout", "x"], "--idle-timeout expects a whole number, got 'x'"),
    (["-b"], "-b takes one destination"),
])
def test_bad_policy_options(tool, args, message):
    process = tool("tcpfwd", *args, "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    assert process.proc.wait(20) == 2
    assert process.log().strip() == f"tcpfwd: error: {message}"
