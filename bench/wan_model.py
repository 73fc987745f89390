"""The WAN emulator's link model, sans-IO: packets and ``now`` (seconds) in, packets out.

One ``Link`` is one direction of the emulated path. A packet offered to it goes through, in
this order (the order of a real path: loss happens on the wire, the queue sits at the
bottleneck router, propagation delay after it):

1. **random loss**: dropped with probability ``loss``;
2. **burst loss** (Gilbert–Elliott): a two-state chain stepped once per packet, good -> bad
   with probability ``p``, bad -> good with ``r``; in the bad state a packet is lost with
   probability ``bad_loss`` (mean loss ``p / (p + r) * bad_loss``, mean burst ``1 / r``);
3. **bottleneck**: a drop-tail queue of ``queue`` packets drained at ``rate_mbit``; a packet
   that finds the queue full is dropped (so bufferbloat and congestion loss exist);
4. **delay + jitter**: one-way ``delay_ms`` plus uniform ``± jitter_ms``; a packet never
   overtakes the one before it (jitter without reordering, as on one physical path) unless it
   is picked for **reordering** (probability ``reorder``): then it is held ``reorder_ms``
   more and may be overtaken.

All randomness comes from the ``random.Random`` given to the link (seeded by the caller).
Nothing here reads a clock or touches a file descriptor: ``bench/wan.py`` is the I/O.
"""

from __future__ import annotations

import collections
import heapq
import random
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Direction:
    """The settings of one direction of the path (0 everywhere: a perfect wire)."""

    delay_ms: float = 0.0  # ms, one-way propagation delay
    jitter_ms: float = 0.0  # ms, uniform ± added to the delay (never below 0)
    loss: float = 0.0  # probability of random (independent) loss per packet, 0..1
    burst_p: float = 0.0  # Gilbert–Elliott: P(good -> bad) per packet (0: no burst loss)
    burst_r: float = 1.0  # Gilbert–Elliott: P(bad -> good) per packet
    burst_loss: float = 1.0  # Gilbert–Elliott: P(loss) in the bad state
    rate_mbit: float = 0.0  # Mbit/s at the bottleneck (0: unlimited, no queue)
    queue: int = 1000  # packets the bottleneck queue holds (drop-tail)
    reorder: float = 0.0  # probability a packet is held back ``reorder_ms`` and overtaken
    reorder_ms: float = 5.0  # ms, the extra hold of a reordered packet

    def __post_init__(self) -> None:
        for name in ("loss", "burst_p", "burst_r", "burst_loss", "reorder"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1]")
        for name in ("delay_ms", "jitter_ms", "rate_mbit", "reorder_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.queue < 1:
            raise ValueError("queue must hold at least one packet")

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        parts = [f"{self.delay_ms:g} ms"]
        if self.jitter_ms:
            parts.append(f"± {self.jitter_ms:g} ms")
        if self.loss:
            parts.append(f"{100 * self.loss:g} % loss")
        if self.burst_p:
            parts.append(f"GE p={self.burst_p:g} r={self.burst_r:g} h={self.burst_loss:g}")
        if self.rate_mbit:
            parts.append(f"{self.rate_mbit:g} Mbit/s, queue {self.queue}")
        if self.reorder:
            parts.append(f"reorder {100 * self.reorder:g} %")
        return ", ".join(parts)


@dataclass
class LinkCounters:
    offered: int = 0  # packets given to the link
    lost_random: int = 0  # dropped by random loss
    lost_burst: int = 0  # dropped by the Gilbert–Elliott chain
    lost_queue: int = 0  # dropped by the full bottleneck queue (drop-tail)
    delivered: int = 0  # packets handed out by ``deliver``
    delivered_bytes: int = 0
    reordered: int = 0  # packets picked for reordering


class Link:
    """One direction of the path; see the module docstring for what happens to a packet."""

    def __init__(self, settings: Direction, rng: random.Random) -> None:
        self.settings = settings
        self.counters = LinkCounters()
        self._rng = rng
        self._bad = False  # Gilbert–Elliott state
        self._departures: collections.deque[float] = collections.deque()  # queued, s
        self._last_departure = 0.0  # s, when the bottleneck finishes its last accepted packet
        self._last_arrival = 0.0  # s, latest in-order arrival (no overtaking)
        self._in_flight: list[tuple[float, int, bytes]] = []  # heap (arrival, n, packet)
        self._n = 0

    def reconfigure(self, settings: Direction) -> None:
        """New settings from now on; packets already in flight keep their schedule."""
        self.settings = settings

    def _lost(self) -> bool:
        s, rng, c = self.settings, self._rng, self.counters
        if s.burst_p:
            if self._bad:
                self._bad = rng.random() >= s.burst_r
            else:
                self._bad = rng.random() < s.burst_p
            if self._bad and rng.random() < s.burst_loss:
                c.lost_burst += 1
                return True
        if s.loss and rng.random() < s.loss:
            c.lost_random += 1
            return True
        return False

    def offer(self, packet: bytes, now: float) -> None:
        """A packet enters this direction at ``now`` (s); it is dropped or scheduled."""
        s, c = self.settings, self.counters
        c.offered += 1
        if self._lost():
            return
        leave = now
        if s.rate_mbit:
            departures = self._departures
            while departures and departures[0] <= now:
                departures.popleft()
            if len(departures) >= s.queue:
                c.lost_queue += 1
                return
            leave = max(now, self._last_departure) + len(packet) * 8 / (s.rate_mbit * 1e6)
            self._last_departure = leave
            departures.append(leave)
        arrival = leave + s.delay_ms / 1000
        if s.jitter_ms:
            arrival = max(leave, arrival + self._rng.uniform(-s.jitter_ms, s.jitter_ms) / 1000)
        if s.reorder and self._rng.random() < s.reorder:
            c.reordered += 1
            arrival += s.reorder_ms / 1000  # held back; later packets may overtake it
        else:
            arrival = max(arrival, self._last_arrival)
            self._last_arrival = arrival
        self._n += 1
        heapq.heappush(self._in_flight, (arrival, self._n, packet))

    def next_deadline(self) -> float | None:
        """When (s) the next packet is due out, or None when nothing is in flight."""
        return self._in_flight[0][0] if self._in_flight else None

    def deliver(self, now: float) -> list[bytes]:
        """Every packet due at or before ``now``, in arrival order."""
        heap, out = self._in_flight, []
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[2])
        if out:
            self.counters.delivered += len(out)
            self.counters.delivered_bytes += sum(len(p) for p in out)
        return out

    @property
    def queued(self) -> int:
        """Packets in flight (queued at the bottleneck or propagating)."""
        return len(self._in_flight)
