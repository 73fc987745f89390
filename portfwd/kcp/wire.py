"""KCP wire format (ikcp_encode_seg / ikcp_input's decoder): pure codec functions.

Beside the engine (``engine``) to keep it under ~800 lines; :mod:`portfwd.kcp` re-exports the
public names.
"""

from __future__ import annotations

import struct
from enum import IntEnum

OVERHEAD = 24  # bytes: segment header size (IKCP_OVERHEAD)
HEADER = struct.Struct("<IBBHIIII")  # conv, cmd, frg, wnd, ts, sn, una, len; little-endian
_PACK = HEADER.pack
_UNPACK_FROM = HEADER.unpack_from


class Cmd(IntEnum):
    """Segment commands (IKCP_CMD_*)."""

    PUSH = 81  # data
    ACK = 82  # acknowledge one sn, echoing its ts
    WASK = 83  # window probe: "tell me your window"
    WINS = 84  # window size tell (the header's wnd carries it)


_CMDS = frozenset(int(cmd) for cmd in Cmd)


class MalformedSegment(ValueError):
    """A datagram that is not a well-formed sequence of KCP segments."""


class ConvMismatch(MalformedSegment):
    """A datagram for another conversation."""


def pack_segment(
    conv: int, cmd: int, frg: int, wnd: int, ts: int, sn: int, una: int, data: bytes = b""
) -> bytes:
    """Encode one segment (ikcp_encode_seg + payload), all integers little-endian.

    ::

        0               4       5       6               8 (bytes)
        +---------------+-------+-------+---------------+
        |   conv (u32)  |cmd u8 |frg u8 |   wnd (u16)   |
        +---------------+-------+-------+---------------+
        |   ts (u32)    |   sn (u32)    |   una (u32)   |
        +---------------+---------------+---------------+
        |   len (u32)   |  data (len bytes) ...
        +---------------+-----------------------------
    """
    return _PACK(conv, cmd, frg, wnd, ts, sn, una, len(data)) + data


def unpack_segments(
    datagram: bytes, conv: int | None = None
) -> list[tuple[int, int, int, int, int, int, bytes]]:
    """Decode every segment of a datagram (layout: see :func:`pack_segment`).

    Returns ``(cmd, frg, wnd, ts, sn, una, data)`` per segment.  The whole datagram is
    validated before anything is returned, so a bad tail never half-applies: raises
    :class:`ConvMismatch` if the first segment's conv is not ``conv`` (when given) and
    :class:`MalformedSegment` for a short header, a length past the end, an unknown command or
    a conv that changes inside the datagram.  (ikcp_input applies the segments before a bad
    one and silently ignores a short tail; we drop the whole datagram instead.)
    """
    segments = []
    offset = 0
    for _conv, cmd, frg, wnd, ts, sn, una, length in unpack_headers(datagram, conv):
        offset += OVERHEAD
        segments.append((cmd, frg, wnd, ts, sn, una, datagram[offset : offset + length]))
        offset += length
    return segments


def unpack_headers(datagram: bytes, conv: int | None) -> list[tuple[int, ...]]:
    """Validate a datagram (see unpack_segments); return its raw headers, payloads left in place.

    Each header is ``(conv, cmd, frg, wnd, ts, sn, una, len)``; the payload of a segment
    follows its header, so a reader walks the datagram with a running offset.
    """
    size = len(datagram)
    if size < OVERHEAD:
        raise MalformedSegment(f"datagram of {size} bytes is shorter than a segment header")
    first_conv = _UNPACK_FROM(datagram, 0)[0]
    if conv is not None and first_conv != conv:
        raise ConvMismatch(f"conv {first_conv} is not ours ({conv})")
    headers = []
    offset = 0
    while offset < size:
        if size - offset < OVERHEAD:
            raise MalformedSegment(f"{size - offset} trailing bytes after the last segment")
        header = _UNPACK_FROM(datagram, offset)
        offset += OVERHEAD + header[7]
        if offset > size:
            raise MalformedSegment(f"segment length {header[7]} runs past the datagram end")
        if header[0] != first_conv:
            raise MalformedSegment("conv changes inside one datagram")
        if header[1] not in _CMDS:
            raise MalformedSegment(f"unknown command {header[1]}")
        headers.append(header)
    return headers


def conv_of(datagram: bytes) -> int | None:
    """The conversation id of a datagram (ikcp_getconv), None if it is too short for a header."""
    if len(datagram) < OVERHEAD:
        return None
    return int.from_bytes(datagram[:4], "little")
