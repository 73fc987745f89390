"""Pacing of a conversation's datagrams, sans-IO: a burst spread out so a drop-tail queue keeps up.

KCP sends whatever its window allows at each flush, so a window that opens at once (a batch of
acks after the process waited for a CPU, a round of retransmissions, the first flush) leaves as
one burst at the speed of the local machine. A drop-tail queue at a slower bottleneck takes the
burst only up to its size and drops the rest, and those drops cost a retransmission round each.
The pacer sends at most ``gain`` x the window per smoothed RTT (BBR's pacing gain, RFC 9002
section 7.7: pace at a multiple of cwnd / smoothed_rtt, with a small burst allowance), which is
faster than the window can drain, so pacing never lowers what the window allows; it only
removes the bursts.

Token bucket in bytes: tokens accrue at ``rate`` (bytes per ms) up to a burst of BURST_MS at the
rate (at least MIN_BURST_BYTES); a datagram leaves while tokens are positive and takes its size
from them (they may go below zero by one datagram). Before the first RTT sample nothing is held.
Nothing is ever dropped here: beyond MAX_HELD datagrams held, the pacer lets them all go.

No clock is read here: ``now`` (ms) comes in as an argument.
"""

from __future__ import annotations

import collections
import math

from .engine import Kcp

PACING_GAIN = 1.5  # x window / srtt: above what the window can drain, so it only removes bursts
BURST_MS = 2  # ms at the rate that may leave back to back (a timer's granularity is ~1 ms)
MIN_BURST_BYTES = 16 * 1500  # bytes: small windows still leave in a few packets' bursts
MAX_HELD = 4096  # datagrams held at most: a bound, not a drop (beyond it they all go)


def window_rate(window: int, mtu: int, srtt_ms: int, gain: float = PACING_GAIN) -> float | None:
    """Bytes per ms for ``window`` segments of ``mtu`` bytes per ``srtt_ms`` x ``gain``; None
    (do not pace) before the first RTT sample."""
    if srtt_ms <= 0 or window <= 0:
        return None
    return gain * window * mtu / srtt_ms


class Pacer:
    """Holds datagrams and lets them out at :attr:`rate`; :meth:`get_timer` says when next."""

    def __init__(self) -> None:
        self.rate: float | None = None  # bytes per ms; None: not paced (everything goes)
        self._held: collections.deque[bytes] = collections.deque()
        self._tokens = 0.0  # bytes that may leave now
        self._last = 0  # ms the tokens were last brought up to date
        self.paced = 0  # datagrams that had to wait (at least one at a time)
        self.overflows = 0  # times MAX_HELD was reached and everything held went at once

    @property
    def held(self) -> int:
        """Datagrams waiting."""
        return len(self._held)

    def _burst(self) -> float:
        return max(MIN_BURST_BYTES, BURST_MS * self.rate) if self.rate else 0.0

    def _refill(self, now: int) -> None:
        if self.rate is not None and now > self._last:
            self._tokens = min(self._burst(), self._tokens + (now - self._last) * self.rate)
        self._last = max(self._last, now)

    def send(self, datagrams: list[bytes], rate: float | None, now: int) -> list[bytes]:
        """Queue ``datagrams`` behind those held and set the rate (None: unpaced); what may
        leave now, in order."""
        self._refill(now)
        starting = rate is not None and self.rate is None
        self.rate = rate
        if starting:  # paced from now on: a full burst may leave at once
            self._tokens = max(self._tokens, self._burst())
        if rate is None and not self._held:
            return datagrams  # not paced (yet): nothing to hold
        self._held.extend(datagrams)
        out = self.release(now)
        self.paced += min(len(datagrams), len(self._held))  # of these, the ones still waiting
        return out

    def release(self, now: int) -> list[bytes]:
        """The held datagrams that may leave now."""
        self._refill(now)
        held = self._held
        if self.rate is None or len(held) > MAX_HELD:
            if len(held) > MAX_HELD:
                self.overflows += 1
            out = list(held)
            held.clear()
            return out
        out = []
        tokens = self._tokens
        while held and tokens > 0:
            datagram = held.popleft()
            tokens -= len(datagram)
            out.append(datagram)
        self._tokens = tokens
        return out

    def get_timer(self) -> int | None:
        """Absolute ms at which the next held datagram may leave, or None (nothing held)."""
        if not self._held or self.rate is None:
            return None
        return self._last + max(1, math.ceil((1 - self._tokens) / self.rate))


def kcp_rate(kcp: Kcp, gain: float = PACING_GAIN) -> float | None:
    """The pacing rate of one KCP engine: its sending window (the congestion window too unless
    ``nc``) of MTU-sized datagrams per smoothed RTT, x ``gain``; bytes per ms, or None."""
    window = min(kcp.snd_wnd, kcp.rmt_wnd)
    if not kcp.nocwnd:
        window = min(window, kcp.cwnd)
    return window_rate(window, kcp.mtu, kcp.rx_srtt, gain)
