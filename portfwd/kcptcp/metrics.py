"""kcptcp's snapshots and the periodic ``stats`` lines rendered from them.

Every ``--stats-interval`` seconds a service logs one ``stats conv=<id>: ...`` line per live
conversation and one ``stats total ...`` line; :func:`render_stats` makes them from a
:class:`TunnelClientMetrics` or :class:`TunnelServerMetrics`.

``up``/``down`` of a conversation are as its own side sees them: bytes it sent and bytes it
received through the tunnel (on the server, up is towards the client).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from portfwd.runtime.admission import refusal_families
from portfwd.runtime.exporter import Families, Labels, RuleKind, top
from portfwd.runtime.metrics import format_counts
from portfwd.runtime.upstream import upstream_families

NO_COUNTS: Mapping[str, int] = MappingProxyType({})


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
    dropped_malformed: int = 0  # datagrams dropped: did not parse, wrong conv, bad body
    dropped_stale: int = 0  # datagrams dropped: no usable key (old epoch past grace, early)
    established: bool = False  # the handshake completed
    fec_parity: int = 0  # parity shards per full group this side sends now (--fec)
    fec_out: int = 0  # FEC packets sent (parity shards, auto-mode manifests)
    fec_recovered: int = 0  # the peer's datagrams rebuilt from its parity
    fec_loss: float = 0.0  # loss of the peer's datagrams measured from its manifests, 0..1
    fec_bytes: int = 0  # bytes of the FEC packets sent (sealed: what they add on the wire)
    pace_mbit: float = 0.0  # --pacing: the bottleneck rate it measures (kcp/pacing.py)
    inflight_cap: int | None = None  # --pacing: unacknowledged segments it lets be in flight


@dataclass(frozen=True)
class ConversationTotals:
    """Counters of conversations summed, ended and live together (so they only grow): what
    the Prometheus counters of a rule are made of. A conversation's counts are added to the
    ended sum once, when it ends (:meth:`plus`)."""

    handshakes: int = 0  # conversations whose handshake completed
    up: int = 0  # stream bytes sent to the peer
    down: int = 0  # stream bytes received from the peer
    retrans: int = 0  # KCP timeout retransmissions
    fast_retrans: int = 0  # KCP fast retransmissions
    dgrams_out: int = 0  # datagrams sealed and sent
    dgrams_in: int = 0  # datagrams authenticated and accepted
    dropped_auth: int = 0  # datagrams dropped: bad tag (unauthenticated)
    dropped_replay: int = 0  # datagrams dropped: replayed or too old a counter
    dropped_malformed: int = 0  # datagrams dropped: did not parse
    dropped_stale: int = 0  # datagrams dropped: no usable key
    rekeys_started: int = 0  # rekeys started by this side
    epoch_switches: int = 0  # key epochs switched to
    peer_address_changes: int = 0  # peers that moved to a new address

    def plus(self, c: Any) -> ConversationTotals:
        """These totals with ``c``'s counts added: a ConversationMetrics, or another tool's
        conversation snapshot (kcpudp's), whose missing counters count as 0."""
        return ConversationTotals(*(getattr(self, f.name) + n for f, n in zip(
            TOTAL_FIELDS, counts_of(c), strict=True)))


TOTAL_FIELDS = dataclasses.fields(ConversationTotals)
FROM_CONVERSATION = {"handshakes": "established"}  # total field -> ConversationMetrics field
NO_TOTALS = ConversationTotals()


def counts_of(c: Any) -> tuple[int, ...]:
    """What a conversation snapshot adds to ConversationTotals, in its field order."""
    return tuple(int(getattr(c, FROM_CONVERSATION.get(f.name, f.name), 0)) for f in TOTAL_FIELDS)


def sum_totals(ended: ConversationTotals,
               live: tuple[ConversationMetrics, ...]) -> ConversationTotals:
    for c in live:
        ended = ended.plus(c)
    return ended


def close_reason_label(reason: str) -> str:
    """A bounded label for a close reason: ``"tcp read: Connection reset by peer"`` ->
    ``tcp_read``, ``"closed by peer"`` -> ``closed_by_peer`` (the errno text is for logs)."""
    return reason.partition(":")[0].strip().lower().replace(" ", "_") or "unknown"


@dataclass(frozen=True)
class TunnelClientMetrics:
    """kcptcp-client: totals plus one entry per live conversation."""

    conversations: int  # live now
    finished: int  # ended since start
    accepted: int  # TCP connections accepted
    accept_errors: Mapping[str, int]  # failed accept() calls, by errno name
    udp_open_failures: Mapping[str, int]  # no UDP socket for a new connection, by errno name
    per_conversation: tuple[ConversationMetrics, ...]  # live ones, oldest first
    totals: ConversationTotals = NO_TOTALS  # ended and live conversations summed
    closed: Mapping[str, int] = field(default_factory=lambda: NO_COUNTS)  # ended, by reason
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
    totals: ConversationTotals = NO_TOTALS  # ended and live conversations summed
    closed: Mapping[str, int] = field(default_factory=lambda: NO_COUNTS)  # ended, by reason
    rejected_malformed: int = 0  # HELLO-typed datagrams that are no well-formed HELLO
    rejected_cache_full: int = 0  # valid HELLOs refused: replay cache full (fails closed)
    kernel_drops: int = 0  # datagrams the kernel dropped on the UDP socket (buffer full)
    denied: int = 0  # HELLOs dropped unread: their UDP source is refused by --allow/--deny
    unknown_sent: int = 0  # UNKNOWN replies: PROBEs for conversations we do not hold
    probes_known: int = 0  # PROBEs for conversations we hold (not answered)
    probes_rejected: int = 0  # PROBEs dropped: forged, stale, replayed or over the budget
    over_limit: int = 0  # HELLOs refused at --max-conns (a valid one gets a REFUSE_FULL)
    destinations_down: int = 0  # times a target was put down after --max-fails failures
    lookups_failed: int = 0  # background re-resolutions of a target name that failed


def render_conversation(m: ConversationMetrics) -> str:
    """The part of a ``stats conv=<id>: ...`` line after the colon."""
    return (f"up={m.up} down={m.down} srtt={m.srtt}ms rto={m.rto}ms inflight={m.inflight} "
            f"queued={m.queued} peer_wnd={m.peer_wnd} rcv_queue={m.rcv_queue} "
            f"retrans={m.retrans} fast_retrans={m.fast_retrans} epoch={m.epoch} "
            f"dgrams_out={m.dgrams_out} dgrams_in={m.dgrams_in} dropped_auth={m.dropped_auth} "
            f"dropped_replay={m.dropped_replay} age={m.age:.0f}s"
            + (f" fec_parity={m.fec_parity} fec_out={m.fec_out} fec_bytes={m.fec_bytes} "
               f"fec_recovered={m.fec_recovered} fec_loss={100 * m.fec_loss:.1f}%"
               if m.fec_out or m.fec_recovered else "")
            + (f" pace={m.pace_mbit:.1f}Mbit/s cap={m.inflight_cap}"
               if m.inflight_cap is not None else ""))


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
            f"evicted={m.evicted} kernel_drops={m.kernel_drops} unknown_sent={m.unknown_sent}")


Snapshot = TypeVar("Snapshot", TunnelClientMetrics, TunnelServerMetrics)


def render_stats(m: Any, render_totals: Callable[[Any], str],
                 render_conv: Callable[[Any], str] = render_conversation) -> list[str]:
    """The lines of one stats round: one per live conversation (``render_conv``: kcpudp has
    its own), then the total."""
    lines = [f"stats conv={c.conv}: {render_conv(c)}" for c in m.per_conversation]
    lines.append(f"stats total {render_totals(m)}")
    return lines


# --- export: Prometheus families, the SIGUSR1 lines, systemd's STATUS= ------------------------

RTT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # s


def conversation_families(out: Families, labels: Labels,
                          m: TunnelClientMetrics | TunnelServerMetrics) -> None:
    """What both sides export: conversations, stream bytes, datagrams, KCP, keys, RTT."""
    t = m.totals
    out.counter("conversations_opened", "Tunnelled conversations started",
                m.conversations + m.finished, labels)
    out.gauge("conversations_active", "Tunnelled conversations live now", m.conversations,
              labels)
    out.counters_by("conversations_closed", "Tunnelled conversations ended, by reason",
                    "reason", m.closed, labels)
    doc = "Stream bytes through the tunnel (up: sent to the peer)"
    out.counter("bytes", doc, t.up, {**labels, "direction": "up"})
    out.counter("bytes", doc, t.down, {**labels, "direction": "down"})
    doc = "Tunnel datagrams (out: sealed and sent; in: authenticated and accepted)"
    out.counter("tunnel_datagrams", doc, t.dgrams_out, {**labels, "direction": "out"})
    out.counter("tunnel_datagrams", doc, t.dgrams_in, {**labels, "direction": "in"})
    out.counters_by("tunnel_datagrams_dropped", "Tunnel datagrams dropped by a conversation, "
                    "by reason (unauthenticated: bad tag; replayed; malformed; stale: no "
                    "usable key)", "reason",
                    {"unauthenticated": t.dropped_auth, "replayed": t.dropped_replay,
                     "malformed": t.dropped_malformed, "stale": t.dropped_stale}, labels)
    doc = "KCP retransmissions (timeout: RTO expired; fast: skipped by later acks)"
    out.counter("kcp_retransmissions", doc, t.retrans, {**labels, "type": "timeout"})
    out.counter("kcp_retransmissions", doc, t.fast_retrans, {**labels, "type": "fast"})
    out.counter("tunnel_rekeys", "Rekeys this side started", t.rekeys_started, labels)
    out.counter("tunnel_epoch_switches", "Key epochs switched to", t.epoch_switches, labels)
    out.counter("tunnel_peer_address_changes", "Peers that moved to a new address",
                t.peer_address_changes, labels)
    out.gauge_histogram("tunnel_srtt_seconds", "KCP smoothed round-trip time of the live "
                        "conversations that have measured one",
                        (c.srtt / 1000 for c in m.per_conversation if c.srtt), RTT_BUCKETS,
                        labels)


def client_families(out: Families, labels: Labels, m: TunnelClientMetrics) -> None:
    conversation_families(out, labels, m)
    out.counter("tunnel_handshakes", "Handshakes completed", m.totals.handshakes, labels)
    out.counter("connections_accepted", "TCP connections accepted from clients", m.accepted,
                labels)
    out.counters_by("accept_errors", "Failed accept() calls on the listener, by errno",
                    "reason", m.accept_errors, labels)
    out.counters_by("udp_open_failures", "No UDP socket for a new connection, by errno",
                    "reason", m.udp_open_failures, labels)
    refusal_families(out, labels, m)


def server_families(out: Families, labels: Labels, m: TunnelServerMetrics) -> None:
    conversation_families(out, labels, m)
    out.counter("tunnel_handshakes", "HELLOs authenticated and answered", m.handshakes, labels)
    out.counters_by("tunnel_handshakes_rejected", "HELLOs rejected, by reason (auth: bad MAC, "
                    "e.g. a wrong PSK)", "reason", rejected(m), labels)
    out.counters_by("tunnel_hellos_refused", "Authenticated or pending HELLOs refused at a cap "
                    "(pending: --max-pending; full: --max-sessions)", "reason",
                    {"pending": m.refused_pending, "full": m.refused_full}, labels)
    out.counter("tunnel_cookies_sent", "COOKIE replies sent under load", m.cookies_sent, labels)
    out.counter("tunnel_handshakes_restarted", "Unconfirmed sessions replaced by a retried "
                "HELLO", m.restarted, labels)
    out.counter("conversations_evicted", "Idle conversations closed at --max-sessions",
                m.evicted, labels)
    out.counters_by("tunnel_datagrams_unmatched", "Datagrams dropped before any conversation "
                    "(unknown: no such conv, not a HELLO; malformed: shorter than the prefix)",
                    "reason", {"unknown": m.dropped_unknown, "malformed": m.dropped_malformed},
                    labels)
    out.counter("udp_kernel_drops", "Datagrams the kernel dropped on the UDP socket before the "
                "process read them (receive buffer full)", m.kernel_drops, labels)
    out.counter("udp_send_errors", "UDP sends the network refused (KCP retransmits)",
                m.send_errors, labels)
    out.counters_by("dial_failures", "Connects to the target that failed, by errno", "reason",
                    m.dial_failures, labels)
    out.counters_by("tunnel_probes", "Liveness PROBEs from clients, by outcome (unknown: "
                    "answered, we do not hold the conversation; known: we do; rejected: forged, "
                    "stale, replayed or over the budget)", "outcome",
                    {"unknown": m.unknown_sent, "known": m.probes_known,
                     "rejected": m.probes_rejected}, labels)
    out.counter("tunnel_hellos_denied", "HELLOs and PROBEs dropped unread: their UDP source is "
                "refused by --allow/--deny", m.denied, labels)
    upstream_families(out, labels, m)


def rejected(m: TunnelServerMetrics) -> dict[str, int]:
    return {"auth": m.rejected_auth, "replay": m.rejected_replay, "stale": m.rejected_stale,
            "rate": m.rejected_rate, "before_start": m.rejected_before_start,
            "load": m.rejected_load, "malformed": m.rejected_malformed,
            "cache_full": m.rejected_cache_full}


def status(m: TunnelClientMetrics | TunnelServerMetrics,
           render_totals: Callable) -> list[str]:
    """SIGUSR1: the total line, the closes by reason, then the 10 conversations that moved
    most."""
    t = m.totals
    lines = [f"total {render_totals(m)}",
             f"closed {format_counts(m.closed)}; retrans={t.retrans} "
             f"fast_retrans={t.fast_retrans} dropped_auth={t.dropped_auth} "
             f"dropped_replay={t.dropped_replay} rekeys={t.rekeys_started}"]
    lines += [f"top conv={c.conv}: {render_conversation(c)}"
              for c in top(m.per_conversation, lambda c: c.up + c.down)]
    return lines


def summary(m: TunnelClientMetrics | TunnelServerMetrics) -> str:
    return f"{m.conversations} conversations, {m.finished} finished"


CLIENT_KIND = RuleKind("kcptcp-client", client_families,
                       lambda m: status(m, render_client_totals), summary)
SERVER_KIND = RuleKind("kcptcp-server", server_families,
                       lambda m: status(m, render_server_totals), summary)
