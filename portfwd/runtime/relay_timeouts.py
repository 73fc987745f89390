"""--idle-timeout and --half-close-timeout of a TCP relay (tcpfwd's relays, kcptcp-client's and
kcptcp-server's conversations), on libev timers in the hub.

The pumps stay as they are: a timeout calls the relay's ``expire(reason)`` in the hub, which
must not block (tcpfwd shuts both sockets down, which wakes each pump with EOF or an error;
kcptcp aborts its conversation from a new greenlet), and the relay ends as after any other
error.

Cost on the short-connection path: every relay becomes half-closed for a moment (one
direction ends first), so the half-close timeout must be cheap to arm and disarm. One sweeper
per forwarder holds the half-closed relays in arrival order (one timeout for all, so that is
deadline order) and one timer checks the oldest: a dict insert and a pop per connection, no
timer object per relay. The idle timeout, when asked for, does take a timer per relay.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gevent import get_hub

from portfwd.runtime.options import Options

MAX_TIMEOUT = 7 * 86400  # s: bound of --idle-timeout and --half-close-timeout
HALF_CLOSE_TIMEOUT = 60  # s: --half-close-timeout default
SWEEP_MAX = 1.0  # s between two sweeps at most (a relay closes at most this late)
SWEEP_MIN = 0.05  # s


@dataclass(frozen=True)
class RelayLimits:
    """Timeouts of one relay (0 = none)."""

    idle_timeout: float = 0.0  # s without a byte either way before both sides are closed
    half_close_timeout: float = float(HALF_CLOSE_TIMEOUT)  # s the other direction gets after
    # one direction ended


def relay_limits(options: Options) -> RelayLimits:
    """``idle_timeout`` and ``half_close_timeout`` (--idle-timeout, --half-close-timeout)."""
    return RelayLimits(
        idle_timeout=float(options.integer("idle_timeout", 0, MAX_TIMEOUT, 0)),
        half_close_timeout=float(options.integer("half_close_timeout", 0, MAX_TIMEOUT,
                                                 HALF_CLOSE_TIMEOUT)))


class Expirable(Protocol):
    def expire(self, reason: str) -> None: ...


class HalfCloseSweeper:
    """Closes relays that stayed half-closed for ``timeout`` seconds."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.every = min(SWEEP_MAX, max(SWEEP_MIN, timeout / 4))
        self.waiting: dict[Expirable, float] = {}  # relay -> deadline (s, monotonic), in order
        self.timer = None

    def add(self, relay: Expirable) -> None:
        self.waiting[relay] = time.monotonic() + self.timeout
        if self.timer is None:
            self.timer = get_hub().loop.timer(self.every, self.every)
            self.timer.start(self._sweep)

    def discard(self, relay: Expirable) -> None:
        self.waiting.pop(relay, None)

    def _sweep(self) -> None:
        now, waiting = time.monotonic(), self.waiting
        while waiting:
            relay, deadline = next(iter(waiting.items()))
            if deadline > now:
                return
            del waiting[relay]
            relay.expire("half-close timeout")
        self.timer.stop()
        self.timer.close()
        self.timer = None


class IdleTimer:
    """One relay's --idle-timeout: checked a few times per period instead of re-armed per read
    (the pumps only count bytes), so a relay closes within 1.25x the timeout."""

    __slots__ = ("timeout", "timer", "seen", "quiet_since", "relay", "moved")

    def __init__(self, relay: Expirable, timeout: float, moved) -> None:
        self.relay = relay
        self.timeout = timeout
        self.moved = moved  # () -> bytes moved both ways so far
        self.seen = 0
        self.quiet_since = time.monotonic()
        every = max(SWEEP_MIN, timeout / 4)
        self.timer = get_hub().loop.timer(every, every)
        self.timer.start(self._check)

    def _check(self) -> None:
        moved, now = self.moved(), time.monotonic()
        if moved != self.seen:
            self.seen, self.quiet_since = moved, now
        elif now - self.quiet_since >= self.timeout:
            self.stop()
            self.relay.expire("idle timeout")

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.stop()
            self.timer.close()
            self.timer = None


def arm(relay: Any, limits: RelayLimits, sweeper: HalfCloseSweeper | None,
        moved: Callable[[], int]) -> IdleTimer | None:
    """Arm a tunnel conversation's --idle-timeout (now) and --half-close-timeout (from its
    ``half_closed`` hook, called when a direction ends); the idle timer gives way once a
    direction is over, as in tcpfwd. kcptcp-client and kcptcp-server both use it; the caller
    stops the returned timer and discards ``relay`` from the sweeper when the relay ends."""
    idle = IdleTimer(relay, limits.idle_timeout, moved) if limits.idle_timeout else None
    if sweeper is not None:
        def half_closed() -> None:
            if idle is not None:
                idle.stop()
            sweeper.add(relay)
        relay.half_closed = half_closed
    return idle
