"""kcptcp-client + kcptcp-server end to end: the real processes on loopback."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import (
    BIN,
    EchoServer,
    connect,
    echo_roundtrip,
    fill_until_blocked,
    free_port,
    listening_socket,
    needs_ipv6,
)
from hardening import cpu_ticks, rss_kb

PSK = "0123456789abcdef" * 4
OTHER_PSK = "fedcba9876543210" * 4
MIB = 1 << 20


def start_tunnel(tool, target_port: int, *extra: str, server_extra: tuple = (),
                 client_extra: tuple = (), host: str = "127.0.0.1", env: dict | None = None):
    """Server then client; returns (client_tcp_port, server, client)."""
    udp = free_port(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    tcp = free_port()
    fmt = f"[{host}]" if ":" in host else host
    server = tool("kcptcp-server", f"{fmt}:{udp}", f"127.0.0.1:{target_port}", *extra,
                  *server_extra, env=env)
    client = tool("kcptcp-client", f"127.0.0.1:{tcp}", f"{fmt}:{udp}", *extra, *client_extra,
                  env=env)
    server.wait_for_log("tunnelling")
    client.wait_for_log("tunnelling")
    return tcp, server, client


@pytest.mark.parametrize("key", [["-K", PSK], []], ids=["encrypted", "plaintext"])
def test_64mib_intact(tool, echo_server, key):
    port, server, client = start_tunnel(tool, echo_server.port, *key)
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 64 * MIB, seed=5)
    client.wait_for_log(r"closed \((finished|closed by peer)\): 67108864 bytes up, 67108864 down")
    assert client.stop() == 0 and server.stop() == 0
    if not key:
        assert "NOT encrypted" in client.log() and "NOT encrypted" in server.log()
    for process in (client, server):
        assert "Traceback" not in process.log()


def test_50_concurrent_connections(tool, echo_server):
    port, server, client = start_tunnel(tool, echo_server.port, "-K", PSK)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with connect("127.0.0.1", port) as sock:
                echo_roundtrip(sock, 200_000 + i, seed=i)
        except BaseException as exc:  # collected and re-raised by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]
    assert echo_server.accepted == 50
    assert client.stop() == 0 and server.stop() == 0


@pytest.mark.parametrize("client_key", [["-K", OTHER_PSK], []], ids=["wrong-psk", "no-psk"])
def test_wrong_psk_moves_nothing_and_never_dials(tool, echo_server, client_key):
    port, server, client = start_tunnel(tool, echo_server.port, server_extra=("-K", PSK),
                                        client_extra=tuple(client_key))
    started = time.monotonic()
    with connect("127.0.0.1", port) as sock:
        sock.sendall(b"secret request")
        sock.settimeout(30)
        try:  # closed after the handshake timeout, nothing echoed (a reset: data was unread)
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
    assert 8 < time.monotonic() - started < 20
    assert echo_server.accepted == 0  # the target was never dialled
    client.wait_for_log(r"closed \(handshake timeout\): 0 bytes up, 0 down")
    assert "open" not in server.log().split("tunnelling", 1)[1]
    assert client.stop() == 0 and server.stop() == 0


def test_half_close_crosses_the_tunnel(tool):
    """The client shuts its write side first; the target still sends its whole reply."""
    listener = listening_socket()
    reply = os.urandom(3 * MIB)

    def serve() -> None:
        conn, _ = listener.accept()
        request = b""
        while chunk := conn.recv(65536):  # to EOF: the FIN must cross the tunnel
            request += chunk
        conn.sendall(request + reply)
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    port, server, client = start_tunnel(tool, listener.getsockname()[1], "-K", PSK)
    with connect("127.0.0.1", port) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(30)
        got = b""
        while chunk := sock.recv(1 << 20):
            got += chunk
    thread.join(10)
    listener.close()
    assert got == b"GET / HTTP/1.0\r\n\r\n" + reply
    assert client.stop() == 0 and server.stop() == 0


def test_target_refused_closes_client_promptly(tool):
    dead = free_port()
    port, server, client = start_tunnel(tool, dead, "-K", PSK)
    started = time.monotonic()
    with connect("127.0.0.1", port) as sock:
        sock.settimeout(10)
        assert sock.recv(10) == b""
    assert time.monotonic() - started < 3
    server.wait_for_log(r"connect to 127\.0\.0\.1:\d+ failed: Connection refused")
    server.wait_for_log(r"closed \(target unreachable\)")
    client.wait_for_log(r"closed \(closed by peer\): 0 bytes up, 0 down")
    echo = EchoServer("127.0.0.1", dead)  # the target comes back: the tunnel still works
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 10_000)
    echo.close()
    assert client.stop() == 0 and server.stop() == 0


def test_server_gone_client_closes_after_keepalive(tool, echo_server):
    port, server, client = start_tunnel(tool, echo_server.port, "-K", PSK, "--keepalive", "3")
    sock = connect("127.0.0.1", port)
    echo_roundtrip_open(sock, b"ping")
    server.proc.kill()
    server.proc.wait()
    started = time.monotonic()
    sock.settimeout(15)
    assert sock.recv(10) == b""
    assert 2 < time.monotonic() - started < 8
    client.wait_for_log(r"closed \(peer silent\)")
    sock.close()
    assert client.stop() == 0


def echo_roundtrip_open(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        got += sock.recv(100)
    assert got == data


def test_idle_conversation_uses_no_cpu(tool, echo_server):
    port, server, client = start_tunnel(tool, echo_server.port, "-K", PSK)
    sock = connect("127.0.0.1", port)
    echo_roundtrip_open(sock, b"hello")
    time.sleep(0.5)
    before = [cpu_ticks(p.pid) for p in (client, server)]
    time.sleep(3)
    after = [cpu_ticks(p.pid) for p in (client, server)]
    # A busy 10 ms tick loop would cost ~10-30 % of a core: 30-90 ticks in 3 s. Idle: ~0.
    assert [a - b for a, b in zip(after, before, strict=True)] <= [10, 10]
    echo_roundtrip_open(sock, b"still there")
    sock.close()


@needs_ipv6
def test_ipv6_udp_leg(tool, echo_server):
    port, server, client = start_tunnel(tool, echo_server.port, "-K", PSK, host="::1")
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 2 * MIB)
    assert client.stop() == 0 and server.stop() == 0


def test_sigterm_mid_stream_closes_conversations(tool, echo_server):
    port, server, client = start_tunnel(tool, echo_server.port, "-K", PSK)
    sock = connect("127.0.0.1", port)
    echo_roundtrip_open(sock, b"x" * 1000)
    assert client.stop(signal.SIGTERM) == 0
    sock.settimeout(10)
    assert sock.recv(100) == b""
    sock.close()
    server.wait_for_log(r"closed \((closed by peer|shutting down)\)")
    assert server.stop(signal.SIGINT) == 0


def test_stats_lines(tool, echo_server):
    port, server, client = start_tunnel(tool, echo_server.port, "-K", PSK,
                                        "--stats-interval", "1")
    sock = connect("127.0.0.1", port)
    echo_roundtrip_open(sock, b"x" * 5000)
    client.wait_for_log(r"stats conv=\d+: up=5000 down=5000 ")
    server.wait_for_log(r"stats total conversations=1 .*handshakes=1 ")
    sock.close()


def test_daemon_and_pidfile(echo_server, tmp_path):
    pidfile = tmp_path / "server.pid"
    udp = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    result = subprocess.run([sys.executable, os.path.join(BIN, "kcptcp-server"), "-d", "-p",
                             str(pidfile), "-K", PSK, f"127.0.0.1:{udp}",
                             f"127.0.0.1:{echo_server.port}"], capture_output=True, timeout=20)
    assert result.returncode == 0, result.stderr
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGHUP)
    for _ in range(100):
        if not pidfile.exists():
            break
        time.sleep(0.05)
    assert not pidfile.exists()


@pytest.mark.parametrize("mode", [["normal", "16"], ["timeout", "16", "5000", "8"]])
def test_it_kcp(mode):
    env = dict(os.environ, IT_ECHO_PORT=str(free_port()), IT_TCP_PORT=str(free_port()),
               IT_UDP_PORT=str(free_port(socket.AF_INET, socket.SOCK_DGRAM)),
               IT_DEADLINE_S="90")
    result = subprocess.run([sys.executable, os.path.join(BIN, "it_kcp"), *mode], env=env,
                            capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.strip().endswith("it_kcp: PASS")
    if mode[0] == "normal":  # every rekey line seen at least once
        assert not re.search(r"(?m)^it_kcp: +0 x ", result.stdout), result.stdout


def test_slow_reader_bounded_memory(tool):
    """A client that never reads: both tunnel ends stop taking data, none buffers without bound."""
    listener = listening_socket()
    port, server, client = start_tunnel(tool, listener.getsockname()[1], "-K", PSK)
    reader = connect("127.0.0.1", port)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    reader.sendall(b"go")  # the conversation and the target connection exist from here
    target, _ = listener.accept()
    sent = fill_until_blocked(target, 6, os.urandom(65536))
    # Windows of 1024 segments each way plus socket buffers: a few MiB, never "everything".
    assert sent < 32 * MIB
    for process in (client, server):
        assert rss_kb(process.pid) < 120_000
    got = 0  # and once the reader reads, everything arrives
    reader.settimeout(10)
    target.shutdown(socket.SHUT_WR)
    while chunk := reader.recv(1 << 20):
        got += len(chunk)
    assert got == sent
    for sock in (reader, target, listener):
        sock.close()
