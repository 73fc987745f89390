"""Graceful shutdown under load: SIGTERM during transfers stops accepting, lets the
active connections finish inside the drain period (daemon.DRAIN_TIMEOUT), exits 0 and removes
the pidfile. udpfwd has no connections to drain: it stops at once, cleanly."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
from conftest import connect, echo_roundtrip, free_port
from test_hardening_tunnel import PSK, assert_clean

from portfwd.runtime.daemon import DRAIN_TIMEOUT

CONNECTIONS = 8
# bytes each way per connection: still running at the signal, done well inside DRAIN_TIMEOUT
SIZE = {"tcpfwd": 32 << 20, "kcptcp-client": 2 << 20, "kcptcp-server": 2 << 20}


def start(tool, which: str, target: int, pidfile: str):
    """(tcp port to connect to, process that gets the SIGTERM, other processes)."""
    port = free_port()
    if which == "tcpfwd":
        fwd = tool("tcpfwd", "-p", pidfile, f"127.0.0.1:{port}", f"127.0.0.1:{target}")
        fwd.wait_for_log("forwarding")
        return port, fwd, ()
    udp = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    server_pid = ("-p", pidfile) if which == "kcptcp-server" else ()
    client_pid = ("-p", pidfile) if which == "kcptcp-client" else ()
    server = tool("kcptcp-server", *server_pid, "-K", PSK, f"127.0.0.1:{udp}",
                  f"127.0.0.1:{target}")
    client = tool("kcptcp-client", *client_pid, "-K", PSK, f"127.0.0.1:{port}",
                  f"127.0.0.1:{udp}")
    server.wait_for_log("tunnelling")
    client.wait_for_log("tunnelling")
    return (port, server, (client,)) if which == "kcptcp-server" else (port, client, (server,))


def refused_within(port: int, seconds: float) -> None:
    """The listener closes shortly after the "stopping" line (the hub may be busy moving data
    when the signal lands): connections are refused within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except (ConnectionRefusedError, ConnectionResetError):
            return  # reset: the probe reached the backlog just as the listener closed
        assert time.monotonic() < deadline, "still accepting after SIGTERM"
        time.sleep(0.05)


@pytest.mark.parametrize("which", ["tcpfwd", "kcptcp-client", "kcptcp-server"])
def test_sigterm_under_load_drains(tool, echo_server, tmp_path, which):
    pidfile = tmp_path / "tool.pid"
    port, victim, others = start(tool, which, echo_server.port, str(pidfile))
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with connect("127.0.0.1", port) as sock:
                echo_roundtrip(sock, SIZE[which], seed=i)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    while echo_server.accepted < CONNECTIONS:  # every connection is through
        time.sleep(0.01)
    busy = sum(thread.is_alive() for thread in threads)
    victim.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    victim.wait_for_log("stopping")
    if which != "kcptcp-server":  # its listener goes: no new connections
        refused_within(port, 2.0)
    for thread in threads:
        thread.join(DRAIN_TIMEOUT + 5)
    assert not errors, errors[:2]  # every transfer finished intact
    assert victim.proc.wait(DRAIN_TIMEOUT + 3) == 0
    took = time.monotonic() - signalled
    print(f"\n{which}: SIGTERM with {busy}/{CONNECTIONS} transfers running; "
          f"all intact, exit 0 after {took:.1f} s")
    assert busy > 0
    assert not pidfile.exists()
    assert "Traceback" not in victim.log()
    assert_clean(*others)
    for process in others:
        assert process.stop() == 0


def test_udpfwd_sigterm_under_load(tool, tmp_path):
    pidfile = tmp_path / "udpfwd.pid"
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    port = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    fwd = tool("udpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{echo.getsockname()[1]}",
               "-p", str(pidfile))
    fwd.wait_for_log(r"forwarding|listening|udp")
    stop = threading.Event()
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]

    def load() -> None:
        while not stop.is_set():
            for c in clients:
                try:
                    c.sendto(b"x" * 512, ("127.0.0.1", port))
                except OSError:
                    pass

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    time.sleep(0.5)
    try:
        assert fwd.stop(signal.SIGTERM, timeout=DRAIN_TIMEOUT + 2) == 0
    finally:
        stop.set()
        thread.join(5)
        for c in clients:
            c.close()
        echo.close()
    assert not pidfile.exists()
    assert "Traceback" not in fwd.log()
