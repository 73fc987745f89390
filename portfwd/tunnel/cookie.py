"""Handshake load control, sans-IO: budgets, source prefixes and stateless cookies
(docs/PROTOCOL.md "Handshake under load"; WireGuard's cookie reply and QUIC's Retry).

Glossary:
  prefix   -- the /24 of an IPv4 source or the /64 of an IPv6 one: what one host (or one
              NAT) can easily send from, so what per-source limits count.
  budget   -- a token bucket: so many operations per second, with a burst.
  cookie   -- 16 bytes the server computes from a client's IP address and a secret it rotates;
              only a sender that *receives* at that address can learn it, so a HELLO that
              echoes a valid cookie comes from a real address, not a spoofed one. The server
              keeps no state to check it.

While HELLO verification stays within its global budget nothing of this is visible. Past the
budget, a HELLO without a valid cookie is not verified at all: it is answered with a COOKIE
datagram (smaller than the HELLO; itself within a reply budget) and forgotten. A HELLO with a
valid cookie is verified within its prefix's own budget, so a flood from spoofed sources can
neither starve real clients nor lock one out by spending its tokens.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable

from .wire import COOKIE_SIZE

COOKIE_ROTATION_MS = 120_000  # ms a cookie secret is current; the previous one is still valid
SECRET_SIZE = 32  # bytes


class TokenBucket:
    """``rate`` operations per second with bursts of ``burst``; ``rate <= 0`` is unlimited."""

    __slots__ = ("rate", "burst", "tokens", "last_ms")

    def __init__(self, rate: float, burst: float, now: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last_ms = now

    def take(self, now: int) -> bool:
        """Spend one token if there is one (refilled to ``now`` first)."""
        if self.rate <= 0:
            return True
        tokens = min(self.burst, self.tokens + (now - self.last_ms) * self.rate / 1000.0)
        self.last_ms = now
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True


def source_prefix(host: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) of a source address, as a string key."""
    if ":" not in host:
        return host.rpartition(".")[0]
    try:
        ip = ipaddress.IPv6Address(host.split("%")[0])
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:  # an IPv4 client of a dual-stack listener
        return str(ip.ipv4_mapped).rpartition(".")[0]
    return ip.packed[:8].hex()


class CookieJar:
    """Makes and checks cookies under a secret that rotates every COOKIE_ROTATION_MS."""

    def __init__(self, random_bytes: Callable[[int], bytes], now: int) -> None:
        self._random_bytes = random_bytes
        self._epoch = now // COOKIE_ROTATION_MS
        self._current = random_bytes(SECRET_SIZE)
        self._previous = random_bytes(SECRET_SIZE)  # never used to make one: nothing to accept

    def _rotate(self, now: int) -> None:
        epoch = now // COOKIE_ROTATION_MS
        if epoch != self._epoch:
            self._previous = self._current if epoch == self._epoch + 1 else (
                self._random_bytes(SECRET_SIZE))
            self._current = self._random_bytes(SECRET_SIZE)
            self._epoch = epoch

    def make(self, host: str, now: int) -> bytes:
        """The cookie of ``host`` (its IP address, whatever its port: one per client host)."""
        self._rotate(now)
        return _cookie(self._current, host)

    def valid(self, cookie: bytes, host: str, now: int) -> bool:
        self._rotate(now)
        return (hmac.compare_digest(cookie, _cookie(self._current, host))
                or hmac.compare_digest(cookie, _cookie(self._previous, host)))


def _cookie(secret: bytes, host: str) -> bytes:
    # hmac.digest is the one-shot C path: a forged cookie costs the server well under a us.
    return hmac.digest(secret, host.encode(), "sha256")[:COOKIE_SIZE]
