"""The TCP forwarder service: accept, dial the destination, relay both directions.

Glossary: *client* is the accepted connection, *upstream* the one we dial to the destination;
*up* is client -> upstream, *down* upstream -> client.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import logging
import socket
import struct

from gevent import get_hub

from portfwd.policy.proxy import pack
from portfwd.runtime.acceptloop import AcceptLoop
from portfwd.runtime.addr import HostPort, Resolved, format_sockaddr
from portfwd.runtime.admission import Client, Gate
from portfwd.runtime.logs import RateLimitedLog, hot_log
from portfwd.runtime.relay_timeouts import HalfCloseSweeper
from portfwd.runtime.sockets import (
    EARLY_SEND,
    DeferredKeepalive,
    dial_tcp,
    finish_dial,
    quick_acks,
    start_dial,
)
from portfwd.runtime.stats_lines import StatsLines
from portfwd.runtime.upstream import Destination, Upstreams
from portfwd.tcpfwd.config import TcpConfig
from portfwd.tcpfwd.metrics import TcpCounters, TcpMetrics, status
from portfwd.tcpfwd.pump import COPY_CHUNK, MSG_DONTWAIT, RelaySocket
from portfwd.tcpfwd.relay import CONN_LOG_LEVEL, Relay

log = logging.getLogger(__name__)

PRELUDE_PEEK = 16384  # bytes of client data sent along with the PROXY header, at most
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value


class BaseAddrError(ValueError):
    """-b address arithmetic left the address space."""


def offset_address(base: Resolved, offset: int) -> Resolved:
    """-b arithmetic: add ``offset`` to the IPv4 address, or to the low 32 bits of an IPv6 one."""
    ip = ipaddress.ip_address(base.host.split("%")[0])
    if ip.version == 4:
        value = int(ip) + offset
        if not 0 <= value <= 0xFFFFFFFF:
            raise BaseAddrError(f"{ip} + {offset} leaves IPv4 address space")
        new = ipaddress.IPv4Address(value)
    else:
        low = (int(ip) & 0xFFFFFFFF) + offset
        if not 0 <= low <= 0xFFFFFFFF:
            raise BaseAddrError(f"{ip} + {offset} overflows the low 32 bits")
        new = ipaddress.IPv6Address((int(ip) & ~0xFFFFFFFF) | low)
    return Resolved(base.family, (str(new), *base.sockaddr[1:]))


def listening_address(bound: tuple) -> tuple[str, int] | None:
    """The local address of every connection a listener bound to ``bound`` accepts, or None for
    a wildcard (0.0.0.0, ::), where each connection's is its own getsockname()."""
    try:
        if ipaddress.ip_address(bound[0]).is_unspecified:
            return None
    except ValueError:  # a scoped IPv6 address: ask each connection
        return None
    return bound[:2]


def original_dst_port(sock: socket.socket) -> int:
    """The port a REDIRECT/TPROXY'd connection was originally sent to (netfilter conntrack)."""
    if sock.family == socket.AF_INET6:
        try:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        except OSError:  # an IPv4 connection on a dual-stack listener: tracked as IPv4
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    else:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return struct.unpack_from("!H", raw, 2)[0]  # sockaddr_in{,6}: family, then port


class TcpForwarder:
    """A bound listener plus the destination; :func:`portfwd.runtime.daemon.run` starts and
    stops it."""

    def __init__(self, config: TcpConfig, listener: socket.socket) -> None:
        self.config = config
        bound = listener.getsockname()
        self.listen_port: int = bound[1]  # the zero point of -b offsets
        self.accept_loop = AcceptLoop(listener, self._accepted, inline=True)
        self.workers = self.accept_loop.workers
        self._loop = get_hub().loop  # the relays' watchers' (the accept loop's hub)
        self._ids = itertools.count(1)
        self._faults = RateLimitedLog(log)
        self.counters = TcpCounters()
        self.gate = Gate(config.admission)
        self.upstreams = Upstreams(
            config.destinations or (Destination(HostPort(config.dest.host, config.dest.port),
                                                (config.dest,)),),
            config.balancing, config.connect_timeout)
        self._single = self.upstreams.single  # one literal address: dial it directly
        # Connections in _handle and not yet relaying (reading, dialling), for --max-conns; the
        # plain case's (_accepted, _finish_dial) only happen with no gate, so are not counted.
        self.pending = 0
        self._gated = self.gate.checks
        self._proxy = config.proxy_protocol  # PROXY header version to send, 0 = none
        # _dial defers the handshake's last ACK to the header (not for upstreams.dial()'s
        # several destinations: their sockets are dialled without it)
        self._early_header = bool(self._proxy) and EARLY_SEND and \
            (self._single is not None or bool(config.base_addr))
        self._local = listening_address(bound)  # every connection's local address, or None
        # The plain case's one address (no gate, PROXY header or -b), set up by _accepted
        # itself; None: every connection goes to a worker (_handle).
        self._plain = None if self._gated or self._proxy or config.base_addr else self._single
        self.keepalive = DeferredKeepalive()  # the plain case's dialled sockets
        half_close = config.relay.half_close_timeout
        self.sweeper = HalfCloseSweeper(half_close) if half_close else None
        self.stats_lines = StatsLines(log, self.metrics,
                                      lambda snapshot: f"stats: {status(snapshot)[0]}")

    def metrics(self) -> TcpMetrics:
        """A snapshot of the counters (no I/O; bytes of running relays included)."""
        return self.counters.snapshot(self.accept_loop.accepted, self.accept_loop.errors,
                                      self.gate, self.upstreams)

    def start(self) -> None:
        self.accept_loop.start()
        dests = ", ".join(map(str, self.upstreams.destinations))
        log.info("forwarding %s -> %s (%s)", format_sockaddr(self.accept_loop.address),
                 dests if not self.config.base_addr else self.config.dest,
                 "splice" if self.config.splice else "copy")
        self.stats_lines.start(self.config.stats_interval)  # SIGUSR1's status line, periodically

    def stop(self, timeout: float) -> None:
        self.accept_loop.stop(timeout)
        self.keepalive.close()
        if self.stats_lines.running:  # the last word: what the drained service did
            self.stats_lines.stop()
            self.stats_lines.write()

    def handover(self) -> socket.socket:
        """Stop accepting; return the listener for the next service of this address (config
        reload). Open connections go on until stop(timeout), which then leaves it open."""
        return self.accept_loop.release()

    def _destination(self, conn_id: int, client: socket.socket, peer: tuple) -> Resolved | None:
        try:
            offset = original_dst_port(client) - self.listen_port
            return offset_address(self.config.dest, offset)
        except (OSError, BaseAddrError) as exc:
            self.counters.no_destination += 1
            self._faults.warning("base", "conn %d from %s: -b address: %s",
                                 conn_id, format_sockaddr(peer), exc)
            return None

    def _accepted(self, accepted: socket.socket, peer: tuple) -> None:
        """A new connection, in the accept loop's hub callback (must not wait). The plain case (one
        destination address, no gate, no PROXY header, no -b) is set up right here when the
        dial completes at once, as on loopback and fast LANs: the client's first bytes if
        they are here, socket, connect, those bytes sent, relay on callbacks, with no
        greenlet of its own; its keepalive options are set a second later if it is still
        open. Everything else goes on in a worker."""
        dest = self._plain
        if dest is None:
            self.workers.spawn(self._handle, accepted, peer)
            return
        conn_id = next(self._ids)
        # What the client sent already (under load an HTTP request usually is here by now)
        # goes out with the handshake's last ACK (start_dial's ``early``); nothing here yet
        # (a server that speaks first, a slow client): a plain dial.
        first = b""
        try:  # the accepted socket is in blocking mode (RelaySocket)
            if EARLY_SEND and MSG_DONTWAIT:
                first = accepted.recv(COPY_CHUNK, MSG_DONTWAIT)
        except BlockingIOError:
            pass
        except OSError as exc:  # reset already: nothing to dial for
            self._gone_before_dial(conn_id, peer, exc)
            accepted.close()
            return
        try:
            early = bool(first)  # the bytes in hand carry the ACK and probe the handshake
            dialled, connected = start_dial(dest, keepalive=False, early=early, send_probes=early)
        except OSError as exc:
            self._dial_failed(conn_id, dest, exc)
            accepted.close()
            return
        sent = 0
        if first:  # the send says whether the handshake is over
            try:
                sent = dialled.send(first, MSG_DONTWAIT)
            except BlockingIOError:
                pass  # still connecting: a worker finishes the dial
            except OSError as exc:  # the connect's own error (refused, unreachable)
                dialled.close()
                self._dial_failed(conn_id, dest, exc)
                accepted.close()
                return
            else:
                connected = True
                quick_acks(dialled)
        self.keepalive.add(dialled)  # a second from now, if still open (short ones are not)
        if connected:
            self._relay(conn_id, accepted, peer, None, dialled, dest, first, sent)
        else:
            self.workers.spawn(self._finish_dial, conn_id, accepted, peer, dialled, dest, first)

    def _finish_dial(self, conn_id: int, accepted: socket.socket, peer: tuple,
                     dialled: socket.socket, dest: Resolved, first: bytes) -> None:
        try:
            finish_dial(dialled, self.config.connect_timeout)
        except OSError as exc:
            self._dial_failed(conn_id, dest, exc)
            accepted.close()
            return
        except BaseException:  # killed while dialling (finish_dial closed the socket)
            accepted.close()
            raise
        sent = 0
        if first:
            # What this does not send goes first in the relay, which also meets any error.
            with contextlib.suppress(OSError):
                sent = dialled.send(first, MSG_DONTWAIT)
            with contextlib.suppress(OSError):
                quick_acks(dialled)
        self._relay(conn_id, accepted, peer, None, dialled, dest, first, sent)

    def _gone_before_dial(self, conn_id: int, peer: tuple, exc: OSError) -> None:
        """The client's connection failed before anything was dialled for it: counted as a
        connection that opened and failed."""
        self.counters.closed += 1
        self.counters.failed += 1
        if log.isEnabledFor(CONN_LOG_LEVEL):
            hot_log(log, CONN_LOG_LEVEL, "conn %d from %s failed before the dial: %s", conn_id,
                    format_sockaddr(peer), exc.strerror or exc)

    def _handle(self, accepted: socket.socket, peer: tuple) -> None:
        """A new connection in a worker: the gate, then the dial, then the relay."""
        conn_id = next(self._ids)
        dialled = dest = None
        client = None
        self.pending += 1
        try:
            if self._gated:  # --allow/--deny, --max-conns, --accept-proxy: before any dial
                client = self.gate.admit(accepted, peer,
                                         len(self.counters.live) + self.pending - 1)
                if client is None:
                    return
            if self.config.base_addr:
                dest = self._destination(conn_id, accepted, peer)
                if dest is not None:
                    dialled = self._dial(conn_id, dest)
            else:
                dialled, dest = self._dial_upstream(conn_id)
        finally:
            self.pending -= 1
            if dialled is None:  # refused, no destination, or killed while dialling
                accepted.close()
        if dialled is None:
            return
        self._relay(conn_id, accepted, peer, client, dialled, dest)

    def _relay(self, conn_id: int, accepted: socket.socket, peer: tuple, client: Client | None,
               dialled: socket.socket, dest: Resolved, first: bytes = b"",
               sent: int = 0) -> None:
        """Both ends are connected: send the prelude if any, then relay (never waits, except
        for sending a PROXY header, which only the worker path does). ``first``: client bytes
        read before the dial, of which ``sent`` went out already."""
        upstream = RelaySocket(dialled, self._loop)
        ahead = sent  # stream bytes sent before the relay
        if client is not None or self._proxy:
            prelude = self._send_prelude(conn_id, accepted, peer, client, upstream, dest)
            if prelude is None:
                upstream.close()
                accepted.close()
                return
            ahead = prelude
        if log.isEnabledFor(CONN_LOG_LEVEL):  # off by default: not even the arguments
            if client is None or client.address is peer:
                hot_log(log, CONN_LOG_LEVEL, "conn %d open %s -> %s", conn_id,
                        format_sockaddr(peer), dest)
            else:
                hot_log(log, CONN_LOG_LEVEL, "conn %d open %s (via %s) -> %s", conn_id,
                        format_sockaddr(client.address), format_sockaddr(peer), dest)
        relay = Relay(conn_id, RelaySocket(accepted, self._loop), upstream, self.config.splice,
                      self.counters, self.config.relay.idle_timeout, self.sweeper)
        relay.up.moved += ahead
        relay.start(self.workers, first[sent:])

    def _send_prelude(self, conn_id: int, accepted: socket.socket, peer: tuple,
                      client: Client | None, upstream: RelaySocket, dest: Resolved) -> int | None:
        """Send what goes to the destination before the relay: the PROXY header, then the
        stream bytes that arrived with a header we read. Returns how many stream bytes went
        ahead of the relay, None if sending failed (logged)."""
        data = b"" if client is None else client.early
        ahead = len(data)  # stream bytes among ``data``
        try:
            if self._proxy:
                source = peer if client is None else client.address
                local = self._local if client is None else client.local or self._local
                data = pack(self._proxy, source[:2], (local or accepted.getsockname())[:2]) + data
                # What the client sent already goes in the same segment as the header: on
                # loopback a segment of its own costs the forwarder ~10 us more per connection.
                try:  # the accepted socket may still be in blocking mode (RelaySocket)
                    first = accepted.recv(PRELUDE_PEEK, MSG_DONTWAIT)
                except BlockingIOError:
                    first = b""
                data += first
                ahead += len(first)
            if data:
                upstream.send_all(data)
            if self._early_header:
                quick_acks(upstream.sock)
        except OSError as exc:
            self._faults.warning("prelude", "conn %d: sending to %s failed: %s", conn_id, dest,
                                 exc.strerror or exc)
            return None
        return ahead

    def _dial_upstream(self, conn_id: int) -> tuple[socket.socket | None, Resolved | None]:
        if self._single is not None:
            return self._dial(conn_id, self._single), self._single
        try:
            return self.upstreams.dial()
        except OSError as exc:
            self.counters.dial_failures.add(exc)
            self._faults.warning("connect", "conn %d: no destination answered: %s", conn_id,
                                 exc.strerror or exc)
            return None, None

    def _dial(self, conn_id: int, dest: Resolved) -> socket.socket | None:
        try:
            # A PROXY header is always in hand: it carries the handshake's last ACK
            # (start_dial's ``early``; _send_prelude turns quick ACKs back on).
            return dial_tcp(dest, self.config.connect_timeout, early=self._early_header)
        except OSError as exc:  # includes TimeoutError and EMFILE
            self._dial_failed(conn_id, dest, exc)
            return None

    def _dial_failed(self, conn_id: int, dest: Resolved, exc: OSError) -> None:
        self.counters.dial_failures.add(exc)
        self._faults.warning("connect", "conn %d: connect to %s failed: %s", conn_id, dest,
                             exc.strerror or exc)
