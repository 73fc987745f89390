"""Liveness probes, sans-IO: how a client learns fast that the server lost its conversation
(a crash or restart without a goodbye) without the server ever answering unauthenticated input
(docs/PROTOCOL.md "Liveness probes", docs/SECURITY.md).

Glossary:
  probe   -- PROBE (type 11), client -> server: conv, a fresh nonce and the time, under the
             PSK-derived handshake MAC alone, so a server that holds no keys for the conversation
             (it restarted) can still verify it, as it verifies a HELLO.
  unknown -- UNKNOWN (type 12), server -> client: "I hold no conversation with this conv", bound
             to one probe by its MAC (only who saw that probe can answer it), 21 bytes for 46.
  silence -- time since the client last heard an authenticated packet of the conversation.

The client probes when it has heard nothing for PROBE_SILENCE_MS while KCP has data the server
has not acknowledged, or, idle, once the server's keepalive is PROBE_SILENCE_MS overdue; then
every PROBE_INTERVAL_MS while the silence lasts. A server that knows the conversation answers
nothing (its packets are the answer); one that does not answers each probe at most once (the
HELLO replay cache holds its nonce), within a global reply budget.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from . import crypto
from .cookie import TokenBucket
from .wire import MAC_SIZE, PREFIX, PREFIX_SIZE, PROTOCOL_VERSION, MalformedPacket, PacketType

PROBE_LABEL = b"portfwd/3 probe"  # first input of a PROBE's MAC: never a HELLO's or WELCOME's
UNKNOWN_LABEL = b"portfwd/3 unknown"  # first input of an UNKNOWN's MAC
NONCE_SIZE = 16  # bytes, random per probe: the replay cache's key
PROBE_SIZE = PREFIX_SIZE + 1 + 8 + NONCE_SIZE + MAC_SIZE  # 46 bytes
UNKNOWN_SIZE = PREFIX_SIZE + MAC_SIZE  # 21 bytes: smaller than the probe it answers
PROBE_SILENCE_MS = 1000  # ms without a word from the server, data outstanding, before probing
PROBE_INTERVAL_MS = 1000  # ms between probes while the silence lasts
PROBES_REMEMBERED = 4  # recent probes an UNKNOWN may answer (one may be late)
UNKNOWN_REPLY_RATE_PER_S = 2000.0  # UNKNOWN replies per second, all sources together
_FIELDS = struct.Struct(">BIBQ16s")  # type, conv, version, timestamp_ms, nonce
_PROBE = int(PacketType.PROBE)
_UNKNOWN = int(PacketType.UNKNOWN)

assert UNKNOWN_SIZE < PROBE_SIZE


def pack_probe(conv: int, timestamp_ms: int, nonce: bytes) -> bytes:
    """The part of a PROBE its MAC covers; the datagram appends the 16-byte MAC.

    ::

        0        1            5         6              14             30       46
        +--------+------------+---------+--------------+--------------+--------+
        |0| 0x0b |   conv     | version | timestamp_ms |    nonce     |  mac   |
        +--------+------------+---------+--------------+--------------+--------+
           1          4           1            8              16          16
    """
    if len(nonce) != NONCE_SIZE:
        raise ValueError("nonce must be 16 bytes")
    return _FIELDS.pack(_PROBE, conv, PROTOCOL_VERSION, timestamp_ms, nonce)


def unpack_probe(data: bytes) -> tuple[int, int, bytes]:
    """``(conv, timestamp_ms, nonce)`` of a PROBE (layout in :func:`pack_probe`); the MAC is
    *not* verified here."""
    if len(data) != PROBE_SIZE:
        raise MalformedPacket(f"PROBE must be {PROBE_SIZE} bytes, got {len(data)}")
    type_byte, conv, version, timestamp_ms, nonce = _FIELDS.unpack_from(data)
    if type_byte != _PROBE:
        raise MalformedPacket(f"not a PROBE: type byte 0x{type_byte:02x}")
    if version != PROTOCOL_VERSION:
        raise MalformedPacket(f"unsupported protocol version {version}")
    return conv, timestamp_ms, nonce


def pack_unknown(mac: crypto.HandshakeMac, probe: bytes) -> bytes:
    """The UNKNOWN datagram answering ``probe`` (an already verified PROBE).

    ::

        0        1            5                  21
        +--------+------------+------------------+
        |0| 0x0c |   conv     |       mac        |
        +--------+------------+------------------+
           1          4               16

    mac = HMAC(handshake key, "portfwd/3 unknown" || the whole PROBE || bytes [0, 5)).
    """
    head = PREFIX.pack(_UNKNOWN, int.from_bytes(probe[1:PREFIX_SIZE], "big"))
    return head + mac(UNKNOWN_LABEL, probe, head)


class ClientProbes:
    """The client side: when a probe is due, the probes themselves, and whether a datagram is
    an UNKNOWN answering one of them."""

    def __init__(self, mac: crypto.HandshakeMac, conv: int, wall_offset_ms: int,
                 keepalive_interval_ms: int, now: int,
                 random_bytes: Callable[[int], bytes]) -> None:
        self._mac = mac
        self._conv = conv
        self._wall_offset = wall_offset_ms  # Unix ms minus the monotonic ms of ``now``
        self._idle_silence = keepalive_interval_ms + PROBE_SILENCE_MS
        self._random_bytes = random_bytes
        self._sent: list[bytes] = []  # recent probes, newest last
        self._last_probe: int | None = None  # ms of the last probe of this silence
        self._outstanding_since: int | None = None  # ms: data unacknowledged since then
        self.last_heard: int = now  #: ms: the server's last authenticated packet
        self.sent: int = 0  #: probes made

    def heard(self, now: int) -> None:
        """An authenticated packet of this conversation arrived: the server knows it."""
        self.last_heard = now
        self._last_probe = None
        self._sent = []

    def deadline(self, outstanding: bool, now: int) -> int:
        """When the next probe is due; ``outstanding``: the server owes us an acknowledgement
        (since ``now``, if it did not before). The silence that counts with data outstanding
        starts when the data did, so the first write after an idle spell is not probed."""
        if self._last_probe is not None:
            return self._last_probe + PROBE_INTERVAL_MS
        if not outstanding:
            self._outstanding_since = None
            return self.last_heard + self._idle_silence
        if self._outstanding_since is None:
            self._outstanding_since = now
        return max(self.last_heard, self._outstanding_since) + PROBE_SILENCE_MS

    def next(self, now: int) -> bytes:
        """A fresh PROBE to send at ``now`` (monotonic ms)."""
        body = pack_probe(self._conv, now + self._wall_offset, self._random_bytes(NONCE_SIZE))
        probe = body + self._mac(PROBE_LABEL, body)
        self._sent = [*self._sent[1 - PROBES_REMEMBERED:], probe]
        self._last_probe = now
        self.sent += 1
        return probe

    def is_unknown(self, data: bytes) -> bool:
        """True if ``data`` is an UNKNOWN that answers one of our recent probes."""
        if len(data) != UNKNOWN_SIZE or data[0] != _UNKNOWN or not self._sent:
            return False
        head = data[:PREFIX_SIZE]
        return any(crypto.mac_equal(self._mac(UNKNOWN_LABEL, probe, head), data[PREFIX_SIZE:])
                   for probe in self._sent)


class ProbeResponder:
    """The server side: verify a PROBE for a conv it does not hold and make its UNKNOWN.

    ``first_sight(key, wall_ms)`` is the HELLO replay cache (HandshakeAcceptor.first_sight):
    True the first time it sees ``key`` (then remembered), False for a repeat or when it is
    full. Checks run cheapest first, the MAC before anything else, as for a HELLO.
    """

    def __init__(self, psk: bytes | None, timestamp_window_ms: int,
                 first_sight: Callable[[bytes, int], bool],
                 started_wall_ms: int | None = None,
                 rate_per_s: float = UNKNOWN_REPLY_RATE_PER_S) -> None:
        self._mac = crypto.handshake_mac_for(psk)
        self._window = timestamp_window_ms
        self._first_sight = first_sight
        self._started_wall_ms = started_wall_ms
        self._budget = TokenBucket(rate_per_s, rate_per_s, 0)
        self.answered: int = 0  #: UNKNOWN replies sent
        self.dropped_auth: int = 0  #: MAC did not verify (wrong PSK, forged, other mode)
        self.dropped_malformed: int = 0  #: not a well-formed PROBE
        self.dropped_stale: int = 0  #: timestamp outside the window or before our start
        self.dropped_replay: int = 0  #: nonce seen before (or the cache is full)
        self.dropped_rate: int = 0  #: over the reply budget

    def verify(self, data: bytes, wall_ms: int) -> bool:
        """True for an authentic, fresh PROBE seen for the first time (its nonce is then
        remembered, so a copy is never answered, whoever holds the conv later)."""
        if len(data) != PROBE_SIZE or data[0] != _PROBE:
            self.dropped_malformed += 1
            return False
        if not crypto.mac_equal(self._mac(PROBE_LABEL, data[:-MAC_SIZE]), data[-MAC_SIZE:]):
            self.dropped_auth += 1
            return False
        try:
            _, timestamp_ms, nonce = unpack_probe(data)
        except MalformedPacket:
            self.dropped_malformed += 1
            return False
        if abs(wall_ms - timestamp_ms) > self._window or (
                self._started_wall_ms is not None and timestamp_ms < self._started_wall_ms):
            self.dropped_stale += 1
            return False
        if not self._first_sight(b"probe" + nonce, wall_ms):
            self.dropped_replay += 1
            return False
        return True

    def answer(self, data: bytes, now: int, wall_ms: int) -> bytes | None:
        """The UNKNOWN for a PROBE whose conv this server does not hold, or None (dropped and
        counted: nothing is ever sent for a datagram that does not verify)."""
        if not self.verify(data, wall_ms):
            return None
        if not self._budget.take(now):
            self.dropped_rate += 1
            return None
        self.answered += 1
        return pack_unknown(self._mac, data)
