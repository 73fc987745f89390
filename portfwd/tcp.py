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
import time
from dataclasses import dataclass

import gevent
from gevent.event import Event

from portfwd.acceptloop import AcceptLoop
from portfwd.addr import Resolved, format_sockaddr
from portfwd.logs import RateLimitedLog
from portfwd.pump import Counter, Endpoint, pump
from portfwd.sockets import CONNECT_TIMEOUT, dial_tcp
from portfwd.workers import Workers

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value


class BaseAddrError(ValueError):
    """-b address arithmetic left the address space."""


@dataclass(frozen=True)
class TcpConfig:
    """tcpfwd's behaviour, built from the command line in one place (``portfwd.tcpfwd``)."""

    dest: Resolved  # where connections go (the base address with -b)
    listen_port: int  # the listener's port, the zero point of -b offsets
    base_addr: bool = False  # -b: destination address += original port - listener port
    splice: bool = True  # kernel splice() relay; False = userspace copy
    connect_timeout: float = CONNECT_TIMEOUT  # s


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


def original_dst_port(sock: socket.socket) -> int:
    """The port a REDIRECT/TPROXY'd connection was originally sent to (netfilter conntrack)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    else:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return struct.unpack_from("!H", raw, 2)[0]  # sockaddr_in{,6}: family, then port


class TcpForwarder:
    """A bound listener plus the destination; :func:`portfwd.daemon.run` starts and stops it."""

    def __init__(self, config: TcpConfig, listener: socket.socket) -> None:
        self.config = config
        self.acceptor = AcceptLoop(listener, self._handle)
        self._ids = itertools.count(1)
        self._faults = RateLimitedLog(log)

    def start(self) -> None:
        self.acceptor.start()
        log.info("forwarding %s -> %s (%s)", format_sockaddr(self.acceptor.address),
                 self.config.dest, "splice" if self.config.splice else "copy")

    def stop(self, timeout: float) -> None:
        self.acceptor.stop(timeout)

    def _destination(self, client: socket.socket) -> Resolved:
        if not self.config.base_addr:
            return self.config.dest
        offset = original_dst_port(client) - self.config.listen_port
        return offset_address(self.config.dest, offset)

    def _handle(self, accepted: socket.socket, peer: tuple) -> None:
        conn_id = next(self._ids)
        try:
            dest = self._destination(accepted)
        except (OSError, BaseAddrError) as exc:
            self._faults.warning("base", "conn %d from %s: -b address: %s",
                                 conn_id, format_sockaddr(peer), exc)
            accepted.close()
            return
        dialled = self._dial(conn_id, dest)
        if dialled is None:
            accepted.close()
            return
        client, upstream = Endpoint(accepted), Endpoint(dialled)
        try:
            log.info("conn %d open %s -> %s", conn_id, format_sockaddr(peer), dest)
            started = time.monotonic()
            try:
                up, down, error = relay(client, upstream, self.config.splice,
                                        self.acceptor.workers)
            except gevent.GreenletExit:
                # Cut at the end of the drain period: reset both sides, so neither mistakes a
                # truncated transfer for a finished one.
                for end in (client, upstream):
                    reset_on_close(end.sock)
                log.info("conn %d reset: service stopping", conn_id)
                raise
            log.info("conn %d closed: %d bytes up, %d down, %.1f s%s", conn_id, up, down,
                     time.monotonic() - started, f" ({error})" if error else "")
        finally:
            client.close()
            upstream.close()

    def _dial(self, conn_id: int, dest: Resolved) -> socket.socket | None:
        try:
            return dial_tcp(dest, self.config.connect_timeout)
        except OSError as exc:  # includes TimeoutError and EMFILE
            self._faults.warning("connect", "conn %d: connect to %s failed: %s", conn_id, dest,
                                 exc.strerror or exc)
            return None


def reset_on_close(sock: socket.socket) -> None:
    """Make the next close() send RST instead of FIN (SO_LINGER on, timeout 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def relay(a: Endpoint, b: Endpoint, splice: bool, workers: Workers) -> tuple[int, int, str]:
    """Pump a -> b here and b -> a in a second job in ``workers`` until both reach EOF.

    An error in either direction ends both: the failing pump shuts both sockets down, which
    wakes the other pump with EOF (no greenlet kill, no waiting machinery on the hot path).
    Returns (bytes a->b, bytes b->a, error text or ""). The sockets stay open for the caller.
    """
    forward, backward = Counter(), Counter()
    errors: list[str] = []  # the first one is the connection's fate; later ones are echoes
    finished = Event()  # b -> a is over
    other = workers.spawn(_guarded_pump, b, a, splice, backward, errors, finished)
    try:
        _guarded_pump(a, b, splice, forward, errors)
        finished.wait()
    finally:
        if not finished.is_set():
            # We were killed (drain period over). b -> a must be gone before the caller closes
            # the sockets: a splice pump waits on its own watchers, which close() cannot cancel.
            workers.cancel(other, finished)
            finished.wait()
    return forward.moved, backward.moved, errors[0] if errors else ""


def _guarded_pump(src: Endpoint, dst: Endpoint, splice: bool, counter: Counter,
                  errors: list[str], finished: Event | None = None) -> None:
    """A pump whose socket errors are a result (the connection's fate), not a traceback."""
    try:
        pump(src, dst, splice, counter)
    except OSError as exc:
        errors.append(exc.strerror or repr(exc))
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
    finally:
        if finished is not None:
            finished.set()
