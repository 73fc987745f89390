"""bench/run --quick produces its report with every section. Never checks a timing."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(REPO, "bench", "run")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the bench lab needs root (network namespace)"),
    pytest.mark.skipif(any(shutil.which(b) is None for b in ("iperf3", "nft", "ip")),
                       reason="iperf3, nft or ip missing"),
]

SECTIONS = {
    "tcp": ["## tcpfwd vs direct, socat, haproxy", "### TCP throughput", "### Short connections",
            "### RSS per idle connection"],
    "udp": ["## udpfwd vs direct, socat", "### UDP delivered pps and loss", "### udpfwd RSS"],
    "tunnel": ["## kcptcp vs kcptun vs plain TCP under loss", "### Lab",
               "### Request/response latency under loss", "### Throughput under loss",
               "### Tunnel ends: peak RSS under load, idle CPU"],
}


def test_bench_run_quick(tmp_path) -> None:
    only = ["tcp", "udp"]
    if shutil.which("kcptun-client") and shutil.which("kcptun-server"):
        only.append("tunnel")
    proc = subprocess.Popen([sys.executable, RUN, "--quick", "--only", ",".join(only),
                             "--out", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    reports = list(tmp_path.glob("*.md"))
    assert len(reports) == 1
    text = reports[0].read_text()
    assert text.startswith("# portfwd benchmark report")
    for section in only:
        for heading in SECTIONS[section]:
            assert heading in text, heading
    assert "× direct" in text
    # The run's namespace (named after its pid) is gone, and with it its nftables rules.
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"pfbench-{proc.pid}-" not in listed


@pytest.mark.skipif(any(shutil.which(b) is None for b in ("ab", "nginx", "haproxy")),
                    reason="ab, nginx or haproxy missing")
def test_bench_run_short_section(tmp_path) -> None:
    """bench/run's short section (bench_short.py: ab against nginx behind each forwarder) runs
    end to end in its namespace and reports rates, ratios and CPU per connection; its figures
    mean nothing at this size."""
    proc = subprocess.run([sys.executable, RUN, "--quick", "--only", "short", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = next(tmp_path.glob("*.md")).read_text()
    assert "## Concurrent short connections (ab, nginx)" in text
    assert "### Concurrent short connections (ab → nginx 1 KiB, req/s)" in text
    assert "### Forwarder CPU per connection" in text
    for path in ("| direct |", "| tcpfwd |", "| haproxy nbthread 1 |"):
        assert path in text, path
    assert "| path | -c 1 | -c 10 |" in text and "×" in text
    assert "Skipped" not in text


def test_bench_handshake_smoke() -> None:
    """bench_handshake.py runs end to end (a tiny flood, one round) and cleans up after itself;
    its figures mean nothing at this size."""
    script = os.path.join(REPO, "bench", "bench_handshake.py")
    pinned = len(os.sched_getaffinity(0)) >= 2  # --flood-cpu: the generator on a CPU of its own
    proc = subprocess.run([sys.executable, script, "--seconds", "0.5", "--rounds", "1",
                           "--workers", "1", "--flood-pps", "2000", "--sources", "100",
                           *(["--flood-cpu", str(max(os.sched_getaffinity(0)))] if pinned else [])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "New tunnelled connections per second" in proc.stdout
    assert ("the flood generator alone on CPU" in proc.stdout) == pinned
    assert "| this checkout |" in proc.stdout
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "pfhs-" not in listed


def test_bench_handshake_sites_smoke() -> None:
    """bench_handshake.py --sites: the server site and the client site in two namespaces
    joined by a veth, and both namespaces removed afterwards."""
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("--sites needs CPUs 0 and 1")
    script = os.path.join(REPO, "bench", "bench_handshake.py")
    before = set(namespaces())
    proc = subprocess.run([sys.executable, script, "--seconds", "0.5", "--rounds", "1",
                           "--workers", "1", "--flood-pps", "2000", "--sources", "100",
                           "--sites"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "two sites (--sites)" in proc.stdout and "| CPU 1 busy % |" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| this checkout |"))
    assert int(row.split("|")[2].split()[0]) > 0  # legitimate connections crossed the veth
    assert set(namespaces()) <= before  # both sites removed (another bench may hold its own)


def namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


def test_bench_forged_hello_smoke() -> None:
    """bench_forged_hello.py runs end to end (one tiny round, with pending sessions); its
    figures mean nothing at this size."""
    script = os.path.join(REPO, "bench", "bench_forged_hello.py")
    proc = subprocess.run([sys.executable, script, "--count", "200", "--rounds", "1",
                           "--pending", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| this checkout |" in proc.stdout


def test_iperf3_client_waits_out_a_server_between_tests() -> None:
    """iperf3 -s closes its listener after each test and opens it anew; a client that arrives
    in that gap is refused, which is the server not being ready, not the test failing."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import common

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started: list[subprocess.Popen] = []
    timer = threading.Timer(1.2, lambda: started.append(subprocess.Popen(
        ["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    timer.start()
    try:
        result = common.iperf3(port, 1)
    finally:
        timer.join()
        for proc in started:
            proc.kill()
            proc.wait()
    assert result["end"]["sum_received"]["bytes"] > 0
