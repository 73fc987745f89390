"""Restarts that must not leave a service down: tcpfwd after many short connections (the
listener always has SO_REUSEADDR), and the start-up errors an operator meets first."""

from __future__ import annotations

import os
import socketserver
import subprocess
import threading
import time

from conftest import BIN, REPO, connect, free_port, run_cli

CONTROL = os.path.join(REPO, "contrib", "portfwd-control.sh")
SHORT_CONNECTIONS = 2000
DEADLINE = 60.0  # s: the bounded loop gives up after this


class CloseFirstServer(socketserver.ThreadingTCPServer):
    """A destination that writes one byte and closes first, as an HTTP/1.0 server does: the
    forwarder then closes its client side first, so the TIME_WAIT sockets sit on the
    forwarder's listening port (what blocked a restart without SO_REUSEADDR)."""

    daemon_threads = True
    request_queue_size = 1024

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"x")

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), self.Handler)
        self.port = self.server_address[1]
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def fetch_one(port: int) -> bytes:
    with connect("127.0.0.1", port) as sock:
        data = b""
        while chunk := sock.recv(16):
            data += chunk
        return data


def control(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", CONTROL, command], env=env, capture_output=True, text=True,
                          timeout=60)


def time_wait_on(port: int) -> int:
    """TIME_WAIT sockets whose local port is ``port`` (from /proc/net/tcp, state 06)."""
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "06" and int(fields[1].split(":")[1], 16) == port:
                count += 1
    return count


def test_tcpfwd_restart_after_short_connections(tmp_path):
    dest = CloseFirstServer()
    port = free_port()
    pidfile = tmp_path / "fwd.pid"
    env = dict(os.environ, BIN=os.path.join(BIN, "tcpfwd"), PIDFILE=str(pidfile),
               ARGS=f"127.0.0.1:{port} 127.0.0.1:{dest.port}")
    try:
        started = control("start", env)
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + DEADLINE
        served = 0
        while served < SHORT_CONNECTIONS and time.monotonic() < deadline:
            assert fetch_one(port) == b"x"
            served += 1
        assert served == SHORT_CONNECTIONS
        assert time_wait_on(port) > 0  # the condition that used to block the restart
        restarted = control("restart", env)
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        assert fetch_one(port) == b"x"
    finally:
        control("stop", env)
        dest.close()


def test_pidfile_in_missing_directory(tmp_path):
    missing = tmp_path / "no-such-dir" / "t.pid"
    result = run_cli("tcpfwd", "-p", str(missing), f"127.0.0.1:{free_port()}", "127.0.0.1:9")
    assert result.returncode == 2
    assert result.stderr == (f"tcpfwd: error: -p {missing}: directory {missing.parent} "
                             "does not exist\n")
