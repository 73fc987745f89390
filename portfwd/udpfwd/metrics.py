"""udpfwd's snapshot and the ``status:`` line rendered from it.

There are no per-session entries: sessions keep no counters of their own (the datagram path
counts into one forwarder-wide :class:`~portfwd.udpfwd.forwarder.Stats`), and a snapshot of
8192 session addresses every status interval would cost more than the line it feeds.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    denied: int = 0  # datagrams dropped before a session: the client is refused by --allow/--deny


def render_status(m: UdpMetrics) -> str:
    """The periodic ``status:`` line."""
    return (f"status: {m.sessions} sessions ({m.opened} opened, {m.expired} expired, "
            f"{m.evicted} evicted); up {m.datagrams_up} datagrams {m.bytes_up} bytes; "
            f"down {m.datagrams_down} datagrams {m.bytes_down} bytes; "
            f"dropped {m.dropped_up} up {m.dropped_down} down; "
            f"{m.upstream_errors} upstream errors; {m.gso_sends} GSO sends")
