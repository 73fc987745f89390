"""systemd readiness: NOTIFY_SOCKET pointed at the test's own unix datagram socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import connect, free_port

from portfwd.runtime.notify import Notifier


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(10)
    yield sock, path
    sock.close()


def messages(sock: socket.socket, until: str, timeout: float = 10.0) -> list[dict[str, str]]:
    """Datagrams as dicts, up to and including the first one that has the key ``until``."""
    got: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = sock.recv(4096).decode()
        got.append(dict(line.split("=", 1) for line in data.split("\n")))
        if until in got[-1]:
            return got
    raise AssertionError(f"no {until} in {got}")


def test_notifier_sends_assignments(notify_socket):
    sock, path = notify_socket
    notifier = Notifier(path)
    notifier.ready("3 connections")
    assert sock.recv(100) == b"READY=1\nSTATUS=3 connections"
    notifier.reloading()
    reload = sock.recv(100).decode().split("\n")
    assert reload[0] == "RELOADING=1" and reload[1].startswith("MONOTONIC_USEC=")
    assert abs(int(reload[1].split("=")[1]) - time.monotonic_ns() // 1000) < 10_000_000
    notifier.stopping()
    assert sock.recv(100) == b"STOPPING=1"
    notifier.close()


def test_notifier_abstract_socket():
    name = f"portfwd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        Notifier("@" + name).watchdog()
        assert sock.recv(100) == b"WATCHDOG=1"


def test_notifier_without_socket_and_with_a_gone_one(tmp_path, caplog):
    assert not Notifier.from_environ({}).enabled
    assert Notifier(None).notify(READY=1) is False
    gone = Notifier(str(tmp_path / "nobody"))
    assert gone.notify(READY=1) is False and gone.notify(READY=1) is False
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1  # once


def test_watchdog_interval_is_half_and_only_for_this_pid():
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000"}
    assert Notifier.from_environ(env).watchdog_interval == 2.0
    assert Notifier.from_environ({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval
    assert Notifier.from_environ({**env, "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier.from_environ({**env, "WATCHDOG_USEC": "0"}).watchdog_interval is None


def test_tcpfwd_ready_watchdog_stopping(tool, echo_server, notify_socket):
    sock, path = notify_socket
    port = free_port()
    fwd = tool("tcpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}",
               env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
    ready = messages(sock, "READY")
    assert ready[-1] == {"READY": "1", "STATUS": f"tcp:127.0.0.1:{port}: 0 connections, 0 opened"}
    with connect("127.0.0.1", port):  # READY came after the listener was bound
        pass
    pings = messages(sock, "WATCHDOG")  # every 0.1 s, with a fresh STATUS=
    assert pings[-1]["WATCHDOG"] == "1" and "STATUS" in pings[-1]
    fwd.proc.send_signal(signal.SIGTERM)
    assert messages(sock, "STOPPING")[-1] == {"STOPPING": "1"}
    assert fwd.proc.wait(10) == 0


RELOADING_SERVICE = textwrap.dedent("""
    import sys
    from portfwd.runtime import daemon
    from portfwd.runtime.config import ProcessConfig

    class Service:
        def start(self): pass
        def stop(self, timeout): pass
        def metrics(self): return None

    def reload():
        print("reloaded", flush=True)

    sys.exit(daemon.run("svc", Service(), ProcessConfig(), reload=reload))
""")


def test_reload_is_announced_between_reloading_and_ready(notify_socket):
    sock, path = notify_socket
    proc = subprocess.Popen([sys.executable, "-c", RELOADING_SERVICE], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, NOTIFY_SOCKET=path))
    try:
        assert messages(sock, "READY")[-1]["READY"] == "1"
        proc.send_signal(signal.SIGHUP)  # reload, not stop
        reloading = messages(sock, "RELOADING")[-1]
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert proc.stdout.readline() == "reloaded\n"
        assert messages(sock, "READY")[-1]["READY"] == "1"
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert messages(sock, "STOPPING")[-1] == {"STOPPING": "1"}
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
