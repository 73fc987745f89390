"""kcpudp's snapshots and the periodic ``stats`` lines rendered from them.

A kcpudp conversation carries datagrams, so its line counts datagrams and what was dropped
besides kcptcp's tunnel counters: ``up``/``down`` are datagrams (and ``*_bytes`` their bytes)
as the conversation's own side sees them; ``dropped_queue`` datagrams found a full queue (the
send window in reliable mode, the receive queue in datagram mode), ``dropped_local`` could not
be handed to the local UDP socket (full or refused), ``dropped_incomplete`` (datagram mode)
lost a fragment on the way; with FEC (``--fec``, or a peer that sends parity) ``fec_out`` and
``fec_recovered`` follow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from portfwd.kcptcp.metrics import TunnelServerMetrics, rejected
from portfwd.kcptcp.metrics import render_server_totals as render_tunnel_totals
from portfwd.kcptcp.metrics import render_stats as render_tunnel_stats
from portfwd.runtime.exporter import Families, Labels, RuleKind


@dataclass(frozen=True)
class DatagramConversationMetrics:
    """One live conversation: datagram and tunnel-session counters."""

    conv: int  # conversation id
    up: int  # datagrams sent to the peer
    down: int  # datagrams received from the peer
    up_bytes: int
    down_bytes: int
    dropped_queue: int  # datagrams dropped at a full queue
    dropped_local: int  # datagrams the local UDP socket did not take
    dropped_incomplete: int  # datagram mode: a fragment never came
    srtt: int  # ms, KCP smoothed round-trip time (0 in datagram mode)
    retrans: int  # KCP retransmissions, timeout and fast (0 in datagram mode)
    epoch: int  # key epoch in use
    dropped_auth: int  # tunnel datagrams dropped: bad tag
    dropped_replay: int  # tunnel datagrams dropped: replayed or too old a counter
    age: float  # s since the conversation started
    fec_out: int = 0  # FEC packets sent (--fec: parity shards, auto-mode manifests)
    fec_recovered: int = 0  # the peer's packets rebuilt from its parity


@dataclass(frozen=True)
class DatagramClientMetrics:
    """kcpudp-client: totals plus one entry per live conversation (client address)."""

    conversations: int  # live now
    finished: int  # ended since start
    opened: int  # conversations opened for new client addresses
    expired: int  # closed after -t seconds without a datagram either way
    evicted: int  # live ones closed to make room at --max-sessions
    dropped_open: int  # datagrams from new clients for which no conversation could open
    denied: int  # datagrams dropped before a conversation: the client is refused by --allow/--deny
    udp_open_failures: Mapping[str, int]  # no UDP socket for a new client, by errno name
    per_conversation: tuple[DatagramConversationMetrics, ...]  # oldest first


@dataclass(frozen=True)
class DatagramServerMetrics:
    """kcpudp-server: kcptcp-server's totals plus one entry per live conversation."""

    tunnel: TunnelServerMetrics  # handshakes, rejections, caps (dial_failures: target sockets)
    refused_mode: int  # authenticated HELLOs for another kind of conversation (REFUSE sent)
    expired: int  # conversations closed after -t seconds without a datagram either way
    per_conversation: tuple[DatagramConversationMetrics, ...]  # oldest first
    no_origin: int = 0  # --proxy-protocol: conversations whose HELLO carried no ORIGIN


def render_conversation(m: DatagramConversationMetrics) -> str:
    """The part of a ``stats conv=<id>: ...`` line after the colon."""
    return (f"up={m.up} down={m.down} up_bytes={m.up_bytes} down_bytes={m.down_bytes} "
            f"dropped_queue={m.dropped_queue} dropped_local={m.dropped_local} "
            f"dropped_incomplete={m.dropped_incomplete} srtt={m.srtt}ms retrans={m.retrans} "
            f"epoch={m.epoch} dropped_auth={m.dropped_auth} "
            f"dropped_replay={m.dropped_replay} age={m.age:.0f}s"
            + (f" fec_out={m.fec_out} fec_recovered={m.fec_recovered}"
               if m.fec_out or m.fec_recovered else ""))


def render_client_totals(m: DatagramClientMetrics) -> str:
    """The part of kcpudp-client's ``stats total ...`` line after "total"."""
    return (f"conversations={m.conversations} finished={m.finished} opened={m.opened} "
            f"expired={m.expired} evicted={m.evicted} dropped_open={m.dropped_open} "
            f"denied={m.denied}")


def render_server_totals(m: DatagramServerMetrics) -> str:
    """The part of kcpudp-server's ``stats total ...`` line after "total"."""
    return (f"{render_tunnel_totals(m.tunnel)} refused_mode={m.refused_mode} "
            f"expired={m.expired} no_origin={m.no_origin}")


Snapshot = TypeVar("Snapshot", DatagramClientMetrics, DatagramServerMetrics)


def render_stats(m: Snapshot, totals: Callable[[Snapshot], str]) -> list[str]:
    """The lines of one stats round: kcptcp's, with kcpudp's conversation counters."""
    return render_tunnel_stats(m, totals, render_conversation)


# --- export: Prometheus families, the SIGUSR1 lines, systemd's STATUS= ------------------------

def client_families(out: Families, labels: Labels, m: DatagramClientMetrics) -> None:
    out.gauge("conversations_active", "Client addresses with a live tunnel conversation",
              m.conversations, labels)
    out.counter("conversations_opened", "Conversations opened for new client addresses",
                m.opened, labels)
    out.counters_by("conversations_closed", "Conversations ended, by reason (expired: -t "
                    "without a datagram; evicted: at --max-sessions; other: the tunnel ended)",
                    "reason", {"expired": m.expired, "evicted": m.evicted,
                               "other": max(0, m.finished - m.expired - m.evicted)}, labels)
    out.counter("datagrams_dropped_unopened", "Datagrams from new clients for which no "
                "conversation could open", m.dropped_open, labels)
    out.counters_by("udp_open_failures", "No UDP socket for a new client, by errno", "reason",
                    m.udp_open_failures, labels)
    out.counter("datagrams_denied", "Datagrams dropped before a conversation: the client is "
                "refused by --allow/--deny", m.denied, labels)


def server_families(out: Families, labels: Labels, m: DatagramServerMetrics) -> None:
    out.gauge("conversations_active", "Tunnel conversations held", m.tunnel.conversations,
              labels)
    out.counter("tunnel_handshakes", "HELLOs authenticated and answered", m.tunnel.handshakes,
                labels)
    out.counters_by("tunnel_handshakes_rejected", "HELLOs rejected, by reason (auth: bad MAC, "
                    "e.g. a wrong PSK; mode: a client of another --mode or kcptcp)", "reason",
                    {**rejected(m.tunnel), "mode": m.refused_mode}, labels)
    out.counter("conversations_expired", "Conversations closed after -t seconds without a "
                "datagram", m.expired, labels)
    out.counter("conversations_without_origin", "--proxy-protocol: conversations whose HELLO "
                "carried no client address (an older kcpudp-client): LOCAL headers",
                m.no_origin, labels)
    out.counter("udp_kernel_drops", "Datagrams the kernel dropped on the UDP socket before the "
                "process read them (receive buffer full)", m.tunnel.kernel_drops, labels)
    out.counter("tunnel_hellos_denied", "HELLOs and PROBEs dropped unread: their UDP source is "
                "refused by --allow/--deny", m.tunnel.denied, labels)


def client_status(m: DatagramClientMetrics) -> list[str]:
    return render_stats(m, render_client_totals)


def server_status(m: DatagramServerMetrics) -> list[str]:
    return render_stats(m, render_server_totals)


CLIENT_KIND = RuleKind("kcpudp-client", client_families, client_status,
                       lambda m: f"{m.conversations} conversations, {m.finished} finished")
SERVER_KIND = RuleKind("kcpudp-server", server_families, server_status,
                       lambda m: f"{m.tunnel.conversations} conversations, "
                                 f"{m.tunnel.finished} finished")
