"""kcptcp-client's service: each accepted TCP connection becomes one conversation to the server.

Each conversation has its own UDP socket, connected to the server, so the kernel filters
other sources and the server can tell conversations apart by address as well as by conv.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from types import MappingProxyType

import gevent

from portfwd.kcptcp.config import ClientConfig
from portfwd.kcptcp.driver import (
    ConversationDriver,
    ConversationService,
    now_ms,
    wall_ms,
)
from portfwd.kcptcp.metrics import TunnelClientMetrics, render_client_totals
from portfwd.kcptcp.udp_endpoint import UdpEndpoint
from portfwd.runtime.acceptloop import AcceptLoop
from portfwd.runtime.addr import format_sockaddr
from portfwd.runtime.admission import Gate
from portfwd.runtime.logs import RateLimitedLog
from portfwd.runtime.metrics import ErrorCounts
from portfwd.runtime.relay_timeouts import HalfCloseSweeper, IdleTimer, arm
from portfwd.runtime.sockets import cooperative, set_buffers
from portfwd.tunnel.hello import CLOSE_SERVER_FULL
from portfwd.tunnel.origin import Origin
from portfwd.tunnel.session import CLOSE_HANDSHAKE_TIMEOUT
from portfwd.tunnel.stream import Conversation
from portfwd.tunnel.wire import NO_COOKIE

log = logging.getLogger(__name__)


def random_conv() -> int:
    return struct.unpack("<I", os.urandom(4))[0] or 1


class TunnelClient(ConversationService):
    """Listens on TCP; carries each connection over KCP/UDP to ``remote``."""

    render_totals = staticmethod(render_client_totals)

    def __init__(self, config: ClientConfig, listener: socket.socket) -> None:
        super().__init__(config.stats_interval)
        self.config = config
        self.remote = config.remote
        self.udp_buffer = config.udp_buffer
        self.accept_loop = AcceptLoop(listener, self._handle)
        self.udp_open_failures = ErrorCounts()
        self._stats: gevent.Greenlet | None = None
        # The cookie a loaded server last gave one of our conversations: every new HELLO
        # carries it, so one round trip proves this host's address for all of them.
        self.cookie: bytes = NO_COOKIE
        self._faults = RateLimitedLog(log)
        self.gate = Gate(config.admission)
        self.pending = 0  # connections accepted and still at the gate
        half_close = config.relay.half_close_timeout
        self.sweeper = HalfCloseSweeper(half_close) if half_close else None

    def start(self) -> None:
        self.accept_loop.start()
        self._announce(f"tcp {format_sockaddr(self.accept_loop.address)}", f"udp {self.remote}",
                       self.config.conversation.tunnel.plaintext)
        self._stats = self._start_stats()

    def metrics(self) -> TunnelClientMetrics:
        """A snapshot of the counters and of every live conversation (no I/O)."""
        live = self._per_conversation()
        return TunnelClientMetrics(
            conversations=len(self.drivers), finished=self.finished,
            accepted=self.accept_loop.accepted, accept_errors=self.accept_loop.errors.snapshot(),
            udp_open_failures=self.udp_open_failures.snapshot(), per_conversation=live,
            totals=self._totals(live), closed=MappingProxyType(dict(self.closed)),
            denied=self.gate.denied, over_limit=self.gate.over_limit,
            proxy_rejected=self.gate.proxy_rejected)

    def stop(self, timeout: float) -> None:
        if self._stats is not None:
            self._stats.kill()
        self.accept_loop.stop(timeout)

    def handover(self) -> socket.socket:
        """Stop accepting; return the listener for the next service of this address (config
        reload). Open conversations go on until stop(timeout), which then leaves it open."""
        return self.accept_loop.release()

    def _handle(self, accepted: socket.socket, peer: tuple) -> None:
        # --allow/--deny, --max-conns, --accept-proxy: before any UDP is sent
        self.pending += 1
        try:
            client = self.gate.admit(accepted, peer, len(self.drivers) + self.pending - 1)
            local = None if client is None else client.local or accepted.getsockname()
        except OSError:  # the client is gone already
            client = local = None
        finally:
            self.pending -= 1
        if client is None or local is None:
            accepted.close()
            return
        origin = Origin(client.address[:2], local[:2])
        sock = cooperative(accepted)
        udp_sock: socket.socket | None = None
        try:
            # socket() itself fails with EMFILE at the fd limit: that must close the accepted
            # connection and log (rate-limited), not kill the greenlet with a traceback and
            # leak the accepted fd.
            udp_sock = socket.socket(self.remote.family, socket.SOCK_DGRAM)
            set_buffers(udp_sock, self.udp_buffer, force=True)
            udp_sock.connect(self.remote.sockaddr)
        except OSError as exc:
            self.udp_open_failures.add(exc)
            self._faults.warning("udp", "cannot open udp socket to %s: %s", self.remote, exc)
            if udp_sock is not None:
                udp_sock.close()
            sock.close()
            return
        udp = UdpEndpoint(udp_sock)
        conv_id = random_conv()
        conv = Conversation.client(self.config.conversation, conv_id, self.remote.sockaddr,
                                   now_ms(), wall_ms(), self.cookie)
        conv.send_origin(origin)  # the first record: who this connection is for
        if client.early:  # bytes that came with a PROXY header
            conv.send_stream_data(client.early)
        driver = ConversationDriver(conv, udp, f"conv={conv_id}", self.config.fec, self.fec_hint,
                                    pacing=self.config.conversation.pacing)
        self.drivers[conv_id] = driver
        driver.spawn(self._receive, driver, udp)  # ends in wait_finished
        idle: IdleTimer | None = None
        try:
            driver.transmit()  # the HELLO
            driver.attach_tcp(sock)
            idle = self._time_out(driver)
            log.info("conv=%d open %s -> %s", conv_id, format_sockaddr(client.address),
                     self.remote)
            driver.tick_until_finished()  # this greenlet is the conversation's ticker
        finally:
            if idle is not None:
                idle.stop()
            if self.sweeper is not None:
                self.sweeper.discard(driver)
            self._retire(driver)
            driver.stop_jobs()  # the receiver, even if wait_finished was cut short
            udp.close()
            sock.close()
            log.info("conv=%d closed (%s): %d bytes up, %d down, %.1f s", conv_id,
                     driver.close_reason, conv.bytes_sent, conv.bytes_received,
                     time.monotonic() - driver.started)
            if driver.close_reason == CLOSE_HANDSHAKE_TIMEOUT:
                # A dead server and a wrong key look the same from here: say both.
                self._faults.warning("handshake", "handshake timeout: no answer from %s: the "
                                     "server is down or unreachable, or its key differs from "
                                     "ours (another -K, or -K on one side only)", self.remote)
            elif driver.close_reason == CLOSE_SERVER_FULL:
                self._faults.warning("max-conns", "server at --max-conns: %s refused a new "
                                     "conversation; the connection was reset", self.remote)

    def _time_out(self, driver: ConversationDriver) -> IdleTimer | None:
        """Arm --half-close-timeout and --idle-timeout of a connection."""
        conv = driver.conv
        return arm(driver, self.config.relay, self.sweeper,
                   lambda: conv.bytes_sent + conv.bytes_received)

    def _receive(self, driver: ConversationDriver, udp: UdpEndpoint) -> None:
        session = driver.conv.session
        while True:
            batch = udp.recv_batch()
            now = now_ms()
            for data, addr in batch:
                driver.datagram_received(data, addr, now)
            if not session.confirmed and session.hellos.cookie != self.cookie:
                self.cookie = session.hellos.cookie  # a COOKIE came: share it
            driver.transmit()
