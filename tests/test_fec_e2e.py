"""kcptcp with --fec end to end: real bin/ tools through a seeded 10 %-loss UDP relay on
loopback, bytes intact, and the stats lines show the parity doing the work. No timings."""

from __future__ import annotations

import re
import socket
import time

import pytest
from conftest import connect, echo_roundtrip, free_port
from hardening import Relay

PSK = "0123456789abcdef" * 4
MIB = 1 << 20


def lossy_tunnel(tool, target: int, loss: float, client_fec: str, server_fec: str,
                 *extra: str):
    udp = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = free_port()
    common = ("-K", PSK, "--stats-interval", "1", *extra)
    server = tool("kcptcp-server", *common, "--fec", server_fec, f"127.0.0.1:{udp}",
                  f"127.0.0.1:{target}")
    server.wait_for_log("tunnelling")
    relay = Relay(("127.0.0.1", udp), loss=loss, seed=17)
    client = tool("kcptcp-client", *common, "--fec", client_fec, f"127.0.0.1:{tcp}",
                  f"127.0.0.1:{relay.port}")
    client.wait_for_log("tunnelling")
    return tcp, server, client, relay


def echo_open(sock: socket.socket, size: int, seed: int) -> None:
    """Seeded bytes through the echo and back intact, the connection left open (the
    conversation stays alive for the stats lines)."""
    echo_roundtrip(sock, size, seed, shutdown=False)


def recovered(log: str) -> int:
    return max((int(n) for n in re.findall(r"fec_recovered=(\d+)", log)), default=0)


@pytest.mark.parametrize("fec", ["10:3", "auto"])
def test_fec_through_a_lossy_relay_bytes_intact(tool, echo_server, fec) -> None:
    port, server, client, relay = lossy_tunnel(tool, echo_server.port, 0.10, fec, fec)
    try:
        with connect("127.0.0.1", port) as sock:
            sock.settimeout(120)
            echo_open(sock, 2 * MIB, seed=3)
            if fec == "auto":  # the loss reports turn parity on (a report can be lost too)
                for seed in range(10, 30):
                    if all(re.search(r"fec_parity=[1-9]", p.log()) for p in (client, server)):
                        break
                    echo_open(sock, MIB // 2, seed)
                    time.sleep(1.2)  # a stats line
                echo_open(sock, 2 * MIB, seed=5)
            # Parity rebuilt some of what the relay dropped, on both sides (each one repairs
            # the other's datagrams), as the periodic stats lines say.
            server.wait_for_log(r"fec_recovered=[1-9]", timeout=15)
            client.wait_for_log(r"fec_recovered=[1-9]", timeout=15)
            echo_roundtrip(sock, MIB, seed=6)  # and it closes cleanly
        assert relay.lost > 0
        assert recovered(server.log()) > 0 and recovered(client.log()) > 0
    finally:
        relay.close()


def test_pacing_with_fec_auto_through_a_lossy_relay_bytes_intact(tool, echo_server) -> None:
    """--pacing with a wide window (its path model caps what is in flight and paces new
    segments) and FEC auto: nothing lost or reordered for good, both directions, the model's
    rate and cap in the stats lines, and the conversation closes cleanly."""
    port, server, client, relay = lossy_tunnel(tool, echo_server.port, 0.05, "auto", "auto",
                                               "--pacing", "--sndwnd", "4096",
                                               "--rcvwnd", "4096")
    try:
        with connect("127.0.0.1", port) as sock:
            sock.settimeout(120)
            for seed in range(3):
                echo_open(sock, 2 * MIB, seed)
            client.wait_for_log(r"fec_out=[1-9]", timeout=15)  # the manifests of auto mode
            client.wait_for_log(r"pace=\d+\.\dMbit/s cap=[1-9]", timeout=15)
            echo_roundtrip(sock, MIB, seed=7)
        assert relay.lost > 0
    finally:
        relay.close()


def test_fec_off_sends_no_parity_and_still_decodes_a_peer_that_does(tool, echo_server) -> None:
    port, server, client, relay = lossy_tunnel(tool, echo_server.port, 0.10, "off", "10:3")
    try:
        with connect("127.0.0.1", port) as sock:
            sock.settimeout(120)
            echo_open(sock, MIB, seed=4)
            client.wait_for_log(r"fec_recovered=[1-9]", timeout=15)  # the server's parity
        assert not re.search(r"fec_recovered=[1-9]", server.log())  # the client sent none
    finally:
        relay.close()


def test_bad_fec_spec_is_one_clean_error(tool) -> None:
    proc = tool("kcptcp-server", "--fec", "10:0", "127.0.0.1:4000", "127.0.0.1:4001")
    assert proc.proc.wait(20) == 2
    assert "kcptcp-server: error: --fec: parity must be at least 1" in proc.log()
