"""The pacer (kcp/pacing.py), sans-IO on a virtual clock in ms: it never drops nor reorders, it
keeps to its rate after a small burst, and paced bursts get through a drop-tail queue that an
unpaced burst overruns (bench/wan_model.py's link, seeded)."""

from __future__ import annotations

import os
import random
import sys

import pytest

from portfwd.kcp import Kcp, KcpConfig, pacing
from portfwd.kcp.pacing import Pacer, kcp_rate, window_rate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from wan_model import Direction, Link  # noqa: E402

SIZE = 1400  # bytes per datagram


def numbered(first: int, count: int) -> list[bytes]:
    return [i.to_bytes(4, "big") + bytes(SIZE - 4) for i in range(first, first + count)]


def drain(pacer: Pacer, now: int, until: int) -> list[tuple[int, bytes]]:
    """Jump from timer to timer up to ``until``: (time, datagram) of each release."""
    out: list[tuple[int, bytes]] = []
    while (due := pacer.get_timer()) is not None and due <= until:
        assert due > now  # a timer always moves time on
        now = due
        out += [(now, d) for d in pacer.release(now)]
    return out


def test_unpaced_before_the_first_rtt_sample() -> None:
    pacer = Pacer()
    burst = numbered(0, 500)
    assert pacer.send(burst, None, 0) is burst
    assert pacer.get_timer() is None and pacer.held == 0


def test_a_burst_leaves_at_the_rate_in_order_and_complete() -> None:
    rate = 10 * SIZE  # bytes per ms: 10 datagrams per ms
    pacer = Pacer()
    burst = numbered(0, 1000)
    first = pacer.send(burst, rate, 0)
    allowance = max(pacing.MIN_BURST_BYTES, pacing.BURST_MS * rate) // SIZE + 1
    assert 0 < len(first) <= allowance
    released = [(0, d) for d in first] + drain(pacer, 0, 10_000)
    assert [d for _, d in released] == burst  # nothing dropped, nothing reordered
    for t in range(0, 200, 5):  # never ahead of rate x time + the burst allowance
        assert sum(1 for when, _ in released if when <= t) <= allowance + 1 + t * rate / SIZE
    assert released[-1][0] >= (1000 - allowance) * SIZE / rate - 1
    assert pacer.held == 0 and pacer.get_timer() is None and pacer.paced > 0


def test_held_datagrams_all_go_when_pacing_stops() -> None:
    pacer = Pacer()
    first = pacer.send(numbered(0, 100), SIZE, 0)
    assert pacer.held == 100 - len(first) > 0
    rest = pacer.send(numbered(100, 1), None, 1)  # e.g. the conversation closed
    assert first + rest == numbered(0, 101) and pacer.held == 0


def test_beyond_max_held_nothing_is_dropped() -> None:
    pacer = Pacer()
    burst = numbered(0, pacing.MAX_HELD + 100)
    out = pacer.send(burst, 1.0, 0)
    assert out == burst and pacer.overflows == 1 and pacer.held == 0


def offer_paced(seed: int, paced: bool) -> Link:
    """One window (1,500 datagrams) at once into a 10 Mbit/s bottleneck with a 1,000-packet
    drop-tail queue, paced at 1.5x the bottleneck or not."""
    link = Link(Direction(delay_ms=10, rate_mbit=10, queue=1000), random.Random(seed))
    bottleneck = 10e6 / 8 / 1000  # bytes per ms
    pacer = Pacer()
    burst = numbered(0, 1500)
    if not paced:
        for d in burst:
            link.offer(d, 0.0)
        return link
    for d in pacer.send(burst, 1.5 * bottleneck, 0):
        link.offer(d, 0.0)
    for when, d in drain(pacer, 0, 60_000):
        link.offer(d, when / 1000)
    return link


@pytest.mark.parametrize("seed", range(3))
def test_a_paced_window_gets_through_a_queue_an_unpaced_one_overruns(seed: int) -> None:
    assert offer_paced(seed, paced=False).counters.lost_queue >= 400
    assert offer_paced(seed, paced=True).counters.lost_queue == 0


def test_rate_follows_the_kcp_window_and_rtt() -> None:
    assert window_rate(1024, 1400, 0) is None  # no RTT sample yet
    assert window_rate(1000, 1000, 100, gain=1.0) == 10_000.0
    kcp = Kcp(1, KcpConfig(mtu=1400, snd_wnd=1024, nc=True))
    assert kcp_rate(kcp) is None
    kcp.rx_srtt, kcp.rmt_wnd = 100, 512
    assert kcp_rate(kcp) == pacing.PACING_GAIN * 512 * 1400 / 100  # the peer's window limits
    kcp.nocwnd, kcp.cwnd = False, 8
    assert kcp_rate(kcp) == pacing.PACING_GAIN * 8 * 1400 / 100  # and the congestion window
