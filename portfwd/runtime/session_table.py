"""The UDP session table: an LRU map with idle expiry and a size cap, sans-IO.

Seed "UDP connection tracking and eviction": entries expire after ``-t`` seconds of
inactivity and, at the cap, timed-out entries are recycled first, then the least recently
active one is evicted. Here that is one ``OrderedDict`` kept in activity order (least recently
active first, most recently active last):

* ``touch``/``get`` move an entry to the end: O(1) per datagram;
* ``expire(now)`` walks from the oldest end and stops at the first live entry, so a sweep
  costs O(expired + 1), never O(table) -- the order *is* the expiry order because every
  touch both refreshes the timestamp and moves the entry to the end;
* ``add`` at the cap pops the oldest entry; if it had already timed out it is reported as
  expired, else as evicted.

The table never reads a clock or touches a socket: ``now`` (seconds, monotonic) comes in as an
argument and removed values go out as return values for the caller to close. That keeps it
testable on a virtual clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

DEFAULT_MAX_SESSIONS = 8192  # entries; seed UDP_PROXY_MAX_CONNS
DEFAULT_IDLE_TIMEOUT = 60.0  # s; seed udpfwd -t default
NEVER = 0.0  # idle timeout meaning "sessions never expire" (-t 0)


class _Entry(Generic[V]):
    """One slot: the caller's value and when it was last active."""

    __slots__ = ("value", "last_active")

    def __init__(self, value: V, last_active: float) -> None:
        self.value = value
        self.last_active = last_active  # s, the caller's monotonic clock


class SessionTable(Generic[K, V]):
    """LRU map ``key -> value`` with idle expiry (``idle_timeout`` s, 0 = never) and a cap."""

    def __init__(self, capacity: int = DEFAULT_MAX_SESSIONS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if idle_timeout < 0:
            raise ValueError(f"idle_timeout must be >= 0, got {idle_timeout}")
        self.capacity = capacity
        self.idle_timeout = idle_timeout
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self.expired = 0  # entries removed for idleness, cumulative
        self.evicted = 0  # live entries removed to make room at the cap, cumulative
        self.last_sweep_visited = 0  # entries looked at by the last expire() (cost probe)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently active first."""
        return iter(self._entries)

    def get(self, key: K, now: float) -> V | None:
        """The value for ``key``, marked active at ``now``; None when absent."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.last_active = now
        self._entries.move_to_end(key)
        return entry.value

    def touch(self, key: K, now: float) -> bool:
        """Mark ``key`` active at ``now``; False when it is not (or no longer) in the table."""
        return self.get(key, now) is not None

    def add(self, key: K, value: V, now: float) -> list[tuple[K, V, bool]]:
        """Insert a new entry; returns what had to go to make room: ``(key, value, was_live)``.

        ``was_live`` False means the entry had timed out anyway (recycled, counted as
        expired); True means a live entry was evicted. Raises KeyError if ``key`` exists:
        replacing a session silently would leak its socket.
        """
        if key in self._entries:
            raise KeyError(f"{key!r} is already in the table")
        removed: list[tuple[K, V, bool]] = []
        while len(self._entries) >= self.capacity:
            old_key, old = self._entries.popitem(last=False)
            live = not self._is_idle(old, now)
            if live:
                self.evicted += 1
            else:
                self.expired += 1
            removed.append((old_key, old.value, live))
        self._entries[key] = _Entry(value, now)
        return removed

    def pop(self, key: K) -> V | None:
        """Remove ``key`` (its session ended by itself); its value, or None if absent."""
        entry = self._entries.pop(key, None)
        return None if entry is None else entry.value

    def expire(self, now: float, limit: int | None = None) -> list[tuple[K, V]]:
        """Remove entries idle for at least ``idle_timeout`` at ``now``, oldest first.

        Stops at the first live entry (everything after it is younger), or after ``limit``
        removals so one sweep cannot stall the event loop; call again to continue.
        """
        removed: list[tuple[K, V]] = []
        self.last_sweep_visited = 0
        if self.idle_timeout == NEVER:
            return removed
        entries = self._entries
        while entries and (limit is None or len(removed) < limit):
            key = next(iter(entries))
            entry = entries[key]
            self.last_sweep_visited += 1
            if not self._is_idle(entry, now):
                break
            del entries[key]
            removed.append((key, entry.value))
        self.expired += len(removed)
        return removed

    def clear(self) -> list[tuple[K, V]]:
        """Remove everything (shutdown); the caller closes the values."""
        items = [(key, entry.value) for key, entry in self._entries.items()]
        self._entries.clear()
        return items

    def _is_idle(self, entry: _Entry[V], now: float) -> bool:
        return self.idle_timeout != NEVER and now - entry.last_active >= self.idle_timeout
