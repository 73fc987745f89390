"""Choosing where a connection goes: several destinations, failover, round robin, the
re-resolution cache and Happy Eyeballs, all on a clock the caller passes in.

Glossary: a *destination* is one configured ``host:port`` (``--balance`` picks among them); an
*address* is one of the IPs its name resolves to (Happy Eyeballs races them). A destination is
*down* from its ``max_fails``-th consecutive failure until ``fail_timeout`` seconds later
(nginx's ``max_fails``/``fail_timeout``); then it is tried again, and a success clears it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

TTL_FLOOR = 30.0  # s: a name is not re-resolved sooner, whatever its TTL says
RETRY_AFTER_FAILURE = 5.0  # s before a failed lookup is tried again (the last answer is kept)
ATTEMPT_DELAY = 0.25  # s between two connection attempts (RFC 8305 section 5, the default)


class Balance(str, enum.Enum):
    """``--balance``."""

    FIRST = "first"  # the first live destination, in the order given
    ROUNDROBIN = "roundrobin"  # live destinations in turn


class DestinationSelector:
    """Which destinations to try for one connection, and in what order."""

    def __init__(self, count: int, balance: Balance = Balance.FIRST, max_fails: int = 1,
                 fail_timeout: float = 10.0) -> None:
        if count < 1 or max_fails < 1 or fail_timeout < 0:
            raise ValueError("need count >= 1, max_fails >= 1, fail_timeout >= 0")
        self.count = count
        self.balance = balance
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self.fails = [0] * count  # consecutive failures since the last success or down period
        self.down_until = [0.0] * count  # s (caller's clock): skipped before this instant
        self._next = 0  # round robin: the destination to start from next time

    def is_down(self, index: int, now: float) -> bool:
        return now < self.down_until[index]

    def order(self, now: float) -> list[int]:
        """Destinations to try, best first: the live ones (from the round-robin position with
        ``roundrobin``). When every one is down they are all tried anyway: refusing every client
        for ``fail_timeout`` seconds would be worse than one more failed attempt per target."""
        indexes = list(range(self.count))
        if self.balance == Balance.ROUNDROBIN:
            start = self._next
            self._next = (start + 1) % self.count
            indexes = indexes[start:] + indexes[:start]
        live = [i for i in indexes if not self.is_down(i, now)]
        return live or indexes

    def failed(self, index: int, now: float) -> bool:
        """Count a failed connect; True when that put the destination down."""
        self.fails[index] += 1
        if self.fails[index] < self.max_fails:
            return False
        self.fails[index] = 0
        self.down_until[index] = now + self.fail_timeout
        return True

    def succeeded(self, index: int) -> None:
        self.fails[index] = 0
        self.down_until[index] = 0.0


class NameCache(Generic[T]):
    """The addresses of one destination name, re-resolved when their lifetime runs out.

    The driver asks :meth:`due` on every use; when it says so it starts one lookup in the
    background (:meth:`begin`) and goes on with the current answer, so a slow resolver never
    delays a connection. A failed lookup keeps the last good answer (and retries sooner).
    """

    def __init__(self, addresses: Sequence[T], now: float, ttl: float | None = None,
                 floor: float = TTL_FLOOR) -> None:
        self.floor = floor
        self.addresses: tuple[T, ...] = tuple(addresses)
        self.expires = now + self._lifetime(ttl)
        self.resolving = False
        self.failures = 0  # lookups that failed in a row

    def _lifetime(self, ttl: float | None) -> float:
        return max(ttl or 0.0, self.floor)

    def due(self, now: float) -> bool:
        return not self.resolving and now >= self.expires

    def begin(self) -> None:
        self.resolving = True

    def update(self, addresses: Sequence[T], now: float, ttl: float | None = None) -> bool:
        """A lookup answered; True when the addresses changed. An empty answer is a failure."""
        if not addresses:
            self.fail(now)
            return False
        self.resolving = False
        self.failures = 0
        changed = tuple(addresses) != self.addresses
        self.addresses = tuple(addresses)
        self.expires = now + self._lifetime(ttl)
        return changed

    def fail(self, now: float) -> None:
        self.resolving = False
        self.failures += 1
        self.expires = now + min(RETRY_AFTER_FAILURE, self.floor)


def happy_eyeballs_order(addresses: Sequence[T], is_ipv6: Callable[[T], bool]) -> list[T]:
    """RFC 8305 section 4: interleave the families, IPv6 first, each family in the resolver's
    order (which already follows RFC 6724)."""
    v6 = [a for a in addresses if is_ipv6(a)]
    v4 = [a for a in addresses if not is_ipv6(a)]
    out: list[T] = []
    for i in range(max(len(v6), len(v4))):
        out.extend(family[i] for family in (v6, v4) if i < len(family))
    return out


class Attempts:
    """When to start each connection attempt of a Happy Eyeballs race (RFC 8305 section 5):
    the first at once, each next one ``delay`` after the previous started, or at once when
    every running attempt has failed. The first attempt to connect wins (the driver cancels
    the others)."""

    def __init__(self, count: int, now: float, delay: float = ATTEMPT_DELAY) -> None:
        self.count = count
        self.delay = delay
        self.started = 0  # attempts started so far: indexes 0 .. started-1
        self.running: set[int] = set()
        self.next_at = now  # when the next attempt may start

    def due(self, now: float) -> list[int]:
        """The attempts to start now (at most one, unless some failed meanwhile)."""
        out = []
        while self.started < self.count and now >= self.next_at:
            out.append(self.started)
            self.running.add(self.started)
            self.started += 1
            self.next_at = now + self.delay
        return out

    def failed(self, index: int, now: float) -> None:
        self.running.discard(index)
        if not self.running:
            self.next_at = now

    def timer(self) -> float | None:
        """The instant the next attempt is due, or None when all have started."""
        return self.next_at if self.started < self.count else None

    @property
    def exhausted(self) -> bool:
        """Every attempt started and failed."""
        return self.started >= self.count and not self.running
