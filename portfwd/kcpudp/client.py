"""kcpudp-client's service: each client address on the UDP listener is one conversation.

Each conversation has its own UDP socket, connected to the server (as kcptcp-client's), and its
client address is an entry of a :class:`SessionTable` (udpfwd's): idle for ``-t`` seconds
either way, or the least recently active at ``--max-sessions``, and the conversation is closed
(an authenticated CLOSE tells the server). Replies go back from the listener to the address.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import gevent
import gevent.pool

from portfwd.kcptcp.client import TunnelClient, random_conv
from portfwd.kcptcp.driver import ConversationService, now_ms, wall_ms
from portfwd.kcptcp.udp_endpoint import UdpEndpoint
from portfwd.kcpudp.config import ClientConfig
from portfwd.kcpudp.driver import (
    CONVERSATIONS,
    SWEEP_LIMIT,
    DatagramDriver,
    monotonic,
    sweep_interval,
)
from portfwd.kcpudp.metrics import (
    DatagramClientMetrics,
    render_client_totals,
    render_conversation,
)
from portfwd.runtime.addr import format_sockaddr
from portfwd.runtime.admission import SourceFilter
from portfwd.runtime.logs import RateLimitedLog
from portfwd.runtime.metrics import ErrorCounts
from portfwd.runtime.session_table import SessionTable
from portfwd.runtime.sockets import set_buffers
from portfwd.tunnel.origin import Origin
from portfwd.tunnel.wire import NO_COOKIE

log = logging.getLogger(__name__)


class DatagramClient(ConversationService):
    """Listens on UDP; carries each client address's datagrams over the tunnel to ``remote``."""

    # kcptcp-client's receive loop of one conversation's socket (it shares COOKIEs through
    # self.cookie): one copy.
    _receive_tunnel = TunnelClient._receive
    render_totals = staticmethod(render_client_totals)
    render_conversation = staticmethod(render_conversation)

    def __init__(self, config: ClientConfig, listener: socket.socket) -> None:
        super().__init__(config.stats_interval)
        self.config = config
        self.remote = config.remote
        self.listener = UdpEndpoint(listener)
        # The address clients sent to, for the ORIGIN every HELLO carries (the bound one:
        # a wildcard listener cannot tell which of its addresses a datagram came to).
        self._local = listener.getsockname()[:2]
        self.table: SessionTable[Any, DatagramDriver] = SessionTable(config.max_sessions,
                                                                     config.idle_timeout)
        self.conversation_class = CONVERSATIONS[config.mode]
        self.opened = 0
        self.dropped_open = 0  # datagrams of new clients for which no conversation opened
        # --allow/--deny: a refused client's datagrams are dropped before a conversation exists
        self.sources = SourceFilter(config.admission.access, log, "datagram")
        self.udp_open_failures = ErrorCounts()
        # The cookie a loaded server last gave one of our conversations (kcptcp-client's).
        self.cookie: bytes = NO_COOKIE
        self._greenlets: list[gevent.Greenlet] = []
        self._conversations = gevent.pool.Group()
        self._faults = RateLimitedLog(log)

    def start(self) -> None:
        local = format_sockaddr(self.listener.sock.getsockname())
        self._announce(f"udp {local}", f"udp {self.remote} ({self.config.mode})",
                       self.config.conversation.tunnel.plaintext)
        self._greenlets.append(gevent.spawn(self._receive_local))
        if self.config.idle_timeout:
            self._greenlets.append(gevent.spawn(self._sweep))
        stats = self._start_stats()
        if stats is not None:
            self._greenlets.append(stats)

    def metrics(self) -> DatagramClientMetrics:
        """A snapshot of the counters and of every live conversation (no I/O)."""
        return DatagramClientMetrics(
            conversations=len(self.drivers), finished=self.finished, opened=self.opened,
            expired=self.table.expired, evicted=self.table.evicted,
            dropped_open=self.dropped_open, denied=self.sources.denied,
            udp_open_failures=self.udp_open_failures.snapshot(),
            per_conversation=self._per_conversation())  # type: ignore[arg-type]

    def reconfigure(self, config: ClientConfig) -> None:
        """New settings for the same listening socket (config reload): client addresses that
        start a conversation from now on get them, live conversations finish on theirs; the
        timeout and the cap apply to the whole table at once (one LRU), as in udpfwd."""
        self.config, self.remote = config, config.remote
        self.sources.update(config.admission.access)
        self.conversation_class = CONVERSATIONS[config.mode]
        self.table.capacity = config.max_sessions
        self.table.idle_timeout = config.idle_timeout

    def stop(self, timeout: float) -> None:
        gevent.killall(self._greenlets)
        for _, driver in self.table.clear():
            driver.abort("shutting down")
        self._conversations.join(timeout=min(timeout, 2))
        self._conversations.kill(timeout=1)
        self.listener.close()

    # --- the listener ------------------------------------------------------------------------

    def _receive_local(self) -> None:
        table, sources = self.table, self.sources
        while True:
            batch = self.listener.recv_batch()
            now = monotonic()
            touched: dict[int, DatagramDriver] = {}
            for data, addr in batch:
                driver = table.get(addr, now)
                if driver is None:
                    if sources.active and not sources.permits(addr):
                        continue
                    driver = self._open(addr, now)
                    if driver is None:
                        self.dropped_open += 1
                        continue
                driver.from_local(data)
                touched[id(driver)] = driver
            for driver in touched.values():
                driver.transmit()

    def _to_client(self, addr: Any, datagram: bytes) -> bool:
        try:
            self.listener.sock.sendto(datagram, addr)
            return True
        except OSError as exc:  # full (EAGAIN) or refused: the datagram is lost, counted
            if not isinstance(exc, BlockingIOError):
                self._faults.warning("reply", "reply to %s failed: %s", format_sockaddr(addr),
                                     exc.strerror or exc)
            return False

    def _open(self, addr: Any, now: float) -> DatagramDriver | None:
        udp_sock: socket.socket | None = None
        try:
            udp_sock = socket.socket(self.remote.family, socket.SOCK_DGRAM)
            set_buffers(udp_sock, self.config.udp_buffer, force=True)
            udp_sock.connect(self.remote.sockaddr)
        except OSError as exc:  # EMFILE at the fd limit: this datagram is lost, logged
            self.udp_open_failures.add(exc)
            self._faults.warning("udp", "cannot open udp socket to %s: %s", self.remote, exc)
            if udp_sock is not None:
                udp_sock.close()
            return None
        udp = UdpEndpoint(udp_sock)
        conv_id = random_conv()
        while conv_id in self.drivers:
            conv_id = random_conv()
        conv = self.conversation_class.client(self.config.conversation, conv_id,
                                              self.remote.sockaddr, now_ms(), wall_ms(),
                                              self.cookie, origin=Origin(addr[:2], self._local))
        driver = DatagramDriver(conv, udp, f"conv={conv_id}", self.config.fec, self.fec_hint)
        driver.to_local = lambda datagram: self._to_client(addr, datagram)
        driver.on_local_activity = lambda: self.table.touch(addr, monotonic())
        self.drivers[conv_id] = driver
        self.opened += 1
        for old_addr, old, live in self.table.add(addr, driver, now):
            if live:
                self._faults.warning("evict", "session table full (--max-sessions %d): "
                                     "evicted %s (%s)", self.config.max_sessions, old.name,
                                     format_sockaddr(old_addr))
            old.abort("evicted: session cap" if live else "idle")
        self._conversations.spawn(self._run, driver, udp, addr)
        return driver

    def _run(self, driver: DatagramDriver, udp: UdpEndpoint, addr: Any) -> None:
        receiver = gevent.spawn(self._receive_tunnel, driver, udp)
        conv = driver.conv
        try:
            driver.start_ticker()
            log.info("%s open %s -> %s", driver.name, format_sockaddr(addr), self.remote)
            driver.wait_finished()
        finally:
            self._retire(driver)
            receiver.kill()
            udp.close()
            if self.table.get(addr, monotonic()) is driver:  # ended by itself: free the slot
                self.table.pop(addr)
            level = logging.WARNING if driver.close_reason.startswith("refused") else (
                logging.INFO)
            log.log(level, "%s closed (%s): %d datagrams up, %d down", driver.name,
                    driver.close_reason, conv.datagrams_sent, conv.datagrams_received)

    def _sweep(self) -> None:
        interval = sweep_interval(self.config.idle_timeout)
        while True:
            gevent.sleep(interval)
            for _, driver in self.table.expire(monotonic(), SWEEP_LIMIT):
                driver.abort("idle")
