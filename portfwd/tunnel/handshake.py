"""Server-side HELLO validation: the only code that may create a server ``TunnelSession``.

The server rules of docs/PROTOCOL.md "Handshake" (docs/SECURITY.md says what they protect): the
handshake is authenticated with the PSK (HMAC) before anything is created or dialled; stale
timestamps and replayed HELLOs are rejected (a cache bounded in size *and* time); nothing is ever
sent to a source that did not authenticate; each source host is rate-limited -- rejected HELLOs
spend its tokens, accepted ones do not, so a flood of forgeries cannot lock out a host that holds
the PSK; failures are counted and logged at most once per interval.

The driver demultiplexes by conv first (``wire.peek_prefix``): datagrams for a known conv go to that
session (which answers a retransmitted HELLO with the same WELCOME); only datagrams for an unknown
conv whose type is HELLO reach :meth:`HandshakeAcceptor.accept`.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from . import crypto
from .session import TunnelConfig, TunnelSession
from .wire import MAC_SIZE, MalformedPacket, unpack_hello

logger = logging.getLogger(__name__)

FAILURE_LOG_INTERVAL_MS = 10000  # ms between two "handshake rejected" log lines


class HandshakeAcceptor:
    """Validates HELLO datagrams for unknown convs and creates the server sessions."""

    def __init__(self, config: TunnelConfig,
                 random_bytes: Callable[[int], bytes] = os.urandom,
                 started_wall_ms: int | None = None) -> None:
        """``started_wall_ms``: Unix time in ms at which the server started; a HELLO stamped
        before it cannot come from a client of this process (a replay from before a restart,
        or meant for another process sharing the PSK), so it is refused. None: no such check."""
        self.config: TunnelConfig = config
        self._started_wall_ms: int | None = started_wall_ms
        self._random_bytes: Callable[[int], bytes] = random_bytes
        self._mac_key: bytes = crypto.handshake_mac_key(config.psk)
        # client_share -> wall-clock ms after which a replay of it would be stale anyway.
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        # source host -> (tokens, last refill ms); LRU-bounded so a spoofing flood cannot grow it.
        self._buckets: OrderedDict[Any, tuple[float, int]] = OrderedDict()
        self._next_log_ms: int | None = None
        self.accepted: int = 0  #: sessions created
        self.dropped_malformed: int = 0  #: not a well-formed HELLO
        self.dropped_auth: int = 0  #: HELLO MAC did not verify (wrong PSK or forged)
        self.dropped_stale: int = 0  #: timestamp outside timestamp_window_ms
        self.dropped_replay: int = 0  #: client_share already seen inside the window
        self.dropped_before_start: int = 0  #: stamped before this server started
        self.dropped_rate: int = 0  #: source host over its handshake rate
        self.dropped_cache_full: int = 0  #: replay cache full of live entries (fail closed)

    @property
    def cache_size(self) -> int:
        """Entries currently held by the HELLO replay cache."""
        return len(self._seen)

    def accept(self, data: bytes, addr: Any, now: int, wall_ms: int) -> TunnelSession | None:
        """A new server session (WELCOME queued) for a valid HELLO, else None (dropped, counted).

        ``now`` is the monotonic ms clock of the sessions; ``wall_ms`` is Unix time in ms, compared
        with the HELLO's timestamp.
        """
        cfg = self.config
        # The bucket is checked first (an empty one skips the HMAC: a flood costs no crypto)
        # but only *rejected* HELLOs spend tokens. One kcptcp-client is one source host for
        # all its TCP connections; charging its valid HELLOs capped it at handshake_rate_per_s
        # new connections per second (20/s), while authenticated HELLOs are already bounded by
        # the server's --max-pending / --max-sessions caps.
        host = addr[0] if isinstance(addr, tuple) else addr
        if not self._has_token(host, now):
            self.dropped_rate += 1
            self._log_failure(now, "rate limited", addr)
            return None
        try:
            hello = unpack_hello(data)
        except MalformedPacket:
            self.dropped_malformed += 1
            self._spend_token(host)
            return None
        expected = crypto.handshake_mac(self._mac_key, crypto.HELLO_LABEL, data[:-MAC_SIZE])
        if not crypto.mac_equal(expected, hello.mac):
            self.dropped_auth += 1
            self._spend_token(host)
            self._log_failure(now, "bad MAC (wrong PSK?)", addr)
            return None
        window = cfg.timestamp_window_ms
        if abs(wall_ms - hello.timestamp_ms) > window:
            self.dropped_stale += 1
            self._spend_token(host)
            self._log_failure(now, "stale timestamp (clock skew?)", addr)
            return None
        if self._started_wall_ms is not None and hello.timestamp_ms < self._started_wall_ms:
            self.dropped_before_start += 1
            self._spend_token(host)
            self._log_failure(now, "stamped before the server started (a replay?)", addr)
            return None
        self._expire(wall_ms)
        if hello.client_share in self._seen:
            self.dropped_replay += 1
            self._spend_token(host)
            self._log_failure(now, "replayed HELLO", addr)
            return None
        if len(self._seen) >= cfg.hello_cache_size:
            # Evicting a live entry would re-open a replay hole: refuse instead (fail closed).
            self.dropped_cache_full += 1
            self._spend_token(host)
            self._log_failure(now, "replay cache full", addr)
            return None
        # Any replay later than 2 windows after now carries a timestamp older than
        # now + window - 2 * window, i.e. stale: the entry can go then (time bound).
        self._seen[hello.client_share] = wall_ms + 2 * window
        session = TunnelSession.server_from_hello(cfg, data, hello.client_share, addr, now,
                                                  self._random_bytes)
        if session is None:  # a key share that yields no shared secret
            self.dropped_malformed += 1
            return None
        self.accepted += 1
        return session

    def _expire(self, wall_ms: int) -> None:
        seen = self._seen
        # Insertion order is expiry order as long as the wall clock does not step back; a step
        # back only delays expiry, never drops a live entry.
        while seen:
            first = next(iter(seen))
            if seen[first] >= wall_ms:
                break
            del seen[first]

    def _has_token(self, host: Any, now: int) -> bool:
        """Refill ``host``'s bucket to ``now``; True if it holds a whole token."""
        rate = self.config.handshake_rate_per_s
        if rate <= 0:
            return True
        burst = float(self.config.handshake_burst)
        buckets = self._buckets
        tokens, last = buckets.pop(host, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate / 1000.0)
        buckets[host] = (tokens, now)
        if len(buckets) > self.config.rate_table_size:
            buckets.popitem(last=False)
        return tokens >= 1.0

    def _spend_token(self, host: Any) -> None:
        """Charge ``host`` one token for a rejected HELLO (after :meth:`_has_token`)."""
        entry = self._buckets.get(host)
        if entry is not None:
            self._buckets[host] = (entry[0] - 1.0, entry[1])

    def _log_failure(self, now: int, what: str, addr: Any) -> None:
        if self._next_log_ms is not None and now < self._next_log_ms:
            return
        self._next_log_ms = now + FAILURE_LOG_INTERVAL_MS
        logger.warning(
            "handshake rejected from %s: %s (totals: auth=%d stale=%d replay=%d rate=%d "
            "malformed=%d cache_full=%d before_start=%d)", addr, what, self.dropped_auth,
            self.dropped_stale, self.dropped_replay, self.dropped_rate, self.dropped_malformed,
            self.dropped_cache_full, self.dropped_before_start)
