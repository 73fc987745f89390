"""The WAN emulator: its link model on a virtual clock, then the live relay between two
namespaces (root and /dev/net/tun) against its settings. Seeded; tolerances are wide enough
that noise cannot break them, and the live timing checks are lower bounds (a packet cannot
arrive before its delay) or generous upper bounds."""

from __future__ import annotations

import itertools
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
import wan as wanlab  # noqa: E402
from wan_model import Direction, Link  # noqa: E402

PACKET = bytes(1000)


def run_link(settings: Direction, count: int, spacing: float, seed: int = 1,
             size: int = 1000) -> tuple[Link, list[tuple[float, int]]]:
    """Offer ``count`` numbered packets ``spacing`` s apart; (arrival time, number) of each
    delivered one, on a virtual clock that jumps to every deadline."""
    link = Link(settings, random.Random(seed))
    arrivals: list[tuple[float, int]] = []
    now = 0.0
    for i in range(count):
        now = i * spacing
        while (due := link.next_deadline()) is not None and due <= now:
            arrivals += [(due, int.from_bytes(p[:4], "big")) for p in link.deliver(due)]
        link.offer(i.to_bytes(4, "big") + bytes(size - 4), now)
    while (due := link.next_deadline()) is not None:
        arrivals += [(due, int.from_bytes(p[:4], "big")) for p in link.deliver(due)]
    return link, arrivals


def test_delay_exact_on_virtual_clock() -> None:
    _, arrivals = run_link(Direction(delay_ms=40), 100, 0.01)
    assert [n for _, n in arrivals] == list(range(100))
    assert all(abs(t - (n * 0.01 + 0.04)) < 1e-9 for t, n in arrivals)


def test_jitter_without_reordering_keeps_order() -> None:
    _, arrivals = run_link(Direction(delay_ms=40, jitter_ms=20), 2000, 0.001)
    assert [n for _, n in arrivals] == list(range(2000))  # jitter >> spacing, still in order
    delays = [t - n * 0.001 for t, n in arrivals]
    assert min(delays) >= 0.020 - 1e-9 and max(delays) <= 0.060 + 1e-9
    assert statistics.pstdev(delays) > 0.003  # it does jitter


def test_reordering_when_asked() -> None:
    link, arrivals = run_link(Direction(delay_ms=10, reorder=0.05, reorder_ms=5), 4000, 0.001)
    order = [n for _, n in arrivals]
    assert sorted(order) == list(range(4000))
    overtaken = sum(1 for a, b in itertools.pairwise(order) if a > b)
    assert 0.03 * 4000 < link.counters.reordered < 0.07 * 4000
    assert overtaken >= link.counters.reordered // 2


@pytest.mark.parametrize("seed", range(5))
def test_random_loss_rate(seed: int) -> None:
    link, arrivals = run_link(Direction(loss=0.10), 20_000, 0.0001, seed, size=64)
    lost = 20_000 - len(arrivals)
    assert 0.08 * 20_000 <= lost <= 0.12 * 20_000
    assert lost == link.counters.lost_random


def loss_runs(received: set[int], count: int) -> list[int]:
    runs, current = [], 0
    for i in range(count):
        if i in received:
            if current:
                runs.append(current)
            current = 0
        else:
            current += 1
    return runs + ([current] if current else [])


@pytest.mark.parametrize("seed", range(3))
def test_gilbert_elliott_burst_loss(seed: int) -> None:
    # p/(p+r) = 0.01/0.21 -> 4.8 % loss in bursts of mean length 1/r = 5
    settings = Direction(burst_p=0.01, burst_r=0.2, burst_loss=1.0)
    link, arrivals = run_link(settings, 20_000, 0.0001, seed, size=64)
    runs = loss_runs({n for _, n in arrivals}, 20_000)
    lost = sum(runs)
    assert 0.03 * 20_000 <= lost <= 0.07 * 20_000
    assert 3.5 <= lost / len(runs) <= 7  # bursty: random loss at 5 % gives runs of ~1.05
    assert link.counters.lost_burst == lost


def test_bottleneck_rate_and_drop_tail() -> None:
    # 1000-byte packets offered at 20 Mbit/s into a 10 Mbit/s bottleneck with a 50-packet queue.
    link, arrivals = run_link(Direction(rate_mbit=10, queue=50), 4000, 0.0004)
    times = [t for t, _ in arrivals]
    assert all(b - a >= 0.0008 - 1e-9 for a, b in itertools.pairwise(times))  # 1000 B at 10 Mbit/s
    rate = (len(arrivals) - 1) * 8000 / (times[-1] - times[0])
    assert 9.9e6 <= rate <= 10.0001e6
    assert 0.45 * 4000 <= link.counters.lost_queue <= 0.55 * 4000
    # Queueing delay is bounded by the queue: 50 packets x 0.8 ms.
    assert max(t - n * 0.0004 for t, n in arrivals) <= 50 * 0.0008 + 1e-6


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        Direction(loss=1.5)
    with pytest.raises(ValueError):
        Direction(delay_ms=-1)
    with pytest.raises(ValueError):
        Direction(queue=0)


# --- live: two namespaces, TUN devices, the relay process --------------------------------------

live = pytest.mark.skipif(wanlab.available() is not None,
                          reason=f"WAN emulator unavailable: {wanlab.available()}")


def blast(link: wanlab.Wan, count: int, size: int = 100, pace: int = 50) -> set[int]:
    """``count`` numbered UDP datagrams client -> server site, ``pace`` per ms at most; the
    numbers that arrived."""
    rx, tx = link.socket("server"), link.socket("client")
    with rx, tx:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        rx.bind((wanlab.SERVER_IP, 0))
        rx.settimeout(1.0)
        dest = (wanlab.SERVER_IP, rx.getsockname()[1])
        got: set[int] = set()
        for i in range(count):
            tx.sendto(i.to_bytes(4, "big") + bytes(size - 4), dest)
            if i % pace == pace - 1:
                time.sleep(0.001)
                drain(rx, got, block=False)
        drain(rx, got, block=True)
    return got


def drain(rx: socket.socket, got: set[int], block: bool) -> None:
    rx.setblocking(block)
    if block:
        rx.settimeout(1.0)
    while True:
        try:
            got.add(int.from_bytes(rx.recv(2048)[:4], "big"))
        except (BlockingIOError, TimeoutError):
            return


@live
def test_live_delay() -> None:
    with wanlab.wan(Direction(delay_ms=30)) as link:
        rtts = wanlab.udp_rtts(link, 30)
    assert len(rtts) == 30
    assert min(rtts) >= 60.0  # cannot come back before 2 x 30 ms
    assert statistics.median(rtts) < 60.0 + 500  # generous: a loaded machine


@live
def test_live_random_loss_10_percent() -> None:
    with wanlab.wan(Direction(loss=0.10), Direction(), seed=7) as link:
        got = blast(link, 20_000)
        stats = link.stats()["forward"]
    lost = 20_000 - len(got)
    assert 0.08 * 20_000 <= lost <= 0.12 * 20_000, lost
    assert stats["lost_random"] <= lost  # the relay's own count; the rest is host drops


@live
def test_live_burst_loss() -> None:
    with wanlab.wan(Direction(burst_p=0.01, burst_r=0.2), Direction(), seed=3) as link:
        got = blast(link, 20_000)
    runs = loss_runs(got, 20_000)
    assert 0.03 * 20_000 <= sum(runs) <= 0.07 * 20_000
    assert sum(runs) / len(runs) >= 3  # bursts, not independent drops


@live
def test_live_rate_limit() -> None:
    # 10 Mbit/s bottleneck, 1000-byte datagrams offered faster than that (queue large
    # enough that none is dropped): the receiver cannot see them faster than the rate.
    with wanlab.wan(Direction(rate_mbit=10, queue=5000), Direction()) as link:
        rx, tx = link.socket("server"), link.socket("client")
        with rx, tx:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            rx.bind((wanlab.SERVER_IP, 0))
            rx.settimeout(5.0)
            count = 2500  # 2 s at 10 Mbit/s
            for i in range(count):
                tx.sendto(bytes(1000), (wanlab.SERVER_IP, rx.getsockname()[1]))
                if i % 50 == 49:
                    time.sleep(0.001)
            times = []
            for _ in range(count):
                rx.recv(2048)
                times.append(time.monotonic())
    ip_bits = 1028 * 8  # payload + UDP + IPv4 headers, what the bottleneck serialises
    rate = (count - 1) * ip_bits / (times[-1] - times[0])
    assert rate <= 10e6 * 1.15  # never faster than the bottleneck (slack: receive scheduling)
    assert rate >= 10e6 * 0.3  # and not throttled far below it


@live
def test_live_tcp_crosses_and_teardown() -> None:
    with wanlab.wan(Direction(delay_ms=5)) as link:
        names = (link.client_ns, link.server_ns)
        srv = link.socket("server", socket.SOCK_STREAM)
        cli = link.socket("client", socket.SOCK_STREAM)
        with srv, cli:
            srv.bind((wanlab.SERVER_IP, 0))
            srv.listen()
            cli.settimeout(10)
            cli.connect(srv.getsockname())
            conn, peer = srv.accept()
            with conn:
                assert peer[0] == wanlab.CLIENT_IP
                payload = os.urandom(1 << 20)
                chunks: list[bytes] = []

                def read() -> None:
                    conn.settimeout(10)
                    while chunk := conn.recv(1 << 16):
                        chunks.append(chunk)

                reader = threading.Thread(target=read)
                reader.start()
                cli.sendall(payload)
                cli.shutdown(socket.SHUT_WR)
                reader.join(30)
                got = b"".join(chunks)
                assert got == payload
    listed = os.listdir("/run/netns")
    assert not any(n in listed for n in names)


@live
@pytest.mark.skipif(any(shutil.which(b) is None for b in ("iperf3", "kcptun-client", "nft")),
                    reason="iperf3, kcptun or nft missing")
def test_bench_run_quick_wan(tmp_path) -> None:
    """``bench/run --quick --only wan`` writes its matrix (numbers meaningless at this size)
    and leaves no namespace behind."""
    run = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                       "run")
    before = set(os.listdir("/run/netns"))
    proc = subprocess.run([sys.executable, run, "--quick", "--only", "wan", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = next(tmp_path.glob("*.md")).read_text()
    assert "## The WAN matrix (TUN relay emulator)" in text
    assert "emulator ceiling" in text
    for path in ("TCP bbr", "kcptcp -K", "kcptun fast3"):
        assert f"| 20 ms | 5 % | {path} |" in text
    assert "### Errors" not in text
    assert not [n for n in set(os.listdir("/run/netns")) - before if n.startswith("wan")]
