"""``portfwd run`` with the other issues' pieces: top-level ``metrics``/``log_format`` keys, the
kcpudp rule kinds, one scrape showing every rule with its kind and name, and a reload of a
kcpudp rule (RELOADING/READY and the exporter follow the new rule set)."""

from __future__ import annotations

import json
import socket

import pytest
from conftest import connect, echo_roundtrip, free_port
from test_metrics_export_e2e import scrape, wait_for
from test_portfwd_run import Reloader, key_file, rule, tcp_rule, write
from test_udpfwd import UdpPeer


@pytest.fixture
def udp_target():
    peer = UdpPeer()
    yield peer
    peer.close()


def rules(tmp_path, echo_server, udp_target, ports: dict, mtu: int = 1350) -> list[str]:
    key = key_file(tmp_path)
    return [
        tcp_rule(f"127.0.0.1:{ports['tcp']}", f"127.0.0.1:{echo_server.port}", "web"),
        rule("kcpudp-server", f"127.0.0.1:{ports['tunnel']}", f"127.0.0.1:{udp_target.port}",
             "dns-server", psk_file=key, mode="datagram", mtu=mtu),
        rule("kcpudp-client", f"127.0.0.1:{ports['udp']}", f"127.0.0.1:{ports['tunnel']}",
             "dns-client", psk_file=key, mode="datagram", mtu=mtu),
    ]


def udp_roundtrip(port: int, data: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(10)
        sock.sendto(data, ("127.0.0.1", port))
        return sock.recvfrom(65536)[0]


def test_one_scrape_shows_every_rule_and_follows_a_reload(tool, tmp_path, echo_server,
                                                          udp_target):
    metrics = free_port()
    ports = {"tcp": free_port(), "udp": free_port(socket.AF_INET, socket.SOCK_DGRAM),
             "tunnel": free_port(socket.AF_INET, socket.SOCK_DGRAM)}
    top = f'metrics = "127.0.0.1:{metrics}"\nlog_format = "json"\n\n'
    path = write(tmp_path / "c.toml", *rules(tmp_path, echo_server, udp_target, ports), top=top)
    process = tool("portfwd", "run", path)
    process.wait_for_log(r"tunnelling udp")
    with connect("127.0.0.1", ports["tcp"]) as conn:
        echo_roundtrip(conn, 1000)
    assert udp_roundtrip(ports["udp"], b"through the tunnel") == b"through the tunnel"

    samples = wait_for(metrics, lambda s: s["portfwd_connections_opened_total"][
        (("kind", "tcp"), ("rule", "web"))] == 1)
    assert samples["portfwd_conversations_opened_total"][
        (("kind", "kcpudp-client"), ("rule", "dns-client"))] == 1
    assert samples["portfwd_tunnel_handshakes_total"][
        (("kind", "kcpudp-server"), ("rule", "dns-server"))] == 1
    # log_format = "json": every line one object naming the tool
    lines = [json.loads(line) for line in process.log().splitlines() if line.startswith("{")]
    assert lines and all(line["tool"] == "portfwd" for line in lines)

    # Reload: the kcpudp pair's MTU changes (both ends), the tcp rule goes.
    write(tmp_path / "c.toml", *rules(tmp_path, echo_server, udp_target, ports, mtu=1200)[1:],
          top=top)
    line = Reloader(process).reload()
    assert "changed" in line and "removed" in line, line
    assert udp_roundtrip(ports["udp"], b"after the reload") == b"after the reload"
    samples = scrape(metrics)
    assert (("kind", "tcp"), ("rule", "web")) not in samples.get(
        "portfwd_connections_opened_total", {})
    assert samples["portfwd_conversations_active"][
        (("kind", "kcpudp-client"), ("rule", "dns-client"))] >= 1
