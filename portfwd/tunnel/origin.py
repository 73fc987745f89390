"""The ORIGIN stream record: the client's TCP peer and the address it connected to, carried from
kcptcp-client to kcptcp-server inside the authenticated stream (docs/PROTOCOL.md, section
10.2), so the server can hand the real client address to its target (``--proxy-protocol``).

It travels only inside sealed, authenticated KCP messages: a party without the session keys can
neither forge nor alter it. What it claims is what the kcptcp-client saw (or was told by a
trusted ``--accept-proxy`` sender in front of it).

A datagram conversation (kcpudp) has one client address for its whole life, known before the
HELLO: its ORIGIN rides in the HELLO's extension field (docs/PROTOCOL.md, section 11.6),
encrypted under a key derived from the PSK (the HELLO's MAC, which covers it, authenticates
it), so it is there before the first datagram and costs no packet, round trip or retry logic.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from . import crypto
from .wire import HELLO_COOKIE_OFFSET, HELLO_FLAG_ORIGIN, KEY_SHARE_SIZE, hello_extension

RECORD_ORIGIN = 0x02  # record type (beside DATA 0x00 and FIN 0x01 in tunnel.stream)
FAMILY_SIZES = {4: 4, 6: 16}  # IP version -> address bytes
HELLO_ORIGIN_SIZE = 48  # bytes: the HELLO's extension field (wire.HELLO_EXTENSION_SIZE)
HELLO_ORIGIN_SALT = b"portfwd/3 hello origin"  # HKDF salt of the key that hides it
CHACHA_NONCE_SIZE = 16  # bytes: ChaCha20's counter and nonce, taken from the client's share


class MalformedOrigin(ValueError):
    """An ORIGIN record that breaks its format."""


@dataclass(frozen=True)
class Origin:
    """Who a tunnelled connection is for."""

    source: tuple[str, int]  # the client's address and port
    destination: tuple[str, int]  # the address and port it connected to


@functools.lru_cache(maxsize=1024)  # the same few local addresses, sources that come back
def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:  # type: ignore[union-attr]
        return ip.ipv4_mapped  # type: ignore[union-attr]
    return ip


def pack_origin(origin: Origin) -> bytes:
    """The record, type byte included::

        +------+---------+--------------+----------+--------------+----------+
        | 0x02 | version | src addr     | src port | dst addr     | dst port |
        |      | 4 or 6  | 4 / 16 bytes | 2 bytes  | 4 / 16 bytes | 2 bytes  |
        +------+---------+--------------+----------+--------------+----------+

    Both addresses in one family: a v4-mapped address is written as IPv4, and an IPv4 one
    next to an IPv6 one as v4-mapped IPv6.
    """
    src, dst = _ip(origin.source[0]), _ip(origin.destination[0])
    if src.version != dst.version:
        src, dst = (ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a
                    for a in (src, dst))
    return (bytes([RECORD_ORIGIN, src.version]) + src.packed
            + struct.pack("!H", origin.source[1]) + dst.packed
            + struct.pack("!H", origin.destination[1]))


def unpack_origin(record: bytes) -> Origin:
    """Parse a whole record (type byte included); raises MalformedOrigin."""
    if len(record) < 2 or record[0] != RECORD_ORIGIN or record[1] not in FAMILY_SIZES:
        raise MalformedOrigin("bad ORIGIN type or address family")
    size = FAMILY_SIZES[record[1]]
    if len(record) != _record_size(record[1]):
        raise MalformedOrigin(f"ORIGIN record of {len(record)} bytes")
    if size == 4:  # what str(IPv4Address) gives, without making one
        s1, s2, s3, s4, src_port, d1, d2, d3, d4, dst_port = _UNPACK_V4.unpack_from(record, 2)
        return Origin((f"{s1}.{s2}.{s3}.{s4}", src_port), (f"{d1}.{d2}.{d3}.{d4}", dst_port))
    make = ipaddress.IPv6Address
    offset = 2
    ends = []
    for _ in range(2):
        address = make(record[offset:offset + size])
        (port,) = struct.unpack_from("!H", record, offset + size)
        ends.append((str(address), port))
        offset += size + 2
    return Origin(ends[0], ends[1])


_UNPACK_V4 = struct.Struct("!4BH4BH")


def _record_size(version: int) -> int:
    return 2 + 2 * (FAMILY_SIZES[version] + 2)


@functools.lru_cache(maxsize=16)
def hello_origin_key(psk: bytes | None) -> bytes:
    """The ChaCha20 key that hides a HELLO's ORIGIN (plaintext mode: a fixed key, no secret)."""
    ikm = crypto.PLAINTEXT_PSK if psk is None else psk
    return crypto.hkdf_expand(crypto.hkdf_extract(HELLO_ORIGIN_SALT, ikm), b"key",
                              crypto.KEY_SIZE)


def _keystream(key: bytes, client_share: bytes, data: bytes) -> bytes:
    # The nonce is the first 16 bytes of the HELLO's fresh X25519 share: never reused.
    nonce = client_share[:CHACHA_NONCE_SIZE]
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(data)


def seal_hello_origin(key: bytes, client_share: bytes, origin: Origin) -> bytes:
    """The HELLO's extension field for ``origin``: the record zero-padded to 48 bytes, all of
    it encrypted (neither the family nor the length shows)."""
    return _keystream(key, client_share, pack_origin(origin).ljust(HELLO_ORIGIN_SIZE, b"\0"))


def open_hello_origin(key: bytes, client_share: bytes, field: bytes) -> Origin:
    """The ORIGIN in an authenticated HELLO's extension field; raises MalformedOrigin."""
    if len(field) != HELLO_ORIGIN_SIZE:
        raise MalformedOrigin(f"HELLO ORIGIN field of {len(field)} bytes")
    plain = _keystream(key, client_share, field)
    if len(plain) < 2 or plain[1] not in FAMILY_SIZES:
        raise MalformedOrigin("bad ORIGIN type or address family")
    size = _record_size(plain[1])
    if any(plain[size:]):
        raise MalformedOrigin("HELLO ORIGIN padding is not zero")
    return unpack_origin(plain[:size])


def origin_from_hello(hello: bytes, key: bytes) -> Origin | None:
    """The ORIGIN an authenticated HELLO carries (``key``: :func:`hello_origin_key`), None if
    its flags say it carries none; raises MalformedOrigin."""
    field = hello_extension(hello, HELLO_FLAG_ORIGIN)
    if field is None:
        return None
    share = hello[HELLO_COOKIE_OFFSET - KEY_SHARE_SIZE:HELLO_COOKIE_OFFSET]
    return open_hello_origin(key, share, field)
