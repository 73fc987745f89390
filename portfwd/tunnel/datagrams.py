"""UDP datagrams through a TunnelSession, sans-IO: kcpudp's two modes (docs/PROTOCOL.md,
"Datagram conversations").

* :class:`ReliableDatagrams` (``--mode reliable``): each datagram is one KCP message, so it is
  retransmitted and delivered exactly once, in order. It is a stream :class:`Conversation`
  whose records are whole datagrams (no record byte, no FIN: a datagram conversation ends by
  idle timeout or CLOSE).
* :class:`UnreliableDatagrams` (``--mode datagram``): each datagram goes out once, in DATAGRAM
  packets sealed by the session (so replay-protected by its window), outside any ARQ. One that
  does not fit the MTU is cut into fragments; a datagram any fragment of which is lost is
  lost whole, so it arrives at most once and never altered.

Both bound what they hold: a full send queue or receive queue drops the datagram and counts it,
as a full UDP socket buffer would.

Glossary: *local* is our UDP side (the clients of kcpudp-client, the target of kcpudp-server),
*peer* the other end of the tunnel; ``send`` takes a datagram from the local side, ``read``
gives one from the peer.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from typing import Any

from portfwd.tunnel import events
from portfwd.tunnel.hello import MAX_HELLOS
from portfwd.tunnel.origin import Origin
from portfwd.tunnel.session import MAX_DATAGRAM_SIZE, TunnelSession
from portfwd.tunnel.stream import Conversation, ConversationConfig
from portfwd.tunnel.wire import NO_COOKIE

FRAGMENT = struct.Struct(">IBB")  # datagram id, fragment index, fragment count
FRAGMENT_SIZE = FRAGMENT.size  # 6 bytes in front of each fragment's piece of the datagram
RECEIVE_QUEUE = 1024  # datagrams received and not yet read; beyond, dropped and counted
REASSEMBLY_BYTES = 4 * MAX_DATAGRAM_SIZE  # bytes of incomplete datagrams held per conversation
REASSEMBLY_TIMEOUT_MS = 3000  # ms an incomplete datagram waits for its other fragments


class ReliableDatagrams(Conversation):
    """Datagrams as KCP messages: retransmitted, in order, exactly once."""

    max_message = MAX_DATAGRAM_SIZE

    def __init__(self, session: TunnelSession, config: ConversationConfig, now: int,
                 budget: Any = None) -> None:
        super().__init__(session, config, now, budget)
        self.datagrams_sent = 0  # datagrams queued to the peer
        self.datagrams_received = 0  # datagrams read from the peer
        self.dropped_queue = 0  # datagrams dropped: the send queue (KCP window) was full

    def send(self, datagram: bytes) -> bool:
        """Queue one datagram for the peer; False (dropped, counted) while the queue is full."""
        if self.closed:
            return False
        if self.kcp.waitsnd >= self._send_limit:
            self.dropped_queue += 1
            return False
        self.kcp.send(datagram)
        self.datagrams_sent += 1
        self.bytes_sent += len(datagram)
        self._kick = True
        return True

    def read(self) -> bytes | None:
        """The next datagram from the peer, or None."""
        message = self.kcp.recv()
        if message is None:
            return None
        self._kick = True  # reading may reopen our receive window: tell the peer promptly
        self.datagrams_received += 1
        self.bytes_received += len(message)
        return message


class _Partial:
    """A datagram some of whose fragments have arrived."""

    __slots__ = ("pieces", "missing", "size", "started")

    def __init__(self, count: int, now: int) -> None:
        self.pieces: list[bytes | None] = [None] * count
        self.missing = count
        self.size = 0  # bytes held
        self.started = now  # ms


class UnreliableDatagrams:
    """Datagrams in DATAGRAM packets: sent once, delivered at most once, never altered."""

    # The session-level steps are Conversation's own (one copy): they touch no KCP.
    peer_addr = Conversation.peer_addr
    established = Conversation.established
    _settle = Conversation._settle
    _on_session_event = Conversation._on_session_event
    probes_to_send = Conversation.probes_to_send
    next_event = Conversation.next_event
    abort = Conversation.abort
    _close = Conversation._close
    handle_timer = Conversation._session_timer  # no KCP to update

    def __init__(self, session: TunnelSession, config: ConversationConfig, now: int,
                 budget: Any = None) -> None:
        """``budget`` is unused (no KCP receive memory): the signature is Conversation's."""
        self.session = session
        self.conv: int = session.conv
        self._config = config
        self._superseded: list[TunnelSession] = []
        self._mtu = config.mtu
        # bytes of a datagram per fragment, so each sealed fragment fits the MTU
        self._piece = config.mtu - session.overhead - FRAGMENT_SIZE
        self._next_id = 0
        self._partial: OrderedDict[int, _Partial] = OrderedDict()  # oldest first
        self._partial_bytes = 0
        self._received: deque[bytes] = deque()
        self._events: deque[events.Event] = deque()
        self.probes = None  # no liveness probes here: only stream and reliable conversations
        self._probe_out: list = []  # (Conversation.probes_to_send reads it)
        self._now = now
        self.closed = False
        self.bytes_sent = 0  # datagram bytes sent to the peer
        self.bytes_received = 0  # datagram bytes received from the peer
        self.datagrams_sent = 0
        self.datagrams_received = 0
        self.dropped_queue = 0  # received datagrams dropped: the receive queue was full
        self.dropped_incomplete = 0  # datagrams a fragment of which never came (or too late)
        self.dropped_malformed = 0  # authenticated fragments that break the format
        self.dropped_oversize = 0  # tunnel datagrams longer than mtu, dropped unopened

    @classmethod
    def client(cls, config: ConversationConfig, conv: int, peer_addr: Any, now: int,
               wall_ms: int, cookie: bytes = NO_COOKIE,
               origin: Origin | None = None) -> UnreliableDatagrams:
        return cls(TunnelSession.client(config.tunnel, conv, peer_addr, now, wall_ms,
                                        cookie=cookie, origin=origin), config, now)

    def restart(self, session: TunnelSession) -> None:
        """Carry on with ``session``, the server session for the client's fresh HELLO, as
        :meth:`Conversation.restart` does (no engine to rebuild here)."""
        if session.conv != self.conv:
            raise ValueError(f"restart with conv {session.conv}, not {self.conv}")
        self._superseded = [*self._superseded[1 - MAX_HELLOS:], self.session]
        self.session = session

    # --- local side -------------------------------------------------------------------------

    def can_send(self) -> bool:
        return not self.closed

    @property
    def readable(self) -> bool:
        return bool(self._received)

    def send(self, datagram: bytes) -> bool:
        """Seal one datagram (in fragments beyond the MTU) for the next datagrams_to_send.
        False once closed (before the handshake the session keeps a bounded queue)."""
        if self.closed:
            return False
        piece = self._piece
        count = max(1, -(-len(datagram) // piece))
        ident = self._next_id
        self._next_id = (ident + 1) & 0xFFFFFFFF
        send = self.session.send_datagram
        if count == 1:
            send(FRAGMENT.pack(ident, 0, 1) + datagram)
        else:
            view = memoryview(datagram)
            for index in range(count):
                send(FRAGMENT.pack(ident, index, count) + view[index * piece:(index + 1) * piece])
        self.datagrams_sent += 1
        self.bytes_sent += len(datagram)
        return True

    def read(self) -> bytes | None:
        """The next datagram from the peer, or None."""
        return self._received.popleft() if self._received else None

    def discard_received(self) -> None:
        self._received.clear()
        self._partial.clear()
        self._partial_bytes = 0

    # --- network side -----------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Any, now: int) -> None:
        """One UDP datagram from ``addr``; dropped silently by the session if not authentic."""
        self._now = now
        if len(data) > self._mtu:
            self.dropped_oversize += 1
            return
        session = self.session
        session.receive_datagram(data, addr, now)
        if self._superseded:
            session = self._settle(session, data, addr, now)
        self._drain_session_events()

    def _drain_session_events(self) -> None:
        session = self.session
        while (event := session.next_event()) is not None:
            if type(event) is events.DatagramReceived:
                self._fragment_received(event.data)
            else:
                self._on_session_event(event)

    def _fragment_received(self, payload: bytes) -> None:
        if len(payload) < FRAGMENT_SIZE:
            self.dropped_malformed += 1
            return
        ident, index, count = FRAGMENT.unpack_from(payload)
        if count == 1 and index == 0:
            self._deliver(payload[FRAGMENT_SIZE:])
            return
        if index >= count or len(payload) > FRAGMENT_SIZE + self._piece:
            self.dropped_malformed += 1
            return
        self._expire_partial()
        partial = self._partial.get(ident)
        if partial is None:
            partial = self._partial[ident] = _Partial(count, self._now)
        elif len(partial.pieces) != count or partial.pieces[index] is not None:
            self.dropped_malformed += 1  # replays never get here: the session's window
            return
        piece = payload[FRAGMENT_SIZE:]
        partial.pieces[index] = piece
        partial.missing -= 1
        partial.size += len(piece)
        self._partial_bytes += len(piece)
        if partial.missing == 0:
            del self._partial[ident]
            self._partial_bytes -= partial.size
            if partial.size > MAX_DATAGRAM_SIZE:
                self.dropped_malformed += 1
                return
            self._deliver(b"".join(partial.pieces))  # type: ignore[arg-type]
            return
        while self._partial_bytes > REASSEMBLY_BYTES:  # bounded memory: the oldest goes
            self._drop_oldest_partial()

    def _expire_partial(self) -> None:
        partial = self._partial
        while partial and self._now - next(iter(partial.values())).started > (
                REASSEMBLY_TIMEOUT_MS):
            self._drop_oldest_partial()

    def _drop_oldest_partial(self) -> None:
        _, oldest = self._partial.popitem(last=False)
        self._partial_bytes -= oldest.size
        self.dropped_incomplete += 1

    def _deliver(self, datagram: bytes) -> None:
        if len(self._received) >= RECEIVE_QUEUE:
            self.dropped_queue += 1
            return
        self._received.append(datagram)
        self.datagrams_received += 1
        self.bytes_received += len(datagram)

    def datagrams_to_send(self, now: int) -> list[bytes]:
        """Every sealed datagram to send to peer_addr."""
        self._now = now
        if not self.closed:
            self._drain_session_events()
        return self.session.datagrams_to_send(now)

    def get_timer(self) -> int | None:
        return self.session.get_timer()
