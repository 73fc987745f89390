"""Packet codecs: round trips (hypothesis), byte-at-a-time truncation, junk never escapes as
anything but MalformedPacket."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tunnel_helpers import Header, pack_header, unpack_header

from portfwd.tunnel import wire
from portfwd.tunnel.wire import MalformedPacket, PacketType

u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
u64 = st.integers(min_value=0, max_value=2**64 - 1)
random32 = st.binary(min_size=32, max_size=32)
cookie16 = st.binary(min_size=16, max_size=16)
secured = st.sampled_from(sorted(wire.SECURED_TYPES))


def _hello(conv: int = 1, ts: int = 2, share: bytes = bytes(32)) -> bytes:
    return wire.pack_hello(conv, ts, share) + b"M" * wire.MAC_SIZE


def _welcome(conv: int = 1, share: bytes = bytes(32)) -> bytes:
    return wire.pack_welcome(conv, share) + b"M" * wire.MAC_SIZE


@given(conv=u32, ts=u64, share=random32, cookie=cookie16,
       mac=st.binary(min_size=16, max_size=16))
def test_hello_round_trip(conv: int, ts: int, share: bytes, cookie: bytes, mac: bytes) -> None:
    data = wire.pack_hello(conv, ts, share, cookie) + mac
    assert len(data) == wire.HELLO_SIZE
    assert wire.unpack_hello(data) == wire.Hello(conv, wire.PROTOCOL_VERSION, ts, share, cookie,
                                                 mac)
    assert wire.peek_prefix(data) == (PacketType.HELLO, conv)


def test_hello_layout() -> None:
    # docs/PROTOCOL.md: share at bytes 14..46, cookie at 46..62 (zero by default), zero padding
    # up to the MAC at 112..128.
    share, cookie = bytes(range(32)), bytes(range(100, 116))
    body = wire.pack_hello(7, 9, share, cookie)
    assert len(body) == wire.HELLO_SIZE - wire.MAC_SIZE == 112
    assert body[:6] == bytes([PacketType.HELLO, 0, 0, 0, 7, wire.PROTOCOL_VERSION])
    assert body[6:14] == (9).to_bytes(8, "big")
    assert body[14:46] == share and body[46:62] == cookie and body[62:] == bytes(50)
    assert wire.pack_hello(7, 9, share)[46:62] == bytes(wire.COOKIE_SIZE)
    assert wire.unpack_hello(wire.pack_hello(7, 9, share) + bytes(16)).cookie == bytes(16)


@given(conv=u32, share=random32, mac=st.binary(min_size=16, max_size=16))
def test_welcome_round_trip(conv: int, share: bytes, mac: bytes) -> None:
    data = wire.pack_welcome(conv, share) + mac
    assert len(data) == wire.WELCOME_SIZE
    assert wire.unpack_welcome(data) == wire.Welcome(conv, wire.PROTOCOL_VERSION, share, mac)
    assert wire.peek_prefix(data) == (PacketType.WELCOME, conv)


@given(ptype=secured, phase=st.integers(0, 1), conv=u32, seq=u32, body=st.binary(max_size=64))
def test_header_round_trip(ptype: PacketType, phase: int, conv: int, seq: int,
                           body: bytes) -> None:
    # The session packs and parses headers with wire.HEADER itself; the helpers are the tests'.
    data = pack_header(ptype, phase, conv, seq) + body
    assert len(pack_header(ptype, phase, conv, seq)) == wire.HEADER_SIZE
    assert unpack_header(data) == Header(ptype, phase, conv, seq)
    assert wire.HEADER.unpack_from(data) == (ptype | phase * wire.PHASE_BIT, conv, seq)
    assert wire.peek_prefix(data) == (ptype, conv)


@given(epoch=u32)
def test_epoch_body_round_trip(epoch: int) -> None:
    assert wire.unpack_epoch(wire.pack_epoch(epoch)) == epoch


def test_path_validation_types() -> None:
    # docs/PROTOCOL.md: PATH_CHALLENGE = 8, PATH_RESPONSE = 9, both sealed, 8-byte bodies.
    assert (PacketType.PATH_CHALLENGE, PacketType.PATH_RESPONSE) == (8, 9)
    assert {PacketType.PATH_CHALLENGE, PacketType.PATH_RESPONSE} <= wire.SECURED_TYPES
    assert wire.CHALLENGE_SIZE == 8 and wire.PROTOCOL_VERSION >= 2


def test_welcome_is_smaller_than_hello() -> None:
    # A reply no larger than its request to an unvalidated address: no amplification
    # (docs/SECURITY.md, "Amplification limits").
    assert wire.WELCOME_SIZE < wire.HELLO_SIZE


@pytest.mark.parametrize("full,parse", [
    (_hello(), wire.unpack_hello),
    (_welcome(), wire.unpack_welcome),
    (wire.pack_epoch(3), wire.unpack_epoch),
])
def test_byte_at_a_time_truncation(full: bytes, parse) -> None:
    parse(full)
    for n in range(len(full)):
        with pytest.raises(MalformedPacket):
            parse(full[:n])


def test_peek_prefix_truncation() -> None:
    for n in range(wire.PREFIX_SIZE):
        with pytest.raises(MalformedPacket):
            wire.peek_prefix(bytes(n))


def test_oversized_handshake_packets_rejected() -> None:
    with pytest.raises(MalformedPacket):
        wire.unpack_hello(_hello() + b"x")
    with pytest.raises(MalformedPacket):
        wire.unpack_welcome(_welcome() + b"x")
    with pytest.raises(MalformedPacket):
        wire.unpack_epoch(b"12345")


def test_wrong_type_and_version_rejected() -> None:
    hello = bytearray(_hello())
    hello[0] = PacketType.WELCOME
    with pytest.raises(MalformedPacket):
        wire.unpack_hello(bytes(hello))
    hello = bytearray(_hello())
    hello[5] = wire.PROTOCOL_VERSION + 1
    with pytest.raises(MalformedPacket):
        wire.unpack_hello(bytes(hello))
    welcome = bytearray(_welcome())
    welcome[5] = 0
    with pytest.raises(MalformedPacket):
        wire.unpack_welcome(bytes(welcome))


def test_pack_misuse_raises_value_error() -> None:
    with pytest.raises(ValueError):
        wire.pack_hello(1, 2, b"short")
    with pytest.raises(ValueError):
        wire.pack_hello(1, 2, bytes(32), b"short")
    with pytest.raises(ValueError):
        wire.pack_welcome(1, b"short")


@settings(max_examples=500)
@given(data=st.binary(max_size=200))
def test_junk_only_raises_malformed(data: bytes) -> None:
    for parse in (wire.unpack_hello, wire.unpack_welcome, wire.peek_prefix,
                  wire.unpack_epoch):
        try:
            parse(data)
        except MalformedPacket:
            pass
