"""Test-side readers of tunnel packets: what a test needs to look inside a datagram, which the
session itself does with ``wire.HEADER`` directly on its per-packet path."""

from __future__ import annotations

from typing import NamedTuple

from portfwd.tunnel import wire
from portfwd.tunnel.wire import HEADER, PHASE_BIT, SECURED_TYPES, TYPE_MASK, PacketType


class Header(NamedTuple):
    """The 9-byte header of a secured packet (docs/PROTOCOL.md, "Secured packets")."""

    ptype: PacketType  #: one of SECURED_TYPES
    phase: int  #: key phase bit, epoch & 1
    conv: int  #: conversation id
    seq: int  #: sender's send_seq in its current epoch


def pack_header(ptype: PacketType, phase: int, conv: int, seq: int) -> bytes:
    """The header (and AEAD associated data) a session puts before a secured body."""
    assert ptype in SECURED_TYPES, ptype
    return HEADER.pack(ptype | (PHASE_BIT if phase & 1 else 0), conv, seq)


def unpack_header(data: bytes) -> Header:
    """The header of a secured packet; raises MalformedPacket for anything else."""
    if len(data) < wire.HEADER_SIZE:
        raise wire.MalformedPacket(f"datagram of {len(data)} bytes is shorter than the header")
    type_byte, conv, seq = HEADER.unpack_from(data)
    try:
        ptype = PacketType(type_byte & TYPE_MASK)
    except ValueError:
        raise wire.MalformedPacket(f"unknown packet type 0x{type_byte:02x}") from None
    if ptype not in SECURED_TYPES:
        raise wire.MalformedPacket(f"{ptype.name} has no secured header")
    return Header(ptype, type_byte >> 7, conv, seq)


def reference_nonce(nonce_base: bytes, epoch: int, seq: int) -> bytes:
    """docs/PROTOCOL.md "Nonce": nonce_base XOR (0^32 || epoch || seq), 96 bits, written
    out the slow way to cross-check crypto.PacketKey's folded per-epoch base."""
    counter = (epoch << 32) | seq  # the 64-bit effective counter epoch || send_seq
    return (int.from_bytes(nonce_base, "big") ^ counter).to_bytes(12, "big")
