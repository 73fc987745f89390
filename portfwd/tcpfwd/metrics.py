"""tcpfwd's counters and their snapshot.

Cost on the hot path (short connections cost ~190 us of CPU each): a relay enters the live set
when it starts and leaves it when it closes, adding its byte counts to the totals then. That
is a set add, a set discard and three integer additions per connection (well under 1 us); the
pumps keep counting into their own relay's counters only. A snapshot adds the live relays'
current counts, so bytes of long transfers show up while they run. Everything else here is
counted on error paths.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from portfwd.runtime.admission import Gate, refusal_families
from portfwd.runtime.exporter import TOP, Families, Labels, RuleKind
from portfwd.runtime.metrics import ErrorCounts, format_counts
from portfwd.runtime.upstream import Upstreams, upstream_families


@dataclass(frozen=True)
class ConnectionEntry:
    """One live connection, for the status dump's top list."""

    conn_id: int  # the number of its "conn N open" line
    bytes_up: int  # so far
    bytes_down: int
    age: float  # s since it opened


@dataclass(frozen=True)
class TcpMetrics:
    """What a :class:`~portfwd.tcpfwd.forwarder.TcpForwarder` has done since it started."""

    accepted: int  # connections accepted from clients
    connections_opened: int  # relays started (the destination answered; a client that reset
    # before its dial counts here too, as a failed one)
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
    connections_failed: int = 0  # of the closed ones, ended by a socket error
    # The live connections that moved most, largest first (their ages change by the moment:
    # not part of a snapshot's equality).
    top: tuple[ConnectionEntry, ...] = field(default=(), compare=False)


class TcpCounters:
    """The forwarder's running counts; :meth:`snapshot` turns them into :class:`TcpMetrics`."""

    __slots__ = ("live", "closed", "reset", "failed", "bytes_up", "bytes_down",
                 "dial_failures", "no_destination", "idle_timeouts", "half_close_timeouts")

    def __init__(self) -> None:
        self.live: set[Any] = set()  # running Relays (whose ``up``/``down`` counters grow)
        self.closed = 0
        self.reset = 0
        self.failed = 0
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
            connections_failed=self.failed,
            top=top_connections(live),
        )


def top_connections(live: set[Any]) -> tuple[ConnectionEntry, ...]:
    """The TOP live relays by bytes moved (one pass; a snapshot with 10,000 live is ~ms)."""
    now = time.monotonic()
    biggest = heapq.nlargest(TOP, live, key=lambda relay: relay.up.moved + relay.down.moved)
    return tuple(ConnectionEntry(relay.conn_id, relay.up.moved, relay.down.moved,
                                 now - relay.started) for relay in biggest)


# --- export: Prometheus families, the SIGUSR1 lines, systemd's STATUS= ------------------------

def families(out: Families, labels: Labels, m: TcpMetrics) -> None:
    out.counter("connections_accepted", "TCP connections accepted from clients", m.accepted,
                labels)
    out.counter("connections_opened", "Connections relayed (the destination answered, or "
                "the client reset before its dial: closed by error)",
                m.connections_opened, labels)
    out.gauge("connections_active", "Connections being relayed now", m.connections_active,
              labels)
    closed = {"ended": m.connections_closed - m.connections_reset - m.connections_failed,
              "error": m.connections_failed, "reset": m.connections_reset}
    out.counters_by("connections_closed", "Relayed connections over, by reason (ended: both "
                    "sides closed; error: a socket error; reset: cut at shutdown)", "reason",
                    closed, labels)
    out.counter("bytes", "Bytes relayed (up: client to destination)", m.bytes_up,
                {**labels, "direction": "up"})
    out.counter("bytes", "Bytes relayed (up: client to destination)", m.bytes_down,
                {**labels, "direction": "down"})
    dial = dict(m.dial_failures)
    if m.no_destination:
        dial["no_destination"] = m.no_destination
    out.counters_by("dial_failures", "Connects to the destination that failed, by errno",
                    "reason", dial, labels)
    out.counters_by("accept_errors", "Failed accept() calls on the listener, by errno",
                    "reason", m.accept_errors, labels)
    refusal_families(out, labels, m)
    out.counters_by("relays_timed_out", "Relays closed by a timeout (idle: --idle-timeout; "
                    "half_close: --half-close-timeout)", "reason",
                    {"idle": m.idle_timeouts, "half_close": m.half_close_timeouts}, labels)
    upstream_families(out, labels, m)


def status(m: TcpMetrics) -> list[str]:
    lines = [f"{m.connections_active} active, {m.connections_opened} opened, "
             f"{m.connections_closed} closed ({m.connections_failed} by error, "
             f"{m.connections_reset} reset); {m.accepted} accepted; {m.bytes_up} bytes up, "
             f"{m.bytes_down} down; dial failures {format_counts(m.dial_failures)}, "
             f"{m.no_destination} without destination; accept errors "
             f"{format_counts(m.accept_errors)}"]
    lines += [f"top conn {c.conn_id}: {c.bytes_up} bytes up, {c.bytes_down} down, {c.age:.0f} s"
              for c in m.top]
    return lines


def summary(m: TcpMetrics) -> str:
    return f"{m.connections_active} connections, {m.connections_opened} opened"


KIND = RuleKind("tcp", families, status, summary)
