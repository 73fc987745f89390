"""--pacing (kcp/pacing.py), sans-IO on a virtual clock in ms: the path model's rate, minimum RTT
and in-flight cap follow what is acknowledged, the allowance keeps new segments to the pacing
rate, and a large window paced by the model gets a transfer through a lossy bottleneck with a
drop-tail queue that the same window unpaced overruns (bench/wan_model.py's link, seeded)."""

from __future__ import annotations

import os
import random
import sys

import pytest

from portfwd.kcp import Kcp, KcpConfig, pacing
from portfwd.kcp.pacing import Allowance, RateModel, steer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from wan_model import Direction, Link  # noqa: E402


def feed(model: RateModel, rate: float, rtt: int, ms: int, start: int = 0,
         delivered: float = 0.0, busy: bool = True) -> float:
    """``ms`` of acknowledgements at ``rate`` segments per ms, one update per ms."""
    for now in range(start, start + ms):
        delivered += rate
        model.update(now, int(delivered), rtt, busy)
    return delivered


def test_the_model_measures_the_rate_and_rtt_and_leaves_startup() -> None:
    model = RateModel(1400)
    assert model.cap() == pacing.INITIAL_CAP and model.pacing_rate() is None
    delivered = feed(model, 5.0, 100, 2000)
    assert model.rate == pytest.approx(5.0, rel=0.02) and model.min_rtt == 100
    assert not model.filling  # no growth for FULL_ROUNDS rounds
    assert model.cap() == pytest.approx(pacing.CWND_GAIN * 5.0 * 100, rel=0.02)
    assert model.mbit() == pytest.approx(5.0 * 1400 * 8 / 1000, rel=0.02)
    gains = set()
    for i in range(2 * len(pacing.CYCLE)):  # one round (100 ms) at a time
        delivered = feed(model, 5.0, 100, 100, start=2000 + 100 * i, delivered=delivered)
        gains.add(round(model.pacing_rate() / model.rate, 2))
    assert gains == set(pacing.CYCLE)  # probes above the rate, drains below, else at it


def test_idle_rounds_do_not_lower_the_estimate_and_the_rtt_minimum_expires() -> None:
    model = RateModel(1400)
    delivered = feed(model, 5.0, 100, 1500)
    feed(model, 0.1, 300, 2000, start=1500, delivered=delivered, busy=False)  # app-limited
    assert model.rate == pytest.approx(5.0, rel=0.02)
    assert model.min_rtt == 100  # within MIN_RTT_MS
    feed(model, 0.1, 300, pacing.MIN_RTT_MS + 100, start=3500, delivered=delivered, busy=False)
    assert model.min_rtt == 300


def test_the_allowance_keeps_new_segments_to_the_rate() -> None:
    allowance = Allowance()
    assert allowance.room(0, 0, None, 10) is None  # not paced before a rate exists
    rate, sent, given = 2.0, 0, []  # segments per ms
    for now in range(1, 1001):
        room = allowance.room(now, sent, rate, 10)
        assert room is not None
        if room == 0:
            assert allowance.wake is not None and allowance.wake > now
        sent += room  # the engine sends all it may
        given.append(sent)
    for t in (100, 500, 999):  # never ahead of the rate + one interval and the burst
        assert given[t] <= rate * (t + 1 + 10 + pacing.BURST_MS) + 1
    assert given[-1] >= rate * 990  # and keeps up with it


def test_a_slow_rate_wakes_the_sender_instead_of_leaving_it_idle() -> None:
    allowance = Allowance()
    allowance.room(0, 0, 0.01, 10)
    assert allowance.room(1, 0, 0.01, 10) == 0
    assert allowance.wake is not None and 1 < allowance.wake <= 1 + 100


MSS_DATA = 1200  # bytes per send() call


def expected(seed: int, size: int = 3_000_000) -> bytes:
    return random.Random(-seed).randbytes(size)


def transfer(seed: int, paced: bool, size: int = 3_000_000) -> tuple[bytes, Link, int]:
    """``size`` bytes from one engine to another over 20 ms each way, 20 Mbit/s with a
    200-packet drop-tail queue and 2 % loss (acks: no rate limit), window 4,096 segments;
    the bytes received, the forward link and the virtual ms it took (at most 60 s)."""
    rng = random.Random(seed)
    fwd = Link(Direction(delay_ms=20, rate_mbit=20, queue=200, loss=0.02),
               random.Random(rng.getrandbits(64)))
    back = Link(Direction(delay_ms=20, loss=0.02), random.Random(rng.getrandbits(64)))
    cfg = KcpConfig(mtu=1400, snd_wnd=4096, rcv_wnd=4096, stream=True, fastack_conserve=paced)
    a, b = Kcp(7, cfg), Kcp(7, cfg)
    model, allowance = RateModel(cfg.mtu), Allowance()
    data = expected(seed, size)
    for i in range(0, size, MSS_DATA):
        a.send(data[i : i + MSS_DATA])
    received = bytearray()
    now = 0
    while len(received) < size and now < 60_000:
        for d in fwd.deliver(now / 1000):
            b.input(d, now)
        for d in back.deliver(now / 1000):
            a.input(d, now)
        for kcp, link in ((a, fwd), (b, back)):
            if kcp.check(now) <= now:
                kcp.update(now)
            for d in kcp.datagrams_to_send():
                link.offer(d, now / 1000)
        if paced:
            steer(model, allowance, a, now)
        while (chunk := b.recv()) is not None:
            received += chunk
        now += 1
    return bytes(received), fwd, now


@pytest.mark.parametrize("seed", range(2))
def test_a_paced_large_window_gets_through_a_queue_the_unpaced_one_overruns(seed: int) -> None:
    got, paced_link, paced_ms = transfer(seed, paced=True)
    _, unpaced_link, unpaced_ms = transfer(seed, paced=False)
    assert got == expected(seed)  # intact
    assert paced_link.counters.lost_queue * 50 < paced_link.counters.offered  # under 2 %
    assert unpaced_link.counters.lost_queue > 10 * max(1, paced_link.counters.lost_queue)
    assert paced_ms < unpaced_ms  # virtual ms: the drops cost retransmission rounds


def test_steer_sets_the_engines_cap_and_keeps_the_rto_above_the_queue() -> None:
    kcp = Kcp(1, KcpConfig(mtu=1400, snd_wnd=4096))
    model, allowance = RateModel(1400), Allowance()
    steer(model, allowance, kcp, 0)
    assert kcp.inflight_cap == pacing.INITIAL_CAP  # no rate yet: not paced, the initial cap
    kcp.rx_srtt = 80
    steer(model, allowance, kcp, 1)
    assert kcp.rx_minrto == kcp.config_minrto  # nothing waits: no queue of its own making
    kcp.send(bytes(100_000))
    steer(model, allowance, kcp, 2)
    assert kcp.rx_minrto >= pacing.CWND_GAIN * 80  # a bulk sender: above the queue it may fill


def test_a_rate_under_one_segment_per_flush_still_lets_segments_out() -> None:
    """A slow, long path (0.03 segments/ms, ~0.3 Mbit/s): each flush earns less than one
    segment, so the bucket must hold one, or nothing would ever leave."""
    allowance, sent = Allowance(), 0
    allowance.room(0, 0, 0.03, 10)
    for now in range(10, 2010, 10):
        room = allowance.room(now, sent, 0.03, 10)
        assert room is not None
        sent += room
    assert 0.03 * 2000 * 0.9 <= sent <= 0.03 * 2000 + 2


def test_a_burst_beyond_the_allowance_is_a_bounded_debt() -> None:
    """Segments that left beyond the room (the cap let an ack batch out) hold later ones back
    for at most one burst's worth, not for as long as the overshoot was large."""
    allowance = Allowance()
    allowance.room(0, 0, 1.0, 10)
    allowance.room(1, 10_000, 1.0, 10)  # 10,000 segments went out at once
    assert allowance.room(40, 10_000, 1.0, 10) > 0


def test_a_new_engine_counting_from_zero_is_a_new_round_not_a_negative_sample() -> None:
    """A restarted conversation replaces the engine and keeps the model: its running totals
    start again at zero, which must neither enter the filter as a negative rate nor pay the
    allowance back as if that many segments had been returned."""
    model = RateModel(1400)
    feed(model, 5.0, 100, 1500)
    feed(model, 5.0, 100, 300, start=1500)  # the totals start again at zero
    assert min(model._samples) > 0 and model.rate == pytest.approx(5.0, rel=0.02)
    reset, unchanged = Allowance(), Allowance()
    for allowance in (reset, unchanged):
        allowance.room(0, 0, 1.0, 10)
        allowance.room(10, 5000, 1.0, 10)  # deep in debt after a burst
    assert reset.room(11, 0, 1.0, 10) == unchanged.room(11, 5000, 1.0, 10)
