"""Path validation, sans-IO: a session moves to a new peer address only once that address has
shown it receives what we send there (docs/PROTOCOL.md "Path validation"; QUIC's, RFC 9000 §8.2).

Glossary:
  path       -- the peer address our datagrams go to (``TunnelSession.peer_addr``).
  candidate  -- a new source address that sent an authenticated, highest-numbered packet.
  challenge  -- 8 random bytes sent there in a sealed PATH_CHALLENGE; only a holder of the
                session keys *at* the candidate can echo them in a PATH_RESPONSE from it.

Until the candidate answers, every datagram still goes to the old path, and the candidate gets
at most ``AMPLIFICATION`` times the bytes it sent (QUIC's anti-amplification limit), so a copy of
a client's datagram re-sent from a forged or foreign address cannot turn the server into a
traffic source towards it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from .wire import CHALLENGE_SIZE

AMPLIFICATION = 3  # bytes sent to an unvalidated address per byte received from it


class PathValidator:
    """Challenges one candidate address at a time; the session asks it what to send."""

    def __init__(self, challenge_packet_size: int, retry_ms: int,
                 random_bytes: Callable[[int], bytes]) -> None:
        self.candidate: Any = None  #: the address being validated, or None
        self._packet_size: int = challenge_packet_size  # bytes of one sealed PATH_CHALLENGE
        self._retry_ms: int = retry_ms
        self._random_bytes: Callable[[int], bytes] = random_bytes
        self._challenge: bytes = b""
        self._received: int = 0  # bytes the candidate sent us
        self._sent: int = 0  # bytes we sent the candidate
        self._retry_at: int = 0
        self.challenges_sent: int = 0  #: PATH_CHALLENGEs handed out to be sent
        self.validated: int = 0  #: candidates that answered, i.e. path changes
        self.limited: int = 0  #: challenges withheld by the amplification limit

    def observe(self, addr: Any, size: int, now: int) -> bytes | None:
        """An authenticated, highest-numbered packet of ``size`` bytes came from ``addr`` (not
        the current path): the challenge to send there now, or None."""
        if addr != self.candidate:
            self.candidate = addr
            self._challenge = self._random_bytes(CHALLENGE_SIZE)
            self._received = self._sent = 0
            self._retry_at = now
        self._received += size
        if now < self._retry_at:
            return None
        if self._sent + self._packet_size > AMPLIFICATION * self._received:
            self.limited += 1
            return None
        self._retry_at = now + self._retry_ms
        self._sent += self._packet_size
        self.challenges_sent += 1
        return self._challenge

    def answered(self, addr: Any, body: bytes) -> bool:
        """True if ``body`` from ``addr`` answers the outstanding challenge: move there."""
        if self.candidate is None or addr != self.candidate:
            return False
        if not hmac.compare_digest(body, self._challenge):
            return False
        self.candidate = None
        self.validated += 1
        return True

    def abandon(self) -> None:
        """The peer came back on the current path: forget the candidate."""
        self.candidate = None
