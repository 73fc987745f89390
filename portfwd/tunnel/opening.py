"""The unsealed side of a TunnelSession's handshake (docs/PROTOCOL.md "Handshake"), sans-IO.

A mixin of ``TunnelSession``, as ``rekey.Rekeying`` is: what a session does with the packets
that carry no AEAD -- the client's WELCOME, COOKIE and REFUSE while it waits for its keys, and a
copied HELLO or a stale WELCOME once keyed. The session's state is its own; these methods read
and write it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .wire import MalformedPacket, PacketType, peek_prefix


class Opening:
    """What arrives unsealed; see TunnelSession for the state."""

    config: Any
    is_client: bool
    confirmed: bool
    hellos: Any  # ClientHellos (client)
    _hello: bytes
    _welcome: bytes
    _probes: list
    _hs_interval: int
    _hs_retry_at: int
    _confirm_at: int | None
    dropped_malformed: int
    dropped_replay: int
    dropped_stale: int
    dropped_auth: int
    datagrams_received: int
    welcomes_resent: int
    cookies_received: int
    # TunnelSession's methods these call (declared, not defined: the session provides them).
    _set_keys: Callable[..., None]  # (client_share, server_share, shared)
    _establish: Callable[[int], None]  # (now)
    _queue_hello: Callable[[int], None]  # (now)
    _terminate: Callable[..., None]  # (reason, by_peer=, send_close=)

    def _receive_unsecured(self, data: bytes, addr: Any) -> None:
        """HELLO / WELCOME / garbage arriving on an established session."""
        try:
            ptype = peek_prefix(data)[0]
        except MalformedPacket:
            self.dropped_malformed += 1
            return
        if ptype == PacketType.HELLO and not self.is_client:
            if not self.confirmed and data == self._hello:
                # A copy of the HELLO, from its sender or from whoever raced it: each source gets
                # the same WELCOME (smaller than the HELLO); the first authenticated packet then
                # fixes the path, so a racer cannot cut the real client off.
                self.welcomes_resent += 1
                self._probes.append((self._welcome, addr))
            else:
                self.dropped_replay += 1
        elif ptype == PacketType.WELCOME and self.is_client:
            self.dropped_stale += 1  # a duplicate of the WELCOME we already used
        else:
            self.dropped_malformed += 1

    def _receive_welcome(self, data: bytes, addr: Any, now: int) -> None:
        """Client in HANDSHAKE: only a WELCOME that answers our HELLO is of interest."""
        try:
            ptype = peek_prefix(data)[0]
            if ptype == PacketType.COOKIE or ptype == PacketType.REFUSE:
                self._receive_cookie(data, now)
                return
            if ptype != PacketType.WELCOME:
                self.dropped_stale += 1  # sealed packets before we have keys: unusable
                return
            keys = self.hellos.keys_from_welcome(data)
        except MalformedPacket:
            self.dropped_malformed += 1
            return
        if keys is None:
            self.dropped_auth += 1
            return
        self._set_keys(*keys)
        self._establish(now)
        self.datagrams_received += 1
        # Confirm promptly even with no stream data (a server that speaks first dials its
        # target only after our first sealed packet); repeated until the server answers.
        self._hs_interval = self.config.handshake_retry_ms
        self._hs_retry_at = now + self._hs_interval
        self._confirm_at = now + self.config.confirm_delay_ms

    def _receive_cookie(self, data: bytes, now: int) -> None:
        """A COOKIE (our HELLO again with it, at once: it proves our address) or a REFUSE."""
        if not self.hellos.take_cookie(data):
            if (refused := self.hellos.refusal(data)) is not None:  # REFUSE: not our kind
                return self._terminate(refused, by_peer=True, send_close=False)
            self.dropped_malformed += 1
            return
        self.cookies_received += 1
        self._queue_hello(now)
        self._hs_retry_at = now + self._hs_interval
