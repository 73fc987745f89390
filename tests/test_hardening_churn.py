"""Leaks: tens of thousands of short connections and UDP sessions; afterwards every
tool's fd count is back at its baseline and its RSS grew less than a stated bound.

The baseline is taken after a warm-up round, so one-time allocations (greenlet pools, caches,
the allocator's arenas) are not counted as leaks. bench/soak.py runs the same for minutes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
from conftest import REPO, free_port
from hardening import fd_count, rss_kb
from test_hardening_tunnel import PSK, assert_clean

HARDENING = os.path.join(REPO, "tests", "hardening.py")
TCP_CHURN = 20_000  # connections through tcpfwd
TUNNEL_CHURN = 5_000  # connections through kcptcp-client -> kcptcp-server
UDP_CHURN = 20_000  # udpfwd sessions (one client socket each), -t 1
WARMUP = 500
WORKERS = 16
RSS_BOUND_KB = 16 * 1024  # RSS growth allowed over the churn (after the warm-up)
SETTLE_S = 20.0  # s for fds to return to the baseline


@pytest.fixture
def tcp_echo():
    """The epoll echo target in a process of its own (20,000 threads would not do)."""
    proc = subprocess.Popen([sys.executable, HARDENING, "echo"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    yield int(proc.stdout.readline())
    proc.stdin.close()
    proc.wait(10)


def tcp_once(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"churn")
        got = b""
        while len(got) < 5:
            chunk = sock.recv(16)
            assert chunk, "closed before the echo"
            got += chunk
        assert got == b"churn"


def churn(count: int, once: Callable[[], None]) -> float:
    """``count`` calls of ``once`` over WORKERS threads; returns the seconds taken."""
    errors: list[BaseException] = []
    left = iter(range(count))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            try:
                once()
            except BaseException as exc:  # re-raised below
                errors.append(exc)
                return

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]
    return time.monotonic() - started


def settle(pids: list[int], baseline: list[int]) -> list[int]:
    deadline = time.monotonic() + SETTLE_S
    while True:
        now = [fd_count(pid) for pid in pids]
        if all(a <= b for a, b in zip(now, baseline, strict=True)):
            return now
        if time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def measure(name: str, processes: list, count: int, once: Callable[[], None]) -> None:
    pids = [p.pid for p in processes]
    churn(WARMUP, once)
    time.sleep(2.5)  # udpfwd -t 1: the warm-up sessions expire (swept) first
    fds0 = [fd_count(pid) for pid in pids]
    rss0 = [rss_kb(pid) for pid in pids]
    took = churn(count, once)
    fds1 = settle(pids, fds0)
    rss1 = [rss_kb(pid) for pid in pids]
    print(f"\n{name}: {count} in {took:.1f} s ({count / took:.0f}/s); fds {fds0} -> {fds1}; "
          f"RSS kB {rss0} -> {rss1}")
    assert fds1 == fds0, "fd leak"
    for before, after in zip(rss0, rss1, strict=True):
        assert after - before < RSS_BOUND_KB
    assert_clean(*processes)


def test_tcpfwd_churn(tool, tcp_echo):
    port = free_port()
    fwd = tool("tcpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{tcp_echo}")
    fwd.wait_for_log("forwarding")
    measure("tcpfwd", [fwd], TCP_CHURN, lambda: tcp_once(port))
    assert fwd.stop() == 0


def test_tunnel_churn(tool, tcp_echo):
    udp = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    port = free_port()
    server = tool("kcptcp-server", "-K", PSK, f"127.0.0.1:{udp}", f"127.0.0.1:{tcp_echo}")
    client = tool("kcptcp-client", "-K", PSK, f"127.0.0.1:{port}", f"127.0.0.1:{udp}")
    server.wait_for_log("tunnelling")
    client.wait_for_log("tunnelling")
    measure("kcptcp client+server", [client, server], TUNNEL_CHURN, lambda: tcp_once(port))
    assert client.stop() == 0 and server.stop() == 0


class UdpEcho:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
                self.sock.sendto(data, addr)
            except OSError:
                return


def udp_once(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        for _ in range(5):  # UDP: a lost datagram is retried, not a failure
            sock.sendto(b"churn", ("127.0.0.1", port))
            try:
                if sock.recv(16) == b"churn":
                    return
            except TimeoutError:
                continue
        raise AssertionError("no echo through udpfwd")


def test_udpfwd_churn(tool):
    echo = UdpEcho()
    port = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    fwd = tool("udpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}", "-t", "1")
    fwd.wait_for_log(r"forwarding|listening|udp")
    measure("udpfwd sessions", [fwd], UDP_CHURN, lambda: udp_once(port))
    echo.sock.close()
    assert fwd.stop() == 0
