"""The ORIGIN stream record: the client's TCP peer and the address it connected to, carried from
kcptcp-client to kcptcp-server inside the authenticated stream (docs/PROTOCOL.md, section
10.2), so the server can hand the real client address to its target (``--proxy-protocol``).

It travels only inside sealed, authenticated KCP messages: a party without the session keys can
neither forge nor alter it. What it claims is what the kcptcp-client saw (or was told by a
trusted ``--accept-proxy`` sender in front of it).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

RECORD_ORIGIN = 0x02  # record type (beside DATA 0x00 and FIN 0x01 in tunnel.stream)
FAMILY_SIZES = {4: 4, 6: 16}  # IP version -> address bytes


class MalformedOrigin(ValueError):
    """An ORIGIN record that breaks its format."""


@dataclass(frozen=True)
class Origin:
    """Who a tunnelled connection is for."""

    source: tuple[str, int]  # the client's address and port
    destination: tuple[str, int]  # the address and port it connected to


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
    if len(record) != 2 + 2 * (size + 2):
        raise MalformedOrigin(f"ORIGIN record of {len(record)} bytes")
    make = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    offset = 2
    ends = []
    for _ in range(2):
        address = make(record[offset:offset + size])
        (port,) = struct.unpack_from("!H", record, offset + size)
        ends.append((str(address), port))
        offset += size + 2
    return Origin(ends[0], ends[1])
