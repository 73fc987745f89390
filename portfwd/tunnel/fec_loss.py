"""What an FEC receiver's loss is made of: bottleneck queue drops or random loss, sans-IO.

``--fec auto`` must protect against loss that parity can repair, and only that. A drop-tail
queue at a bottleneck drops packets when it is full, and it is full exactly when packets wait
longest in it; random loss (a noisy radio link, a lossy hop) strikes whatever the queueing delay.
Parity is useless against the first (more bytes into a full queue only lose more) and is what
repairs the second. So the receiver measures each group's *queueing delay* and estimates the
random loss from the groups that did not wait in a full queue (docs/PROTOCOL.md, "FEC"):

* An auto-mode sender stamps every SHARD with its clock (ms, u32). ``arrival - sent`` is the
  one-way delay plus the (unknown, constant) offset between the two clocks; its minimum over the
  last minute (BASE_BUCKET_MS x BASE_BUCKETS, LEDBAT-style, RFC 6817 section 3.4.2) is the
  delay with empty queues, and the *excess* over it is the queueing delay the group saw.
* A group is *queued* when its excess is at least QUEUED_FRACTION of the *high* excess (the
  90th percentile of recent groups', PEAK_QUANTILE) and at least QUEUED_MIN_MS: it crossed a
  queue that was (nearly) as full as it gets, where a drop-tail queue drops. A percentile, not
  the maximum: a receiver that waited for a CPU reads a burst of packets late, and one such
  stall must not lift the bar above a full queue's delay (every queue drop would pass as
  random). The percentile is never above the full queue's delay, so half of it is below.
* The random loss is the loss of the *clear* groups only, over the last LOSS_WINDOW datagrams
  they named. Random loss is independent of the queue, so leaving queued groups out does not
  bias it; queue drops only happen in queued groups, so they stay out of it. While the queue
  stays full (no clear group arrives) the estimate keeps its last value.

Glossary: *delay* is ``arrival - sent`` mod 2**32 (ms), *excess* is delay minus the base.
"""

from __future__ import annotations

import collections

BASE_BUCKET_MS = 10_000  # ms per bucket of the base (minimum) delay history
BASE_BUCKETS = 6  # buckets kept: the base follows a path change within a minute
PEAK_QUANTILE = 0.9  # the "high" excess: this quantile of the groups' (streaming estimate)
PEAK_STEP_MS = 1.0  # ms the estimate moves per group at most (Frugal-1U's step)
QUEUED_FRACTION = 0.5  # a group with excess >= this x the high excess crossed a full queue
QUEUED_MIN_MS = 2  # ms: less excess than this is timer noise, not a queue
LOSS_WINDOW = 2000  # datagrams each loss figure is averaged over (sliding)
_HALF = 1 << 31


class WindowedMinimum:
    """The minimum of samples over the last ``buckets`` buckets of ``bucket_ms``: O(1) per
    sample, and an old minimum ages out (RFC 6817's base delay history, in small)."""

    def __init__(self, bucket_ms: int, buckets: int) -> None:
        self._bucket_ms = bucket_ms
        self._buckets: collections.deque[tuple[int, int]] = collections.deque(maxlen=buckets)

    def add(self, value: int, now: int) -> None:
        start = now - now % self._bucket_ms
        buckets = self._buckets
        if buckets and buckets[-1][0] == start:
            if value < buckets[-1][1]:
                buckets[-1] = (start, value)
        else:
            buckets.append((start, value))

    def value(self, now: int) -> int | None:
        """The minimum of the buckets not older than the window, or None without samples."""
        horizon = now - self._bucket_ms * self._buckets.maxlen  # type: ignore[operator]
        values = [v for start, v in self._buckets if start > horizon]
        return min(values) if values else None


class StreamingQuantile:
    """A running estimate of the ``q`` quantile of a stream in O(1) memory (Frugal-1U, Ma,
    Muthukrishnan and Sandler 2013, deterministic steps): up ``step * q`` on a larger sample,
    down ``step * (1 - q)`` on a smaller one, so it settles where ``1 - q`` of them are larger."""

    def __init__(self, q: float, step: float) -> None:
        self._up = step * q
        self._down = step * (1 - q)
        self.value = 0.0

    def add(self, sample: float) -> None:
        if sample > self.value:
            self.value = min(sample, self.value + self._up)
        elif sample < self.value:
            self.value = max(sample, self.value - self._down)


class LossWindow:
    """Loss over the last LOSS_WINDOW datagrams of the groups added (sliding)."""

    def __init__(self, size: int = LOSS_WINDOW) -> None:
        self._size = size
        self._groups: collections.deque[tuple[int, int]] = collections.deque()  # (lost, total)
        self.lost = 0
        self.total = 0

    def add(self, lost: int, total: int) -> None:
        self._groups.append((lost, total))
        self.lost += lost
        self.total += total
        while self.total - self._groups[0][1] >= self._size:
            old_lost, old_total = self._groups.popleft()
            self.lost -= old_lost
            self.total -= old_total

    @property
    def loss(self) -> float:
        return self.lost / self.total if self.total else 0.0


class LossEstimator:
    """Per group: how many datagrams it lost and the delay its shard saw; out: the loss of all
    groups and the random part of it (what parity should cover)."""

    def __init__(self) -> None:
        self.all = LossWindow()  # every group measured
        self.clear = LossWindow()  # groups that crossed no full queue
        self._base = WindowedMinimum(BASE_BUCKET_MS, BASE_BUCKETS)
        self._high = StreamingQuantile(PEAK_QUANTILE, PEAK_STEP_MS)
        self._reference: int | None = None  # first delay: later ones are kept relative to it
        self.queued_groups = 0  # groups measured as having crossed a full queue
        self.queued_lost = 0  # datagrams those groups lost (mostly queue drops)

    def group(self, lost: int, total: int, delay: int | None, now: int) -> None:
        """A group's first shard arrived at ``now`` (ms): ``lost`` of its ``total`` datagrams are
        missing; ``delay`` is ``arrival - sent`` mod 2**32 (None: the sender did not stamp it,
        and the group counts as clear)."""
        self.all.add(lost, total)
        if delay is not None and self._queued(delay, now):
            self.queued_groups += 1
            self.queued_lost += lost
        else:
            self.clear.add(lost, total)

    def _queued(self, delay: int, now: int) -> bool:
        if self._reference is None:
            self._reference = delay
        # Relative to the first sample, as a signed number: the clocks' offset wraps anywhere.
        relative = ((delay - self._reference + _HALF) & 0xFFFFFFFF) - _HALF
        self._base.add(relative, now)
        base = self._base.value(now)
        excess = relative - base if base is not None else 0
        self._high.add(excess)
        return excess >= QUEUED_MIN_MS and excess >= QUEUED_FRACTION * self._high.value

    @property
    def loss(self) -> float:
        """Loss of every group measured (queue drops included), 0..1."""
        return self.all.loss

    @property
    def random_loss(self) -> float:
        """Loss of the groups that crossed no full queue: the part parity can repair, 0..1."""
        return self.clear.loss
