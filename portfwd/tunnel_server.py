"""kcptcp-server's service: accept authenticated conversations on UDP, bridge each to the target.

One UDP socket and one receive loop serve every conversation: datagrams are demultiplexed by
the conv field; only a HELLO for an unknown conv reaches the HandshakeAcceptor, and the target is
dialled only after the acceptor authenticated it (DESIGN.md). Nothing is ever sent in answer
to a datagram that did not authenticate.
"""

from __future__ import annotations

import logging
import socket

import gevent
import gevent.pool
from gevent.socket import socket as gsocket

from portfwd.acceptor import HandshakeAcceptor
from portfwd.addr import Resolved, format_sockaddr
from portfwd.conversation import Conversation, ConversationConfig
from portfwd.logs import RateLimitedLog
from portfwd.sockets import tune_tcp
from portfwd.tunnel import ConversationDriver, UdpEndpoint, now_ms, stats_loop, wall_ms
from portfwd.wire import TYPE_MASK, MalformedPacket, PacketType, peek_prefix

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # s before an unanswered dial to the target is abandoned
_HELLO = int(PacketType.HELLO)


class TunnelServer:
    """Listens on UDP; bridges each authenticated conversation to ``target`` over TCP."""

    def __init__(self, config: ConversationConfig, udp_sock: socket.socket, target: Resolved,
                 stats_interval: float, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.config = config
        self.target = target
        self.stats_interval = stats_interval
        self.connect_timeout = connect_timeout
        self.udp = UdpEndpoint(udp_sock)
        self.acceptor = HandshakeAcceptor(config.tunnel)
        self.drivers: dict[int, ConversationDriver] = {}
        self.conversations = gevent.pool.Group()
        self.finished = 0
        self.dropped_unknown = 0  # datagrams for no conversation that are not a HELLO
        self.dropped_malformed = 0  # shorter than the common prefix
        self.accepting = True
        self._greenlets: list[gevent.Greenlet] = []
        self._faults = RateLimitedLog(log)

    def start(self) -> None:
        if self.config.tunnel.psk is None:
            log.warning("no -K given: the tunnel is NOT encrypted or authenticated")
        log.info("tunnelling udp %s -> tcp %s (%s)",
                 format_sockaddr(self.udp.sock.getsockname()), self.target,
                 "encrypted" if self.config.tunnel.psk else "plaintext")
        self._greenlets.append(gevent.spawn(self._receive))
        if self.stats_interval > 0:
            self._greenlets.append(gevent.spawn(stats_loop, self.stats_interval,
                                                lambda: list(self.drivers.values()), self._totals))

    def _totals(self) -> str:
        a = self.acceptor
        return (f"conversations={len(self.drivers)} finished={self.finished} "
                f"handshakes={a.accepted} rejected_auth={a.dropped_auth} "
                f"rejected_replay={a.dropped_replay} rejected_stale={a.dropped_stale} "
                f"rejected_rate={a.dropped_rate} dropped_unknown={self.dropped_unknown}")

    def stop(self, timeout: float) -> None:
        self.accepting = False
        self.conversations.join(timeout=timeout)
        for driver in list(self.drivers.values()):
            driver.abort("shutting down")
        self.conversations.join(timeout=1)
        self.conversations.kill(timeout=1)
        gevent.killall(self._greenlets)
        self.udp.close()

    def _receive(self) -> None:
        drivers = self.drivers
        while True:
            batch = self.udp.recv_batch()
            now = now_ms()
            touched: dict[int, ConversationDriver] = {}
            for data, addr in batch:
                try:
                    ptype, conv_id = peek_prefix(data)
                except MalformedPacket:
                    self.dropped_malformed += 1
                    continue
                driver = drivers.get(conv_id)
                if driver is None:
                    if ptype & TYPE_MASK != _HELLO or not self.accepting:
                        self.dropped_unknown += 1
                        continue
                    driver = self._new_conversation(data, addr, now)
                    if driver is None:
                        continue
                else:
                    driver.datagram_received(data, addr, now)
                touched[conv_id] = driver
            for driver in touched.values():
                driver.transmit()

    def _new_conversation(self, hello: bytes, addr: tuple, now: int) -> ConversationDriver | None:
        session = self.acceptor.accept(hello, addr, now, wall_ms())
        if session is None:
            return None  # dropped and counted by the acceptor: never answered
        conv = Conversation(session, self.config, now)
        driver = ConversationDriver(conv, self.udp, f"conv={conv.conv}")
        self.drivers[conv.conv] = driver
        self.conversations.spawn(self._serve, driver, addr)
        return driver

    def _serve(self, driver: ConversationDriver, peer: tuple) -> None:
        conv = driver.conv
        try:
            driver.start_ticker()
            target = self._dial(driver)
            if target is not None:
                log.info("%s open %s -> %s", driver.name, format_sockaddr(peer), self.target)
                driver.attach_tcp(target)
            driver.wait_finished()
        finally:
            if not driver.finished.is_set():
                driver.abort("shutting down")
                driver.wait_finished()
            del self.drivers[conv.conv]
            self.finished += 1
            log.info("%s closed (%s): %d bytes up, %d down", driver.name, driver.close_reason,
                     conv.bytes_received, conv.bytes_sent)

    def _dial(self, driver: ConversationDriver) -> gsocket | None:
        sock = gsocket(self.target.family, socket.SOCK_STREAM)
        try:
            tune_tcp(sock)
            sock.settimeout(self.connect_timeout)
            sock.connect(self.target.sockaddr)
            sock.settimeout(None)
        except OSError as exc:
            sock.close()
            self._faults.warning("connect", "%s: connect to %s failed: %s", driver.name,
                                 self.target, exc.strerror or exc)
            driver.abort("target unreachable")
            return None
        return sock
