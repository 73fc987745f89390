"""--metrics, SIGUSR1 and --log-format on the real tools: scraped over HTTP, parsed by
prometheus_client's parser."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import uuid

import pytest
from conftest import REPO, connect, echo_roundtrip, exposition_samples, free_port, run_cli
from conftest import sample_value as value
from hardening import Relay

PSK = "0123456789abcdef" * 4
OTHER_PSK = "fedcba9876543210" * 4
MIB = 1 << 20


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return exposition_samples(reply.read().decode())


def wait_for(port: int, check, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        try:
            if check(samples):
                return samples
        except (AssertionError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met; last scrape: {samples}")
        time.sleep(0.1)


def test_tcpfwd_counts_100_connections_and_8mib_exactly(tool, echo_server):
    port, metrics = free_port(), free_port()
    fwd = tool("tcpfwd", "--metrics", f"127.0.0.1:{metrics}", f"127.0.0.1:{port}",
               f"127.0.0.1:{echo_server.port}")
    fwd.wait_for_log("metrics on")
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 8 * MIB, seed=3)
    for i in range(99):
        with connect("127.0.0.1", port) as sock:
            echo_roundtrip(sock, 100 + i, seed=i)
    rule = dict(kind="tcp", rule=f"tcp:127.0.0.1:{port}")

    def settled(s: dict) -> bool:
        return value(s, "portfwd_connections_closed_total", reason="ended", **rule) == 100

    s = wait_for(metrics, settled)
    assert value(s, "portfwd_connections_opened_total", **rule) == 100
    assert value(s, "portfwd_connections_accepted_total", **rule) == 100
    assert value(s, "portfwd_connections_active", **rule) == 0
    assert value(s, "portfwd_bytes_total", direction="up", **rule) >= 8 * MIB
    assert value(s, "portfwd_bytes_total", direction="down", **rule) >= 8 * MIB
    assert value(s, "process_open_fds") > 0
    assert fwd.stop() == 0


def test_metrics_endpoint_serves_only_metrics(tool, echo_server):
    port, metrics = free_port(), free_port()
    fwd = tool("tcpfwd", "--metrics", f"127.0.0.1:{metrics}", f"127.0.0.1:{port}",
               f"127.0.0.1:{echo_server.port}")
    fwd.wait_for_log("metrics on")
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"http://127.0.0.1:{metrics}/other", timeout=10)
    assert error.value.code == 404
    assert "unauthenticated" not in fwd.log()  # loopback: no warning
    assert fwd.stop() == 0


@pytest.mark.parametrize("tool_name, args", [
    ("tcpfwd", ["127.0.0.1:1", "127.0.0.1:2"]), ("udpfwd", ["127.0.0.1:1", "127.0.0.1:2"]),
    ("kcptcp-client", ["127.0.0.1:1", "127.0.0.1:2"]),
    ("kcptcp-server", ["127.0.0.1:1", "127.0.0.1:2"])])
def test_bad_metrics_address_is_one_line_and_exit_2(tool_name, args):
    result = run_cli(tool_name, "--metrics", "127.0.0.1:99999", *args)
    assert result.returncode == 2
    assert result.stderr == (f"{tool_name}: error: bad port in '127.0.0.1:99999': 99999 is "
                             "outside 1-65535\n")
    result = run_cli(tool_name, "--log-format", "xml", *args)
    assert result.returncode == 2
    assert result.stderr == (f"{tool_name}: error: --log-format expects one of text, json, "
                             "got 'xml'\n")


def test_busy_metrics_port_is_a_startup_error(echo_server):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        result = run_cli("tcpfwd", "--metrics", f"127.0.0.1:{busy.getsockname()[1]}",
                         f"127.0.0.1:{free_port()}", f"127.0.0.1:{echo_server.port}")
    assert result.returncode == 1
    assert "cannot serve metrics on" in result.stderr and "Traceback" not in result.stderr


def test_udpfwd_counts_what_the_kernel_dropped(tool):
    """A burst into a tiny listener buffer while udpfwd is stopped (SIGSTOP): the kernel drops
    what does not fit, udpfwd never sees it, and the counter shows it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        port, metrics = free_port(socket.AF_INET, socket.SOCK_DGRAM), free_port()
        fwd = tool("udpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{sink.getsockname()[1]}",
                   "--sockbuf", "4096", "--metrics", f"127.0.0.1:{metrics}")
        fwd.wait_for_log("metrics on")
        rule = dict(kind="udp", rule=f"udp:127.0.0.1:{port}")
        assert value(scrape(metrics), "portfwd_udp_kernel_drops_total", **rule) == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            os.kill(fwd.pid, signal.SIGSTOP)
            try:
                for _ in range(500):
                    client.sendto(b"x" * 512, ("127.0.0.1", port))
            finally:
                os.kill(fwd.pid, signal.SIGCONT)
        s = wait_for(metrics, lambda s: value(s, "portfwd_datagrams_total", direction="up",
                                              **rule) > 0)
        drops = value(s, "portfwd_udp_kernel_drops_total", **rule)
        forwarded = value(s, "portfwd_datagrams_total", direction="up", **rule)
        dropped = value(s, "portfwd_datagrams_dropped_total", direction="up", **rule)
        assert drops > 0 and drops + forwarded + dropped == 500  # every datagram accounted for
        os.kill(fwd.pid, signal.SIGUSR1)
        fwd.wait_for_log(rf"{int(drops)} kernel drops")
        assert fwd.stop() == 0


def start_pair(tool, target: int, client_psk: str = PSK, loss: float = 0.0):
    """kcptcp-server and -client with --metrics, through a seeded lossy relay."""
    udp, tcp = free_port(socket.AF_INET, socket.SOCK_DGRAM), free_port()
    server_metrics, client_metrics = free_port(), free_port()
    server = tool("kcptcp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{target}", "-K", PSK,
                  "--metrics", f"127.0.0.1:{server_metrics}")
    relay = Relay(("127.0.0.1", udp), loss=loss, seed=7)
    client = tool("kcptcp-client", f"127.0.0.1:{tcp}", f"127.0.0.1:{relay.port}", "-K",
                  client_psk, "--metrics", f"127.0.0.1:{client_metrics}")
    server.wait_for_log("metrics on")
    client.wait_for_log("metrics on")
    return tcp, server, client, relay, server_metrics, client_metrics, udp


def test_kcptcp_pair_shows_handshakes_rtt_and_retransmissions(tool, echo_server):
    tcp, server, client, relay, sm, cm, udp = start_pair(tool, echo_server.port, loss=0.03)
    try:
        srule = dict(kind="kcptcp-server", rule=f"kcptcp-server:127.0.0.1:{udp}")
        crule = dict(kind="kcptcp-client", rule=f"kcptcp-client:127.0.0.1:{tcp}")
        with connect("127.0.0.1", tcp) as held:
            for _ in range(20):  # a few round trips: KCP measures its RTT
                held.sendall(b"ping")
                assert held.recv(16) == b"ping"
            # live: its smoothed RTT is in the rule's histogram
            s = wait_for(cm, lambda s: value(s, "portfwd_tunnel_srtt_seconds_gcount",
                                             **crule) == 1)
            assert value(s, "portfwd_tunnel_srtt_seconds_gsum", **crule) > 0
            assert value(s, "portfwd_conversations_active", **crule) == 1
        with connect("127.0.0.1", tcp, timeout=60) as sock:  # lossy and a loaded box: slow
            echo_roundtrip(sock, MIB, seed=11)
        assert relay.lost > 0
        c = wait_for(cm, lambda s: value(s, "portfwd_conversations_active", **crule) == 0)
        assert value(c, "portfwd_tunnel_handshakes_total", **crule) == 2
        assert value(c, "portfwd_bytes_total", direction="up", **crule) == MIB + 80
        retrans = (value(c, "portfwd_kcp_retransmissions_total", type="timeout", **crule)
                   + value(c, "portfwd_kcp_retransmissions_total", type="fast", **crule))
        s = wait_for(sm, lambda s: value(s, "portfwd_conversations_active", **srule) == 0)
        retrans += (value(s, "portfwd_kcp_retransmissions_total", type="timeout", **srule)
                    + value(s, "portfwd_kcp_retransmissions_total", type="fast", **srule))
        assert retrans > 0  # counted once each conversation ended, not lost with it
        assert value(s, "portfwd_tunnel_handshakes_total", **srule) >= 1
        assert value(s, "portfwd_bytes_total", direction="down", **srule) == MIB + 80
        assert sum(v for k, v in s["portfwd_conversations_closed_total"].items()
                   if ("rule", srule["rule"]) in k) == 2
        assert value(s, "portfwd_tunnel_handshakes_rejected_total", reason="auth", **srule) == 0
        os.kill(server.pid, signal.SIGUSR1)
        server.wait_for_log(r"status rule=kcptcp-server:\S+: closed ")
        assert client.stop() == 0 and server.stop() == 0
    finally:
        relay.close()


def test_wrong_psk_raises_the_rejected_handshake_counter(tool, echo_server):
    tcp, server, client, relay, sm, cm, udp = start_pair(tool, echo_server.port,
                                                         client_psk=OTHER_PSK)
    try:
        srule = dict(kind="kcptcp-server", rule=f"kcptcp-server:127.0.0.1:{udp}")
        sock = connect("127.0.0.1", tcp)
        try:
            s = wait_for(sm, lambda s: value(s, "portfwd_tunnel_handshakes_rejected_total",
                                             reason="auth", **srule) >= 1)
        finally:
            sock.close()
        assert value(s, "portfwd_tunnel_handshakes_total", **srule) == 0
        assert value(s, "portfwd_conversations_opened_total", **srule) == 0
        assert client.stop() == 0 and server.stop() == 0
    finally:
        relay.close()


def test_sigusr1_writes_a_status_snapshot_and_changes_nothing(tool, echo_server):
    port = free_port()
    fwd = tool("tcpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}")
    fwd.wait_for_log("forwarding")
    held = connect("127.0.0.1", port)
    try:
        held.sendall(b"y" * 3000)
        got = 0
        while got < 3000:
            got += len(held.recv(65536))
        os.kill(fwd.pid, signal.SIGUSR1)
        fwd.wait_for_log(r"top conn 1: 3000 bytes up, 3000 down")
        line = fwd.wait_for_log(rf"status rule=tcp:127.0.0.1:{port}: 1 active, 1 opened, "
                                r"0 closed").group(0)
        assert line
        held.sendall(b"z")  # still forwarding: the dump changed nothing
        assert held.recv(10) == b"z"
    finally:
        held.close()
    assert fwd.stop() == 0


def test_json_log_format(tool, echo_server):
    port = free_port()
    fwd = tool("tcpfwd", "--log-format", "json", "--log-level", "debug", f"127.0.0.1:{port}",
               f"127.0.0.1:{echo_server.port}")
    fwd.wait_for_log("forwarding")
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 1000)
    fwd.wait_for_log("conn 1 closed")
    assert fwd.stop() == 0
    lines = [json.loads(line) for line in fwd.log().splitlines()]
    assert {line["tool"] for line in lines} == {"tcpfwd"}
    assert {line["rule"] for line in lines} == {f"tcp:127.0.0.1:{port}"}
    messages = [line["message"] for line in lines]
    assert any(m.startswith("conn 1 open 127.0.0.1:") for m in messages)
    assert messages[-1] == "stopped"
    assert all(line["time"].endswith("Z") for line in lines)
    assert {line["level"] for line in lines if line["message"].startswith("conn 1 ")} == {"DEBUG"}
    assert {line["level"] for line in lines if not line["message"].startswith("conn ")} == {
        "INFO"}


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 is not installed")
def test_bench_metrics_quick():
    """bench/bench_metrics.py runs end to end (one tiny round) and prints both tables."""
    script = os.path.join(REPO, "bench", "bench_metrics.py")
    out = subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert "tcpfwd with vs without --metrics" in out.stdout
    assert "udpfwd scrape time with 200 live sessions" in out.stdout


NON_LOOPBACK = textwrap.dedent("""
    import subprocess, sys, time, urllib.request
    fwd = subprocess.Popen([sys.executable, sys.argv[1], "--metrics", "0.0.0.0:9100",
                            "127.0.0.1:9001", "127.0.0.1:9002"], stderr=subprocess.PIPE,
                           text=True)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen("http://127.0.0.1:9100/metrics", timeout=2).read()
                break
            except OSError:
                time.sleep(0.05)
    finally:
        fwd.terminate()
        print(fwd.communicate(timeout=10)[1])
""")


def test_non_loopback_metrics_address_warns():
    """0.0.0.0 is bound inside a network namespace the test creates (nothing else can reach
    it): the log says the endpoint is unauthenticated."""
    name = f"pfwd-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode:
        pytest.skip("cannot create a network namespace here")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        out = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", NON_LOOPBACK,
                              os.path.join(REPO, "bin", "tcpfwd")], capture_output=True,
                             text=True, timeout=60)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    assert "metrics endpoint on 0.0.0.0:9100 is not loopback: it is unauthenticated" in out.stdout
    assert "metrics on http://0.0.0.0:9100/metrics" in out.stdout
