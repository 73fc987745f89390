"""First contact: what a new user's first commands meet (dual-stack ``:port``, the systemd
units with a tool directory of their own)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import pytest
from conftest import BIN, REPO, connect, echo_roundtrip, free_port, needs_ipv6


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
