"""kcptcp-server restarts and crashes, seen from the application behind kcptcp-client.

- a stop tells every client (an authenticated CLOSE per idle conversation; a transfer under
  way may finish first, tests/test_hardening_shutdown.py): their applications see EOF at once,
  the server exits without waiting out its drain, and a restart right after binds and serves;
- a crash (SIGKILL) says nothing: the client's PSK-authenticated PROBE, after about a second of
  silence with data outstanding (or a keepalive late when idle), reaches the restarted server,
  whose UNKNOWN makes the client reset that connection (RST); new connections work at once.
"""

from __future__ import annotations

import signal
import socket
import time

import pytest
from conftest import connect, echo_roundtrip, free_port

from portfwd.runtime.daemon import DRAIN_TIMEOUT

PSK = "5eed" * 16
RESET_WAIT = 20.0  # s: bounded wait; --keepalive 30 means the old client needed 30 s or more


class Tunnel:
    """kcptcp-server and kcptcp-client on loopback; the server can be stopped and restarted
    on the same UDP port."""

    def __init__(self, tool, target_port: int, *extra: str) -> None:
        self.tool = tool
        self.udp = free_port(socktype=socket.SOCK_DGRAM)
        self.tcp = free_port()
        self.target_port = target_port
        self.extra = extra
        self.server = self.start_server()
        self.client = tool("kcptcp-client", f"127.0.0.1:{self.tcp}", f"127.0.0.1:{self.udp}",
                           "-K", PSK, "--stats-interval", "0", *extra)
        self.client.wait_for_log("tunnelling")

    def start_server(self):
        server = self.tool("kcptcp-server", f"127.0.0.1:{self.udp}",
                           f"127.0.0.1:{self.target_port}", "-K", PSK, "--stats-interval", "0",
                           *self.extra)
        server.wait_for_log("tunnelling")
        return server

    def open(self) -> socket.socket:
        sock = connect("127.0.0.1", self.tcp)
        echo_roundtrip_once(sock)
        return sock


def echo_roundtrip_once(sock: socket.socket) -> None:
    sock.sendall(b"ping")
    assert sock.recv(16) == b"ping"


def wait_reset(sock: socket.socket) -> float:
    """Seconds until the connection is reset; fails on EOF or silence."""
    sock.settimeout(RESET_WAIT)
    started = time.monotonic()
    with pytest.raises(ConnectionResetError):
        while True:
            data = sock.recv(4096)
            assert data, "clean EOF where a reset was expected"
    return time.monotonic() - started


def test_stop_tells_clients_and_restart_serves_at_once(tool, echo_server):
    tunnel = Tunnel(tool, echo_server.port)
    apps = [tunnel.open() for _ in range(3)]
    stopped = time.monotonic()
    assert tunnel.server.stop() == 0
    exit_s = time.monotonic() - stopped
    for app in apps:  # each application hears of the stop (EOF), not after a keepalive
        app.settimeout(RESET_WAIT)
        assert app.recv(16) == b""
    eof_s = time.monotonic() - stopped
    tunnel.server = tunnel.start_server()  # right after the stop: binds and serves
    with connect("127.0.0.1", tunnel.tcp) as sock:
        echo_roundtrip(sock, 200_000)
    print(f"stop -> exit {exit_s:.3f} s, stop -> all EOF {eof_s:.3f} s")
    # The old server always waited out DRAIN_TIMEOUT for conversations that nobody ended.
    assert exit_s < DRAIN_TIMEOUT
    assert tunnel.server.log().count("error") == 0


@pytest.mark.parametrize("idle", [False, True], ids=["sending", "idle"])
def test_crashed_server_is_noticed_and_the_connection_reset(tool, echo_server, idle):
    # --keepalive 6: keepalive PINGs every 2 s, an idle probe ~3 s after the last word.
    tunnel = Tunnel(tool, echo_server.port, "--keepalive", "6")
    app = tunnel.open()
    tunnel.server.stop(signal.SIGKILL)  # no goodbye
    tunnel.server = tunnel.start_server()
    started = time.monotonic()
    if not idle:
        app.sendall(b"after the restart")  # KCP now has data the new server never acks
    elapsed = wait_reset(app)
    print(f"{'idle' if idle else 'sending'}: reset {elapsed:.3f} s after the restart "
          f"({time.monotonic() - started:.3f} s)")
    # (the line follows the RST: the connection is reset first, then the conversation retired)
    tunnel.client.wait_for_log(r"closed \(server does not know this conversation \(it restarted")
    with connect("127.0.0.1", tunnel.tcp) as sock:  # new connections work at once
        echo_roundtrip(sock, 100_000)


def test_handshake_timeout_says_what_it_can_mean(tool):
    """No server (or one with another key) looks the same from the client: the line says both."""
    dead = free_port(socktype=socket.SOCK_DGRAM)  # nothing listens there
    tcp = free_port()
    client = tool("kcptcp-client", f"127.0.0.1:{tcp}", f"127.0.0.1:{dead}", "-K", PSK)
    client.wait_for_log("tunnelling")
    with connect("127.0.0.1", tcp) as app:
        app.settimeout(RESET_WAIT)
        assert app.recv(16) == b""
    client.wait_for_log(r"handshake timeout: no answer from 127\.0\.0\.1:\d+: the server is down "
                        r"or unreachable, or its key differs from ours")
