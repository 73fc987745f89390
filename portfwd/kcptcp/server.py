"""kcptcp-server's service: accept authenticated conversations on UDP, bridge each to the target.

One UDP socket and one receive loop serve every conversation: datagrams are demultiplexed by
the conv field; only a HELLO for an unknown conv (or a client's retry for an unconfirmed one)
reaches the HandshakeAcceptor, and the target is dialled only after the client's first
authenticated packet proved it holds the session keys (docs/SECURITY.md). Nothing is ever sent in
answer to a datagram that did not authenticate; an authenticated HELLO gets a WELCOME, or under
load a COOKIE, each smaller than it.

Several targets (``--balance``, ``--max-fails``, ``--fail-timeout``) and the TCP side's
``--idle-timeout``/``--half-close-timeout`` are tcpfwd's: ``runtime.upstream.Upstreams``
dials, ``runtime.relay_timeouts.arm`` times out.

Floods (docs/SECURITY.md, "Flood limits"): besides the acceptor's budgets and cookies, two caps
bound what authenticated HELLOs can make us hold: ``max_pending`` sessions whose client has not
yet proven its keys (``TunnelSession.confirmed``; a quarter of them per source prefix), and
``max_sessions`` in all. At the global cap
the least recently active session is evicted if it has moved no stream byte for EVICT_MIN_IDLE_MS;
otherwise the new one is refused. Caps act only *after* the HELLO authenticated, so forged
input can never evict anybody.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from types import MappingProxyType

import gevent

from portfwd.kcp import ReassemblyBudget
from portfwd.kcptcp.config import ServerConfig
from portfwd.kcptcp.driver import (
    ConversationDriver,
    ConversationService,
    now_ms,
    wall_ms,
)
from portfwd.kcptcp.metrics import TunnelServerMetrics, render_server_totals
from portfwd.kcptcp.udp_endpoint import UdpEndpoint
from portfwd.policy.proxy import pack, pack_v1, pack_v2
from portfwd.runtime.addr import HostPort, format_sockaddr
from portfwd.runtime.admission import SourceFilter
from portfwd.runtime.kerneldrops import KernelDrops
from portfwd.runtime.logs import RateLimitedLog
from portfwd.runtime.metrics import ErrorCounts
from portfwd.runtime.relay_timeouts import HalfCloseSweeper, arm
from portfwd.runtime.sockets import cooperative, set_buffers
from portfwd.runtime.upstream import Destination, Upstreams
from portfwd.runtime.workers import Workers
from portfwd.tunnel.cookie import source_prefix
from portfwd.tunnel.handshake import HandshakeAcceptor
from portfwd.tunnel.origin import Origin
from portfwd.tunnel.probe import ProbeResponder
from portfwd.tunnel.session import TunnelSession
from portfwd.tunnel.stream import Conversation
from portfwd.tunnel.wire import PREFIX_SIZE, TYPE_MASK, PacketType

log = logging.getLogger(__name__)


def proxy_prelude(version: int) -> Callable[[Origin | None], bytes] | None:
    """--proxy-protocol: the PROXY header for the target, from the client's ORIGIN record
    (authenticated in the tunnel); a stream without one gets an address-less header (v1
    UNKNOWN, v2 UNSPEC), so the target uses the connection's own addresses."""
    if not version:
        return None

    def prelude(origin: Origin | None) -> bytes:
        if origin is None:
            return pack_v1(None, None) if version == 1 else pack_v2(None, None)
        return pack(version, origin.source, origin.destination)

    return prelude

PENDING_PREFIX_SHARE = 4  # a source prefix may hold 1/4 of --max-pending unconfirmed sessions
STOP_IDLE_MS = 1000  # ms without stream bytes after which a stop closes a conversation at once
STOP_POLL_S = 0.1  # s between two looks for conversations a stop can close
EVICT_MIN_IDLE_MS = 2000  # ms without stream bytes before a session may be evicted at the cap
_HELLO = int(PacketType.HELLO)
_PROBE = int(PacketType.PROBE)
_UNSEALED = (_HELLO, _PROBE)  # what a client sends before it holds session keys


class TunnelServer(ConversationService):
    """Listens on UDP; bridges each authenticated conversation to ``target`` over TCP."""

    render_totals = staticmethod(render_server_totals)

    def __init__(self, config: ServerConfig, udp_sock: socket.socket) -> None:
        super().__init__(config.stats_interval)
        self.config = config
        self.target = config.target
        self.limits = config.limits
        self.udp = UdpEndpoint(udp_sock, batched=True)
        self._kernel_drops = KernelDrops(udp_sock)
        # HELLOs stamped before this moment were made for an earlier process (or replayed
        # from one): refused, so a restart cannot be used to replay a recorded handshake.
        started = wall_ms()
        self.handshakes = HandshakeAcceptor(config.conversation.tunnel, started_wall_ms=started)
        # PROBEs for convs we do not hold (we restarted, or forgot them): an UNKNOWN each, once.
        tunnel = config.conversation.tunnel
        self.probes = ProbeResponder(tunnel.psk, tunnel.timestamp_window_ms,
                                     self.handshakes.first_sight, started_wall_ms=started)
        self.probes_known = 0  # PROBEs for a conversation we hold: its packets answer them
        self.reassembly = ReassemblyBudget(self.limits.reassembly_bytes)
        self.conversations = Workers()  # each conversation's _serve
        self.dropped_unknown = 0  # datagrams for no conversation that are not a HELLO
        self.dropped_malformed = 0  # shorter than the common prefix
        self.refused_pending = 0  # HELLOs not looked at: max_pending unconfirmed sessions
        self.refused_full = 0  # authenticated HELLOs refused: max_sessions, none evictable
        self.evicted = 0  # idle sessions closed to make room at max_sessions
        self.restarted = 0  # unconfirmed sessions replaced by their client's retried HELLO
        self.dial_failures = ErrorCounts()  # connects to the target, by errno name
        # Conversations whose client has not yet proven its keys, and their source prefixes:
        # counted, so the caps cost O(1) per HELLO whatever is pending.
        self._pending: dict[ConversationDriver, str] = {}
        self._pending_by_prefix: dict[str, int] = {}
        self._prefix_quota = max(1, self.limits.max_pending // PENDING_PREFIX_SHARE)
        self.accepting = True
        self._greenlets: list[gevent.Greenlet] = []
        self._stats: gevent.Greenlet | None = None
        self._faults = RateLimitedLog(log)
        self.sources = SourceFilter(config.access, log, "HELLO")  # --allow/--deny
        self.max_conns = config.max_conns  # --max-conns: conversations at once, 0 = no cap
        self.over_limit = 0  # HELLOs refused at --max-conns (answered if valid, in budget)
        self._prelude = proxy_prelude(config.proxy_protocol)
        self.upstreams = self._upstreams(config)
        self.sweeper = self._sweeper(config)

    @staticmethod
    def _upstreams(config: ServerConfig) -> Upstreams:
        """The targets and their health (kcpudp-server has one UDP target: never dialled)."""
        target = config.target
        return Upstreams(config.destinations or (
            Destination(HostPort(target.host, target.port), (target,)),),
            config.balancing, config.limits.connect_timeout)

    @staticmethod
    def _sweeper(config: ServerConfig) -> HalfCloseSweeper | None:
        timeout = config.relay.half_close_timeout
        return HalfCloseSweeper(timeout) if timeout else None

    def start(self) -> None:
        targets = ", ".join(map(str, self.upstreams.destinations))
        self._announce(f"udp {format_sockaddr(self.udp.sock.getsockname())}",
                       f"tcp {targets}", self.config.conversation.tunnel.plaintext)
        self._greenlets.append(gevent.spawn(self._receive))
        self._stats = self._start_stats()

    def metrics(self) -> TunnelServerMetrics:
        """A snapshot of the counters and of every live conversation (no socket I/O; the
        kernel's drop count is read from /proc)."""
        a, probes = self.handshakes, self.probes
        live = self._per_conversation()
        return TunnelServerMetrics(
            conversations=len(self.drivers), finished=self.finished, handshakes=a.accepted,
            rejected_auth=a.dropped_auth, rejected_replay=a.dropped_replay,
            rejected_stale=a.dropped_stale, rejected_rate=a.dropped_rate,
            rejected_before_start=a.dropped_before_start, rejected_load=a.dropped_load,
            cookies_sent=a.cookies_sent, cookie_hellos=a.cookie_hellos, restarted=self.restarted,
            dropped_unknown=self.dropped_unknown, dropped_malformed=self.dropped_malformed,
            refused_pending=self.refused_pending, refused_full=self.refused_full,
            evicted=self.evicted, send_errors=self.udp.send_errors,
            dial_failures=self.dial_failures.snapshot(), per_conversation=live,
            totals=self._totals(live), closed=MappingProxyType(dict(self.closed)),
            rejected_malformed=a.dropped_malformed, rejected_cache_full=a.dropped_cache_full,
            kernel_drops=self._kernel_drops.read(), denied=self.sources.denied,
            unknown_sent=probes.answered, probes_known=self.probes_known,
            probes_rejected=(probes.dropped_auth + probes.dropped_malformed
                             + probes.dropped_stale + probes.dropped_replay
                             + probes.dropped_rate), over_limit=self.over_limit,
            destinations_down=self.upstreams.marked_down,
            lookups_failed=self.upstreams.lookups_failed)

    def stop(self, timeout: float) -> None:
        """Tell every peer (an authenticated CLOSE per conversation) as soon as its
        conversation is idle -- no stream byte either way for STOP_IDLE_MS and nothing
        unacknowledged or unread, which an interactive session nearly always is -- so its
        client closes the application's connection at once; a transfer under way gets up to
        ``timeout`` to finish first. Return as soon as no conversation is left, so the UDP
        port is free for a restart."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self.drivers and (left := deadline - time.monotonic()) > 0:
            now = now_ms()
            for driver in list(self.drivers.values()):
                if self._idle(driver, now):
                    driver.abort("shutting down")
            self.conversations.join(timeout=min(STOP_POLL_S, left))
        for driver in list(self.drivers.values()):
            driver.abort("shutting down")
        self.conversations.join(timeout=1)
        self.conversations.kill(timeout=1)
        gevent.killall([*self._greenlets, *filter(None, [self._stats])])
        self.udp.close()
        self._kernel_drops.close()

    @staticmethod
    def _idle(driver: ConversationDriver, now: int) -> bool:
        """No stream byte for a while and nothing in flight either way here (a stop may close
        it at once)."""
        conv = driver.conv
        return (now - driver.last_active >= STOP_IDLE_MS and conv.kcp.waitsnd == 0
                and not conv.readable)

    def reconfigure(self, config: ServerConfig) -> None:
        """New settings for the same UDP socket (config reload): conversations that start from
        now on get them (targets and their balancing, KCP tuning, limits, --max-conns,
        --proxy-protocol, relay timeouts, key); live ones finish on theirs. New
        tunnel settings mean a new handshake acceptor (its counters restart), which refuses
        HELLOs stamped before the reload, as after a restart."""
        if config.conversation.tunnel != self.config.conversation.tunnel:
            self.handshakes = HandshakeAcceptor(config.conversation.tunnel,
                                                started_wall_ms=wall_ms())
        if (config.destinations, config.balancing, config.limits.connect_timeout) != (
                self.config.destinations, self.config.balancing,
                self.config.limits.connect_timeout):
            self.upstreams = self._upstreams(config)  # new targets start healthy
        if config.relay.half_close_timeout != self.config.relay.half_close_timeout:
            self.sweeper = self._sweeper(config)  # live conversations keep the old one
        self.config, self.target, self.limits = config, config.target, config.limits
        self.max_conns = config.max_conns
        self._prelude = proxy_prelude(config.proxy_protocol)
        self.sources.update(config.access)
        self._prefix_quota = max(1, self.limits.max_pending // PENDING_PREFIX_SHARE)
        set_buffers(self.udp.sock, config.udp_buffer)
        if config.stats_interval != self.stats_interval:
            if self._stats is not None:
                self._stats.kill()
            self.stats_interval = config.stats_interval
            self._stats = self._start_stats()

    def _receive(self) -> None:
        drivers, sources = self.drivers, self.sources
        while True:
            # A forged HELLO is dropped inside the read, for one MAC and no address decoded;
            # not while --allow/--deny (which counts what it refuses) or a stop is in force.
            batch = self.udp.recv_batch(
                None if sources.active or not self.accepting
                else self.handshakes.forgery_screen(now_ms))
            now = now_ms()
            touched: dict[int, ConversationDriver] = {}
            for data, addr in batch:
                # wire.peek_prefix inlined: a flood of forged HELLOs costs this loop per datagram
                if len(data) < PREFIX_SIZE:
                    self.dropped_malformed += 1
                    continue
                ptype = data[0] & TYPE_MASK
                if ptype in _UNSEALED and sources.active and not sources.permits(addr):
                    continue  # refused before any handshake work (no MAC, no cookie)
                conv_id = int.from_bytes(data[1:PREFIX_SIZE], "big")
                driver = drivers.get(conv_id)
                if ptype == _PROBE:
                    self._probed(driver, data, addr, now)
                    continue
                if driver is None:
                    if ptype != _HELLO or not self.accepting:
                        self.dropped_unknown += 1
                        continue
                    if not self.handshakes.authentic(data, addr, now):
                        continue  # forged (or another PSK): one MAC, no bookkeeping at all
                    driver = self._new_conversation(data, addr, now)
                    if driver is None:
                        continue
                elif ptype == _HELLO and self._is_retry(driver, data):
                    if not self._restart(driver, data, addr, now):
                        continue
                else:
                    driver.datagram_received(data, addr, now)
                touched[conv_id] = driver
            for driver in touched.values():
                driver.transmit()
            for reply, addr in self.handshakes.replies_to_send():  # COOKIEs, REFUSEs
                self.udp.send([reply], addr)

    def _probed(self, driver: ConversationDriver | None, probe: bytes, addr: tuple,
                now: int) -> None:
        """A client asks whether we hold its conversation (probe.py): if not, an UNKNOWN (21
        bytes for 46) for a PROBE that verifies and was never seen; otherwise nothing, but the
        nonce is remembered all the same, so a copy replayed after the conversation ended
        gets no answer either."""
        if driver is not None:
            self.probes_known += 1
            self.probes.verify(probe, wall_ms())
            return
        reply = self.probes.answer(probe, now, wall_ms())
        if reply is not None:
            self.udp.send([reply], addr)

    def _new_conversation(self, hello: bytes, addr: tuple, now: int) -> ConversationDriver | None:
        # Checked before the acceptor so a refused HELLO is not consumed: the client's
        # retransmission can still succeed once a pending session confirms or expires.
        if len(self._pending) >= self.limits.max_pending:
            self.refused_pending += 1
            self._faults.warning("pending", "pending session cap (--max-pending %d) reached: "
                                 "HELLO from %s ignored", self.limits.max_pending,
                                 format_sockaddr(addr))
            return None
        by_prefix = self._pending_by_prefix
        prefix = source_prefix(addr[0]) if by_prefix else ""  # none pending: no prefix is full
        if by_prefix.get(prefix, 0) >= self._prefix_quota:
            # One source (a replaying or racing PSK holder) cannot take every pending slot.
            self.refused_pending += 1
            self._faults.warning("pending-prefix", "pending sessions from %s's prefix at their "
                                 "share (%d of --max-pending %d): HELLO ignored",
                                 format_sockaddr(addr), self._prefix_quota,
                                 self.limits.max_pending)
            return None
        if self.max_conns and len(self.drivers) >= self.max_conns:
            # A hard cap: unlike --max-sessions nothing is evicted. A valid HELLO gets a REFUSE
            # saying so (one MAC, no key exchange), and its client closes at once.
            self.over_limit += 1
            self.handshakes.refuse_full(hello, addr, now, wall_ms())
            self._faults.warning("max-conns", "--max-conns %d reached: HELLO from %s refused",
                                 self.max_conns, format_sockaddr(addr))
            return None
        session = self.handshakes.accept(hello, addr, now, wall_ms())
        if session is None:
            return None  # dropped and counted by the acceptor: never answered
        if len(self.drivers) >= self.limits.max_sessions and not self._evict_idle(now):
            self.refused_full += 1
            self._faults.warning("full", "session cap (--max-sessions %d) reached, no idle "
                                 "session to evict: conv=%d from %s refused",
                                 self.limits.max_sessions, session.conv, format_sockaddr(addr))
            return None  # the session object is dropped unanswered; nothing was dialled
        driver = self._make_driver(session, now)
        self.drivers[session.conv] = driver
        prefix = prefix or source_prefix(addr[0])
        self._pending[driver] = prefix
        self._pending_by_prefix[prefix] = self._pending_by_prefix.get(prefix, 0) + 1
        self.conversations.spawn(self._serve, driver)
        return driver

    def _make_driver(self, session: TunnelSession, now: int) -> ConversationDriver:
        """The conversation and driver of a new session (kcpudp-server makes its own)."""
        conv = Conversation(session, self.config.conversation, now, self.reassembly)
        return ConversationDriver(conv, self.udp, f"conv={conv.conv}", self.config.fec,
                                  self.fec_hint, pacing=self.config.conversation.pacing)

    @staticmethod
    def _is_retry(driver: ConversationDriver, hello: bytes) -> bool:
        """A HELLO for a known conv that may be its client's retry: the session has not been
        confirmed and this is not a copy of its HELLO (each retry has a fresh key share; a copy
        goes to the session, which answers it with the same WELCOME)."""
        conv = driver.conv
        return not conv.closed and not conv.session.confirmed and hello != conv.session.hello

    def _restart(self, driver: ConversationDriver, hello: bytes, addr: tuple, now: int) -> bool:
        """The client's WELCOME was lost and it sent a fresh HELLO: if that authenticates, it
        replaces the unconfirmed session (nothing was dialled for it yet). True if it did."""
        session = self.handshakes.accept(hello, addr, now, wall_ms())
        if session is None:
            return False  # dropped and counted by the acceptor
        driver.conv.restart(session)
        self.restarted += 1
        return True

    def _unpend(self, driver: ConversationDriver) -> None:
        """``driver``'s client proved its keys, or the conversation is over."""
        prefix = self._pending.pop(driver, None)
        if prefix is not None:
            left = self._pending_by_prefix[prefix] - 1
            if left:
                self._pending_by_prefix[prefix] = left
            else:
                del self._pending_by_prefix[prefix]

    def _evict_idle(self, now: int) -> bool:
        """Close the least recently active session if it is idle enough; True if one was."""
        victim = min(self.drivers.values(), key=lambda d: d.last_active, default=None)
        if victim is None or now - victim.last_active < EVICT_MIN_IDLE_MS:
            return False
        self.evicted += 1
        self._faults.warning("evict", "session cap (--max-sessions %d) reached: evicting "
                             "%s, idle %d ms", self.limits.max_sessions, victim.name,
                             now - victim.last_active)
        # Out of the table now (its conv id may be reused at once); _serve finishes the close.
        del self.drivers[victim.conv.conv]
        self._unpend(victim)
        victim.abort("evicted: session cap")
        return True

    def _serve(self, driver: ConversationDriver) -> None:
        conv = driver.conv
        try:
            driver.start_ticker()
            # Dial only once the client has proven it holds the session keys (its first
            # authenticated packet, HandshakeCompleted): a replayed or raced HELLO gets a
            # WELCOME and expires without the target ever seeing a connection.
            gevent.wait([driver.established, driver.finished], count=1)
            self._unpend(driver)
            if driver.established.is_set() and not driver.finished.is_set():
                self._connect(driver)
            driver.wait_finished()
        finally:
            self._retire(driver)
            conv.discard_received()  # its unread bytes go back to self.reassembly
            self._unpend(driver)
            log.info("%s closed (%s): %d bytes up, %d down", driver.name, driver.close_reason,
                     conv.bytes_received, conv.bytes_sent)

    def _connect(self, driver: ConversationDriver) -> None:
        """Dial a target for a confirmed conversation and bridge it until it ends, with the
        relay timeouts (kcpudp-server opens a UDP socket instead)."""
        upstreams, sweeper = self.upstreams, self.sweeper
        try:
            dialled, target = upstreams.dial()
        except OSError as exc:  # includes socket.timeout and EMFILE
            self.dial_failures.add(exc)
            self._faults.warning("connect", "%s: connect to %s failed: %s", driver.name,
                                 ", ".join(map(str, upstreams.destinations)),
                                 exc.strerror or exc)
            driver.abort("target unreachable")
            return
        conv = driver.conv
        log.info("%s open %s -> %s", driver.name, format_sockaddr(conv.peer_addr), target)
        driver.attach_tcp(cooperative(dialled), self._prelude)
        idle = arm(driver, self.config.relay, sweeper, lambda: conv.bytes_sent
                   + conv.bytes_received)
        try:
            driver.wait_finished()
        finally:
            if idle is not None:
                idle.stop()
            if sweeper is not None:
                sweeper.discard(driver)
