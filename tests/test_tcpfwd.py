"""tcpfwd end to end: the real process on loopback, real sockets."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
from conftest import (
    EchoServer,
    connect,
    echo_roundtrip,
    fill_until_blocked,
    free_port,
    free_port_for,
    listening_socket,
    needs_ipv6,
)
from hardening import rss_kb

MIB = 1 << 20
PATHS = {"splice": {}, "copy": {"PORTFWD_NO_SPLICE": "1"}}


def start_tcpfwd(tool, listen: str, dest: str, *flags: str, env: dict | None = None):
    process = tool("tcpfwd", *flags, listen, dest, env=env)
    process.wait_for_log(r"forwarding ")
    return process


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("listen_host, echo_host", [
    ("127.0.0.1", "127.0.0.1"),
    pytest.param("::1", "::1", marks=needs_ipv6),
    pytest.param("127.0.0.1", "::1", marks=needs_ipv6),  # v4 -> v6 transforming
])
def test_64mib_intact(tool, path, listen_host, echo_host):
    echo = EchoServer(echo_host)
    port = free_port(socket.AF_INET6 if ":" in listen_host else socket.AF_INET)
    fmt = "[{}]:{}".format if ":" in listen_host else "{}:{}".format
    dest = f"[{echo_host}]:{echo.port}" if ":" in echo_host else f"{echo_host}:{echo.port}"
    fwd = start_tcpfwd(tool, fmt(listen_host, port), dest, env=PATHS[path])
    assert f"({path})" in fwd.log()
    with connect(listen_host, port) as sock:
        echo_roundtrip(sock, 64 * MIB, seed=hash((path, listen_host, echo_host)) & 0xFFFF)
    echo.close()
    assert fwd.stop() == 0
    # The stats line written at stop (the per-connection lines are DEBUG): all of it counted.
    assert re.search(rf"INFO: stats: 0 active, 1 opened, 1 closed \(0 by error, 0 reset\); 1 "
                     rf"accepted; {64 * MIB} bytes up, {64 * MIB} down", fwd.log()), fwd.log()
    assert " conn 1 " not in fwd.log()


def forward_to_scripted_target(tool, path: str, serve) -> tuple[int, threading.Thread]:
    """tcpfwd in front of a target that takes one connection and runs ``serve(conn)`` on it in
    a thread; returns the forwarder's port and that thread (join it after the exchange)."""
    server = listening_socket()
    port = free_port()
    start_tcpfwd(tool, f"127.0.0.1:{port}", f"127.0.0.1:{server.getsockname()[1]}",
                 env=PATHS[path])

    def accept_and_serve() -> None:
        conn, _ = server.accept()
        server.close()
        with conn:
            serve(conn)

    thread = threading.Thread(target=accept_and_serve)
    thread.start()
    return port, thread


@pytest.mark.parametrize("path", sorted(PATHS))
def test_half_close_reply_after_eof(tool, path):
    """`printf req | nc` style: the client shuts its write side first, then reads the reply."""
    reply = os.urandom(3 * MIB)

    def serve(conn: socket.socket) -> None:
        request = b""
        while chunk := conn.recv(65536):  # read to EOF: the EOF must cross the forwarder
            request += chunk
        conn.sendall(request + reply)

    port, thread = forward_to_scripted_target(tool, path, serve)
    with connect("127.0.0.1", port) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(1 << 20):
            got += chunk
    thread.join(10)
    assert got == b"GET / HTTP/1.0\r\n\r\n" + reply


@pytest.mark.parametrize("path", sorted(PATHS))
def test_server_speaks_first(tool, path):
    """SMTP/ssh style: the target greets before the client says anything, then they talk."""
    heard = []

    def serve(conn: socket.socket) -> None:
        conn.sendall(b"220 ready\r\n")
        heard.append(conn.recv(100))
        conn.sendall(b"221 bye\r\n")

    port, thread = forward_to_scripted_target(tool, path, serve)
    with connect("127.0.0.1", port) as sock:
        sock.settimeout(5)
        assert sock.recv(100) == b"220 ready\r\n"
        sock.sendall(b"QUIT\r\n")
        assert sock.recv(100) == b"221 bye\r\n"
        assert sock.recv(100) == b""
    thread.join(10)
    assert heard == [b"QUIT\r\n"]


def test_200_concurrent_connections(tool, echo_server):
    port = free_port()
    fwd = start_tcpfwd(tool, f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}")
    socks = [connect("127.0.0.1", port) for _ in range(200)]
    for i, sock in enumerate(socks):
        sock.sendall(b"hello %d\n" % i)
    for i, sock in enumerate(socks):
        expected = b"hello %d\n" % i
        got = b""
        while len(got) < len(expected):
            got += sock.recv(100)
        assert got == expected
    for sock in socks:
        sock.close()
    assert fwd.stop() == 0


def test_target_down_closes_client_and_keeps_serving(tool):
    port, dead = free_port(), free_port()
    fwd = start_tcpfwd(tool, f"127.0.0.1:{port}", f"127.0.0.1:{dead}")
    for _ in range(3):
        with connect("127.0.0.1", port) as sock:
            sock.settimeout(5)
            assert sock.recv(10) == b""  # closed at once, not left hanging
    fwd.wait_for_log(r"connect to 127\.0\.0\.1:\d+ failed: Connection refused")
    assert fwd.log().count("failed: Connection refused") == 1  # rate-limited: one line
    echo = EchoServer("127.0.0.1", dead)  # the target comes up: service still there
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 1000)
    echo.close()
    assert fwd.proc.poll() is None
    assert fwd.stop() == 0


def test_sigterm_drains_active_connection_then_exits(tool, echo_server):
    port = free_port()
    fwd = start_tcpfwd(tool, f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}")
    sock = connect("127.0.0.1", port)
    sock.sendall(b"x" * 1000)
    assert sock.recv(1000)
    fwd.proc.send_signal(signal.SIGTERM)
    fwd.wait_for_log("stopping")
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        socket.create_connection(("127.0.0.1", port), timeout=2)
    echo_roundtrip(sock, 100_000)  # the active connection still flows, then ends
    sock.close()
    assert fwd.proc.wait(4) == 0  # exits as soon as it is drained, before the 5 s limit
    assert "stopped" in fwd.log()


def test_sigterm_cuts_connections_after_drain_period(tool, echo_server):
    port = free_port()
    fwd = start_tcpfwd(tool, f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}")
    sock = connect("127.0.0.1", port)
    sock.sendall(b"y")
    assert sock.recv(1) == b"y"
    started = time.monotonic()
    assert fwd.stop(timeout=15) == 0
    assert 4 < time.monotonic() - started < 10
    sock.settimeout(5)
    with pytest.raises(ConnectionResetError):  # cut, not finished: the client can tell
        sock.recv(10)
    sock.close()


def test_reuseport_two_instances(tool, echo_server):
    port = free_port()
    a = start_tcpfwd(tool, f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}", "-R")
    b = start_tcpfwd(tool, f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}", "-R")
    for _ in range(20):
        with connect("127.0.0.1", port) as sock:
            echo_roundtrip(sock, 100)
    assert a.stop() == 0 and b.stop() == 0


def test_without_reuseport_second_instance_fails(tool, echo_server):
    port = free_port()
    start_tcpfwd(tool, f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}")
    second = tool("tcpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}")
    assert second.proc.wait(10) == 1
    assert "cannot listen on 127.0.0.1:" in second.log()
    assert len(second.log().strip().splitlines()) == 1


@needs_ipv6
@pytest.mark.parametrize("v6only, v4_works", [([], True), (["-6"], False)])
def test_dual_stack_listener(tool, echo_server, v6only, v4_works):
    # free on 127.0.0.1 too: bind(0) on ::1 may hand out the echo server's IPv4 port number,
    # and with -6 the IPv4 connect below would reach the echo server instead of being refused
    port = free_port_for(("::1", socket.SOCK_STREAM), ("127.0.0.1", socket.SOCK_STREAM))
    start_tcpfwd(tool, f"[::]:{port}", f"127.0.0.1:{echo_server.port}", *v6only)
    with connect("::1", port) as sock:
        echo_roundtrip(sock, 100)
    if v4_works:
        with connect("127.0.0.1", port) as sock:
            echo_roundtrip(sock, 100)
    else:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed")
def test_curl_through_forwarder(tool, tmp_path):
    payload = os.urandom(2 * MIB)
    (tmp_path / "blob").write_bytes(payload)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = free_port()
    start_tcpfwd(tool, f"127.0.0.1:{port}", f"127.0.0.1:{httpd.server_address[1]}")
    out = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/blob"], capture_output=True,
                         timeout=30)
    httpd.shutdown()
    assert out.returncode == 0 and out.stdout == payload


def test_slow_reader_bounded_memory(tool):
    """A client that never reads: the forwarder must stop reading upstream, not buffer it all."""
    server = listening_socket()
    port = free_port()
    fwd = start_tcpfwd(tool, f"127.0.0.1:{port}", f"127.0.0.1:{server.getsockname()[1]}")
    client = connect("127.0.0.1", port)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    conn, _ = server.accept()
    sent = fill_until_blocked(conn, 5)
    # Kernel buffers on three sockets plus at most one 1 MiB pipe: a few MiB, never "everything".
    assert sent < 16 * MIB
    assert rss_kb(fwd.pid) < 200_000
    client.close()
    conn.close()
    server.close()


@pytest.mark.parametrize("path", sorted(PATHS))
def test_target_reset_mid_stream_closes_idle_client(tool, path):
    """The target resets while the client only waits to read: the client is closed promptly."""
    server = listening_socket()
    port = free_port()
    fwd = start_tcpfwd(tool, "--log-level", "debug", f"127.0.0.1:{port}",
                       f"127.0.0.1:{server.getsockname()[1]}", env=PATHS[path])
    client = connect("127.0.0.1", port)
    conn, _ = server.accept()
    conn.sendall(b"banner")
    assert client.recv(6) == b"banner"
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # RST
    client.settimeout(5)
    started = time.monotonic()
    try:
        assert client.recv(10) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - started < 2
    fwd.wait_for_log(r"conn 1 closed: 0 bytes up, 6 down, .*\(Connection reset by peer\)")
    client.close()
    server.close()
