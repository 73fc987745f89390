"""The PROXY protocol codec (portfwd.policy.proxy): both versions, every family, TLVs, CRC32C,
malformed input, byte-at-a-time feeding."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portfwd.policy.proxy import (
    V2_SIGNATURE,
    Command,
    Family,
    MalformedHeader,
    ProxyParser,
    TlvType,
    Transport,
    crc32c,
    pack,
    pack_v1,
    pack_v2,
)


def parse(data: bytes):
    result = ProxyParser().feed(data)
    assert result is not None
    return result


def parse_bytewise(data: bytes):
    parser = ProxyParser()
    for i in range(len(data)):
        result = parser.feed(data[i:i + 1])
        if result is not None:
            return result, i + 1
    return None, len(data)


# -- v1 ---------------------------------------------------------------------------------------

def test_v1_tcp4_exact_bytes_and_rest():
    line = pack_v1(("192.0.2.1", 56324), ("198.51.100.7", 443))
    assert line == b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
    result = parse(line + b"GET / HTTP/1.0\r\n")
    assert result.rest == b"GET / HTTP/1.0\r\n"
    h = result.header
    assert (h.version, h.command, h.family) == (1, Command.PROXY, Family.INET)
    assert h.source == ("192.0.2.1", 56324) and h.destination == ("198.51.100.7", 443)
    assert h.has_address


def test_v1_tcp6():
    line = pack_v1(("2001:db8::1", 1), ("2001:db8::2", 65535))
    assert line == b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n"
    h = parse(line).header
    assert h.family == Family.INET6 and h.source == ("2001:db8::1", 1)


def test_v1_v4_mapped_written_as_tcp4():
    assert pack_v1(("::ffff:10.1.2.3", 5), ("127.0.0.1", 6)) == \
        b"PROXY TCP4 10.1.2.3 127.0.0.1 5 6\r\n"


def test_v1_mixed_families_written_as_tcp6():
    line = pack_v1(("10.1.2.3", 5), ("::1", 6))
    h = parse(line).header
    assert h.family == Family.INET6 and h.destination == ("::1", 6)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n",
                                  b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"])
def test_v1_unknown(line):
    assert pack_v1(None, None) == b"PROXY UNKNOWN\r\n"
    h = parse(line + b"x").header
    assert h.family == Family.UNSPEC and h.source is None and not h.has_address


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",  # too many fields
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # too few
    b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",  # double space
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # leading zero
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",  # port range
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 ::1 ::2 1 2\r\n",  # v6 in TCP4
    b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF without CR
    b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n",
])
def test_v1_malformed(line):
    with pytest.raises(MalformedHeader):
        ProxyParser().feed(line)


def test_v1_without_crlf_in_107_bytes():
    parser = ProxyParser()
    assert parser.feed(b"PROXY UNKNOWN " + b"a" * 92) is None  # 106 bytes: could still end
    with pytest.raises(MalformedHeader):
        parser.feed(b"a")


def test_v1_longest_line_is_accepted():
    line = (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
            b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
    assert len(line) == 104
    assert parse(line).header.source[1] == 65535


# -- v2 ---------------------------------------------------------------------------------------

def test_v2_inet_exact_bytes():
    header = pack_v2(("192.0.2.1", 56324), ("198.51.100.7", 443))
    assert header == (V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([192, 0, 2, 1, 198, 51, 100, 7])
                      + struct.pack("!HH", 56324, 443))
    h = parse(header + b"\x00rest").header
    assert (h.version, h.family, h.transport) == (2, Family.INET, Transport.STREAM)
    assert h.source == ("192.0.2.1", 56324) and h.destination == ("198.51.100.7", 443)
    assert parse(header + b"\x00rest").rest == b"\x00rest"


def test_v2_inet6():
    header = pack_v2(("2001:db8::1", 1000), ("2001:db8::2", 22))
    assert header[13] == 0x21 and len(header) == 16 + 36
    h = parse(header).header
    assert h.family == Family.INET6 and h.source == ("2001:db8::1", 1000)


def test_v2_v4_mapped_is_inet():
    header = pack_v2(("::ffff:10.0.0.1", 1), ("::ffff:10.0.0.2", 2))
    assert parse(header).header.source == ("10.0.0.1", 1)


def test_v2_unix():
    header = pack_v2("/run/a.sock", "/run/b.sock")
    assert header[13] == 0x31 and len(header) == 16 + 216
    h = parse(header).header
    assert h.family == Family.UNIX and (h.source, h.destination) == ("/run/a.sock", "/run/b.sock")


def test_v2_dgram_transport():
    header = pack_v2(("10.0.0.1", 1), ("10.0.0.2", 2), transport=Transport.DGRAM)
    assert parse(header).header.transport == Transport.DGRAM


def test_v2_local_ignores_addresses():
    header = pack_v2(None, None, command=Command.LOCAL)
    assert header == V2_SIGNATURE + b"\x20\x00\x00\x00"
    h = parse(header).header
    assert h.command == Command.LOCAL and not h.has_address
    # A LOCAL header may still carry an address block: the receiver must ignore it.
    with_block = V2_SIGNATURE + b"\x20\x11\x00\x0c" + bytes(12)
    assert parse(with_block).header.source is None


def test_v2_unspec_with_padding_skipped():
    header = V2_SIGNATURE + b"\x21\x00\x00\x05" + b"12345"
    result = parse(header + b"data")
    assert result.header.family == Family.UNSPEC and result.rest == b"data"


def test_v2_tlvs_roundtrip():
    tlvs = ((TlvType.ALPN, b"h2"), (TlvType.AUTHORITY, b"example.com"),
            (TlvType.UNIQUE_ID, b"x" * 128), (0xE0, b""), (TlvType.NOOP, b"\0\0"))
    header = pack_v2(("10.0.0.1", 1), ("10.0.0.2", 2), tlvs=tlvs)
    h = parse(header).header
    assert h.tlvs == tuple((int(t), v) for t, v in tlvs)
    assert h.tlv(TlvType.AUTHORITY) == b"example.com" and h.tlv(0x99) is None


def test_v2_crc32c_checked():
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 B.4 check value
    header = pack_v2(("10.0.0.1", 1), ("10.0.0.2", 2), tlvs=((1, b"h2"),), crc=True)
    assert parse(header).header.tlv(TlvType.CRC32C) is not None
    corrupt = bytearray(header)
    corrupt[16] ^= 1  # source address
    with pytest.raises(MalformedHeader, match="CRC32C"):
        parse(bytes(corrupt))


@pytest.mark.parametrize("header", [
    V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),  # version 1 in binary
    V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
    V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
    V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),  # family 4
    V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12),  # transport 3
    V2_SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11),  # too short for INET
    V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),  # too short for INET6
    V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(14),  # 2 bytes: a truncated TLV
    V2_SIGNATURE + b"\x21\x11\x00\x10" + bytes(12) + b"\x01\x00\x05x",  # TLV past the end
    V2_SIGNATURE + b"\x21\x11\x00\x13" + bytes(12) + b"\x03\x00\x04abcd",  # bad CRC
    V2_SIGNATURE + b"\x21\x11\x00\x0e" + bytes(12) + b"\x03\x00\x00"[:2],
])
def test_v2_malformed(header):
    with pytest.raises(MalformedHeader):
        ProxyParser().feed(header)


def test_v2_unique_id_over_128_bytes():
    header = pack_v2(("10.0.0.1", 1), ("10.0.0.2", 2), tlvs=((TlvType.UNIQUE_ID, b"u" * 129),))
    with pytest.raises(MalformedHeader):
        parse(header)


def test_v2_bad_version_fails_before_the_length_arrives():
    with pytest.raises(MalformedHeader):
        ProxyParser().feed(V2_SIGNATURE + b"\x11")


# -- detection and incremental feeding --------------------------------------------------------

@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"PROXX", b"\r\n\r\n\x01",
                                  b"proxy "])
def test_not_a_header_fails_at_the_first_wrong_byte(data):
    with pytest.raises(MalformedHeader):
        ProxyParser().feed(data)


def test_version_restriction():
    with pytest.raises(MalformedHeader):
        ProxyParser(allow_v1=False).feed(b"PROXY ")
    with pytest.raises(MalformedHeader):
        ProxyParser(allow_v2=False).feed(V2_SIGNATURE)


@pytest.mark.parametrize("header", [
    pack_v1(("192.0.2.1", 56324), ("198.51.100.7", 443)),
    pack_v1(None, None),
    pack_v2(("2001:db8::1", 1000), ("2001:db8::2", 22), tlvs=((1, b"h2"),), crc=True),
    pack_v2("/a", "/b"),
    pack_v2(None, None, command=Command.LOCAL),
])
def test_byte_at_a_time_equals_one_read(header):
    whole = parse(header + b"after")
    result, used = parse_bytewise(header + b"after")
    assert used == len(header) and result.header == whole.header and result.rest == b""


@pytest.mark.parametrize("header", [pack_v1(("1.2.3.4", 1), ("5.6.7.8", 2)),
                                    pack_v2(("1.2.3.4", 1), ("5.6.7.8", 2))])
def test_truncated_header_needs_more(header):
    parser = ProxyParser()
    assert parser.feed(header[:-1]) is None
    assert parser.feed(header[-1:] + b"z").rest == b"z"


def test_feeding_after_done_is_a_caller_error():
    parser = ProxyParser()
    parser.feed(pack_v1(None, None))
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
port = st.integers(0, 65535)


@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), port, port,
       st.lists(st.tuples(st.integers(0, 255).filter(lambda t: t not in (3, 5)),
                          st.binary(max_size=40)), max_size=4),
       st.binary(max_size=50), st.lists(st.integers(1, 20), min_size=1, max_size=30),
       st.booleans())
def test_any_split_parses_the_same(hosts, sport, dport, tlvs, rest, cuts, v1):
    src, dst = (hosts[0], sport), (hosts[1], dport)
    header = pack_v1(src, dst) if v1 else pack_v2(src, dst, tlvs=tuple(tlvs))
    data = header + rest
    parser, result, offset = ProxyParser(), None, 0
    for cut in itertools.cycle(cuts):
        if result is not None or offset >= len(data):
            break
        result = parser.feed(data[offset:offset + cut])
        offset += cut
    assert result is not None
    assert result.header.source == src and result.header.destination == dst
    assert result.rest + data[offset:] == rest
    if not v1:
        assert result.header.tlvs == tuple(tlvs)


@given(st.binary(min_size=1, max_size=300))
def test_garbage_never_raises_anything_but_malformed(data):
    try:
        ProxyParser().feed(data)
    except MalformedHeader:
        pass


@pytest.mark.parametrize(("source", "destination"), [
    (("127.0.0.1", 45678), ("10.0.0.2", 80)),
    (("::1", 1), ("2001:db8::5", 443)),
    (("::ffff:192.0.2.1", 5), ("::1", 6)),  # v4-mapped: the general rules
    (("::ffff:192.0.2.1", 5), ("::ffff:192.0.2.2", 6)),  # both mapped: IPv4
    (("192.0.2.1", 5), ("::1", 6)),  # mixed: written v4-mapped
    (("fe80::1%lo", 5), ("fe80::2%lo", 6)),
])
def test_the_forwarders_pack_is_pack_v2(source, destination) -> None:
    """pack(2, ...) takes a shortcut for plain addresses; its bytes are pack_v2's, and they parse
    back to the addresses given (v4-mapped ones as IPv4 where both are)."""
    header = pack(2, source, destination)
    assert header == pack_v2(source, destination)
    assert pack(1, source, destination) == pack_v1(source, destination)
    assert parse(header).header.source[1] == source[1]


def test_pack_refuses_what_pack_v2_refuses() -> None:
    with pytest.raises(ValueError):
        pack(2, ("999.0.0.1", 1), ("10.0.0.1", 2))
    with pytest.raises(ValueError):
        pack(3, ("10.0.0.1", 1), ("10.0.0.1", 2))
