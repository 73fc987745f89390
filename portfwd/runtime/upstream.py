"""Dialling a rule's destinations: several of them (``--balance``, ``--max-fails``,
``--fail-timeout``), names re-resolved in the background, Happy Eyeballs across a name's
addresses. The decisions are :mod:`portfwd.policy.destinations`' (sans-IO, tested on a virtual
clock); this is their gevent driver.

Fields read by :func:`upstream_config`: ``balance``, ``max_fails``, ``fail_timeout``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.queue

from portfwd.policy.destinations import (
    Attempts,
    Balance,
    DestinationSelector,
    NameCache,
    happy_eyeballs_order,
)
from portfwd.runtime.addr import AddressError, HostPort, Resolved, is_literal, resolve_all, usable
from portfwd.runtime.exporter import Families, Labels
from portfwd.runtime.logs import RateLimitedLog
from portfwd.runtime.options import ConfigError, Options
from portfwd.runtime.sockets import dial_tcp

log = logging.getLogger(__name__)

MAX_FAIL_TIMEOUT = 86400  # s


@dataclass(frozen=True)
class Destination:
    """One configured ``host:port`` and what it resolved to at start."""

    endpoint: HostPort
    addresses: tuple[Resolved, ...]

    def __str__(self) -> str:
        return str(self.endpoint)


@dataclass(frozen=True)
class Balancing:
    """How a connection picks among several destinations."""

    balance: Balance = Balance.FIRST  # --balance
    max_fails: int = 1  # --max-fails: failed connects in a row that put a destination down
    fail_timeout: float = 10.0  # --fail-timeout: s a down destination is skipped


def destinations_config(options: Options, name: str) -> tuple[Destination, ...]:
    """Every ``host:port`` of field ``name`` (repeatable), each resolved once now."""
    out = []
    for endpoint in options.endpoints(name):
        try:
            out.append(Destination(endpoint, resolve_all(endpoint, socket.SOCK_STREAM)))
        except AddressError as exc:
            raise ConfigError(name, str(exc)) from None
    return tuple(out)


def upstream_config(options: Options) -> Balancing:
    balance = options.choice("balance", tuple(b.value for b in Balance), Balance.FIRST.value)
    return Balancing(balance=Balance(balance),
                     max_fails=options.integer("max_fails", 1, 1000, 1),
                     fail_timeout=float(options.integer("fail_timeout", 0, MAX_FAIL_TIMEOUT, 10)))


class Upstreams:
    """The destinations of one rule and their health; :meth:`dial` connects to one."""

    def __init__(self, destinations: Sequence[Destination], balancing: Balancing,
                 connect_timeout: float) -> None:
        self.destinations = tuple(destinations)
        self.connect_timeout = connect_timeout
        self.selector = DestinationSelector(len(self.destinations), balancing.balance,
                                            balancing.max_fails, balancing.fail_timeout)
        now = time.monotonic()
        # Literal addresses never change: no cache, no lookups.
        self.caches: list[NameCache[Resolved] | None] = [
            None if is_literal(d.endpoint.host) else NameCache(d.addresses, now)
            for d in self.destinations]
        # The one address when there is nothing to choose (the fast path), else None.
        self.single: Resolved | None = None
        if len(self.destinations) == 1 and self.caches[0] is None:
            addresses = self.destinations[0].addresses
            if len(addresses) == 1:
                self.single = addresses[0]
        self.marked_down = 0  # times a destination was put down after --max-fails failures
        self.lookups_failed = 0  # background re-resolutions that failed (last answer kept)
        self._faults = RateLimitedLog(log)

    def addresses(self, index: int) -> tuple[Resolved, ...]:
        cache = self.caches[index]
        return self.destinations[index].addresses if cache is None else cache.addresses

    def dial(self) -> tuple[socket.socket, Resolved]:
        """A connected socket to the first destination that answers, in ``--balance`` order
        (one literal address: dialled directly, never put down). Raises the last OSError when
        none does."""
        single = self.single
        if single is not None:
            return dial_tcp(single, self.connect_timeout), single
        now = time.monotonic()
        error: OSError | None = None
        for index in self.selector.order(now):
            self._refresh(index, now)
            try:
                found = dial_any(self.addresses(index), self.connect_timeout)
            except OSError as exc:
                error = exc
                if self.selector.failed(index, time.monotonic()):
                    self.marked_down += 1
                    self._faults.warning(f"down {index}", "destination %s down for %g s: %s",
                                         self.destinations[index],
                                         self.selector.fail_timeout, exc.strerror or exc)
                continue
            self.selector.succeeded(index)
            return found
        assert error is not None
        raise error

    def _refresh(self, index: int, now: float) -> None:
        cache = self.caches[index]
        if cache is not None and cache.due(now):
            cache.begin()
            gevent.spawn(self._resolve, index, cache)

    def _resolve(self, index: int, cache: NameCache[Resolved]) -> None:
        """One background lookup through gevent's resolver (its threadpool or c-ares: the hub
        never waits for DNS)."""
        endpoint = self.destinations[index].endpoint
        try:
            infos = gevent.get_hub().resolver.getaddrinfo(endpoint.host, endpoint.port, 0,
                                                           socket.SOCK_STREAM)
            found = usable(infos, socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            found, reason = (), str(exc)
        else:
            reason = "no IPv4 or IPv6 address"
        now = time.monotonic()
        if not found:
            cache.fail(now)
            self.lookups_failed += 1
            self._faults.warning(f"resolve {index}", "re-resolving %s failed (%s); keeping %s",
                                 endpoint, reason, ", ".join(map(str, cache.addresses)))
        elif cache.update(found, now):
            log.info("%s now resolves to %s", endpoint, ", ".join(map(str, found)))


def dial_any(addresses: Sequence[Resolved], timeout: float) -> tuple[socket.socket, Resolved]:
    """Connect to one of ``addresses``: the only one directly, several by Happy Eyeballs
    (RFC 8305: IPv6 first, families interleaved, the next attempt 250 ms after the previous
    or at once when it failed; the first to connect wins, the others are cancelled)."""
    if len(addresses) == 1:
        return dial_tcp(addresses[0], timeout), addresses[0]
    ordered = happy_eyeballs_order(addresses, lambda a: a.family == socket.AF_INET6)
    start = time.monotonic()
    deadline = start + timeout
    attempts = Attempts(len(ordered), start)
    results: gevent.queue.Queue = gevent.queue.Queue()
    running: list[gevent.Greenlet] = []
    error: OSError = TimeoutError("timed out")

    def attempt(index: int) -> None:
        try:
            results.put((index, dial_tcp(ordered[index], max(0.0, deadline - time.monotonic()))))
        except OSError as exc:
            results.put((index, exc))

    try:
        while True:
            now = time.monotonic()
            for index in attempts.due(now):
                running.append(gevent.spawn(attempt, index))
            if attempts.exhausted or now >= deadline:
                raise error
            wake = attempts.timer()
            wait = deadline - now if wake is None else min(wake, deadline) - now
            try:
                index, outcome = results.get(timeout=max(0.0, wait))
            except gevent.queue.Empty:
                continue
            if isinstance(outcome, OSError):
                error = outcome
                attempts.failed(index, time.monotonic())
                continue
            return outcome, ordered[index]
    finally:
        gevent.killall(running)  # a dial cut in its wait closes its own socket
        while not results.empty():  # one that connected after the winner
            _, outcome = results.get_nowait()
            if not isinstance(outcome, OSError):
                with contextlib.suppress(OSError):
                    outcome.close()


def upstream_families(out: Families, labels: Labels, m: Any) -> None:
    """The destinations' health (tcpfwd, kcptcp-server): ``destinations_down``,
    ``lookups_failed``."""
    out.counter("destinations_down", "Times a destination was skipped after --max-fails "
                "failures", m.destinations_down, labels)
    out.counter("lookups_failed", "Background re-resolutions of a destination name that failed "
                "(the last answer kept)", m.lookups_failed, labels)
