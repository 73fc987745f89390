"""Packet codecs of the tunnel security layer (docs/PROTOCOL.md has the full specification).

Pure functions: bytes in, named tuples out, ``MalformedPacket`` on anything that does not parse.
No crypto here: the MACs and AEAD tags are computed by ``crypto`` over the byte ranges named below.

Every datagram starts with the same 5 bytes, so a server can demultiplex sessions by ``conv``
before knowing anything else::

     0               1               2               3               4
    +-+-------------+---------------+---------------+---------------+---------------+
    |P|    type     |                      conv (32-bit, big-endian)                |
    +-+-------------+---------------+---------------+---------------+---------------+

``P`` is the key phase (``epoch & 1``) on secured packets and 0 on HELLO / WELCOME.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

PROTOCOL_VERSION = 3  # carried in HELLO, WELCOME and PROBE (2: X25519 key shares, path
# validation; 3: liveness probes, what a conversation carries, DATAGRAM, REFUSE, FEC)
PHASE_BIT = 0x80  # key phase flag in the type byte
TYPE_MASK = 0x7F  # packet type bits of the type byte
PREFIX_SIZE = 5  # bytes: type + conv, common to every packet
HEADER_SIZE = 9  # bytes: type + conv + seq, header (and AAD) of every secured packet
TIMESTAMP_SIZE = 8  # bytes, HELLO timestamp (Unix time in ms)
KEY_SHARE_SIZE = 32  # bytes, an X25519 public key (RFC 7748): client_share / server_share
COOKIE_SIZE = 16  # bytes, HELLO cookie field (all zero when the client holds no cookie)
MAC_SIZE = 16  # bytes, truncated HMAC-SHA256 of HELLO / WELCOME
HELLO_SIZE = 128  # bytes: HELLO is padded so WELCOME (and any retransmit of it) is smaller
WELCOME_SIZE = PREFIX_SIZE + 1 + KEY_SHARE_SIZE + MAC_SIZE  # 54 bytes
CHALLENGE_SIZE = 8  # bytes, body of PATH_CHALLENGE / PATH_RESPONSE
COOKIE_REPLY_SIZE = PREFIX_SIZE + MAC_SIZE + COOKIE_SIZE  # 37 bytes
HELLO_COOKIE_OFFSET = PREFIX_SIZE + 1 + TIMESTAMP_SIZE + KEY_SHARE_SIZE  # 46: where it sits
NO_COOKIE = bytes(COOKIE_SIZE)
HELLO_CARRIES_OFFSET = HELLO_COOKIE_OFFSET + COOKIE_SIZE  # 62: first pad byte, what is carried
HELLO_FLAGS_OFFSET = HELLO_CARRIES_OFFSET + 1  # 63: flags (HELLO_FLAG_*), zero before them
HELLO_FLAG_ORIGIN = 0x01  # the HELLO's extension field holds the client's sealed ORIGIN
HELLO_EXTENSION_OFFSET = HELLO_FLAGS_OFFSET + 1  # 64: the extension field, zero when unused
HELLO_EXTENSION_SIZE = 48  # bytes, up to the MAC
REFUSE_SIZE = PREFIX_SIZE + 2 + MAC_SIZE  # 23 bytes
EPOCH_BODY_SIZE = 4  # bytes, plaintext body of REKEY_INIT / REKEY_ACK
UINT32_MAX = 0xFFFFFFFF  # largest u32: conv, seq and epoch are 32-bit on the wire and in the nonce

PREFIX = struct.Struct(">BI")  # type byte, conv
# Header of a secured packet, which is also its AEAD associated data; the session packs and
# parses it with this Struct directly (its per-packet path)::
#
#     0        1            5            9
#     +--------+------------+------------+-------------------------------+---------+
#     |P| type |   conv     |    seq     |  ciphertext (body)            |  tag    |
#     +--------+------------+------------+-------------------------------+---------+
#        1          4            4          len(body)                     16 (0 in
#                                                                         plaintext mode)
HEADER = struct.Struct(">BII")  # type byte (PHASE_BIT | type), conv, seq
_HELLO_FIELDS = struct.Struct(">BIBQ32s16s")  # type, conv, version, timestamp_ms, share, cookie
_WELCOME_FIELDS = struct.Struct(">BIB32s")  # type, conv, version, server_share
_REFUSE_FIELDS = struct.Struct(">BIBB")  # type, conv, version, what the server carries
_EPOCH = struct.Struct(">I")
_NO_EXTENSION = bytes(HELLO_EXTENSION_SIZE)
assert HELLO_EXTENSION_OFFSET + HELLO_EXTENSION_SIZE == HELLO_SIZE - MAC_SIZE


class MalformedPacket(ValueError):
    """A datagram that does not parse (wrong size, unknown type, unsupported version)."""


class PacketType(enum.IntEnum):
    """Packet types (low 7 bits of the type byte)."""

    HELLO = 1  #: client -> server, opens a session (HMAC with the PSK-derived key)
    WELCOME = 2  #: server -> client, answers a HELLO (HMAC, bound to that HELLO)
    DATA = 3  #: either way, one opaque payload (one KCP datagram), AEAD-sealed
    REKEY_INIT = 4  #: rekey initiator, sealed under the current epoch (seed)
    REKEY_ACK = 5  #: rekey responder, sealed under the next epoch (seed)
    PING = 6  #: keepalive, empty sealed body
    CLOSE = 7  #: graceful close, empty sealed body
    PATH_CHALLENGE = 8  #: "do you receive me at this address?", 8 random bytes, sealed
    PATH_RESPONSE = 9  #: echo of a PATH_CHALLENGE's bytes, sealed
    COOKIE = 10  #: server -> client under load: "repeat your HELLO with this cookie" (no MAC)
    PROBE = 11  #: client -> server: "do you hold this conversation?" (HMAC, probe.py)
    UNKNOWN = 12  #: server -> client: "no such conversation here" (HMAC, bound to the PROBE)
    FEC = 13  #: either way, an FEC parity shard or loss report (tunnel/fec.py), sealed
    DATAGRAM = 14  #: either way, one fragment of an unreliable datagram, AEAD-sealed (kcpudp)
    REFUSE = 15  #: server -> client: "I carry something else" (HMAC, bound to the HELLO)


class Carries(enum.IntEnum):
    """What a conversation carries: the HELLO's byte at HELLO_CARRIES_OFFSET (docs/PROTOCOL.md,
    "Conversation payloads"). Client and server must agree, or the server REFUSEs."""

    STREAM = 0  #: one TCP stream in KCP (kcptcp)
    RELIABLE_DATAGRAMS = 1  #: UDP datagrams, each one KCP message (kcpudp --mode reliable)
    DATAGRAMS = 2  #: UDP datagrams in DATAGRAM packets, outside KCP (kcpudp --mode datagram)

    @property
    def label(self) -> str:
        """How log lines name it."""
        return _CARRIES_LABELS[self]


_CARRIES_LABELS = {Carries.STREAM: "a TCP stream (kcptcp)",
                   Carries.RELIABLE_DATAGRAMS: "reliable datagrams (kcpudp --mode reliable)",
                   Carries.DATAGRAMS: "unreliable datagrams (kcpudp --mode datagram)"}


def carries_label(value: int) -> str:
    """The log name of a carries byte, known or not."""
    try:
        return Carries(value).label
    except ValueError:
        return f"unknown payload kind {value}"


SECURED_TYPES = frozenset(
    {PacketType.DATA, PacketType.REKEY_INIT, PacketType.REKEY_ACK, PacketType.PING,
     PacketType.CLOSE, PacketType.PATH_CHALLENGE, PacketType.PATH_RESPONSE,
     PacketType.DATAGRAM, PacketType.FEC}
)
# A WELCOME, the answer to a source that has not proven it holds the session keys, is smaller
# than the HELLO it answers; path challenges keep to 3x instead (path.py; docs/SECURITY.md,
# "Amplification limits").
assert WELCOME_SIZE < HELLO_SIZE and COOKIE_REPLY_SIZE < HELLO_SIZE and REFUSE_SIZE < HELLO_SIZE


class Hello(NamedTuple):
    conv: int  #: conversation id chosen at random by the client
    version: int  #: PROTOCOL_VERSION
    timestamp_ms: int  #: client's Unix time in ms, for the server's freshness check
    client_share: bytes  #: the client's ephemeral X25519 public key, fresh per HELLO
    cookie: bytes  #: 16 bytes, zero when the client holds no cookie
    mac: bytes  #: HMAC over "portfwd/2 hello" then bytes [0, HELLO_SIZE - MAC_SIZE)
    carries: int = Carries.STREAM  #: what the conversation carries (a Carries value, or not)


class Welcome(NamedTuple):
    conv: int  #: echo of the HELLO's conv
    version: int  #: PROTOCOL_VERSION
    server_share: bytes  #: the server's ephemeral X25519 public key for this session
    mac: bytes  #: HMAC over "portfwd/2 welcome", the whole HELLO, bytes [0, WELCOME_SIZE - 16)


def peek_prefix(data: bytes) -> tuple[int, int]:
    """``(type, conv)`` of any datagram, for demultiplexing (type without the phase bit).

    ::

        0        1                               5
        +--------+-------------------------------+----
        |P| type |            conv               | ...
        +--------+-------------------------------+----
    """
    if len(data) < PREFIX_SIZE:
        raise MalformedPacket(f"datagram of {len(data)} bytes is shorter than the prefix")
    type_byte, conv = PREFIX.unpack_from(data)
    return type_byte & TYPE_MASK, conv


def pack_hello(conv: int, timestamp_ms: int, client_share: bytes,
               cookie: bytes = bytes(COOKIE_SIZE), carries: int = Carries.STREAM,
               flags: int = 0, extension: bytes = _NO_EXTENSION) -> bytes:
    """The authenticated part of a HELLO; the datagram is this followed by the 16-byte MAC.

    ::

        0        1      5         6              14             46       62  63  64    112    128
        +--------+------+---------+--------------+--------------+--------+---+---+-----+------+
        |0| 0x01 | conv | version | timestamp_ms | client_share | cookie | c | f | ext | mac  |
        +--------+------+---------+--------------+--------------+--------+---+---+-----+------+
            1       4        1           8              32          16     1   1    48    16

    ``c`` is what the conversation carries (:class:`Carries`); ``f`` holds flags: with
    HELLO_FLAG_ORIGIN, ``ext`` is the client's sealed ORIGIN (tunnel/origin.py), else zero.
    """
    if len(client_share) != KEY_SHARE_SIZE:
        raise ValueError("client_share must be 32 bytes")
    if len(cookie) != COOKIE_SIZE:
        raise ValueError("cookie must be 16 bytes")
    if len(extension) != HELLO_EXTENSION_SIZE:
        raise ValueError(f"extension must be {HELLO_EXTENSION_SIZE} bytes")
    return _HELLO_FIELDS.pack(
        PacketType.HELLO, conv, PROTOCOL_VERSION, timestamp_ms, client_share, cookie
    ) + bytes([carries, flags]) + extension


def hello_extension(hello: bytes, flag: int) -> bytes | None:
    """The extension field of a HELLO (already authenticated) whose flags have ``flag``, else
    None. Servers before the flags existed never read byte 63 or the field: they ignore both."""
    if len(hello) != HELLO_SIZE or not hello[HELLO_FLAGS_OFFSET] & flag:
        return None
    return bytes(hello[HELLO_EXTENSION_OFFSET:HELLO_EXTENSION_OFFSET + HELLO_EXTENSION_SIZE])


def unpack_hello(data: bytes) -> Hello:
    """Parse a HELLO (layout in :func:`pack_hello`); the MAC is *not* verified here."""
    if len(data) != HELLO_SIZE:
        raise MalformedPacket(f"HELLO must be {HELLO_SIZE} bytes, got {len(data)}")
    type_byte, conv, version, timestamp_ms, share, cookie = _HELLO_FIELDS.unpack_from(data)
    if type_byte != PacketType.HELLO:
        raise MalformedPacket(f"not a HELLO: type byte 0x{type_byte:02x}")
    if version != PROTOCOL_VERSION:
        raise MalformedPacket(f"unsupported protocol version {version}")
    return Hello(conv, version, timestamp_ms, share, cookie, bytes(data[HELLO_SIZE - MAC_SIZE:]),
                 data[HELLO_CARRIES_OFFSET])


def pack_welcome(conv: int, server_share: bytes) -> bytes:
    """The part of a WELCOME that the MAC covers after the HELLO; the datagram appends the MAC.

    ::

        0        1            5         6                  38       54
        +--------+------------+---------+------------------+--------+
        |0| 0x02 |   conv     | version |  server_share    |  mac   |
        +--------+------------+---------+------------------+--------+
           1          4           1             32            16
    """
    if len(server_share) != KEY_SHARE_SIZE:
        raise ValueError("server_share must be 32 bytes")
    return _WELCOME_FIELDS.pack(PacketType.WELCOME, conv, PROTOCOL_VERSION, server_share)


def unpack_welcome(data: bytes) -> Welcome:
    """Parse a WELCOME (layout in :func:`pack_welcome`); the MAC is *not* verified here."""
    if len(data) != WELCOME_SIZE:
        raise MalformedPacket(f"WELCOME must be {WELCOME_SIZE} bytes, got {len(data)}")
    type_byte, conv, version, server_share = _WELCOME_FIELDS.unpack_from(data)
    if type_byte != PacketType.WELCOME:
        raise MalformedPacket(f"not a WELCOME: type byte 0x{type_byte:02x}")
    if version != PROTOCOL_VERSION:
        raise MalformedPacket(f"unsupported protocol version {version}")
    return Welcome(conv, version, server_share, bytes(data[WELCOME_SIZE - MAC_SIZE:]))


class CookieReply(NamedTuple):
    conv: int  #: echo of the HELLO's conv
    hello_mac: bytes  #: echo of the HELLO's MAC: only who saw that HELLO can answer it
    cookie: bytes  #: 16 bytes to put in the HELLO's cookie field


def pack_cookie(conv: int, hello_mac: bytes, cookie: bytes) -> bytes:
    """A COOKIE datagram: the answer of a loaded server to a HELLO without a valid cookie.

    ::

        0        1            5                  21                 37
        +--------+------------+------------------+------------------+
        |0| 0x0a |   conv     |   HELLO's mac    |      cookie      |
        +--------+------------+------------------+------------------+
           1          4               16                 16

    It carries no MAC of its own: the echoed HELLO MAC binds it to one HELLO (an off-path
    sender cannot know it), and a wrong cookie costs the client one more round trip, no more.
    """
    if len(hello_mac) != MAC_SIZE or len(cookie) != COOKIE_SIZE:
        raise ValueError("hello_mac and cookie must be 16 bytes each")
    return PREFIX.pack(PacketType.COOKIE, conv) + hello_mac + cookie


def unpack_cookie(data: bytes) -> CookieReply:
    """Parse a COOKIE datagram (layout in :func:`pack_cookie`)."""
    if len(data) != COOKIE_REPLY_SIZE:
        raise MalformedPacket(f"COOKIE must be {COOKIE_REPLY_SIZE} bytes, got {len(data)}")
    type_byte, conv = PREFIX.unpack_from(data)
    if type_byte != PacketType.COOKIE:
        raise MalformedPacket(f"not a COOKIE: type byte 0x{type_byte:02x}")
    return CookieReply(conv, bytes(data[PREFIX_SIZE:PREFIX_SIZE + MAC_SIZE]),
                       bytes(data[PREFIX_SIZE + MAC_SIZE:]))


REFUSE_FULL = 0xFF  # a REFUSE's carries byte from a server at its --max-conns (no Carries value)


class Refuse(NamedTuple):
    conv: int  #: echo of the HELLO's conv
    version: int  #: PROTOCOL_VERSION
    carries: int  #: what the server carries (a Carries value), or REFUSE_FULL
    mac: bytes  #: HMAC over "portfwd/3 refuse", the whole HELLO, bytes [0, REFUSE_SIZE - 16)


def pack_refuse(conv: int, carries: int) -> bytes:
    """The part of a REFUSE that the MAC covers after the HELLO; the datagram appends the MAC.
    The server's answer to an authenticated HELLO for a kind of conversation it does not carry
    (``carries`` = what it does), or to one it has no room for (``carries`` = REFUSE_FULL).

    ::

        0        1            5         6         7        23
        +--------+------------+---------+---------+--------+
        |0| 0x0f |   conv     | version | carries |  mac   |
        +--------+------------+---------+---------+--------+
           1          4           1         1        16
    """
    return _REFUSE_FIELDS.pack(PacketType.REFUSE, conv, PROTOCOL_VERSION, carries)


def unpack_refuse(data: bytes) -> Refuse:
    """Parse a REFUSE (layout in :func:`pack_refuse`); the MAC is *not* verified here."""
    if len(data) != REFUSE_SIZE:
        raise MalformedPacket(f"REFUSE must be {REFUSE_SIZE} bytes, got {len(data)}")
    type_byte, conv, version, carries = _REFUSE_FIELDS.unpack_from(data)
    if type_byte != PacketType.REFUSE:
        raise MalformedPacket(f"not a REFUSE: type byte 0x{type_byte:02x}")
    return Refuse(conv, version, carries, bytes(data[REFUSE_SIZE - MAC_SIZE:]))


def pack_epoch(epoch: int) -> bytes:
    """Body of REKEY_INIT / REKEY_ACK: the epoch being switched *to*, 4 bytes big-endian.

    ::

        0                       4
        +-----------------------+
        |      next epoch       |
        +-----------------------+
    """
    return _EPOCH.pack(epoch)


def unpack_epoch(body: bytes) -> int:
    """Parse a REKEY_INIT / REKEY_ACK body (layout in :func:`pack_epoch`)."""
    if len(body) != EPOCH_BODY_SIZE:
        raise MalformedPacket(f"rekey body must be {EPOCH_BODY_SIZE} bytes, got {len(body)}")
    return _EPOCH.unpack(body)[0]
