"""Faults: a black-holed or resetting target, a kcptcp-server restart or pause.

Everything stays on loopback: the black hole is a listener whose accept queue is full (Linux
then drops further SYNs, so connect() hangs exactly as towards a silent host).
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import threading
import time

import pytest
from conftest import connect, echo_roundtrip, free_port
from test_hardening_tunnel import PSK, assert_clean, echo_roundtrip_open, start_client

CONNECT_TIMEOUT = 2  # s, passed as --connect-timeout


class BlackHole:
    """A listener with backlog 0 and its one accept-queue slot taken: SYNs go unanswered."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        probe = socket.socket()
        probe.settimeout(0.3)
        with pytest.raises(TimeoutError):  # check that the hole really swallows SYNs
            probe.connect(("127.0.0.1", self.port))
        probe.close()

    def close(self) -> None:
        self.filler.close()
        self.sock.close()


class Resetter:
    """Accepts, reads ``after`` bytes, then resets the connection (SO_LINGER 0)."""

    def __init__(self, after: int) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.after = after
        self.reset_at: float | None = None
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        got = 0
        while got < self.after:
            data = conn.recv(65536)
            if not data:
                break
            got += len(data)
            conn.sendall(data[:100])
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.reset_at = time.monotonic()
        conn.close()

    def close(self) -> None:
        self.sock.close()


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Read until EOF or reset; return how long it took (fails after ``seconds``)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def keep_sending(sock: socket.socket, stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            sock.sendall(b"x" * 8192)
            time.sleep(0.005)
    except OSError:
        pass


def start_tunnel(tool, target_port: int, server_extra: tuple = (), client_extra: tuple = (),
                 udp: int | None = None):
    udp = udp or free_port(socket.AF_INET, socket.SOCK_DGRAM)
    server = tool("kcptcp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{target_port}", "-K", PSK,
                  *server_extra)
    server.wait_for_log("tunnelling")
    port, client = start_client(tool, udp, *client_extra)
    return udp, port, server, client


def test_kcptcp_black_hole_target_times_out(tool):
    hole = BlackHole()
    _, port, server, client = start_tunnel(
        tool, hole.port, server_extra=("--connect-timeout", str(CONNECT_TIMEOUT)))
    try:
        with connect("127.0.0.1", port) as sock:
            sock.sendall(b"hello?")
            took = closed_within(sock, 10)
        assert CONNECT_TIMEOUT - 0.2 < took < CONNECT_TIMEOUT + 2
        server.wait_for_log(r"closed \(target unreachable\)")
        failures = re.findall(r"connect to 127\.0\.0\.1:\d+ failed: timed out", server.log())
        assert len(failures) == 1
        client.wait_for_log(r"closed \(closed by peer\)")
        assert_clean(server, client)
    finally:
        hole.close()
    assert client.stop() == 0 and server.stop() == 0


def test_tcpfwd_black_hole_target_times_out(tool):
    hole = BlackHole()
    port = free_port()
    fwd = tool("tcpfwd", "--connect-timeout", str(CONNECT_TIMEOUT), f"127.0.0.1:{port}",
               f"127.0.0.1:{hole.port}")
    fwd.wait_for_log("forwarding")
    try:
        with connect("127.0.0.1", port) as sock:
            took = closed_within(sock, 10)
        assert CONNECT_TIMEOUT - 0.2 < took < CONNECT_TIMEOUT + 2
        fwd.wait_for_log(r"connect to 127\.0\.0\.1:\d+ failed: timed out")
        assert_clean(fwd)
    finally:
        hole.close()
    assert fwd.stop() == 0


@pytest.mark.parametrize("via", ["kcptcp", "tcpfwd"])
def test_target_reset_mid_stream_closes_client_promptly(tool, via):
    target = Resetter(after=200_000)
    if via == "kcptcp":
        _, port, server, client = start_tunnel(tool, target.port)
        processes = (server, client)
    else:
        port = free_port()
        fwd = tool("tcpfwd", "--log-level", "debug", f"127.0.0.1:{port}",
                   f"127.0.0.1:{target.port}")  # debug: the "conn 1 closed" line
        fwd.wait_for_log("forwarding")
        processes = (fwd,)
    stop = threading.Event()
    sock = connect("127.0.0.1", port)
    sender = threading.Thread(target=keep_sending, args=(sock, stop), daemon=True)
    sender.start()
    try:
        closed_within(sock, 10)
        assert target.reset_at is not None
        assert time.monotonic() - target.reset_at < 2.0  # prompt
    finally:
        stop.set()
        sender.join(5)
        sock.close()
        target.close()
    if via == "kcptcp":
        server.wait_for_log(r"closed \(")
        client.wait_for_log(r"closed \(")
    else:
        fwd.wait_for_log(r"conn 1 closed")
    assert_clean(*processes)
    for process in processes:
        assert process.stop() == 0


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["crash", "stop"])
def test_server_restart(tool, echo_server, how):
    """Old conversations end within the keepalive; new ones work within 2 s of the restart."""
    keepalive = 3
    udp, port, server, client = start_tunnel(tool, echo_server.port,
                                             client_extra=("--keepalive", str(keepalive)))
    old = connect("127.0.0.1", port)
    echo_roundtrip_open(old, b"before restart")
    server.proc.send_signal(how)
    server.proc.wait(10)
    down_at = time.monotonic()
    server = tool("kcptcp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{echo_server.port}",
                  "-K", PSK)
    server.wait_for_log("tunnelling")
    back_at = time.monotonic()
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 100_000)
    assert time.monotonic() - back_at < 2.0
    took = closed_within(old, keepalive + 5)
    assert time.monotonic() - down_at < keepalive + 2, took
    old.close()
    if how == signal.SIGKILL:  # the restarted server answered the client's probe (probe.py)
        client.wait_for_log(r"closed \(server does not know this conversation")
    assert_clean(server, client)
    assert client.stop() == 0 and server.stop() == 0


def test_server_pause_leaves_no_stuck_sessions(tool, echo_server):
    """SIGSTOP longer than the keepalive, then SIGCONT: both sides close the conversation."""
    _, port, server, client = start_tunnel(
        tool, echo_server.port, server_extra=("--keepalive", "3", "--stats-interval", "1"),
        client_extra=("--keepalive", "3"))
    sock = connect("127.0.0.1", port)
    echo_roundtrip_open(sock, b"before pause")
    server.proc.send_signal(signal.SIGSTOP)
    try:
        closed_within(sock, 8)  # the client gives up on the silent server
    finally:
        server.proc.send_signal(signal.SIGCONT)
    sock.close()
    server.wait_for_log(r"closed \(", timeout=8)
    server.wait_for_log(r"stats total conversations=0 finished=1 ", timeout=5)
    with connect("127.0.0.1", port) as sock2:  # and it still serves
        echo_roundtrip(sock2, 50_000)
    assert_clean(server, client)
    assert client.stop() == 0 and server.stop() == 0
