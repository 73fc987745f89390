"""kcptcp's snapshots and the periodic ``stats`` lines rendered from them.

Every ``--stats-interval`` seconds a service logs one ``stats conv=<id>: ...`` line per live
conversation and one ``stats total ...`` line; :func:`render_stats` makes them from a
:class:`TunnelClientMetrics` or :class:`TunnelServerMetrics`.

``up``/``down`` of a conversation are as its own side sees them: bytes it sent and bytes it
received through the tunnel (on the server, up is towards the client).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar


@dataclass(frozen=True)
class ConversationMetrics:
    """One live conversation: stream, KCP and tunnel-session counters."""

    conv: int  # conversation id
    up: int  # stream bytes sent to the peer
    down: int  # stream bytes received from the peer
    srtt: int  # ms, KCP smoothed round-trip time
    rto: int  # ms, KCP retransmission timeout
    inflight: int  # segments sent and not yet acknowledged
    queued: int  # segments waiting for send window
    peer_wnd: int  # segments the peer's receive window last advertised
    rcv_queue: int  # segments received, not yet read by the TCP side
    retrans: int  # KCP timeout retransmissions
    fast_retrans: int  # KCP fast retransmissions
    epoch: int  # key epoch in use (one per completed rekey)
    dgrams_out: int  # datagrams sealed and sent
    dgrams_in: int  # datagrams authenticated and accepted
    dropped_auth: int  # datagrams dropped: bad tag
    dropped_replay: int  # datagrams dropped: replayed or too old a counter
    age: float  # s since the conversation started
    rekeys_started: int  # rekeys this side started (RekeyStarted events)
    epoch_switches: int  # key epochs switched to (EpochSwitched events)
    peer_address_changes: int  # peer moved to a new source address (PeerAddressChanged)


@dataclass(frozen=True)
class TunnelClientMetrics:
    """kcptcp-client: totals plus one entry per live conversation."""

    conversations: int  # live now
    finished: int  # ended since start
    accepted: int  # TCP connections accepted
    accept_errors: Mapping[str, int]  # failed accept() calls, by errno name
    udp_open_failures: Mapping[str, int]  # no UDP socket for a new connection, by errno name
    per_conversation: tuple[ConversationMetrics, ...]  # live ones, oldest first
    denied: int = 0  # connections refused by --allow/--deny (before any UDP was sent)
    over_limit: int = 0  # connections closed at once because --max-conns were open
    proxy_rejected: int = 0  # --accept-proxy: header missing, malformed, late or untrusted


@dataclass(frozen=True)
class TunnelServerMetrics:
    """kcptcp-server: totals plus one entry per live conversation."""

    conversations: int  # live now
    finished: int  # ended since start
    handshakes: int  # HELLOs authenticated and answered
    rejected_auth: int  # HELLOs that did not authenticate
    rejected_replay: int  # HELLOs seen before
    rejected_stale: int  # HELLOs whose timestamp is outside the window
    rejected_rate: int  # HELLOs with a valid cookie over their source prefix's budget
    rejected_before_start: int  # HELLOs stamped before the server started (replays)
    rejected_load: int  # valid HELLOs over the session and the COOKIE budgets
    cookies_sent: int  # COOKIE replies to valid HELLOs without a cookie, under load
    cookie_hellos: int  # HELLOs that came with a valid cookie
    restarted: int  # unconfirmed sessions replaced by their client's fresh HELLO
    dropped_unknown: int  # datagrams for no conversation that are not a HELLO
    dropped_malformed: int  # datagrams shorter than the common prefix
    refused_pending: int  # HELLOs ignored at --max-pending
    refused_full: int  # authenticated HELLOs refused at --max-sessions
    evicted: int  # idle conversations closed to make room at --max-sessions
    send_errors: int  # UDP sends the network refused (KCP retransmits)
    dial_failures: Mapping[str, int]  # connects to the target that failed, by errno name
    per_conversation: tuple[ConversationMetrics, ...]  # live ones, oldest first
    denied: int = 0  # HELLOs dropped unread: their UDP source is refused by --allow/--deny
    over_limit: int = 0  # HELLOs ignored at --max-conns (before any handshake work)


def render_conversation(m: ConversationMetrics) -> str:
    """The part of a ``stats conv=<id>: ...`` line after the colon."""
    return (f"up={m.up} down={m.down} srtt={m.srtt}ms rto={m.rto}ms inflight={m.inflight} "
            f"queued={m.queued} peer_wnd={m.peer_wnd} rcv_queue={m.rcv_queue} "
            f"retrans={m.retrans} fast_retrans={m.fast_retrans} epoch={m.epoch} "
            f"dgrams_out={m.dgrams_out} dgrams_in={m.dgrams_in} dropped_auth={m.dropped_auth} "
            f"dropped_replay={m.dropped_replay} age={m.age:.0f}s")


def render_client_totals(m: TunnelClientMetrics) -> str:
    """The part of kcptcp-client's ``stats total ...`` line after "total"."""
    return f"conversations={m.conversations} finished={m.finished}"


def render_server_totals(m: TunnelServerMetrics) -> str:
    """The part of kcptcp-server's ``stats total ...`` line after "total"."""
    return (f"conversations={m.conversations} finished={m.finished} "
            f"handshakes={m.handshakes} rejected_auth={m.rejected_auth} "
            f"rejected_replay={m.rejected_replay} rejected_stale={m.rejected_stale} "
            f"rejected_rate={m.rejected_rate} dropped_unknown={m.dropped_unknown} "
            f"refused_pending={m.refused_pending} refused_full={m.refused_full} "
            f"evicted={m.evicted}")


Snapshot = TypeVar("Snapshot", TunnelClientMetrics, TunnelServerMetrics)


def render_stats(m: Snapshot, render_totals: Callable[[Snapshot], str]) -> list[str]:
    """The lines of one stats round: one per live conversation, then the total."""
    lines = [f"stats conv={c.conv}: {render_conversation(c)}" for c in m.per_conversation]
    lines.append(f"stats total {render_totals(m)}")
    return lines
