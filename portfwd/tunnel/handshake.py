"""Server-side HELLO validation: the only code that may create a server ``TunnelSession``.

The server rules of docs/PROTOCOL.md "Handshake" and "Handshake under load" (docs/SECURITY.md
says what they protect): the HELLO is authenticated with the PSK (HMAC) before anything is
created, and nothing is ever sent to a source whose HELLO does not authenticate; stale
timestamps, HELLOs stamped before the server started and replayed HELLOs are rejected (a cache
bounded in size *and* time); new sessions are made within a global budget, past which a valid
HELLO gets a stateless COOKIE and only HELLOs that echo a valid one are taken, within their
source prefix's budget (cookie.py); failures are counted and logged at most once per interval.

The driver demultiplexes by conv first (``wire.peek_prefix``): datagrams for a known conv go to that
session (which answers a retransmitted HELLO with the same WELCOME); only datagrams for an unknown
conv whose type is HELLO reach :meth:`HandshakeAcceptor.accept`.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from hmac import compare_digest  # crypto.mac_equal without the call: once per HELLO
from typing import Any

from . import crypto
from .cookie import CookieJar, TokenBucket, source_prefix
from .session import TunnelConfig, TunnelSession
from .wire import (
    HELLO_SIZE,
    MAC_SIZE,
    NO_COOKIE,
    PROTOCOL_VERSION,
    REFUSE_FULL,
    Hello,
    MalformedPacket,
    PacketType,
    carries_label,
    pack_cookie,
    pack_refuse,
    unpack_hello,
)

logger = logging.getLogger(__name__)

FAILURE_LOG_INTERVAL_MS = 10000  # ms between two "handshake rejected" log lines
VOUCHED_MAX = 64  # HELLOs remembered as verified (one receive batch's worth)
SCREEN_CLOCK_EVERY = 64  # forgeries the screen drops between two looks at the clock
_HELLO = int(PacketType.HELLO)  # a plain int: comparing with an IntEnum member costs more


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
        self._mac = crypto.handshake_mac_for(config.psk)
        self._hello_mac = self._mac.labelled(crypto.HELLO_LABEL)  # checked for every HELLO
        # client_share -> wall-clock ms after which a replay of it would be stale anyway.
        self._seen: OrderedDict[bytes, int] = OrderedDict()
        # Load control (cookie.py): without a cookie, HELLOs are verified within one global
        # budget; with a valid one, within their prefix's own.
        self._cookies: CookieJar = CookieJar(random_bytes, 0)
        self._verify_budget = TokenBucket(config.hello_verify_rate_per_s,
                                          config.hello_verify_rate_per_s, 0)
        self._reply_budget = TokenBucket(config.cookie_reply_rate_per_s,
                                         config.cookie_reply_rate_per_s, 0)
        self._proven: OrderedDict[str, TokenBucket] = OrderedDict()
        self._replies: list[tuple[bytes, Any]] = []
        # HELLOs whose MAC verified, by id (each kept, so its id cannot be reused while it is
        # here): the screen's, authentic()'s and accept()'s checks of one datagram cost one
        # MAC. Only immutable bytes; emptied at each new screen (a new receive batch).
        self._vouched: dict[int, bytes] = {}
        self._next_log_ms: int | None = None
        self.accepted: int = 0  #: sessions created
        self.dropped_malformed: int = 0  #: not a well-formed HELLO
        self.dropped_auth: int = 0  #: HELLO MAC did not verify (wrong PSK or forged)
        self.dropped_stale: int = 0  #: timestamp outside timestamp_window_ms
        self.dropped_replay: int = 0  #: client_share already seen inside the window
        self.dropped_before_start: int = 0  #: stamped before this server started
        self.dropped_rate: int = 0  #: with a valid cookie, over its source prefix's budget
        self.dropped_cache_full: int = 0  #: replay cache full of live entries (fail closed)
        self.dropped_load: int = 0  #: no valid cookie, over the verify and the reply budgets
        self.cookies_sent: int = 0  #: COOKIE replies (valid HELLOs not taken up: under load)
        self.cookie_hellos: int = 0  #: HELLOs that came with a valid cookie
        self.refused_carries: int = 0  #: valid HELLOs for another kind of conversation (REFUSE)
        self.refused_full: int = 0  #: valid HELLOs answered "at --max-conns" (REFUSE_FULL)

    @property
    def cache_size(self) -> int:
        """Entries currently held by the HELLO replay cache."""
        return len(self._seen)

    def accept(self, data: bytes, addr: Any, now: int, wall_ms: int) -> TunnelSession | None:
        """A new server session (WELCOME queued) for a valid HELLO, else None (dropped, counted;
        under load, a COOKIE may be queued for :meth:`replies_to_send`).

        ``now`` is the monotonic ms clock of the sessions; ``wall_ms`` is Unix time in ms, compared
        with the HELLO's timestamp. The checks run cheapest first. The MAC comes first: without
        the PSK nothing passes it, and nothing is ever answered (a MAC costs about a
        microsecond, less than the bookkeeping of any per-source limit would). Next the checks
        against the clock and the replay cache, which cost a lookup each. Only a fresh, valid
        HELLO reaches the expensive part (the X25519 exchange and the session), and that part
        has a budget: past it, a HELLO without a valid cookie gets a COOKIE instead
        (WireGuard's order: mac1 checked, then a cookie reply), and one with a valid cookie is
        verified within its source prefix's own budget.
        """
        hello = self._fresh(data, addr, now, wall_ms)
        if hello is None:
            return None
        host = addr[0] if isinstance(addr, tuple) else addr
        if hello.cookie != NO_COOKIE and self._cookies.valid(hello.cookie, host, now):
            # A real address (it received our COOKIE): its prefix's own budget, whatever
            # floods from other (or spoofed) sources did to the global one.
            self.cookie_hellos += 1
            if not self._proven_prefix_token(source_prefix(host), now):
                self.dropped_rate += 1
                self._log_failure(now, "over its prefix's budget (with cookie)", addr)
                return None
        elif not self._verify_budget.take(now):
            self._answer_with_cookie(hello, addr, host, now)
            return None
        if not self._remember(hello, addr, now, wall_ms):
            return None
        if hello.carries != self.config.carries:
            self._refuse(hello, data, addr, now, self.config.carries)
            return None
        session = TunnelSession.server_from_hello(self.config, data, hello.client_share, addr,
                                                  now, self._random_bytes)
        if session is None:  # a key share that yields no shared secret
            self.dropped_malformed += 1
            return None
        self.accepted += 1
        return session

    def refuse_full(self, data: bytes, addr: Any, now: int, wall_ms: int) -> None:
        """The server is at --max-conns: a fresh, valid HELLO gets a REFUSE saying so (queued
        for :meth:`replies_to_send`, within the reply budget), so its client gives up at once
        instead of at its handshake timeout. Its key share goes into the replay cache: one
        REFUSE per HELLO at most, and a replay of it later gets nothing. No key exchange."""
        hello = self._fresh(data, addr, now, wall_ms)
        if hello is None:
            return
        if not self._reply_budget.take(now):
            self.dropped_load += 1
            self._log_failure(now, "over the handshake budget", addr)
            return
        if self._remember(hello, addr, now, wall_ms):
            self._refuse(hello, data, addr, now, REFUSE_FULL)

    def authentic(self, data: bytes, addr: Any, now: int) -> bool:
        """Whether ``data`` is HELLO-sized and typed and its MAC verifies (else counted, logged
        at most once per interval): the first and cheapest test, stateless, which a driver may
        run before any bookkeeping of its own so that a forgery costs one MAC and nothing else
        (:meth:`accept` runs it again: it does not rely on its caller, but the MAC of a
        ``bytes`` object that passed here or the screen is not computed twice)."""
        if self._vouched.get(id(data)) is data:
            return True
        if len(data) != HELLO_SIZE or data[0] != _HELLO:
            self.dropped_malformed += 1
            return False
        if not compare_digest(self._hello_mac(data[:-MAC_SIZE]), data[-MAC_SIZE:]):
            self.dropped_auth += 1
            if self._log_due(now):
                self._log_failure(now, self._why_bad_mac(data), addr)
            return False
        self._vouch(data)
        return True

    def _vouch(self, data: bytes) -> None:
        """Remember that ``data``'s MAC verified (an immutable object only)."""
        if type(data) is bytes:
            vouched = self._vouched
            if len(vouched) >= VOUCHED_MAX:
                vouched.clear()
            vouched[id(data)] = data

    def forgery_screen(self, clock: Callable[[], int]) -> Callable[[bytes], bool]:
        """A test a driver's receive loop may run on each datagram of one batch before it
        decodes their source addresses: True for a HELLO-sized and typed datagram whose MAC
        fails (counted in ``dropped_auth``), which it then drops unseen. False for anything
        else, and for the batch's first forgery while a "handshake rejected" line is due
        (``clock``: the ``now`` of :meth:`authentic`, read at the first forgery and then once
        per SCREEN_CLOCK_EVERY), so that :meth:`authentic` counts and logs it with its
        source. A new screen for each batch."""
        passed = False  # a forgery of this batch went on to be logged
        unclocked = 0  # forgeries left before the clock is read again
        self._vouched.clear()  # the last batch is done with
        vouch, hello_mac = self._vouch, self._hello_mac

        def forged(data: bytes) -> bool:
            nonlocal passed, unclocked
            if len(data) != HELLO_SIZE or data[0] != _HELLO:
                return False
            if compare_digest(hello_mac(data[:-MAC_SIZE]), data[-MAC_SIZE:]):
                vouch(data)  # authentic() and accept() will not compute it again
                return False
            if unclocked:
                unclocked -= 1
            elif not passed:
                # The clock once per SCREEN_CLOCK_EVERY forgeries: reading it costs a third of a
                # MAC, and a flood's line may come that many forgeries late.
                unclocked = SCREEN_CLOCK_EVERY - 1
                if self._log_due(clock()):
                    passed = True
                    return False
            self.dropped_auth += 1
            return True

        return forged

    def _fresh(self, data: bytes, addr: Any, now: int, wall_ms: int) -> Hello | None:
        """The HELLO in ``data`` if it is well formed, authentic, timely and not seen before,
        else None (counted, logged at most once per interval)."""
        if not self.authentic(data, addr, now):
            return None
        cfg = self.config
        try:
            hello = unpack_hello(data)
        except MalformedPacket:
            self.dropped_malformed += 1
            if data[5] != PROTOCOL_VERSION:
                self._log_failure(now, f"protocol version {data[5]}, this server speaks "
                                       f"{PROTOCOL_VERSION}: run the same version on both ends",
                                  addr)
            return None
        window = cfg.timestamp_window_ms
        if abs(wall_ms - hello.timestamp_ms) > window:
            self.dropped_stale += 1
            self._log_failure(now, "stale timestamp (clock skew?)", addr)
            return None
        if self._started_wall_ms is not None and hello.timestamp_ms < self._started_wall_ms:
            self.dropped_before_start += 1
            self._log_failure(now, "stamped before the server started (a replay?)", addr)
            return None
        self._expire(wall_ms)
        if hello.client_share in self._seen:
            self.dropped_replay += 1
            self._log_failure(now, "replayed HELLO", addr)
            return None
        return hello

    def _remember(self, hello: Hello, addr: Any, now: int, wall_ms: int) -> bool:
        """Put the HELLO's key share into the replay cache; False (counted) if it is full."""
        if len(self._seen) >= self.config.hello_cache_size:
            # Evicting a live entry would re-open a replay hole: refuse instead (fail closed).
            self.dropped_cache_full += 1
            self._log_failure(now, "replay cache full", addr)
            return False
        # Any replay later than 2 windows after now carries a timestamp older than
        # now + window - 2 * window, i.e. stale: the entry can go then (time bound).
        self._seen[hello.client_share] = wall_ms + 2 * self.config.timestamp_window_ms
        return True

    def replies_to_send(self) -> list[tuple[bytes, Any]]:
        """``(datagram, address)`` pairs queued by :meth:`accept` (COOKIEs under load,
        REFUSEs) and :meth:`refuse_full`."""
        replies, self._replies = self._replies, []
        return replies

    def _refuse(self, hello: Hello, data: bytes, addr: Any, now: int, carries: int) -> None:
        """A REFUSE, smaller than the HELLO and bound to it; nothing is created or dialled.
        ``carries``: what this server carries (a PSK holder asked for another kind of
        conversation: a kcptcp client at a kcpudp server, or another --mode), or REFUSE_FULL
        (it is at --max-conns; the caller logs that)."""
        body = pack_refuse(hello.conv, carries)
        self._replies.append((body + self._mac(crypto.REFUSE_LABEL, data, body), addr))
        if carries == REFUSE_FULL:
            self.refused_full += 1
            return
        self.refused_carries += 1
        self._log_failure(now, f"conv={hello.conv}: the client carries "
                          f"{carries_label(hello.carries)}, this server "
                          f"{carries_label(carries)}", addr)

    def _answer_with_cookie(self, hello: Hello, addr: Any, host: str, now: int) -> None:
        """Over the verify budget: a COOKIE, stateless and smaller than the HELLO, within the
        reply budget (past it the HELLO is dropped; the client's retry comes back)."""
        if not self._reply_budget.take(now):
            self.dropped_load += 1
            self._log_failure(now, "over the handshake budget", addr)
            return
        self._replies.append((pack_cookie(hello.conv, hello.mac, self._cookies.make(host, now)),
                              addr))
        self.cookies_sent += 1

    def _proven_prefix_token(self, prefix: str, now: int) -> bool:
        """One token from the cookie-lane budget of ``prefix`` (an LRU of rate_table_size)."""
        table, rate = self._proven, self.config.cookie_hello_rate_per_s
        bucket = table.pop(prefix, None) or TokenBucket(rate, rate, now)
        table[prefix] = bucket
        if len(table) > self.config.rate_table_size:
            table.popitem(last=False)
        return bucket.take(now)

    def first_sight(self, key: bytes, wall_ms: int) -> bool:
        """The replay cache for the other packets stamped like a HELLO (PROBE nonces, probe.py):
        True the first time ``key`` is seen (remembered as long as a HELLO's share); False for
        a repeat, or when the cache is full of live entries (fail closed)."""
        self._expire(wall_ms)
        if key in self._seen or len(self._seen) >= self.config.hello_cache_size:
            return False
        self._seen[key] = wall_ms + 2 * self.config.timestamp_window_ms
        return True

    def _why_bad_mac(self, data: bytes) -> str:
        """What a well-formed HELLO that fails our MAC most likely means. The other mode's MAC
        is computed only here, when a line is logged, so forgeries cost one MAC as before."""
        if len(data) != HELLO_SIZE or data[5] != PROTOCOL_VERSION:
            return "bad MAC (wrong PSK?)"
        if self.config.plaintext:
            return ("bad MAC: the client encrypts (it has -K) and this server runs without a "
                    "key (plaintext); give both the same -K")
        plain = crypto.handshake_mac_for(None)(crypto.HELLO_LABEL, data[:-MAC_SIZE])
        if crypto.mac_equal(plain, data[-MAC_SIZE:]):
            return ("the client runs without a key (plaintext) and this server has one (-K); "
                    "give both the same -K")
        return "bad MAC (wrong PSK?)"

    def _log_due(self, now: int) -> bool:
        return self._next_log_ms is None or now >= self._next_log_ms

    def _expire(self, wall_ms: int) -> None:
        seen = self._seen
        # Insertion order is expiry order as long as the wall clock does not step back; a step
        # back only delays expiry, never drops a live entry.
        while seen:
            first = next(iter(seen))
            if seen[first] >= wall_ms:
                break
            del seen[first]

    def _log_failure(self, now: int, what: str, addr: Any) -> None:
        if self._next_log_ms is not None and now < self._next_log_ms:
            return
        self._next_log_ms = now + FAILURE_LOG_INTERVAL_MS
        logger.warning(
            "handshake rejected from %s: %s (totals: auth=%d stale=%d replay=%d rate=%d "
            "malformed=%d cache_full=%d before_start=%d load=%d cookies=%d)", addr, what,
            self.dropped_auth, self.dropped_stale, self.dropped_replay, self.dropped_rate,
            self.dropped_malformed, self.dropped_cache_full, self.dropped_before_start,
            self.dropped_load, self.cookies_sent)
