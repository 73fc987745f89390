"""tcpfwd's counters and their snapshot.

Cost on the hot path (short connections cost ~190 us of CPU each): a relay enters the live set
when it starts and leaves it when it closes, adding its byte counts to the totals then. That
is a set add, a set discard and three integer additions per connection (well under 1 us); the
pumps keep counting into their own relay's counters only. A snapshot adds the live relays'
current counts, so bytes of long transfers show up while they run. Everything else here is
counted on error paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from portfwd.runtime.admission import Gate
from portfwd.runtime.metrics import ErrorCounts
from portfwd.runtime.upstream import Upstreams


@dataclass(frozen=True)
class TcpMetrics:
    """What a :class:`~portfwd.tcpfwd.forwarder.TcpForwarder` has done since it started."""

    accepted: int  # connections accepted from clients
    connections_opened: int  # relays started (the destination answered)
    connections_active: int  # relays still running
    connections_closed: int  # relays over (ended, failed or cut)
    connections_reset: int  # of those, cut with RST when the drain period ran out
    bytes_up: int  # client -> destination, closed and live relays together
    bytes_down: int  # destination -> client
    dial_failures: Mapping[str, int]  # connects to the destination that failed, by errno name
    no_destination: int  # -b: no destination address could be computed for the connection
    accept_errors: Mapping[str, int]  # failed accept() calls on the listener, by errno name
    denied: int = 0  # connections refused by --allow/--deny (before any dial)
    over_limit: int = 0  # connections closed at once because --max-conns were open
    proxy_rejected: int = 0  # --accept-proxy: header missing, malformed, late or untrusted
    idle_timeouts: int = 0  # relays closed by --idle-timeout
    half_close_timeouts: int = 0  # relays closed by --half-close-timeout
    destinations_down: int = 0  # times a destination was put down after --max-fails failures
    lookups_failed: int = 0  # background re-resolutions that failed (the last answer kept)


class TcpCounters:
    """The forwarder's running counts; :meth:`snapshot` turns them into :class:`TcpMetrics`."""

    __slots__ = ("live", "closed", "reset", "bytes_up", "bytes_down", "dial_failures",
                 "no_destination", "idle_timeouts", "half_close_timeouts")

    def __init__(self) -> None:
        self.live: set[Any] = set()  # running Relays (whose ``up``/``down`` counters grow)
        self.closed = 0
        self.reset = 0
        self.bytes_up = 0  # of closed relays; live ones are added at snapshot time
        self.bytes_down = 0
        self.dial_failures = ErrorCounts()
        self.no_destination = 0
        self.idle_timeouts = 0
        self.half_close_timeouts = 0

    def snapshot(self, accepted: int, accept_errors: ErrorCounts, gate: Gate,
                 upstreams: Upstreams) -> TcpMetrics:
        live = self.live
        return TcpMetrics(
            accepted=accepted,
            connections_opened=self.closed + len(live),
            connections_active=len(live),
            connections_closed=self.closed,
            connections_reset=self.reset,
            bytes_up=self.bytes_up + sum(relay.up.moved for relay in live),
            bytes_down=self.bytes_down + sum(relay.down.moved for relay in live),
            dial_failures=self.dial_failures.snapshot(),
            no_destination=self.no_destination,
            accept_errors=accept_errors.snapshot(),
            denied=gate.denied,
            over_limit=gate.over_limit,
            proxy_rejected=gate.proxy_rejected,
            idle_timeouts=self.idle_timeouts,
            half_close_timeouts=self.half_close_timeouts,
            destinations_down=upstreams.marked_down,
            lookups_failed=upstreams.lookups_failed,
        )
