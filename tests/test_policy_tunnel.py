"""Traffic policy through the tunnel, the real processes on loopback: the client's address
carried inside the authenticated tunnel to kcptcp-server --proxy-protocol (nginx shows it),
kcptcp-client --accept-proxy behind HAProxy, --allow/--deny, --max-conns, --idle-timeout and
--half-close-timeout on kcptcp-client, --allow/--deny and --max-conns on kcptcp-server."""

from __future__ import annotations

import re
import socket
import time

import pytest
from conftest import EchoServer, connect, free_port
from proxy_peers import (
    connect_from,
    half_close_ends,
    half_closing_target,
    haproxy,
    http_get,
    idle_and_busy,
    needs_haproxy,
    needs_nginx,
    nginx,
    roundtrip,
    wait_for,
)

PSK = "0123456789abcdef" * 4


def start_tunnel(tool, target_port: int, server_extra: tuple = (), client_extra: tuple = ()):
    udp = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = free_port()
    server = tool("kcptcp-server", "-K", PSK, *server_extra, f"127.0.0.1:{udp}",
                  f"127.0.0.1:{target_port}")
    client = tool("kcptcp-client", "-K", PSK, *client_extra, f"127.0.0.1:{tcp}",
                  f"127.0.0.1:{udp}")
    server.wait_for_log("tunnelling")
    client.wait_for_log("tunnelling")
    return tcp, server, client


@needs_nginx
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nginx_behind_the_tunnel_sees_the_client_address(tool, tmp_path, version):
    with nginx(str(tmp_path)) as web:
        port, server, client = start_tunnel(tool, web.port,
                                            server_extra=("--proxy-protocol", version))
        response, client_port = http_get(port, source="127.0.0.2")
        assert response.startswith(b"HTTP/1.1 200"), (server.log(), web.error_log())
        seen = wait_for(web.seen)
        assert ("127.0.0.2", str(client_port), "127.0.0.1") in seen, (seen, web.error_log())


@needs_nginx
@needs_haproxy
def test_haproxy_then_tunnel_then_nginx_keeps_the_client(tool, tmp_path):
    with nginx(str(tmp_path)) as web:
        port, server, client = start_tunnel(
            tool, web.port, server_extra=("--proxy-protocol", "v2"),
            client_extra=("--accept-proxy", "--proxy-from", "127.0.0.1"))
        with haproxy(str(tmp_path), f"127.0.0.1:{port}", "send-proxy-v2") as front:
            response, client_port = http_get(front.port, source="127.0.0.3")
        assert response.startswith(b"HTTP/1.1 200"), client.log()
        seen = wait_for(web.seen)
        assert ("127.0.0.3", str(client_port), "127.0.0.1") in seen, (seen, client.log())


def test_client_deny_and_max_conns(tool):
    echo = EchoServer()
    port, server, client = start_tunnel(
        tool, echo.port, client_extra=("--deny", "127.0.0.2", "--max-conns", "2"))
    with connect_from("127.0.0.2", port) as sock:
        assert sock.recv(1) == b""
    client.wait_for_log(r"connection from 127.0.0.2:\d+ denied by --allow/--deny")
    assert echo.accepted == 0
    held = [connect("127.0.0.1", port) for _ in range(2)]
    for sock in held:
        assert roundtrip(sock) == b"ping"
    extra = [connect("127.0.0.1", port) for _ in range(3)]
    for sock in extra:
        sock.settimeout(10)
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
    client.wait_for_log(r"--max-conns 2 reached")
    assert echo.accepted == 2
    for sock in held + extra:
        sock.close()
    echo.close()


def test_server_denies_the_udp_source_before_any_handshake_work(tool):
    echo = EchoServer()
    port, server, client = start_tunnel(tool, echo.port, server_extra=("--deny", "127.0.0.0/8"))
    with connect("127.0.0.1", port) as sock:
        sock.settimeout(1)
        sock.sendall(b"never arrives")
        server.wait_for_log(r"HELLO from 127.0.0.1:\d+ dropped: denied by --allow/--deny")
        time.sleep(0.5)
    assert echo.accepted == 0
    assert not re.search(r"conv=\d+ open", server.log())
    echo.close()


def test_server_max_conns_refuses_beyond_it_and_the_client_resets_at_once(tool):
    """--max-conns 2 on the server, three connections: the third's HELLO gets a REFUSE and its
    client resets the TCP connection (a handshake timeout, 10 s later, would end it with a
    FIN instead: the RST shows it was the REFUSE); the two held ones go on."""
    echo = EchoServer()
    port, server, client = start_tunnel(tool, echo.port, server_extra=("--max-conns", "2"))
    held = [connect("127.0.0.1", port) for _ in range(2)]
    for sock in held:
        assert roundtrip(sock) == b"ping"
    with pytest.raises((ConnectionResetError, BrokenPipeError)):  # RST: even connect() may see it
        with connect("127.0.0.1", port) as extra:
            extra.settimeout(20)
            extra.sendall(b"never arrives")
            extra.recv(1)
    server.wait_for_log(r"--max-conns 2 reached: HELLO from 127.0.0.1:\d+ refused")
    client.wait_for_log(r"conv=\d+ closed \(server full: at its --max-conns\)")
    client.wait_for_log(r"server at --max-conns: 127\.0\.0\.1:\d+ refused a new conversation")
    for sock in held:
        assert roundtrip(sock, b"still") == b"still"
        sock.close()
    assert echo.accepted == 2
    echo.close()


def on_side(side: str, *flags: str) -> dict:
    """start_tunnel's keyword for ``flags`` on the client's or the server's end."""
    return {f"{side}_extra": flags}


@pytest.mark.parametrize("side", ["client", "server"])
def test_idle_timeout_closes_both_sides_and_spares_a_busy_connection(tool, side):
    """--idle-timeout on either end (the server's is on its TCP side, to the target)."""
    echo = EchoServer()
    port, server, client = start_tunnel(tool, echo.port, **on_side(side, "--idle-timeout", "2"))
    timed, other = (client, server) if side == "client" else (server, client)
    idle, busy = idle_and_busy(port, 3.5, timed.log)  # busy: never idle for 2 s
    timed.wait_for_log(r"conv=\d+ closed \(idle timeout\): 4 bytes up, 4 down")
    other.wait_for_log(r"conv=\d+ closed")  # the other side ended too (a CLOSE came)
    idle.close()
    busy.close()
    echo.close()


@pytest.mark.parametrize("side", ["client", "server"])
def test_half_close_timeout_ends_a_connection_whose_other_side_never_closes(tool, side):
    """The client half-closes, the target never closes its side: 1 s on either end ends it
    (the other end's default, 60 s, would not in time)."""
    with half_closing_target() as target_port:
        port, server, client = start_tunnel(tool, target_port,
                                            **on_side(side, "--half-close-timeout", "1"))
        half_close_ends(port)
        (client if side == "client" else server).wait_for_log(
            r"conv=\d+ closed \(half-close timeout\)")
