"""Pacing of a conversation (``--pacing``), sans-IO: its rate from what the peer acknowledges.

KCP with ``nc`` sends its whole window whatever the path. At 100 ms RTT and 5 % loss a window of
1,024 segments stalls behind each lost segment for a retransmission round (the window counts from
snd_una), which held a conversation near half of a 100 Mbit/s link; a larger window overran the
bottleneck's drop-tail queue, and a pacer after KCP (datagrams held back after KCP has timed
them) makes its timeouts fire for datagrams still waiting there. So the window may be large,
and what leaves is bounded inside the engine by a model of the path (BBR, Cardwell
et al. 2016; draft-ietf-ccwg-bbr), through ``Kcp.inflight_cap`` (new segments only: a
retransmission is never held):

* **bottleneck rate**: segments newly acknowledged per round (one minimum RTT), the maximum over
  the last FILTER_ROUNDS rounds. Random loss lowers it by the loss itself, not by half per loss
  as a loss-based congestion control does. A round in which the sender had nothing waiting (an
  interactive conversation) counts only if it raises the estimate.
* **minimum RTT**: the smallest smoothed RTT seen over MIN_RTT_MS.
* **in-flight cap** (unacknowledged segments): CWND_GAIN x rate x minimum RTT, at least MIN_CAP;
  INITIAL_CAP before the first round. The bottleneck's queue then holds at most
  (CWND_GAIN - 1) x the path's bandwidth-delay product, and the RTO is kept above the RTT such a
  queue makes (a timeout below it is spurious; a fast retransmission repairs a real loss sooner).
* **pacing rate**: STARTUP_GAIN x the rate until it stops growing by 25 % for 3 rounds, one round
  at 1 / STARTUP_GAIN to drain startup's queue, then BBR's ProbeBW cycle of CYCLE gains, one per
  round. New segments leave at that rate (:class:`Allowance`, a token bucket in segments that is
  filled up to the next flush), so a window that opens at once does not leave as one burst.

FEC parity is not counted here: the rate is measured in data segments, so at the bottleneck it
settles at what the link carries besides the parity. ``now`` (ms) comes in as an argument;
nothing here reads a clock.
"""

from __future__ import annotations

import collections
import math

from .engine import U32_MASK, Kcp

FILTER_ROUNDS = 10  # rounds the bottleneck-rate maximum looks back over
MIN_RTT_MS = 10_000  # ms the minimum RTT looks back over
MIN_ROUND_MS = 10  # ms: a round is at least this long (a timer's granularity)
CWND_GAIN = 2.0  # x the path's bandwidth-delay product in flight (BBR's cwnd_gain)
STARTUP_GAIN = 2.0  # pacing gain while the rate estimate still doubles each round
CYCLE = (1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)  # ProbeBW pacing gains, one per round
FULL_GROWTH = 1.25  # startup ends after FULL_ROUNDS rounds without this much growth
FULL_ROUNDS = 3
INITIAL_CAP = 32  # segments in flight before the first rate sample
MIN_CAP = 16  # segments: a cap never below a few packets
BURST_MS = 2  # ms at the pacing rate that may be saved up beyond one flush interval


class RateModel:
    """Bottleneck rate and minimum RTT of one conversation; its in-flight cap and pacing rate."""

    def __init__(self, mtu: int) -> None:
        self.mtu = mtu  # bytes per datagram: segments to bytes for mbit()
        self.rate = 0.0  # segments per ms: the bottleneck-rate estimate
        self.min_rtt: int | None = None  # ms
        self.filling = True  # startup: the rate still grows
        self.rounds = 0
        self._samples: collections.deque[float] = collections.deque(maxlen=FILTER_ROUNDS)
        self._rtts: collections.deque[tuple[int, int]] = collections.deque()  # (ms, srtt)
        self._round_start: int | None = None
        self._round_delivered = 0
        self._round_busy = False  # data waited for the window at some point of the round
        self._full_rate = 0.0
        self._full_count = 0
        self._draining = False  # the round after startup: paced at 1 / STARTUP_GAIN

    def update(self, now: int, delivered: int, srtt: int, busy: bool) -> None:
        """Bring the model up to ``now``: ``delivered`` segments acknowledged so far (a running
        total), the engine's smoothed RTT (0: none yet), ``busy`` = data is waiting."""
        if srtt > 0:
            rtts = self._rtts
            while rtts and rtts[-1][1] >= srtt:
                rtts.pop()  # a monotonic deque: its front is the window's minimum
            rtts.append((now, srtt))
            while now - rtts[0][0] > MIN_RTT_MS:
                rtts.popleft()
            self.min_rtt = rtts[0][1]
        self._round_busy |= busy
        if self._round_start is None or delivered < self._round_delivered:
            # first call, or a new engine (a restarted conversation) counting from zero again
            self._round_start, self._round_delivered = now, delivered
            return
        elapsed = now - self._round_start
        if elapsed < max(MIN_ROUND_MS, self.min_rtt or 0):
            return
        sample = (delivered - self._round_delivered) / elapsed
        if self._round_busy or sample > self.rate:
            self._samples.append(sample)
            self.rate = max(self._samples)
        was_busy = self._round_busy
        self._round_start, self._round_delivered = now, delivered
        self._round_busy = busy
        self.rounds += 1
        if self.filling and was_busy:
            if self.rate >= self._full_rate * FULL_GROWTH:
                self._full_rate, self._full_count = self.rate, 0
            else:
                self._full_count += 1
                self.filling = self._full_count < FULL_ROUNDS
                self._draining = not self.filling  # startup's overshoot leaves the queue
        elif self._draining:
            self._draining = False

    def cap(self) -> int:
        """Unacknowledged segments that may be in flight."""
        if not self.rate or self.min_rtt is None:
            return INITIAL_CAP
        return max(MIN_CAP, math.ceil(CWND_GAIN * self.rate * self.min_rtt))

    def mbit(self) -> float:
        """The bottleneck-rate estimate in Mbit/s (of datagrams of ``mtu`` bytes)."""
        return self.rate * self.mtu * 8 / 1000

    def pacing_rate(self) -> float | None:
        """Segments per ms to pace at; None before the first rate sample (not paced)."""
        if not self.rate:
            return None
        if self.filling:
            gain = STARTUP_GAIN
        elif self._draining:
            gain = 1 / STARTUP_GAIN
        else:
            gain = CYCLE[self.rounds % len(CYCLE)]
        floor = MIN_CAP / max(MIN_ROUND_MS, self.min_rtt or 0)  # never below MIN_CAP per RTT
        return gain * max(self.rate, floor)


class Allowance:
    """Pacing inside the engine: new segments may leave at the pacing rate (a token bucket in
    segments, refilled up to the next flush), so nothing waits after KCP has timed it."""

    def __init__(self) -> None:
        self.tokens = 0.0  # segments that may leave before the next refill
        self._last: int | None = None  # ms of the last refill
        self._sent = 0  # new segments given out at the last refill (a running total)
        self.wake: int | None = None  # ms at which a segment may leave, if none may now

    def room(self, now: int, sent: int, rate: float | None, interval: int) -> int | None:
        """New segments that may leave until ``interval`` ms from ``now``; None: not paced.
        ``sent`` counts every new segment so far, ``rate`` is in segments per ms."""
        last, self._last = self._last, now
        spent, self._sent = max(0, sent - self._sent), sent  # fewer: a new engine's count
        self.wake = None
        if rate is None or last is None:
            self.tokens = 0.0
            return None
        # At least one segment: below that a slow, long path could never let one out.
        burst = max(1.0, rate * (interval + BURST_MS))
        # The debt is bounded too: a burst the cap let out must not hold later data back long.
        self.tokens = max(-burst, min(burst, self.tokens - spent + rate * (now - last)))
        room = max(0, math.floor(self.tokens + rate * interval))
        # nothing may leave by the next flush: wake when one segment may
        self.wake = None if room else now + max(1, math.ceil((1 - self.tokens) / rate))
        return room


def sent(kcp: Kcp) -> int:
    """New segments ``kcp`` has given sequence numbers to (u32; never wraps within one
    model's life)."""
    return (kcp.snd_nxt - kcp.config.isn) & U32_MASK


def delivered(kcp: Kcp) -> int:
    """Segments of ``kcp`` acknowledged so far: every sn given out minus those still in flight
    (u32 sequence numbers; a conversation never wraps them within one model's life)."""
    return sent(kcp) - kcp.snd_buf_segments


def steer(model: RateModel, allowance: Allowance, kcp: Kcp, now: int) -> None:
    """Update ``model`` from ``kcp``; set the engine's in-flight cap (the model's, and no more
    new segments than the pacing rate lets out by the next flush) and its minimum RTO."""
    busy = kcp.snd_queue_segments > 0
    model.update(now, delivered(kcp), kcp.rx_srtt, busy)
    cap = model.cap()
    room = allowance.room(now, sent(kcp), model.pacing_rate(), kcp.interval)
    if room is not None:
        cap = min(cap, kcp.snd_buf_segments + room)
    kcp.inflight_cap = cap
    kcp.rx_minrto = kcp.config_minrto
    if busy and model.min_rtt is not None:
        # A sender that fills its cap lets the queue grow the RTT to CWND_GAIN x its minimum:
        # a timeout before that is spurious (a fast retransmission repairs a real loss
        # sooner). A request or a keystroke fills no queue: its RTO stays the engine's.
        floor = math.ceil(CWND_GAIN * model.min_rtt) + kcp.interval
        kcp.rx_minrto = max(kcp.config_minrto, floor)
