"""First contact: what a new user's first commands meet (dual-stack ``:port``, the systemd
units with a tool directory of their own)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
from conftest import BIN, REPO, connect, echo_roundtrip, free_port, needs_ipv6, run_cli


@needs_ipv6
def test_empty_host_listens_on_ipv4_and_ipv6(tool, echo_server):
    port = free_port()
    fwd = tool("tcpfwd", f":{port}", f"127.0.0.1:{echo_server.port}")
    fwd.wait_for_log("forwarding")
    for host in ("127.0.0.1", "::1"):
        with connect(host, port) as sock:
            echo_roundtrip(sock, 10_000)
    assert fwd.stop() == 0


@needs_ipv6
def test_udpfwd_empty_host_answers_both_families(tool):
    upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    upstream.bind(("127.0.0.1", 0))
    upstream.settimeout(5)
    port = free_port(socktype=socket.SOCK_DGRAM)
    fwd = tool("udpfwd", f":{port}", f"127.0.0.1:{upstream.getsockname()[1]}")
    fwd.wait_for_log("forwarding")
    try:
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family, socket.SOCK_DGRAM) as client:
                client.settimeout(5)
                client.sendto(b"ping-" + host.encode(), (host, port))
                data, peer = upstream.recvfrom(100)
                upstream.sendto(data.upper(), peer)
                assert client.recv(100) == b"PING-" + host.upper().encode()
        # The log names the IPv4 client as IPv4, not as ::ffff:127.0.0.1.
        assert "::ffff:" not in fwd.log()
    finally:
        upstream.close()
    assert fwd.stop() == 0


UNITS = os.path.join(REPO, "contrib", "systemd")
TOOLS = ["tcpfwd", "udpfwd", "kcptcp-client", "kcptcp-server"]


def unit_setting(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize("tool_name", TOOLS)
def test_systemd_unit_verifies(tmp_path, tool_name):
    shutil.copy(os.path.join(UNITS, f"{tool_name}@.service"), tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / f"{tool_name}@t.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("tool_name", TOOLS)
def test_systemd_unit_runs_tool_from_bindir(tool_name):
    """ExecStart as systemd expands it (${BINDIR} inside a word, $ARGS split into words) runs the
    tool from any BINDIR, here this checkout's bin/ standing in for a venv's."""
    with open(os.path.join(UNITS, f"{tool_name}@.service"), encoding="utf-8") as f:
        text = f.read()
    assert unit_setting(text, "Environment") == ["BINDIR=/usr/local/bin"]  # the default
    (exec_start,) = unit_setting(text, "ExecStart")
    argv = [word.replace("${BINDIR}", BIN) for word in exec_start.split()]
    argv = [arg for word in argv for arg in (["-h"] if word == "$ARGS" else [word])]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{tool_name}:")


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def read(path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.mark.parametrize("tool_name", ["tcpfwd", "udpfwd", "kcptcp-client", "kcptcp-server"])
def test_log_file_with_daemon_and_sigusr2_reopen(tmp_path, tool_name):
    """--log-file takes the daemon's log; after logrotate's rename, SIGUSR2 starts a new file."""
    log, pidfile = tmp_path / "tool.log", tmp_path / "tool.pid"
    socktype = socket.SOCK_DGRAM if tool_name in ("udpfwd", "kcptcp-server") else socket.SOCK_STREAM
    port = free_port(socktype=socktype)
    started = run_cli(tool_name, "-d", "-p", str(pidfile), "--log-file", str(log),
                      f"127.0.0.1:{port}", "127.0.0.1:9")
    assert started.returncode == 0, started.stderr
    assert started.stderr == ""  # nothing lost: the log has a home
    pid = int(pidfile.read_text())
    try:
        wait_for(lambda: "INFO" in read(log))
        rotated = tmp_path / "tool.log.1"
        log.rename(rotated)
        os.kill(pid, signal.SIGUSR2)
        wait_for(log.exists)
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: "stopped" in read(log))
        assert "stopped" not in rotated.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(os.path.exists("/dev/log"), reason="this system has a syslog socket")
def test_daemon_without_syslog_says_logs_are_lost(tmp_path):
    pidfile = tmp_path / "t.pid"
    started = run_cli("tcpfwd", "-d", "-p", str(pidfile), f"127.0.0.1:{free_port()}",
                      "127.0.0.1:9")
    try:
        assert started.returncode == 0, started.stderr
        assert "log lines from now on are lost; give --log-file <path>" in started.stderr
    finally:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            os.kill(int(pidfile.read_text()), signal.SIGTERM)


def test_log_file_in_missing_directory(tmp_path):
    missing = tmp_path / "nope" / "t.log"
    result = run_cli("udpfwd", f"127.0.0.1:{free_port()}", "127.0.0.1:9", "--log-file",
                     str(missing))
    assert result.returncode == 2
    assert result.stderr.startswith(f"udpfwd: error: --log-file {missing}: directory")
