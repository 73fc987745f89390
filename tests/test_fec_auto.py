"""``--fec auto`` tells bottleneck queue drops from random loss (tunnel/fec_loss.py), sans-IO.

An auto-mode FecEncoder and an FecDecoder across the WAN emulator's own link model
(bench/wan_model.py: seeded random loss, a drop-tail bottleneck) on a virtual clock in ms; the
decoder's REPORTs go straight back to the encoder. The sender alternates between sending faster
than the bottleneck (the queue fills and drops) and slower (it drains), the way a window-limited
sender without congestion control overruns a drop-tail queue."""

from __future__ import annotations

import os
import random
import sys

import pytest
from test_fec import fake_datagram

from portfwd.tunnel import fec, fec_loss
from portfwd.tunnel.fec import FecDecoder, FecEncoder, FecSettings, parity_for
from portfwd.tunnel.fec_loss import LossEstimator, StreamingQuantile, WindowedMinimum

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from wan_model import Direction, Link  # noqa: E402

RATE_MBIT = 8.0  # bottleneck: ~700 datagrams/s of ~700 bytes
QUEUE = 40  # packets: 28 ms of queue at the rate above
STALL_EVERY_MS, STALL_MS = 2000, 100  # a receiver that waits for a CPU (above the queue)


class Run:
    """What one run measured: the decoder and every parity the encoder chose after a report."""

    def __init__(self, encoder: FecEncoder, decoder: FecDecoder, parities: list[int],
                 link: Link, data_bytes: int) -> None:
        self.encoder, self.decoder, self.parities, self.link = encoder, decoder, parities, link
        self.data_bytes = data_bytes  # bytes of datagrams sent (FEC bodies not counted)


def run(loss: float, overrun: bool, seed: int, seconds: int = 20,
        clock_start: int = 0, stalls: bool = False) -> Run:
    """``overrun``: 1 s at 1.6x the bottleneck, then 1 s at 0.5x, repeated; otherwise 0.5x
    throughout. ``clock_start``: the sender's clock at 0 (the receiver's starts at 0).
    ``stalls``: the receiver reads nothing for STALL_MS every STALL_EVERY_MS (it waited for a
    CPU), then everything at once, late."""
    rng = random.Random(seed)
    link = Link(Direction(delay_ms=25, loss=loss, rate_mbit=RATE_MBIT, queue=QUEUE),
                random.Random(seed + 1000))
    encoder, decoder = FecEncoder(FecSettings(auto=True)), FecDecoder()
    bottleneck = RATE_MBIT * 1e6 / 8 / 700  # datagrams/s of the mean size below
    parities: list[int] = []
    credit, seq, data_bytes = 0.0, 0, 0
    for now in range(seconds * 1000):
        fast = overrun and (now // 1000) % 2 == 0
        credit += (1.6 if fast else 0.5) * bottleneck / 1000
        sender_now = (clock_start + now) & 0xFFFFFFFF
        out: list[bytes] = []
        while credit >= 1:
            credit -= 1
            datagram = fake_datagram(seq, rng)[:rng.randint(400, 1000)]
            seq += 1
            data_bytes += len(datagram)
            out.append(datagram)
            out += encoder.add(datagram, sender_now)
        out += encoder.handle_timer(sender_now)
        for packet in out:
            link.offer(packet, now / 1000)
        # The first stall comes after the start: a base delay measured only behind a full
        # queue (or a stall) from the first packet on cannot know the queue (as in LEDBAT).
        if stalls and (now + STALL_EVERY_MS // 2) % STALL_EVERY_MS < STALL_MS:
            continue
        for packet in link.deliver(now / 1000):
            if packet[0] == fec.Kind.SHARD or packet[0] == fec.Kind.SHARD | fec.AUTO_FLAG:
                decoder.shard_received(packet, now)
            else:
                decoder.record(packet)
        report = decoder.report_to_send(now)
        if report is not None:
            encoder.report_received(report)
            parities.append(encoder.parity)
    return Run(encoder, decoder, parities, link, data_bytes)


def test_fake_datagrams_cannot_be_mistaken_for_shards() -> None:
    assert fake_datagram(0, random.Random(0))[0] not in (fec.Kind.SHARD,
                                                         fec.Kind.SHARD | fec.AUTO_FLAG)


@pytest.mark.parametrize("seed", range(3))
def test_random_loss_turns_parity_on(seed: int) -> None:
    r = run(0.05, overrun=False, seed=seed)
    assert r.link.counters.lost_queue == 0
    assert 0.03 <= r.encoder.peer_loss <= 0.08
    assert r.encoder.parity == parity_for(r.encoder.peer_loss, 10, fec.AUTO_MAX_OVERHEAD) >= 2


@pytest.mark.parametrize("stalls", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_queue_drops_alone_keep_parity_off(seed: int, stalls: bool) -> None:
    r = run(0.0, overrun=True, seed=seed, stalls=stalls)
    counters = r.link.counters
    # The queue really dropped, and a loss figure that counted it would have turned parity on:
    assert counters.lost_queue > 0.02 * counters.offered
    assert r.decoder.loss > 0.02
    assert parity_for(r.decoder.loss, 10, fec.AUTO_MAX_OVERHEAD) > 0
    # ... but those drops were seen as queue drops: nothing reported, parity stayed off.
    assert r.decoder.estimator.queued_lost > 0
    assert r.decoder.random_loss < fec.AUTO_OFF_BELOW
    assert r.parities and max(r.parities) == 0
    assert r.encoder.shard_bytes <= 0.02 * r.data_bytes  # manifests only


@pytest.mark.parametrize("stalls", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_both_track_the_random_part(seed: int, stalls: bool) -> None:
    r = run(0.05, overrun=True, seed=seed, stalls=stalls)
    assert r.link.counters.lost_queue > 0.02 * r.link.counters.offered
    assert r.decoder.loss > r.decoder.random_loss + 0.02  # the queue drops are there ...
    assert 0.03 <= r.encoder.peer_loss <= 0.08  # ... and left out of what was reported
    assert r.encoder.parity == parity_for(r.encoder.peer_loss, 10, fec.AUTO_MAX_OVERHEAD)


def test_clocks_that_wrap_mid_run_change_nothing() -> None:
    r = run(0.0, overrun=True, seed=7, seconds=10, clock_start=0xFFFFFFFF - 3000)
    assert r.decoder.loss > 0.02 and r.decoder.random_loss < fec.AUTO_OFF_BELOW


def test_estimator_by_hand() -> None:
    e = LossEstimator()
    e.group(0, 10, 1000, 0)  # the base: 1000 ms of offset + delay
    for i in range(200):  # a full queue for a while: 100 ms excess, the high excess follows
        e.group(0, 10, 1100, i)
    assert 90 <= e._high.value <= 100
    e.group(5, 10, 1100, 300)  # at the full queue's delay: queued
    e.group(0, 10, 1060, 310)  # 60 >= half the high excess: still queued
    e.group(1, 10, 1020, 320)  # 20: the queue was far from full, clear
    e.group(1, 10, 1001, 330)  # 1 ms excess: noise, clear
    assert (e.all.lost, e.all.total) == (7, 2000)  # the window: the last 2,000 datagrams
    assert (e.clear.lost, e.clear.total) == (2, 30)
    assert e.queued_groups == 202 and e.queued_lost == 5
    e.group(2, 10, None, 340)  # an unstamped group (fixed-mode sender): counted as clear
    assert e.clear.lost == 4


def test_streaming_quantile_settles_at_its_quantile() -> None:
    rng = random.Random(4)
    q = StreamingQuantile(0.9, 1.0)
    for _ in range(20_000):
        q.add(rng.uniform(0, 100))
    assert 85 <= q.value <= 95


def test_base_delay_ages_out() -> None:
    base = WindowedMinimum(fec_loss.BASE_BUCKET_MS, fec_loss.BASE_BUCKETS)
    base.add(5, 0)
    base.add(50, fec_loss.BASE_BUCKET_MS)
    assert base.value(fec_loss.BASE_BUCKET_MS) == 5
    later = fec_loss.BASE_BUCKET_MS * fec_loss.BASE_BUCKETS
    base.add(40, later)
    assert base.value(later) == 40  # the first bucket is out of the window
    assert base.value(later * 3) is None


def test_auto_shard_carries_the_senders_clock() -> None:
    rng = random.Random(3)
    encoder = FecEncoder(FecSettings(auto=True))
    bodies: list[bytes] = []
    for seq in range(10):
        bodies += encoder.add(fake_datagram(seq, rng), 0xFFFFFFFF + 77)
    shard = fec.unpack_shard(bodies[0])
    assert shard.auto and shard.sent == 76
    assert len(bodies[0]) == FecSettings(auto=True).room  # parity 0: a manifest only
    fixed = FecEncoder(FecSettings(data=2, parity=1))
    body = fixed.add(fake_datagram(0, rng), 5) + fixed.add(fake_datagram(1, rng), 5)
    assert fec.unpack_shard(body[0]).sent is None
