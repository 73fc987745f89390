"""The Prometheus collector on synthetic snapshots, the status dump, JSON logs (no processes)."""

from __future__ import annotations

import json
import logging
import socket

import pytest
from conftest import exposition_samples
from prometheus_client import generate_latest

from portfwd.kcptcp.metrics import (
    CLIENT_KIND,
    SERVER_KIND,
    ConversationMetrics,
    ConversationTotals,
    TunnelClientMetrics,
    TunnelServerMetrics,
    close_reason_label,
)
from portfwd.runtime.addr import Resolved
from portfwd.runtime.exporter import (
    is_loopback,
    make_registry,
    rule_snapshots,
    status_lines,
    summary_line,
)
from portfwd.runtime.kerneldrops import KernelDrops
from portfwd.runtime.logs import JsonFormatter, LeanRecord
from portfwd.tcpfwd.metrics import KIND as TCP_KIND
from portfwd.tcpfwd.metrics import ConnectionEntry, TcpMetrics
from portfwd.udpfwd.metrics import KIND as UDP_KIND
from portfwd.udpfwd.metrics import UdpMetrics

KINDS = {k.name: k for k in (TCP_KIND, UDP_KIND, CLIENT_KIND, SERVER_KIND)}

TCP = TcpMetrics(accepted=103, connections_opened=100, connections_active=2,
                 connections_closed=98, connections_reset=1, bytes_up=8 << 20, bytes_down=9 << 20,
                 dial_failures={"ECONNREFUSED": 3}, no_destination=0,
                 accept_errors={"EMFILE": 1}, connections_failed=4,
                 top=(ConnectionEntry(7, 500, 600, 1.0), ConnectionEntry(9, 10, 20, 2.0)))
UDP = UdpMetrics(sessions=5, opened=9, expired=3, evicted=1, datagrams_up=100, bytes_up=1000,
                 datagrams_down=90, bytes_down=900, dropped_up=2, dropped_down=1,
                 upstream_errors=4, gso_sends=6, kernel_drops=77)


def conversation(conv: int, up: int, srtt: int) -> ConversationMetrics:
    return ConversationMetrics(
        conv=conv, up=up, down=up // 2, srtt=srtt, rto=200, inflight=0, queued=0, peer_wnd=1024,
        rcv_queue=0, retrans=2, fast_retrans=1, epoch=0, dgrams_out=10, dgrams_in=9,
        dropped_auth=1, dropped_replay=0, age=3.0, rekeys_started=0, epoch_switches=0,
        peer_address_changes=0, established=True)


LIVE = tuple(conversation(i, 1000 * i, srtt) for i, srtt in enumerate([3, 40, 40, 700], 1))
TOTALS = ConversationTotals(handshakes=6, up=50000, down=40000, retrans=11, fast_retrans=5,
                            dgrams_out=300, dgrams_in=290, dropped_auth=2, dropped_replay=3,
                            dropped_malformed=4, dropped_stale=1, rekeys_started=1,
                            epoch_switches=1)
SERVER = TunnelServerMetrics(
    conversations=4, finished=2, handshakes=7, rejected_auth=5, rejected_replay=1,
    rejected_stale=0, rejected_rate=0, rejected_before_start=0, rejected_load=0, cookies_sent=0,
    cookie_hellos=0, restarted=1, dropped_unknown=8, dropped_malformed=2, refused_pending=0,
    refused_full=0, evicted=0, send_errors=0, dial_failures={"ECONNREFUSED": 1},
    per_conversation=LIVE, totals=TOTALS, closed={"finished": 1, "handshake_timeout": 1},
    kernel_drops=12)
CLIENT = TunnelClientMetrics(conversations=4, finished=2, accepted=6, accept_errors={},
                             udp_open_failures={}, per_conversation=LIVE, totals=TOTALS,
                             closed={"finished": 2})
RULES = [("tcp", "tcp:127.0.0.1:80", TCP), ("udp", "udp:[::]:53", UDP),
         ("kcptcp-client", "kcptcp-client:127.0.0.1:22", CLIENT),
         ("kcptcp-server", "kcptcp-server:0.0.0.0:4000", SERVER)]


def scrape(rules=RULES) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value}, parsed by prometheus_client's own parser."""
    return exposition_samples(
        generate_latest(make_registry(lambda: rules, KINDS, process=False)).decode())


def value(samples: dict, name: str, **labels: str) -> float:
    """Exactly these labels (besides ``kind`` and ``rule``, nothing else may be set)."""
    return samples[name][tuple(sorted(labels.items()))]


def test_tcp_families():
    s = scrape()
    rule = dict(kind="tcp", rule="tcp:127.0.0.1:80")
    assert value(s, "portfwd_connections_opened_total", **rule) == 100
    assert value(s, "portfwd_connections_accepted_total", **rule) == 103
    assert value(s, "portfwd_connections_active", **rule) == 2
    assert value(s, "portfwd_connections_closed_total", reason="ended", **rule) == 93
    assert value(s, "portfwd_connections_closed_total", reason="error", **rule) == 4
    assert value(s, "portfwd_connections_closed_total", reason="reset", **rule) == 1
    assert value(s, "portfwd_bytes_total", direction="up", **rule) == 8 << 20
    assert value(s, "portfwd_bytes_total", direction="down", **rule) == 9 << 20
    assert value(s, "portfwd_dial_failures_total", reason="ECONNREFUSED", **rule) == 3
    assert value(s, "portfwd_accept_errors_total", reason="EMFILE", **rule) == 1


def test_udp_families():
    s = scrape()
    rule = dict(kind="udp", rule="udp:[::]:53")
    assert value(s, "portfwd_sessions_active", **rule) == 5
    assert value(s, "portfwd_sessions_opened_total", **rule) == 9
    assert value(s, "portfwd_sessions_closed_total", reason="evicted", **rule) == 1
    assert value(s, "portfwd_sessions_closed_total", reason="expired", **rule) == 3
    assert value(s, "portfwd_datagrams_total", direction="down", **rule) == 90
    assert value(s, "portfwd_datagrams_dropped_total", direction="up", **rule) == 2
    assert value(s, "portfwd_udp_kernel_drops_total", **rule) == 77
    assert value(s, "portfwd_gso_sends_total", **rule) == 6


def test_tunnel_families():
    s = scrape()
    server = dict(kind="kcptcp-server", rule="kcptcp-server:0.0.0.0:4000")
    client = dict(kind="kcptcp-client", rule="kcptcp-client:127.0.0.1:22")
    assert value(s, "portfwd_tunnel_handshakes_total", **server) == 7
    assert value(s, "portfwd_tunnel_handshakes_total", **client) == 6
    assert value(s, "portfwd_tunnel_handshakes_rejected_total", reason="auth", **server) == 5
    assert value(s, "portfwd_kcp_retransmissions_total", type="timeout", **client) == 11
    assert value(s, "portfwd_kcp_retransmissions_total", type="fast", **server) == 5
    assert value(s, "portfwd_tunnel_datagrams_dropped_total", reason="unauthenticated",
                 **server) == 2
    assert value(s, "portfwd_tunnel_datagrams_dropped_total", reason="replayed", **server) == 3
    assert value(s, "portfwd_tunnel_datagrams_dropped_total", reason="malformed", **server) == 4
    assert value(s, "portfwd_tunnel_datagrams_unmatched_total", reason="unknown", **server) == 8
    assert value(s, "portfwd_tunnel_rekeys_total", **server) == 1
    assert value(s, "portfwd_tunnel_epoch_switches_total", **server) == 1
    assert value(s, "portfwd_conversations_opened_total", **server) == 6
    assert value(s, "portfwd_conversations_closed_total", reason="handshake_timeout",
                 **server) == 1
    assert value(s, "portfwd_udp_kernel_drops_total", **server) == 12
    assert value(s, "portfwd_connections_accepted_total", **client) == 6


def test_rtt_is_one_histogram_per_rule():
    s = scrape()
    rule = dict(kind="kcptcp-client", rule="kcptcp-client:127.0.0.1:22")
    assert value(s, "portfwd_tunnel_srtt_seconds_gcount", **rule) == 4
    assert value(s, "portfwd_tunnel_srtt_seconds_gsum", **rule) == pytest.approx(0.783)
    assert value(s, "portfwd_tunnel_srtt_seconds_bucket", le="0.005", **rule) == 1
    assert value(s, "portfwd_tunnel_srtt_seconds_bucket", le="0.05", **rule) == 3
    assert value(s, "portfwd_tunnel_srtt_seconds_bucket", le="0.5", **rule) == 3
    assert value(s, "portfwd_tunnel_srtt_seconds_bucket", le="1.0", **rule) == 4
    assert value(s, "portfwd_tunnel_srtt_seconds_bucket", le="+Inf", **rule) == 4
    # no per-conversation series: the conv id is never a label
    assert not any("conv" in dict(labels) for samples in s.values() for labels in samples)


def test_every_name_follows_the_conventions():
    for name, samples in scrape().items():
        assert name.startswith("portfwd_")
        for labels in samples:
            assert {"kind", "rule"} <= dict(labels).keys()


def test_two_rules_of_one_kind_share_the_families():
    other = TcpMetrics(**{**TCP.__dict__, "connections_opened": 5})
    s = scrape([("tcp", "a", TCP), ("tcp", "b", other)])
    assert value(s, "portfwd_connections_opened_total", kind="tcp", rule="a") == 100
    assert value(s, "portfwd_connections_opened_total", kind="tcp", rule="b") == 5


def test_process_collector_is_included():
    text = generate_latest(make_registry(lambda: RULES[:1], KINDS)).decode()
    assert "process_open_fds" in text and "process_resident_memory_bytes" in text


def test_snapshots_are_read_at_scrape_time():
    class Service:
        calls = 0

        def metrics(self) -> TcpMetrics:
            Service.calls += 1
            return TCP

    snapshots = rule_snapshots(Service(), ("tcp", "tcp:x"))
    registry = make_registry(snapshots, KINDS, process=False)
    assert Service.calls == 0
    generate_latest(registry)
    generate_latest(registry)
    assert Service.calls == 2


def test_a_multi_rule_service_names_its_rules():
    class Many:
        def rule_snapshots(self):
            return RULES

    assert rule_snapshots(Many(), None)() == RULES


def test_status_lines_name_every_rule_and_the_top_entries():
    lines = status_lines(lambda: RULES, KINDS)
    assert lines[0] == "status rule=tcp:127.0.0.1:80 kind=tcp"
    assert any("top conn 7: 500 bytes up, 600 down" in line for line in lines)
    assert any("udp:[::]:53: 5 sessions" in line and "77 kernel drops" in line
               for line in lines)
    tops = [line for line in lines if line.startswith("status rule=kcptcp-server")
            and "top conv=" in line]
    assert [t.split("top conv=")[1].split(":")[0] for t in tops] == ["4", "3", "2", "1"]
    assert summary_line(lambda: RULES[:1], KINDS) == (
        "tcp:127.0.0.1:80: 2 connections, 100 opened")


@pytest.mark.parametrize("reason, label", [
    ("tcp read: Connection reset by peer", "tcp_read"), ("closed by peer", "closed_by_peer"),
    ("evicted: session cap", "evicted"), ("finished", "finished"), ("", "unknown")])
def test_close_reason_labels_are_bounded(reason, label):
    assert close_reason_label(reason) == label


def test_loopback_check():
    assert is_loopback(Resolved(socket.AF_INET, ("127.0.0.2", 1)))
    assert is_loopback(Resolved(socket.AF_INET6, ("::1", 1, 0, 0)))
    assert not is_loopback(Resolved(socket.AF_INET, ("0.0.0.0", 1)))
    assert not is_loopback(Resolved(socket.AF_INET6, ("::", 1, 0, 0)))


def test_json_log_lines():
    formatter = JsonFormatter("tcpfwd", "tcp:127.0.0.1:80")
    record = LeanRecord("portfwd.tcpfwd", logging.INFO, "", 0, "conn %d open", (3,), None)
    line = json.loads(formatter.format(record))
    assert line["message"] == "conn 3 open" and line["level"] == "INFO"
    assert line["tool"] == "tcpfwd" and line["rule"] == "tcp:127.0.0.1:80"
    assert line["logger"] == "portfwd.tcpfwd" and line["time"].endswith("Z")
    record.rule = "other"  # a multi-rule process tags records with extra={"rule": ...}
    assert json.loads(formatter.format(record))["rule"] == "other"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        failed = LeanRecord("x", logging.ERROR, "", 0, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(formatter.format(failed))["exception"]


def overflow(sock: socket.socket, count: int = 200) -> None:
    host, port = sock.getsockname()[:2]
    with socket.socket(sock.family, socket.SOCK_DGRAM) as sender:
        for _ in range(count):
            sender.sendto(b"x" * 500, (host, port))


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"),
                                          (socket.AF_INET6, "::1")])
def test_kernel_drops_of_a_full_socket(family, host):
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.bind((host, 0))
        drops = KernelDrops(sock)
        assert drops.read() == 0
        overflow(sock)
        dropped = drops.read()
        assert 0 < dropped < 200
        assert drops.source == "netlink"  # the exact lookup, not the /proc scan
        drops.close()


def test_kernel_drops_of_a_reuseport_group_fall_back_to_proc():
    """sock_diag's lookup of an SO_REUSEPORT address may answer for another member of the
    group: the reader notices (inode) and reads /proc/net/udp instead; both count the same."""
    socks = []
    try:
        for _ in range(4):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            sock.bind(("127.0.0.1", socks[0].getsockname()[1] if socks else 0))
            socks.append(sock)
        readers = [KernelDrops(s) for s in socks]
        overflow(socks[0], 800)
        counts = [r.read() for r in readers]
        assert sum(counts) > 0
        assert {r.source for r in readers} == {"netlink", "proc"}
    finally:
        for sock in socks:
            sock.close()


def test_policy_counters_are_exported():
    # tcpfwd's admission gate and timeouts (issue: traffic policy), udpfwd's --deny drops
    tcp = TcpMetrics(**{**TCP.__dict__, "denied": 2, "over_limit": 3, "proxy_rejected": 1,
                        "idle_timeouts": 4, "half_close_timeouts": 5, "destinations_down": 6})
    udp = UdpMetrics(**{**UDP.__dict__, "denied": 7})
    s = scrape([("tcp", "a", tcp), ("udp", "b", udp)])
    refused = {reason: value(s, "portfwd_connections_refused_total", kind="tcp", rule="a",
                             reason=reason) for reason in ("denied", "over_limit", "proxy")}
    assert refused == {"denied": 2, "over_limit": 3, "proxy": 1}
    assert value(s, "portfwd_relays_timed_out_total", kind="tcp", rule="a", reason="idle") == 4
    assert value(s, "portfwd_destinations_down_total", kind="tcp", rule="a") == 6
    assert value(s, "portfwd_datagrams_denied_total", kind="udp", rule="b") == 7
