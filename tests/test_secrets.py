"""The key stays out of ``ps``: PORTFWD_PSK instead of -K, and -K hidden from the process title."""

from __future__ import annotations

import os
import socket

from conftest import connect, echo_roundtrip, free_port, run_cli

PSK = "c0ffee" * 10 + "beef"


def cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


def start_tunnel(tool, echo_port: int, server_args: tuple, client_args: tuple, env=None):
    udp = free_port(socktype=socket.SOCK_DGRAM)
    tcp = free_port()
    server = tool("kcptcp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{echo_port}", *server_args,
                  env=env)
    client = tool("kcptcp-client", f"127.0.0.1:{tcp}", f"127.0.0.1:{udp}", *client_args, env=env)
    server.wait_for_log("tunnelling")
    client.wait_for_log("tunnelling")
    return server, client, tcp


def test_key_given_with_K_is_hidden_from_the_process_title(tool, echo_server):
    server, client, port = start_tunnel(tool, echo_server.port, ("-K", PSK), (f"-K{PSK}",))
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 100_000)  # the key still works
    for process in (server, client):
        title = cmdline(process.pid)
        assert PSK.encode() not in title and PSK[:16].encode() not in title
        assert b"<redacted>" in title and b"kcptcp-" in title
        # ... and the process says once that -K is the wrong way to pass a key.
        assert process.log().count("set PORTFWD_PSK instead") == 1
        assert "WARNING" in process.log()
    assert server.stop() == 0 and client.stop() == 0


def test_key_from_PORTFWD_PSK(tool, echo_server):
    env = {"PORTFWD_PSK": PSK}
    server, client, port = start_tunnel(tool, echo_server.port, (), (), env=env)
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 100_000)
    for process in (server, client):
        assert PSK.encode() not in cmdline(process.pid)
        assert "PORTFWD_PSK instead" not in process.log()
        assert "plaintext" not in process.log().lower()  # encrypted: the key was taken
    assert server.stop() == 0 and client.stop() == 0


def test_PORTFWD_PSK_is_validated_and_not_echoed():
    env = dict(os.environ, PORTFWD_PSK=PSK[:-2])
    result = run_cli("kcptcp-server", "127.0.0.1:1", "127.0.0.1:2", env=env)
    assert result.returncode == 2
    assert result.stderr.startswith("kcptcp-server: error: PORTFWD_PSK expects 64 hex digits")
    assert PSK[:-2] not in result.stderr


def test_K_and_PORTFWD_PSK_together_are_refused():
    env = dict(os.environ, PORTFWD_PSK=PSK)
    result = run_cli("kcptcp-client", "-K", PSK, "127.0.0.1:1", "127.0.0.1:2", env=env)
    assert result.returncode == 2
    assert result.stderr == "kcptcp-client: error: -K and PORTFWD_PSK both give a key; use one\n"


def test_it_kcp_children_do_not_get_the_key_on_their_command_line():
    from portfwd.testing import it_kcp

    harness = it_kcp.Harness(PSK, (free_port(), free_port(socket.AF_INET, socket.SOCK_DGRAM),
                                   free_port()), {})
    try:
        for proc in harness.procs.values():
            assert PSK.encode() not in cmdline(proc.pid)
    finally:
        harness.close()
