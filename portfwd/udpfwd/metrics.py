"""udpfwd's snapshot and the ``status:`` line rendered from it.

There are no per-session entries: sessions keep no counters of their own (the datagram path
counts into one forwarder-wide :class:`~portfwd.udpfwd.forwarder.Stats`), and a snapshot of
8192 session addresses every status interval would cost more than the line it feeds.
"""

from __future__ import annotations

from dataclasses import dataclass

from portfwd.runtime.exporter import Families, Labels, RuleKind


@dataclass(frozen=True)
class UdpMetrics:
    """What a :class:`~portfwd.udpfwd.forwarder.UdpForwarder` has done since it started."""

    sessions: int  # sessions open now
    opened: int  # sessions opened
    expired: int  # sessions closed for idleness (or recycled at the cap after timing out)
    evicted: int  # live sessions closed to make room at --max-sessions
    datagrams_up: int  # client -> destination, sent
    bytes_up: int
    datagrams_down: int  # destination -> client, sent
    bytes_down: int
    dropped_up: int  # lost: a socket queue was full or a session could not open
    dropped_down: int
    upstream_errors: int  # ICMP errors (refused, unreachable) reported on upstream sockets
    gso_sends: int  # sends that carried several datagrams (UDP GSO)
    kernel_drops: int = 0  # datagrams the kernel dropped on the listening socket (buffer full)
    denied: int = 0  # datagrams dropped before a session: the client is refused by --allow/--deny


def render_status(m: UdpMetrics) -> str:
    """The periodic ``status:`` line."""
    return (f"status: {m.sessions} sessions ({m.opened} opened, {m.expired} expired, "
            f"{m.evicted} evicted); up {m.datagrams_up} datagrams {m.bytes_up} bytes; "
            f"down {m.datagrams_down} datagrams {m.bytes_down} bytes; "
            f"dropped {m.dropped_up} up {m.dropped_down} down; "
            f"{m.upstream_errors} upstream errors; {m.gso_sends} GSO sends; "
            f"{m.kernel_drops} kernel drops")


# --- export: Prometheus families, the SIGUSR1 lines, systemd's STATUS= ------------------------

def families(out: Families, labels: Labels, m: UdpMetrics) -> None:
    up, down = {**labels, "direction": "up"}, {**labels, "direction": "down"}
    out.counter("sessions_opened", "UDP sessions opened (one per client address)", m.opened,
                labels)
    out.gauge("sessions_active", "UDP sessions open now", m.sessions, labels)
    out.counters_by("sessions_closed", "UDP sessions closed, by reason (expired: idle for -t; "
                    "evicted: the least recently active one at --max-sessions)", "reason",
                    {"expired": m.expired, "evicted": m.evicted}, labels)
    doc = "Datagrams forwarded (up: client to destination)"
    out.counter("datagrams", doc, m.datagrams_up, up)
    out.counter("datagrams", doc, m.datagrams_down, down)
    doc = "Bytes relayed (up: client to destination)"
    out.counter("bytes", doc, m.bytes_up, up)
    out.counter("bytes", doc, m.bytes_down, down)
    doc = "Datagrams the process dropped: a socket queue was full or no session could open"
    out.counter("datagrams_dropped", doc, m.dropped_up, up)
    out.counter("datagrams_dropped", doc, m.dropped_down, down)
    out.counter("udp_kernel_drops", "Datagrams the kernel dropped on the listening socket "
                "before the process read them (receive buffer full)", m.kernel_drops, labels)
    out.counter("upstream_errors", "ICMP errors (refused, unreachable) on upstream sockets",
                m.upstream_errors, labels)
    out.counter("gso_sends", "Sends that carried several datagrams (UDP GSO)", m.gso_sends,
                labels)
    out.counter("datagrams_denied", "Datagrams dropped before a session: the client is refused "
                "by --allow/--deny", m.denied, labels)


def status(m: UdpMetrics) -> list[str]:
    """Sessions keep no byte counters of their own (that would cost per datagram), so there is
    no top list: the totals are the status."""
    return [render_status(m).removeprefix("status: ")]


def summary(m: UdpMetrics) -> str:
    return f"{m.sessions} sessions, {m.opened} opened, {m.kernel_drops} kernel drops"


KIND = RuleKind("udp", families, status, summary)
