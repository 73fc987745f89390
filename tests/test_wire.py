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
secured = st.sampled_from(sorted(wire.SECURED_TYPES))


def _hello(conv: int = 1, ts: int = 2, rnd: bytes = bytes(32)) -> bytes:
    return wire.pack_hello(conv, ts, rnd) + b"M" * wire.MAC_SIZE


def _welcome(conv: int = 1, rnd: bytes = bytes(32)) -> bytes:
    return wire.pack_welcome(conv, rnd) + b"M" * wire.MAC_SIZE


@given(conv=u32, ts=u64, rnd=random32, mac=st.binary(min_size=16, max_size=16))
def test_hello_round_trip(conv: int, ts: int, rnd: bytes, mac: bytes) -> None:
    data = wire.pack_hello(conv, ts, rnd) + mac
    assert len(data) == wire.HELLO_SIZE
    assert wire.unpack_hello(data) == wire.Hello(conv, wire.PROTOCOL_VERSION, ts, rnd, mac)
    assert wire.peek_prefix(data) == (PacketType.HELLO, conv)


@given(conv=u32, rnd=random32, mac=st.binary(min_size=16, max_size=16))
def test_welcome_round_trip(conv: int, rnd: bytes, mac: bytes) -> None:
    data = wire.pack_welcome(conv, rnd) + mac
    assert len(data) == wire.WELCOME_SIZE
    assert wire.unpack_welcome(data) == wire.Welcome(conv, wire.PROTOCOL_VERSION, rnd, mac)
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
