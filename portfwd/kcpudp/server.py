"""kcpudp-server's service: kcptcp-server's flood-limited acceptor, each conversation bridged
to the target over its own connected UDP socket (so the target sees one stable source per
client).

Everything before the bridge is kcptcp-server's (:class:`TunnelServer`: one UDP socket,
demultiplexing by conv, the HandshakeAcceptor, the pending and session caps, eviction): the
target socket opens only once the client proved its keys, and a HELLO for another kind of
conversation (a kcptcp client, or the other --mode) is answered with a REFUSE and nothing else.
A conversation without a datagram either way for ``-t`` seconds is closed.

``--proxy-protocol v2``: every datagram to the target starts with a PROXY v2 header (transport
DGRAM) naming the client address the kcpudp-client saw, from the ORIGIN its HELLO carried
(authenticated by the HELLO's MAC): a header per datagram, because a UDP receiver (dnsdist,
PowerDNS Recursor, Envoy) keeps no state between datagrams and parses each on its own.
"""

from __future__ import annotations

import dataclasses
import logging
import socket

import gevent

from portfwd.kcptcp.driver import now_ms
from portfwd.kcptcp.server import STOP_IDLE_MS, TunnelServer
from portfwd.kcptcp.udp_endpoint import UdpEndpoint
from portfwd.kcpudp.config import ServerConfig
from portfwd.kcpudp.driver import (
    CONVERSATIONS,
    SWEEP_LIMIT,
    DatagramDriver,
    sweep_interval,
)
from portfwd.kcpudp.metrics import (
    DatagramServerMetrics,
    render_conversation,
    render_server_totals,
)
from portfwd.policy.proxy import Command, Transport, pack_v2
from portfwd.runtime.addr import format_sockaddr
from portfwd.runtime.sockets import set_buffers
from portfwd.tunnel.datagrams import UnreliableDatagrams
from portfwd.tunnel.origin import MalformedOrigin, hello_origin_key, origin_from_hello
from portfwd.tunnel.session import TunnelSession

log = logging.getLogger(__name__)


class DatagramServer(TunnelServer):
    """Listens on UDP; bridges each authenticated conversation to the UDP ``target``."""

    render_totals = staticmethod(render_server_totals)
    render_conversation = staticmethod(render_conversation)

    def __init__(self, config: ServerConfig, udp_sock: socket.socket) -> None:
        super().__init__(config, udp_sock)
        self.config: ServerConfig = config
        self.conversation_class = CONVERSATIONS[config.mode]
        self.expired = 0  # conversations closed after -t seconds without a datagram
        self.no_origin = 0  # --proxy-protocol: conversations whose HELLO carried no ORIGIN

    def start(self) -> None:
        self._announce(f"udp {format_sockaddr(self.udp.sock.getsockname())}",
                       f"udp {self.target} ({self.config.mode})",
                       self.config.conversation.tunnel.plaintext)
        self._greenlets.append(gevent.spawn(self._receive))
        if self.config.idle_timeout:
            self._greenlets.append(gevent.spawn(self._sweep))
        self._stats = self._start_stats()  # TunnelServer's: stop and reconfigure see it

    def metrics(self) -> DatagramServerMetrics:  # type: ignore[override]
        """A snapshot of the counters and of every live conversation (no I/O)."""
        tunnel = super().metrics()
        return DatagramServerMetrics(
            tunnel=dataclasses.replace(tunnel, per_conversation=()),
            refused_mode=self.handshakes.refused_carries, expired=self.expired,
            no_origin=self.no_origin,
            per_conversation=tunnel.per_conversation)  # type: ignore[arg-type]

    def reconfigure(self, config: ServerConfig) -> None:  # type: ignore[override]
        """kcptcp-server's reload; new conversations also get the new --mode."""
        super().reconfigure(config)
        self.conversation_class = CONVERSATIONS[config.mode]

    @staticmethod
    def _idle(driver: DatagramDriver, now: int) -> bool:  # type: ignore[override]
        """kcptcp-server's test; a datagram-mode conversation has no KCP: nothing in flight."""
        if isinstance(driver.conv, UnreliableDatagrams):
            return now - driver.last_active >= STOP_IDLE_MS and not driver.conv.readable
        return TunnelServer._idle(driver, now)

    def _make_driver(self, session: TunnelSession, now: int) -> DatagramDriver:
        conv = self.conversation_class(session, self.config.conversation, now, self.reassembly)
        return DatagramDriver(conv, self.udp, f"conv={conv.conv}", self.config.fec,
                              self.fec_hint)

    def _connect(self, driver: DatagramDriver) -> None:  # type: ignore[override]
        """The client proved its keys: a UDP socket connected to the target, and a greenlet
        carrying what the target sends back."""
        target = self.target
        header = b""
        if self.config.proxy_protocol:
            header = self._proxy_header(driver)
            if header is None:
                return
        sock: socket.socket | None = None
        try:
            sock = socket.socket(target.family, socket.SOCK_DGRAM)
            set_buffers(sock, self.config.udp_buffer, force=True)
            sock.connect(target.sockaddr)
        except OSError as exc:  # EMFILE at the fd limit, or no route
            self.dial_failures.add(exc)
            self._faults.warning("connect", "%s: cannot open udp socket to %s: %s",
                                 driver.name, target, exc.strerror or exc)
            if sock is not None:
                sock.close()
            driver.abort("target unreachable")
            return
        local = UdpEndpoint(sock)
        def receive() -> None:
            self._receive_target(driver, local)

        if header:  # each datagram its own sendmsg behind the header (no GSO run across them)
            driver.attach_local(lambda datagram: self._to_target_after(local, header, datagram),
                                local.close, receive)
        else:
            driver.attach_local(lambda datagram: self._to_target(local, datagram), local.close,
                                receive, many=local.offer)
        log.info("%s open %s -> %s", driver.name, format_sockaddr(driver.conv.peer_addr), target)
        driver.transmit()  # what arrived before the socket was open

    def _proxy_header(self, driver: DatagramDriver) -> bytes | None:
        """The PROXY v2 header of every datagram of this conversation: the client address of
        its HELLO's ORIGIN; LOCAL (the receiver uses the socket's own addresses) for a client
        that sent none. None, and the conversation aborted, for a malformed one."""
        session = driver.conv.session
        try:
            origin = origin_from_hello(session.hello,
                                       hello_origin_key(self.config.conversation.tunnel.psk))
        except MalformedOrigin as exc:  # only a PSK holder can get here
            self._faults.warning("origin", "%s: malformed ORIGIN in the HELLO from %s: %s",
                                 driver.name, format_sockaddr(driver.conv.peer_addr), exc)
            driver.abort("malformed ORIGIN")
            return None
        if origin is None:
            self.no_origin += 1
            return pack_v2(None, None, command=Command.LOCAL)
        return pack_v2(origin.source, origin.destination, transport=Transport.DGRAM)

    @staticmethod
    def _to_target_after(local: UdpEndpoint, header: bytes, datagram: bytes) -> bool:
        try:
            local.sock.sendmsg((header, datagram))  # gathered: the datagram is not copied
            return True
        except OSError:  # full, refused (ICMP), or too long with the header: lost, counted
            return False

    def _to_target(self, local: UdpEndpoint, datagram: bytes) -> bool:
        try:
            local.sock.send(datagram)
            return True
        except OSError:  # full, or the target's port refused the last one (ICMP): lost
            return False

    @staticmethod
    def _receive_target(driver: DatagramDriver, local: UdpEndpoint) -> None:
        while True:
            batch = local.recv_batch()
            for data, _ in batch:
                driver.from_local(data)
            driver.transmit()

    def _sweep(self) -> None:
        interval = sweep_interval(self.config.idle_timeout)
        idle_ms = self.config.idle_timeout * 1000
        while True:
            gevent.sleep(interval)
            now = now_ms()
            idle = [d for d in self.drivers.values() if now - d.last_active >= idle_ms]
            for driver in idle[:SWEEP_LIMIT]:
                self.expired += 1
                driver.abort("idle")
