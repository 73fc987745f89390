"""First contact: what a new user's first commands meet (dual-stack ``:port``)."""

from __future__ import annotations

import socket

from conftest import connect, echo_roundtrip, free_port, needs_ipv6


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
