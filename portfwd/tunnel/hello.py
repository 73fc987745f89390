"""The client's handshake messages, sans-IO: fresh HELLOs, the WELCOME or COOKIE that answers
one of them (docs/PROTOCOL.md "Handshake", "Handshake under load").

Each HELLO carries a new X25519 key share and the current time, so a retry is never a copy; the
last MAX_HELLOS are remembered with their shares, so a late answer to an earlier one still
completes. A COOKIE from a loaded server is kept and put into every later HELLO. A datagram
conversation's HELLOs carry its client's ORIGIN, sealed afresh under each one's key share.
"""

from __future__ import annotations

from collections.abc import Callable

from . import crypto
from .origin import Origin, hello_origin_key, seal_hello_origin
from .wire import (
    HELLO_FLAG_ORIGIN,
    MAC_SIZE,
    NO_COOKIE,
    REFUSE_FULL,
    Carries,
    MalformedPacket,
    Welcome,
    carries_label,
    pack_hello,
    unpack_cookie,
    unpack_refuse,
    unpack_welcome,
)

MAX_HELLOS = 8  # HELLOs remembered, so a WELCOME to any recent retry still completes
CLOSE_SERVER_FULL = "server full: at its --max-conns"  # the close reason of a REFUSE_FULL


class ClientHellos:
    """Makes a client session's HELLOs and recognises the answers to them."""

    def __init__(self, mac: crypto.HandshakeMac, conv: int, wall_offset_ms: int,
                 random_bytes: Callable[[int], bytes], cookie: bytes = NO_COOKIE,
                 carries: int = Carries.STREAM, origin: Origin | None = None,
                 psk: bytes | None = None) -> None:
        self._mac = mac
        self._origin = origin  # who the conversation is for (kcpudp), in every HELLO
        self._origin_key = hello_origin_key(psk) if origin is not None else b""
        self._carries = carries  # what our HELLOs say the conversation carries
        self._conv = conv
        self._wall_offset = wall_offset_ms  # Unix ms minus the session's monotonic ms
        self._random_bytes = random_bytes
        self._sent: list[tuple[bytes, crypto.KeyShare]] = []  # recent HELLOs and their shares
        self.cookie: bytes = cookie  #: what the next HELLO carries in its cookie field
        self.count: int = 0  #: HELLOs made

    def next(self, now: int) -> bytes:
        """A fresh HELLO to send at ``now`` (monotonic ms)."""
        share = crypto.KeyShare(self._random_bytes(crypto.SHARE_SIZE))
        extension = () if self._origin is None else (
            HELLO_FLAG_ORIGIN, seal_hello_origin(self._origin_key, share.public, self._origin))
        body = pack_hello(self._conv, now + self._wall_offset, share.public, self.cookie,
                          self._carries, *extension)
        hello = body + self._mac(crypto.HELLO_LABEL, body)
        self._sent = [*self._sent[1 - MAX_HELLOS:], (hello, share)]
        self.count += 1
        return hello

    def answered_by(self, welcome: Welcome, body: bytes) -> crypto.KeyShare | None:
        """The key share of the HELLO whose MAC the WELCOME (``body`` = its bytes before the
        MAC) carries, or None: a WELCOME for no HELLO of ours."""
        for hello, share in reversed(self._sent):
            expected = self._mac(crypto.WELCOME_LABEL, hello, body)
            if crypto.mac_equal(expected, welcome.mac):
                self._sent = []
                return share
        return None

    def keys_from_welcome(self, data: bytes) -> tuple[bytes, bytes, bytes] | None:
        """``(client_share, server_share, shared secret)`` from a WELCOME that answers one of
        our HELLOs, None if it answers none (or its key share yields no secret); raises
        MalformedPacket for a datagram that is no WELCOME of this conv."""
        welcome = unpack_welcome(data)
        if welcome.conv != self._conv:
            raise MalformedPacket(f"WELCOME for conv {welcome.conv}")
        share = self.answered_by(welcome, data[:-MAC_SIZE])
        shared = None if share is None else share.exchange(welcome.server_share)
        return None if shared is None else (share.public, welcome.server_share, shared)

    def take_cookie(self, data: bytes) -> bool:
        """A COOKIE datagram: True (and the cookie kept) if it answers one of our HELLOs."""
        try:
            reply = unpack_cookie(data)
        except MalformedPacket:
            return False
        if reply.conv != self._conv:
            return False
        if not any(crypto.mac_equal(hello[-MAC_SIZE:], reply.hello_mac)
                   for hello, _ in self._sent):
            return False
        self.cookie = reply.cookie
        return True

    def refusal(self, data: bytes) -> str | None:
        """The close reason for a REFUSE that answers one of our HELLOs (the server carries
        something else, or is at its --max-conns: CLOSE_SERVER_FULL), else None (not a REFUSE,
        or not for a HELLO of ours)."""
        try:
            refuse = unpack_refuse(data)
        except MalformedPacket:
            return None
        if refuse.conv != self._conv:
            return None
        body = data[:-MAC_SIZE]
        if not any(crypto.mac_equal(self._mac(crypto.REFUSE_LABEL, hello, body), refuse.mac)
                   for hello, _ in self._sent):
            return None
        if refuse.carries == REFUSE_FULL:
            return CLOSE_SERVER_FULL
        return (f"refused by the server: it carries {carries_label(refuse.carries)}, "
                f"this side {carries_label(self._carries)}")
