"""One tunnelled TCP stream, sans-IO: stream records in KCP messages in a TunnelSession.

Layers, top to bottom (docs/PROTOCOL.md, "Stream layer")::

    TCP bytes  --records-->  KCP messages  --datagrams-->  TunnelSession (AEAD)  -->  UDP

Glossary: *stream* is the TCP byte stream of this conversation; a *record* is one KCP message
whose first byte says what it carries (DATA bytes, or FIN = the sender's TCP side reached EOF);
*local* is our TCP side, *peer* the other end of the tunnel.

Like the session below it, this object never reads a clock or touches a socket: the driver
passes ``now`` (ms) in, hands it datagrams and stream bytes, and sends what it returns.
Flow control is pull-based so nothing grows without bound: the driver reads from the TCP side only
while :meth:`can_send` (KCP's send queue is bounded) and takes records with :meth:`read` only as
fast as its TCP writer drains them (an unread KCP receive queue closes the peer's window).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from portfwd.kcp import OVERHEAD as KCP_OVERHEAD
from portfwd.kcp import Kcp, KcpConfig, ReassemblyBudget
from portfwd.kcp.engine import ASK_TELL, DEAD_LINK_XMIT, FRG_MAX, WND_RCV_MIN
from portfwd.tunnel import crypto, events
from portfwd.tunnel.fec import MAX_ROOM
from portfwd.tunnel.hello import MAX_HELLOS
from portfwd.tunnel.origin import RECORD_ORIGIN, MalformedOrigin, Origin, pack_origin, unpack_origin
from portfwd.tunnel.probe import UNKNOWN_SIZE, ClientProbes
from portfwd.tunnel.session import (
    CLOSE_LOCAL,
    OVERHEAD,
    TunnelConfig,
    TunnelSession,
)
from portfwd.tunnel.wire import NO_COOKIE, SECURED_TYPES, TYPE_MASK, PacketType

RECORD_DATA = 0x00  # record type: stream bytes follow
RECORD_FIN = 0x01  # record type: the sender's stream ended (TCP half-close)
MAX_RECORD_PAYLOAD = 32 * 1024  # bytes of stream data per record (KCP allows <= 127 fragments)
MAX_RECORD_SIZE = MAX_RECORD_PAYLOAD + 1  # bytes: type byte + payload
# ikcp probes a zero window only after 7 s (then backs off to 120 s). A receiver announces its
# reopened window once; on a lossy link that one datagram is lost now and then, and the sender
# sat idle for the full 7 s (seen in the lab at 5 % loss). Probing is a 24-byte WASK.
WINDOW_PROBE_INIT_MS = 100  # ms
WINDOW_PROBE_LIMIT_MS = 1000  # ms
SEND_QUEUE_FACTOR = 2  # can_send() while KCP holds < factor x send window segments
CLOSE_LINK_DEAD = "link dead"  # KCP sent one segment dead_link times without an ack
CLOSE_BAD_RECORD = "malformed stream record"  # empty, unknown type, FIN with a payload, or a
# misplaced or malformed ORIGIN
CLOSE_FINISHED = "finished"  # both directions ended and everything was acknowledged
CLOSE_UNKNOWN = "server does not know this conversation (it restarted?)"  # an UNKNOWN came

_FIN = bytes([RECORD_FIN])
_DATA = bytes([RECORD_DATA])
_ORIGIN = bytes([RECORD_ORIGIN])


@dataclass(frozen=True)
class ConversationConfig:
    """Tunnel security settings and KCP tuning of one conversation.

    ``mtu`` is the conversation's one MTU: the largest UDP payload it sends. The KCP engine's
    own MTU is derived from it per conversation (:meth:`kcp_config`), because what the session
    adds to each datagram differs between plaintext and AEAD.
    """

    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    mtu: int = 1350  # bytes: largest UDP payload we send (-M, seed default 1350)
    interval: int = 10  # ms between KCP flushes (--interval)
    resend: int = 2  # KCP fast retransmit after this many skipping acks, 0 = off (--resend)
    nc: bool = True  # True = no KCP congestion control (--nc)
    snd_wnd: int = 1024  # segments: KCP send window (--sndwnd)
    rcv_wnd: int = 1024  # segments: KCP receive window (--rcvwnd)
    dead_link: int = DEAD_LINK_XMIT  # transmissions of one segment before the link is dead
    pacing: bool = False  # --pacing: the path's rate and in-flight cap (kcp/pacing.py; the driver)
    # kcp-go's fast-ack rule (KcpConfig.fastack_conserve): one fast retransmission per loss, not
    # one every `resend` acks for a whole RTT. On with --fec (parity repairs a lost copy, and the
    # repeated copies only fill the bottleneck: at 100 ms / 5 %, --fec 10:3, 46.7 against 38.8
    # Mbit/s) and with --pacing (its window moves on past a loss, so acks of later segments
    # soon count against a lost retransmission). Off otherwise: with a window stalled behind a
    # loss the repeated copies are the quick repair of a lost retransmission (34 against 46
    # Mbit/s with it on). bench/results/2026-12-01-wan.md.
    fastack_conserve: bool = False

    def __post_init__(self) -> None:
        self.kcp_config(OVERHEAD)  # bad settings raise here, not at the first conversation

    def kcp_config(self, overhead: int, max_message: int = MAX_RECORD_SIZE) -> KcpConfig:
        """The engine's settings for a session adding ``overhead`` bytes to each datagram and
        KCP messages of up to ``max_message`` bytes: the seed's defaults plus prompt zero-window
        probing.

        Receive limits follow from the MTU: no fragment count beyond the largest record's, and
        out-of-order data only while everything held stays within one receive window of full
        segments, so a peer can make us hold about rcv_wnd * mss bytes (1.3 MB at the defaults),
        not twice that.
        """
        mtu = self.mtu - overhead
        mss = mtu - KCP_OVERHEAD
        max_frg = FRG_MAX  # an MTU too small for any segment: KcpConfig rejects the mtu
        if mss > 0:
            max_frg = min(FRG_MAX, -(-max_message // mss) - 1)
        return KcpConfig(mtu=mtu, snd_wnd=self.snd_wnd, rcv_wnd=self.rcv_wnd,
                         interval=self.interval, resend=self.resend, nc=self.nc,
                         dead_link=self.dead_link, probe_init=WINDOW_PROBE_INIT_MS,
                         fastack_conserve=self.fastack_conserve,
                         probe_limit=WINDOW_PROBE_LIMIT_MS, max_frg=max_frg,
                         max_rcv_bytes=max(self.rcv_wnd, WND_RCV_MIN) * mss)


class Conversation:
    """A TunnelSession carrying one KCP conversation that carries one TCP stream."""

    max_message: int = MAX_RECORD_SIZE  # bytes: the largest KCP message (a subclass may differ)

    def __init__(self, session: TunnelSession, config: ConversationConfig, now: int,
                 budget: ReassemblyBudget | None = None) -> None:
        """``budget``: receive memory shared with other conversations (a server passes one)."""
        self.session = session
        self.conv: int = session.conv
        self._config: ConversationConfig = config
        self._budget: ReassemblyBudget | None = budget
        # Server: unconfirmed sessions that restart() replaced, oldest first. The client keeps
        # its last MAX_HELLOS HELLOs and completes with a WELCOME to any of them, so a WELCOME
        # that was late rather than lost leaves it holding the keys of one of these.
        self._superseded: list[TunnelSession] = []
        self.kcp: Kcp = self._engine_for(session)
        self._mtu: int = config.mtu
        self._send_limit: int = SEND_QUEUE_FACTOR * self.kcp.snd_wnd
        self._events: deque[events.Event] = deque()
        self._now: int = now
        self._kick: bool = True  # something changed that the next flush should act on
        self.eof_sent: bool = False  # our FIN record is queued
        self.eof_received: bool = False  # the peer's FIN record was read
        self.closed: bool = False
        self.bytes_sent: int = 0  # stream bytes queued to the peer
        self.bytes_received: int = 0  # stream bytes read from the peer
        self.malformed_records: int = 0  # records that broke the format (closes the stream)
        self.origin: Origin | None = None  # the peer's ORIGIN record, once read
        self._started: bool = False  # the stream's first record was looked at
        self._stash: bytes | None = None  # that record, when poll_origin() found no ORIGIN
        self.dropped_oversize: int = 0  # datagrams longer than mtu, dropped unopened
        self.probes: ClientProbes | None = None  # client: liveness probes (probe.py)
        self._probe_out: list[tuple[bytes, Any]] = []  # a due PROBE, for probes_to_send

    @classmethod
    def client(cls, config: ConversationConfig, conv: int, peer_addr: Any, now: int,
               wall_ms: int, cookie: bytes = NO_COOKIE,
               random_bytes: Callable[[int], bytes] = os.urandom,
               origin: Origin | None = None) -> Conversation:
        """A client conversation; ``origin``: the client address its HELLOs carry (kcpudp;
        a stream sends its ORIGIN record instead, :meth:`send_origin`)."""
        tunnel = config.tunnel
        self = cls(TunnelSession.client(tunnel, conv, peer_addr, now, wall_ms,
                                        random_bytes, cookie=cookie, origin=origin),
                   config, now)
        self.probes = ClientProbes(crypto.handshake_mac_for(tunnel.psk), conv, wall_ms - now,
                                   tunnel.keepalive_interval_ms, now, random_bytes)
        return self

    def restart(self, session: TunnelSession) -> None:
        """Carry on with ``session``, a server session for the client's fresh HELLO (a retry
        after its WELCOME was lost) replacing the unconfirmed one; same conv.

        Nothing can have moved on the stream yet: the stream never flushes KCP before the
        session is established, and an unconfirmed server session is not. The engine is rebuilt
        anyway, as __init__ builds it, so no state of the old session's handshake carries over.
        """
        if session.conv != self.conv:
            raise ValueError(f"restart with conv {session.conv}, not {self.conv}")
        self.kcp.discard_received()  # whatever it holds goes back to the shared budget
        self._superseded = [*self._superseded[1 - MAX_HELLOS:], self.session]
        self.session = session
        self.kcp = self._engine_for(session)
        self._kick = True

    def _engine_for(self, session: TunnelSession) -> Kcp:
        """The KCP engine of this conversation over ``session`` (its MSS leaves room for the
        session's overhead)."""
        return Kcp(session.conv, self._config.kcp_config(session.overhead, self.max_message),
                   self._budget)

    # --- stream side ------------------------------------------------------------------------

    @property
    def peer_addr(self) -> Any:
        return self.session.peer_addr

    @property
    def established(self) -> bool:
        return self.session.established

    def can_send(self) -> bool:
        """True while the driver may read more from its TCP side (bounded send queue)."""
        return not self.closed and self.kcp.waitsnd < self._send_limit

    def send_stream_data(self, data: bytes) -> None:
        """Queue stream bytes as DATA records (call only while :meth:`can_send`)."""
        if self.eof_sent:
            raise ValueError("stream data after EOF")
        view = memoryview(data)
        for start in range(0, len(view), MAX_RECORD_PAYLOAD):
            self.kcp.send(_DATA + view[start : start + MAX_RECORD_PAYLOAD])
        self.bytes_sent += len(data)
        self._kick = True

    def send_origin(self, origin: Origin) -> None:
        """Client: say who the connection is for, as the stream's first record (before any
        DATA; the session authenticates it like every record)."""
        if self.bytes_sent or self.eof_sent:
            raise ValueError("ORIGIN after stream data")
        self.kcp.send(pack_origin(origin))
        self._kick = True

    def poll_origin(self) -> bool:
        """Server: True once the stream's start has arrived (or the conversation closed):
        ``origin`` is then the client's ORIGIN, or None when the stream began without one.
        Consumes only an ORIGIN record; anything else stays for :meth:`read`."""
        if self._started:
            return True
        record = self.kcp.recv()
        if record is None:
            return self.closed
        self._kick = True
        self._started = True
        if record[:1] == _ORIGIN:
            self._take_origin(record)
        else:
            self._stash = record
        return True

    def _take_origin(self, record: bytes) -> None:
        try:
            self.origin = unpack_origin(record)
        except MalformedOrigin:
            self.malformed_records += 1
            self._close(CLOSE_BAD_RECORD)

    def send_eof(self) -> None:
        """Our TCP side reached EOF: queue a FIN record behind the data (half-close)."""
        if not self.eof_sent:
            self.eof_sent = True
            self.kcp.send(_FIN)
            self._kick = True

    def read(self) -> bytes | None:
        """Next stream bytes from the peer; b"" once at the peer's EOF; None if nothing is ready."""
        if self.eof_received:
            return None
        record, self._stash = self._stash, None
        if record is None:
            record = self.kcp.recv()
            if record is None:
                return None
            self._kick = True  # reading may reopen our receive window: tell the peer promptly
        kind = record[:1]
        if kind == _ORIGIN and not self._started:  # only as the first record
            self._started = True
            self._take_origin(record)
            return None if self.closed else self.read()
        self._started = True
        if kind == _DATA and 1 < len(record) <= MAX_RECORD_SIZE:
            self.bytes_received += len(record) - 1
            return record[1:]
        if record == _FIN:
            self.eof_received = True
            return b""
        # An authenticated peer broke the record format (or sent a record larger than any of
        # ours): the stream cannot be trusted further.
        self.malformed_records += 1
        self._close(CLOSE_BAD_RECORD)
        return None

    @property
    def window_reopened(self) -> bool:
        """A read() freed a full receive window: the next flush tells the peer (KCP's WINS),
        which is waiting for it; the driver flushes at once then."""
        return bool(self.kcp.probe & ASK_TELL)

    @property
    def readable(self) -> bool:
        return not self.eof_received and (self._stash is not None or self.kcp.peeksize() >= 0)

    def discard_received(self) -> None:
        """Drop whatever was received and not read (the driver is done with this conversation),
        returning its memory to the shared budget. Call once, after the last read()."""
        self.kcp.discard_received()

    # --- network side -----------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Any, now: int) -> None:
        """One UDP datagram from ``addr``; dropped silently by the session if not authentic."""
        self._now = now
        if len(data) > self._mtu and (len(data) > self._mtu + MAX_ROOM
                                      or data[0] & TYPE_MASK != PacketType.FEC):
            # no peer with our -M sends it (an FEC shard: its longest datagram + its header,
            # tunnel/fec.py): drop before paying for the AEAD
            self.dropped_oversize += 1
            return
        session = self.session
        probes = self.probes
        if probes is not None and len(data) == UNKNOWN_SIZE and session.established and (
                probes.is_unknown(data)):
            self._close(CLOSE_UNKNOWN)  # the server lost our keys: nothing can be resent
            return
        heard = session.datagrams_received
        session.receive_datagram(data, addr, now)
        if probes is not None and session.datagrams_received != heard:
            probes.heard(now)
        if self._superseded:
            session = self._settle(session, data, addr, now)
        kcp_input = self.kcp.input
        while (event := session.next_event()) is not None:
            if type(event) is events.DatagramReceived:
                kcp_input(event.data, now)
                self._kick = True
            else:
                self._on_session_event(event)

    def _settle(self, session: TunnelSession, data: bytes, addr: Any,
                now: int) -> TunnelSession:
        """Server after a restart: the session this conversation goes on with. A sealed packet
        that did not confirm the current session may confirm one it replaced (the client
        completed with the WELCOME to an earlier HELLO); the first to confirm wins."""
        if session.confirmed:
            self._superseded = []  # the others can never be confirmed now
            return session
        if data and (data[0] & TYPE_MASK) in SECURED_TYPES:
            for old in reversed(self._superseded):
                old.receive_datagram(data, addr, now)
                if old.confirmed:
                    self.session = old
                    self._superseded = []
                    return old
        return session

    def _on_session_event(self, event: events.Event) -> None:
        if isinstance(event, events.ConnectionClosed):
            self.closed = True
        self._events.append(event)

    def probes_to_send(self) -> list[tuple[bytes, Any]]:
        """The session's ``(datagram, address)`` pairs for addresses other than peer_addr
        (WELCOMEs, path challenges and responses); send each to its own address."""
        probes = self.session.probes_to_send()
        if self._probe_out:
            probes, self._probe_out = self._probe_out + probes, []
        return probes

    def datagrams_to_send(self, now: int) -> list[bytes]:
        """Flush KCP if anything changed, seal its datagrams, return all to send to peer_addr."""
        self._now = now
        session = self.session
        if not self.closed:
            if self._kick and session.established:
                self._kick = False
                self.kcp.flush(now)
            for datagram in self.kcp.datagrams_to_send():
                session.send_datagram(datagram)
            if self._finished():
                # Seal this flush (it may ack the peer's FIN) before the CLOSE: the session
                # discards unsealed payloads when it closes.
                datagrams = session.datagrams_to_send(now)
                self._close(CLOSE_FINISHED)
                return datagrams + session.datagrams_to_send(now)
            self._drain_session_events()
        return session.datagrams_to_send(now)

    def _finished(self) -> bool:
        """Both streams ended and every byte of ours was acknowledged."""
        return self.eof_sent and self.eof_received and self.kcp.waitsnd == 0

    def _drain_session_events(self) -> None:
        while (event := self.session.next_event()) is not None:
            if type(event) is events.DatagramReceived:
                self.kcp.input(event.data, self._now)
            else:
                self._on_session_event(event)

    def get_timer(self) -> int | None:
        """Absolute ms at which :meth:`handle_timer` is due, or None when closed."""
        deadline = self.session.get_timer()
        if self.closed or deadline is None:
            return deadline
        if self.session.established:
            deadline = min(deadline, self.kcp.check(self._now))
            if self.probes is not None:
                deadline = min(deadline, self.probes.deadline(self.kcp.waitsnd > 0, self._now))
        return deadline

    def handle_timer(self, now: int) -> None:
        self._session_timer(now)
        session = self.session
        if not self.closed and session.established:
            self.kcp.update(now)
            if self.kcp.dead:
                self.abort(CLOSE_LINK_DEAD)
            elif self.probes is not None and now >= self.probes.deadline(self.kcp.waitsnd > 0, now):
                self._probe_out.append((self.probes.next(now), session.peer_addr))

    def _session_timer(self, now: int) -> None:
        """The session's own timer, if due (keepalive, rekey, handshake retries)."""
        self._now = now
        session = self.session
        timer = session.get_timer()
        if timer is not None and now >= timer:
            session.handle_timer(now)
            self._drain_session_events()

    def next_event(self) -> events.Event | None:
        if self._events:
            return self._events.popleft()
        return None

    def abort(self, reason: str = CLOSE_LOCAL) -> None:
        """Close now (TCP error, target refused, shutdown): the peer gets an authenticated CLOSE."""
        if not self.closed:
            self._close(reason)

    def _close(self, reason: str) -> None:
        """Close the session (authenticated CLOSE), reporting ``reason`` instead of its own."""
        self._drain_session_events()  # the session may have closed by itself meanwhile
        if self.closed:
            return
        session = self.session
        session.close()
        while (event := session.next_event()) is not None:
            if type(event) is not events.ConnectionClosed:  # its CLOSE_LOCAL: ours replaces it
                self._events.append(event)
        self.closed = True
        self._events.append(events.ConnectionClosed(reason, by_peer=False))
