"""Sans-IO tunnel session: handshake, AEAD, anti-replay, rekey, keepalive (docs/PROTOCOL.md).

The session carries *opaque datagrams* (KCP output datagrams, or kcpudp datagram fragments)
between two peers; it knows nothing about KCP, sockets or clocks. Time is an int of ms passed in
as ``now``; the HELLO timestamp is Unix time in ms passed in as ``wall_ms``. The verbs are
aioquic's: ``receive_datagram`` / ``send_datagram`` / ``datagrams_to_send`` / ``get_timer`` /
``handle_timer`` / ``next_event`` / ``close``. Network input never raises: dropped, counted.

Glossary:
  client / server -- the kcptcp-client side (sends HELLO) and the kcptcp-server side (answers).
  conv            -- 32-bit conversation id, random, chosen by the client, in every packet.
  epoch           -- key generation (crypto.py); send_seq restarts at 0 in each epoch.
  initiator       -- the side whose send_seq crossed the threshold and sent REKEY_INIT;
  responder       -- the side that answered it with REKEY_ACK (seed "AEAD Rekeying").
  confirmed       -- the peer has proven it holds the session keys (its first authenticated
                     packet arrived). The server sends nothing but WELCOMEs before that (its
                     driver dials nothing either); the client repeats a sealed PING until then.
  path            -- the peer address datagrams go to; a new one is taken only after it
                     answered a challenge (path.py).
  probe           -- a datagram for an address other than the path (a WELCOME to a HELLO's
                     source, a PATH_CHALLENGE or PATH_RESPONSE): see ``probes_to_send``.
"""

from __future__ import annotations

import enum
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from . import crypto, events
from .config import TunnelConfig
from .events import CLOSE_BY_PEER, CLOSE_HANDSHAKE_TIMEOUT, CLOSE_LOCAL, CLOSE_PEER_SILENT
from .hello import ClientHellos
from .opening import Opening
from .origin import Origin
from .path import PathValidator
from .rekey import CLOSE_WRAPAROUND, Rekeying
from .replay import ReplayWindow
from .wire import (
    CHALLENGE_SIZE,
    HEADER,
    HEADER_SIZE,
    NO_COOKIE,
    PHASE_BIT,
    TYPE_MASK,
    UINT32_MAX,
    PacketType,
    pack_welcome,
    peek_prefix,
)

logger = logging.getLogger(__name__)

DatagramReceived, FecReceived = events.DatagramReceived, events.FecReceived  # one lookup less
_unpack_header = HEADER.unpack_from

OVERHEAD = HEADER_SIZE + crypto.TAG_SIZE  # 25 bytes a sealed DATA packet adds to its payload
PLAINTEXT_OVERHEAD = HEADER_SIZE  # 9 bytes in plaintext mode
MAX_DATAGRAM_SIZE = 65507  # bytes, largest UDP payload over IPv4
MAX_PAYLOAD_SIZE = MAX_DATAGRAM_SIZE - OVERHEAD  # bytes accepted by send_datagram


# Plain ints for the per-packet path: comparing an int with an IntEnum member costs ~70 ns.
_DATA, _INIT, _ACK, _PING, _CLOSE, _CHALLENGE, _RESPONSE, _FEC = (
    int(PacketType.DATA), int(PacketType.REKEY_INIT), int(PacketType.REKEY_ACK),
    int(PacketType.PING), int(PacketType.CLOSE), int(PacketType.PATH_CHALLENGE),
    int(PacketType.PATH_RESPONSE), int(PacketType.FEC),
)


class _State(enum.Enum):
    HANDSHAKE = "handshake"  # client: waiting for WELCOME; server: for the client's confirmation
    ESTABLISHED = "established"
    CLOSED = "closed"


class _ConvAdapter(logging.LoggerAdapter):
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"conv={self.extra['conv']} {msg}", kwargs


class TunnelSession(Rekeying, Opening):
    """One side of one tunnel conversation.  Build with :meth:`client` or via HandshakeAcceptor."""

    def __init__(self, config: TunnelConfig, conv: int, is_client: bool, peer_addr: Any,
                 now: int, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        if not 0 <= conv <= UINT32_MAX:
            raise ValueError(f"conv out of range: {conv}")
        self.config: TunnelConfig = config
        self.conv: int = conv
        self.is_client: bool = is_client
        self.peer_addr: Any = peer_addr
        self.confirmed: bool = False  # the peer's first authenticated packet arrived
        self._state: _State = _State.HANDSHAKE
        self._data_type: int = config.payload_type  # DATA, or DATAGRAM (kcpudp datagram mode)
        self._payloads = (self._data_type, _FEC)
        self._random_bytes: Callable[[int], bytes] = random_bytes
        self._log: _ConvAdapter = _ConvAdapter(logger, {"conv": conv})
        self._mac = crypto.handshake_mac_for(config.psk)
        self._crypto: crypto.CryptoPair | None = None
        self._hello: bytes = b""  # the latest HELLO (server: to recognise copies of it)
        self._welcome: bytes = b""  # server: the WELCOME to repeat to a copy of the HELLO
        self.hellos: ClientHellos | None = None  #: client: its HELLOs (count, cookie)
        self._probes: list[tuple[bytes, Any]] = []  # datagrams for other addresses than the path
        self._confirm_at: int | None = None  # PING "keys arrived" unless sealed data goes first
        self._hs_deadline: int = now + config.handshake_timeout_ms
        self._hs_retry_at: int = now + config.handshake_retry_ms
        self._hs_interval: int = config.handshake_retry_ms
        self._send_seq: int = config.initial_send_seq
        self._threshold: int = config.rekey_seq_threshold
        self._win: ReplayWindow = ReplayWindow(config.replay_window)
        self._win_prev: ReplayWindow | None = None
        self._rekey_in_progress: bool = False
        self._rekey_deadline: int = 0
        self._rekey_retry_at: int = 0
        self._pending: deque[bytes] = deque()
        self._out: list[bytes] = []
        self._events: deque[events.Event] = deque()
        self._last_send_ms: int = now
        self._last_recv_ms: int = now
        # Per-epoch cache for the per-packet receive path (refreshed at each epoch switch).
        self._fast_type: int = -1  # type byte of a current-epoch DATA packet
        self._fast_open: Callable[[int, bytes, bytes], bytes | None] | None = None
        self._min_secured: int = HEADER_SIZE  # header + tag
        self._path: PathValidator = PathValidator(
            HEADER_SIZE + CHALLENGE_SIZE + (0 if config.plaintext else crypto.TAG_SIZE),
            config.handshake_retry_ms, random_bytes)
        self.datagrams_sent: int = 0  #: datagrams handed out by datagrams_to_send
        self.datagrams_received: int = 0  #: authenticated, non-replayed datagrams
        self.dropped_auth: int = 0  #: MAC / AEAD tag did not verify
        self.dropped_replay: int = 0  #: duplicate, too old for the window, or a replayed HELLO
        self.dropped_malformed: int = 0  #: did not parse, wrong conv, bad body
        self.dropped_stale: int = 0  #: no usable key: old epoch past grace, early, or closed
        self.dropped_send_queue: int = 0  #: payloads dropped: queue full before the handshake
        self.welcomes_resent: int = 0  #: server: WELCOME repeated for a copy of the HELLO
        self.cookies_received: int = 0  #: client: COOKIEs from a loaded server (HELLO resent)

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def client(cls, config: TunnelConfig, conv: int, peer_addr: Any, now: int, wall_ms: int,
               random_bytes: Callable[[int], bytes] = os.urandom,
               cookie: bytes = NO_COOKIE, origin: Origin | None = None) -> TunnelSession:
        """A client session with its HELLO queued; ``wall_ms`` is Unix time in ms; ``cookie``
        one a loaded server gave an earlier conversation of this client (``hellos.cookie``);
        ``origin`` the client address every HELLO carries (kcpudp)."""
        self = cls(config, conv, True, peer_addr, now, random_bytes)
        self.hellos = ClientHellos(self._mac, conv, wall_ms - now, random_bytes, cookie,
                                   config.carries, origin, config.psk)
        self._queue_hello(now)
        return self

    def _queue_hello(self, now: int) -> None:
        """A fresh HELLO (new key share, current timestamp): a retry is never a copy, so a HELLO
        seen by a server that restarted since carries a time it can tell from its start."""
        self._hello = self.hellos.next(now)
        self._out.append(self._hello)

    @classmethod
    def server_from_hello(cls, config: TunnelConfig, hello: bytes, client_share: bytes,
                          peer_addr: Any, now: int,
                          random_bytes: Callable[[int], bytes] = os.urandom
                          ) -> TunnelSession | None:
        """A server session for an already *validated* HELLO (use HandshakeAcceptor.accept), its
        WELCOME queued for ``peer_addr``; None if the client's key share is unusable."""
        conv = peek_prefix(hello)[1]
        self = cls(config, conv, False, peer_addr, now, random_bytes)
        # Nothing authenticated has come from the client yet: idle_timeout_ms bounds that too.
        self._hs_deadline = now + min(config.handshake_timeout_ms, config.idle_timeout_ms)
        share = crypto.KeyShare(random_bytes(crypto.SHARE_SIZE))
        shared = share.exchange(client_share)
        if shared is None:
            return None
        self._hello = bytes(hello)
        body = pack_welcome(conv, share.public)
        self._welcome = body + self._mac(crypto.WELCOME_LABEL, self._hello, body)
        self._probes.append((self._welcome, peer_addr))
        self._set_keys(client_share, share.public, shared)
        return self

    def _set_keys(self, client_share: bytes, server_share: bytes, shared: bytes) -> None:
        secret = crypto.session_secret(self.config.psk, client_share, server_share, shared)
        self._crypto = crypto.CryptoPair(self.config.psk, secret, self.conv, self.is_client,
                                         self.config.rekey_grace_ms)
        self._min_secured = HEADER_SIZE + self._crypto.tag_size
        self._refresh_fast_path()

    def _establish(self, now: int) -> None:
        self._state = _State.ESTABLISHED
        self._last_recv_ms = now
        self._log.debug("handshake completed, peer %s", self.peer_addr)
        self._events.append(events.HandshakeCompleted(self.conv))

    # --- public state ---------------------------------------------------------------------

    @property
    def established(self) -> bool:
        return self._state is _State.ESTABLISHED

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def epoch(self) -> int:
        return self._crypto.epoch if self._crypto is not None else 0

    @property
    def send_seq(self) -> int:
        return self._send_seq

    @property
    def rekey_in_progress(self) -> bool:
        return self._rekey_in_progress

    @property
    def hello(self) -> bytes:
        """The latest HELLO (the server compares a HELLO for a known conv with it)."""
        return self._hello

    @property
    def overhead(self) -> int:
        """Bytes a DATA packet adds to its payload (25 sealed, 9 in plaintext mode)."""
        return PLAINTEXT_OVERHEAD if self.config.plaintext else OVERHEAD

    # --- commands -------------------------------------------------------------------------

    def send_datagram(self, payload: bytes) -> None:
        """Queue one opaque payload to be sealed as DATA by the next ``datagrams_to_send``.

        Before the handshake completes up to ``max_pending_payloads`` are kept (then dropped and
        counted, as a lossy link would); after close the call is ignored.
        """
        if len(payload) > MAX_PAYLOAD_SIZE:
            raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_SIZE}")
        state = self._state
        if state is _State.CLOSED:
            return
        if state is _State.HANDSHAKE and len(self._pending) >= self.config.max_pending_payloads:
            self.dropped_send_queue += 1
            return
        self._pending.append(payload)

    def seal_fec(self, body: bytes, now: int) -> bytes | None:
        """An FEC body (tunnel/fec.py) sealed now, outside the queue; None unless established."""
        return self._out.pop() if self._seal(_FEC, body, now) else None

    def close(self) -> None:
        """Send an authenticated CLOSE (if keyed) and end the session; idempotent."""
        self._terminate(CLOSE_LOCAL, by_peer=False, send_close=True)

    def next_event(self) -> events.Event | None:
        """The oldest undelivered event, or None."""
        return self._events.popleft() if self._events else None

    def probes_to_send(self) -> list[tuple[bytes, Any]]:
        """``(datagram, address)`` pairs for addresses other than ``peer_addr`` (WELCOMEs,
        path challenges and responses), each under 3x what it answers from that address."""
        probes = self._probes
        if probes:
            self._probes = []
            self.datagrams_sent += len(probes)
        return probes

    def datagrams_to_send(self, now: int) -> list[bytes]:
        """Seal queued payloads and return every datagram to transmit to ``peer_addr``."""
        if self._pending and self._state is _State.ESTABLISHED:
            self._seal_pending(now)
        out = self._out
        if self._confirm_at is not None:
            if out:  # any sealed packet confirms: the PING is not needed
                self._confirm_at = None
            elif now >= self._confirm_at:
                self._confirm_at = None
                self._seal_raw(_PING, b"")
                out = self._out
        if out:
            self._out = []
            self._last_send_ms = now
            self.datagrams_sent += len(out)
        return out

    def get_timer(self) -> int | None:
        """Absolute time (ms) at which ``handle_timer`` must be called, or None."""
        state = self._state
        if state is _State.ESTABLISHED:
            cfg = self.config
            deadline = min(self._last_recv_ms + cfg.idle_timeout_ms,
                           self._last_send_ms + cfg.keepalive_interval_ms)
            if self._rekey_in_progress:
                deadline = min(deadline, self._rekey_deadline, self._rekey_retry_at)
            if not self.confirmed:
                deadline = min(deadline, self._hs_deadline, self._hs_retry_at)
            if self._confirm_at is not None:
                deadline = min(deadline, self._confirm_at)
            return deadline
        if state is _State.HANDSHAKE:
            return min(self._hs_deadline, self._hs_retry_at) if self.is_client else (
                self._hs_deadline)
        return None

    def handle_timer(self, now: int) -> None:
        """Run whatever is due at ``now``: retransmissions, keepalive, timeouts."""
        state = self._state
        cfg = self.config
        if state is _State.HANDSHAKE:
            if now >= self._hs_deadline:
                # Server: an unconfirmed session (a replayed HELLO, or a client that never
                # completed) is dropped without a word.
                self._terminate(CLOSE_HANDSHAKE_TIMEOUT, by_peer=False, send_close=False)
            elif self.is_client and now >= self._hs_retry_at:
                self._queue_hello(now)
                self._retry_later(now)
            return
        if state is not _State.ESTABLISHED:
            return
        if not self.confirmed:  # client: the server has not yet shown it heard our keys
            if now >= self._hs_deadline:
                self._terminate(CLOSE_HANDSHAKE_TIMEOUT, by_peer=False, send_close=True)
                return
            if now >= self._hs_retry_at:
                self._seal(_PING, b"", now)
                self._retry_later(now)
        if now >= self._last_recv_ms + cfg.idle_timeout_ms:
            self._log.info("no authenticated packet for %d ms, closing", now - self._last_recv_ms)
            self._terminate(CLOSE_PEER_SILENT, by_peer=False, send_close=True)
            return
        if self._rekey_in_progress and not self._rekey_timer(now):
            return
        if self._state is _State.ESTABLISHED and not self._out and not self._pending and (
                now >= self._last_send_ms + cfg.keepalive_interval_ms):
            self._seal(_PING, b"", now)

    def _retry_later(self, now: int) -> None:
        self._hs_interval = min(self._hs_interval * 2, self.config.handshake_retry_max_ms)
        self._hs_retry_at = now + self._hs_interval

    # --- sending --------------------------------------------------------------------------

    def _seal_pending(self, now: int) -> None:
        pending = self._pending
        out = self._out
        key = self._crypto.send
        type_byte = self._data_type | (PHASE_BIT if key.phase else 0)
        conv = self.conv
        threshold = self._threshold
        seq = self._send_seq
        pack = HEADER.pack
        seal = key.seal
        while pending:
            if seq >= threshold:
                # Slow path: rekey trigger and wraparound guard (seed "AEAD Rekeying").
                self._send_seq = seq
                while pending and self._seal(self._data_type, pending.popleft(), now):
                    pass
                return
            payload = pending.popleft()
            header = pack(type_byte, conv, seq)
            out.append(header + seal(seq, header, payload))
            seq += 1
        self._send_seq = seq

    def _seal(self, ptype: int, body: bytes, now: int) -> bool:
        """Seal with rekey trigger and wraparound guard; False once the session is closed."""
        # A server whose client has not yet proven its keys defers the rekey: its REKEY_INIT
        # could not be opened yet, and the deadline would run out for nothing.
        if (self._send_seq >= self._threshold and not self._rekey_in_progress
                and self.confirmed and self._state is _State.ESTABLISHED):
            self._start_rekey(now)
        if self._state is not _State.ESTABLISHED:
            return False
        return self._seal_raw(ptype, body)

    def _seal_raw(self, ptype: int, body: bytes, to: Any = None) -> bool:
        """Seal one packet for the path, or as a probe for ``to``; False once closed."""
        seq = self._send_seq
        if seq >= UINT32_MAX:
            # seed "AEAD Rekeying", wraparound guard: send_seq 0xFFFFFFFF is never used, so
            # (epoch, send_seq) never repeats under one key
            logger.info("send_seq wraparound guard hit, closing conv=%d", self.conv)
            self._terminate(CLOSE_WRAPAROUND, by_peer=False, send_close=False)
            return False
        key = self._crypto.send
        header = HEADER.pack(ptype | (PHASE_BIT if key.phase else 0), self.conv, seq)
        sealed = header + key.seal(seq, header, body)
        if to is None or to == self.peer_addr:
            self._out.append(sealed)
        else:
            self._probes.append((sealed, to))
        self._send_seq = seq + 1
        return True

    def _refresh_fast_path(self) -> None:
        key = self._crypto.recv
        self._fast_type = self._data_type | (PHASE_BIT if key.phase else 0)
        self._fast_open = key.open

    def _terminate(self, reason: str, by_peer: bool, send_close: bool) -> None:
        if self._state is _State.CLOSED:
            return
        if send_close and self._state is _State.ESTABLISHED and self._send_seq < UINT32_MAX:
            self._seal_raw(_CLOSE, b"")
        self._state = _State.CLOSED
        self._pending.clear()
        self._rekey_in_progress = False
        self._log.debug("closed: %s", reason)
        self._events.append(events.ConnectionClosed(reason, by_peer))

    # --- receiving ------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Any, now: int) -> None:
        """Process one datagram from ``addr``; anything invalid is dropped and counted."""
        state = self._state
        if state is _State.ESTABLISHED or (state is _State.HANDSHAKE and not self.is_client):
            if len(data) >= self._min_secured:
                type_byte, conv, seq = _unpack_header(data)
                if conv == self.conv:
                    if type_byte == self._fast_type and self.confirmed:
                        # Per-packet fast path: DATA of the current epoch. A deliberate inline copy
                        # of _receive_secured's steps (replay check, open, record, counters,
                        # migration) without call and epoch dispatch: change both or neither.
                        win = self._win
                        if not win.is_new(seq):
                            self.dropped_replay += 1
                            return
                        body = self._fast_open(seq, data[:HEADER_SIZE], data[HEADER_SIZE:])
                        if body is None:
                            self.dropped_auth += 1
                            return
                        win.record(seq)
                        self.datagrams_received += 1
                        self._last_recv_ms = now
                        if addr != self.peer_addr:
                            self._from_new_address(addr, seq == win.top, len(data), now)
                        self._events.append(DatagramReceived(body))
                        return
                    if _DATA < (t := type_byte & TYPE_MASK) <= _RESPONSE or t in self._payloads:
                        self._receive_secured(data, type_byte, seq, addr, now)
                        return
            self._receive_unsecured(data, addr)
        elif state is _State.HANDSHAKE:
            self._receive_welcome(data, addr, now)
        else:
            self.dropped_stale += 1

    def _receive_secured(self, data: bytes, type_byte: int, seq: int, addr: Any,
                         now: int) -> None:
        """Every secured packet but current-epoch DATA, which receive_datagram's fast path
        handles with the same steps inlined."""
        cp = self._crypto
        key = cp.recv
        win = self._win
        from_next = False
        from_prev = False
        if (type_byte >> 7) != key.phase:
            # Not the current epoch: the next one (peer already switched: implicit REKEY_ACK)
            # or the previous one (a late packet inside the grace period).
            header = data[:HEADER_SIZE]
            body = None
            if cp.recv_next is not None:
                body = cp.recv_next.open(seq, header, data[HEADER_SIZE:])
                from_next = body is not None
            if body is None:
                if not cp.prev_usable(now) or self._win_prev is None:
                    self._win_prev = None  # grace over: release the old window too
                    self.dropped_stale += 1
                    return
                key = cp.recv_prev
                win = self._win_prev
                from_prev = True
        if not from_next:
            if not win.is_new(seq):
                self.dropped_replay += 1
                return
            body = key.open(seq, data[:HEADER_SIZE], data[HEADER_SIZE:])
            if body is None:
                self.dropped_auth += 1
                return
        ptype = type_byte & TYPE_MASK
        if from_next:
            if ptype == _ACK:
                logger.info("recv REKEY_ACK conv=%d", self.conv)
            self._switch_epoch(now)
            win = self._win
        win.record(seq)  # authenticated from here on
        self.datagrams_received += 1
        self._last_recv_ms = now
        if not self.confirmed:
            self._confirm(addr, now)
        elif addr != self.peer_addr:
            self._from_new_address(addr, not from_prev and seq == win.top, len(data), now)
        if ptype == self._data_type:
            self._events.append(DatagramReceived(body))
        elif ptype == _FEC:  # an FEC body for tunnel/fec.py
            self._events.append(FecReceived(body))
        elif ptype == _PING:
            pass
        elif ptype == _CLOSE:
            self._terminate(CLOSE_BY_PEER, by_peer=True, send_close=False)
        elif ptype == _INIT:
            self._receive_rekey_init(body, seq, from_prev, now)
        elif ptype == _CHALLENGE:
            if len(body) == CHALLENGE_SIZE:
                self._seal_raw(_RESPONSE, body, to=addr)  # to where it came from, same size
            else:
                self.dropped_malformed += 1
        elif ptype == _RESPONSE:
            if self._path.answered(addr, body):
                self._migrate(addr)
        elif not from_next:  # REKEY_ACK under the current key: already switched, nothing to do
            logger.info("recv REKEY_ACK conv=%d", self.conv)

    def _confirm(self, addr: Any, now: int) -> None:
        """The peer's first authenticated packet: it holds the session keys, and its source is
        the path from now on (whoever raced a copy of the HELLO from elsewhere got a WELCOME
        and nothing more)."""
        self.confirmed = True
        self.peer_addr = addr
        self._path.abandon()
        if self._state is _State.HANDSHAKE:  # server: tell the client, which may have no data
            self._establish(now)
            self._confirm_at = now + self.config.confirm_delay_ms

    def _from_new_address(self, addr: Any, highest: bool, size: int, now: int) -> None:
        """An authenticated packet from another address than the path. Only the newest packet
        may start a move (an old one re-sent from elsewhere is no sign of a move), and only a
        challenge goes there until it is answered."""
        if not self.confirmed:
            self._confirm(addr, now)
            return
        if not highest:
            return
        challenge = self._path.observe(addr, size, now)
        if challenge is not None:
            self._seal_raw(_CHALLENGE, challenge, to=addr)

    def _migrate(self, addr: Any) -> None:
        # The peer address changes only once the new address answered a challenge under the
        # session keys (docs/PROTOCOL.md "Path validation").
        old, self.peer_addr = self.peer_addr, addr
        self._events.append(events.PeerAddressChanged(old, addr))
