"""Socket set-up shared by the tools: listeners with the seed's -r/-R/-6 flags, TCP tuning."""

from __future__ import annotations

import _socket
import errno
import os
import socket
import sys
from dataclasses import dataclass

from gevent import get_hub
from gevent.socket import socket as gsocket
from gevent.socket import wait_write

from portfwd.runtime.addr import Resolved

SOCKBUF_CAP = 262144  # bytes; seed TCP_PROXY_SOCKBUF_CAP / UDP_PROXY_SOCKBUF_CAP
DGRAM_CAP = 65536  # bytes; seed UDP_PROXY_DGRAM_CAP: holds the largest UDP payload (65,527)
KEEPALIVE_IDLE = 60  # s; seed TCP_PROXY_KEEPALIVE_IDLE
KEEPALIVE_INTVL = 10  # s; seed TCP_PROXY_KEEPALIVE_INTVL
KEEPALIVE_CNT = 6  # probes; seed TCP_PROXY_KEEPALIVE_CNT
LISTEN_BACKLOG = 1024
CONNECT_TIMEOUT = 10.0  # s before an unanswered connect to a destination/target is abandoned
SOCK_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)  # Linux: socket() makes it non-blocking
READ, WRITE = 1, 2  # libev event masks (EV_READ, EV_WRITE) for loop.io() watchers
# UDP GSO (Linux 4.18+): one sendmsg() with UDP_SEGMENT carries a run of equal-size datagrams
# that the kernel splits back into the same datagrams.
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # linux/udp.h
UDP_MAX_SEGMENTS = 64  # datagrams per GSO send at most (the kernel's limit)
SOFT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                         errno.EHOSTDOWN, errno.ENETDOWN, errno.EMSGSIZE})  # ICMP-reported:
# the datagram is lost, not us


@dataclass(frozen=True)
class ListenOptions:
    """The listener flags every tool shares."""

    reuseaddr: bool = False  # -r: SO_REUSEADDR on a UDP listener (TCP listeners always set it)
    reuseport: bool = False  # -R: SO_REUSEPORT (several processes share one port)
    v6only: bool = False  # -6 (udpfwd: -o): IPV6_V6ONLY; without it [::] also takes IPv4
    bufsize: int | None = None  # SO_RCVBUF/SO_SNDBUF in bytes, None = kernel default


def bind_socket(addr: Resolved, socktype: int, options: ListenOptions) -> socket.socket:
    """A bound (not yet listening) stdlib socket; errors propagate as OSError for the caller.

    A TCP listener always gets SO_REUSEADDR, as nginx, HAProxy and gevent's StreamServer do:
    without it the TIME_WAIT sockets of the last run's short connections keep the port from a
    restarted instance for a minute. On a UDP socket SO_REUSEADDR lets a second process bind
    the same port, so there it stays the -r opt-in.
    """
    sock = socket.socket(addr.family, socktype)
    try:
        if options.reuseaddr or socktype == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if options.reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if addr.family == socket.AF_INET6:
            # Set explicitly both ways: the system default (bindv6only) must not decide.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(options.v6only))
        if options.bufsize:
            # A datagram listener's buffer is what holds a burst while we catch up (new
            # sessions cost time): root may exceed net.core.rmem_max, as the tunnel does.
            set_buffers(sock, options.bufsize, force=socktype == socket.SOCK_DGRAM)
        sock.bind(addr.sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


# Python's socket module does not export the root-only SO_{SND,RCV}BUFFORCE (they may exceed
# net.core.{w,r}mem_max): Linux's asm-generic values (x86, arm, riscv), None elsewhere.
_LINUX_GENERIC = sys.platform == "linux" and os.uname().machine in (
    "x86_64", "i686", "aarch64", "armv7l", "armv6l", "riscv64")
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32 if _LINUX_GENERIC else None)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33 if _LINUX_GENERIC else None)
# (capped option, root-only option that may exceed net.core.{r,w}mem_max or None)
BUFFER_OPTIONS = [(socket.SO_RCVBUF, SO_RCVBUFFORCE), (socket.SO_SNDBUF, SO_SNDBUFFORCE)]


def set_buffers(sock: socket.socket, size: int, force: bool = False) -> None:
    """SO_RCVBUF/SO_SNDBUF; ``force`` lets root exceed net.core.{r,w}mem_max (datagram sockets,
    where a small buffer means loss at high rates), falling back to the capped options."""
    for plain, forced in BUFFER_OPTIONS:
        if force and forced is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, forced, size)
                continue
            except PermissionError:
                pass
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


# The seed's per-connection options after the buffers: TCP_NODELAY, keepalive 60/10/6 (the
# keepalive timing options are Linux's; other systems keep their defaults).
NODELAY_OPTION = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
KEEPALIVE_OPTIONS = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
if hasattr(socket, "TCP_KEEPIDLE"):
    KEEPALIVE_OPTIONS += [(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE),
                          (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTVL),
                          (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_CNT)]
TCP_OPTIONS = [NODELAY_OPTION, *KEEPALIVE_OPTIONS]
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux
# start_dial's ``early``: Linux fails a send on a socket still connecting with EAGAIN, so the
# first send says whether the handshake is over; other systems may queue it instead.
EARLY_SEND = TCP_QUICKACK is not None and sys.platform.startswith("linux")
KEEPALIVE_DEFER = 1.0  # s: DeferredKeepalive tunes sockets 1-2 s old
# start_dial's options in one list per (keepalive, early), set in one loop (three Python
# calls fewer per dial than helpers would make): tune_tcp's (the seed's buffers, TCP_NODELAY,
# keepalive unless deferred), then for ``early`` TCP_QUICKACK off. That lets the handshake's
# last ACK ride on the first data segment instead of going alone (HAProxy's ``option
# tcp-smart-connect``): TCP_QUICKACK off before connect() makes Linux hold that ACK (up to
# 200 ms) and send it with the first bytes written. One packet fewer per connection, and the
# server gets its first bytes with the connection. Only for a caller with bytes in hand to
# write the moment the connection is up (a client's request already read, a PROXY header): a
# server that speaks first must never wait for an ACK that waits for data. The mode would
# also delay the ACK of the server's first reply, which stalls a server that writes twice
# with Nagle on for one delayed-ACK period (40 ms, measured): quick_acks() right after the
# first write ends it. Nothing is set where TCP_QUICKACK does not exist.
_BUFFERS = [(socket.SOL_SOCKET, plain, SOCKBUF_CAP) for plain, _ in BUFFER_OPTIONS]
DIAL_OPTIONS = {
    (keepalive, early): [*_BUFFERS, *(TCP_OPTIONS if keepalive else (NODELAY_OPTION,)),
                         *([(socket.IPPROTO_TCP, TCP_QUICKACK, 0)]
                           if early and TCP_QUICKACK is not None else [])]
    for keepalive in (False, True) for early in (False, True)}
# socket() non-blocking from birth; a plain int (SocketKind | SocketKind is one already)
STREAM_NONBLOCK = int(socket.SOCK_STREAM | SOCK_NONBLOCK)
# Sockets on the short-connection path (accepted by AcceptLoop, dialled by start_dial) are
# CPython's C socket type itself, not the stdlib's Python subclass: its __init__ and close()
# (close, then _real_close) are Python frames, about 0.5 us per connection for its two
# sockets. Everything the tools call on them (recv, send, setsockopt, detach, ...) is the C
# type's; ``family`` and ``type`` are plain ints there.
RawSocket = _socket.socket


def tune_tcp(sock: socket.socket, bufsize: int | None = SOCKBUF_CAP,
             keepalive: bool = True) -> None:
    """Per-connection options from the seed: big buffers, TCP_NODELAY, keepalive 60/10/6
    (without ``keepalive`` the caller sets those later: :class:`DeferredKeepalive`)."""
    if bufsize:
        set_buffers(sock, bufsize)
    for level, option, value in TCP_OPTIONS if keepalive else (NODELAY_OPTION,):
        sock.setsockopt(level, option, value)


def set_keepalive(sock: socket.socket) -> None:
    for level, option, value in KEEPALIVE_OPTIONS:
        sock.setsockopt(level, option, value)


class DeferredKeepalive:
    """Sets the keepalive options of the sockets still open ``delay`` to 2 ``delay`` seconds
    after :meth:`add`.

    Keepalive acts only after KEEPALIVE_IDLE (60 s) without traffic, and most short
    connections are over within milliseconds: for them the four setsockopt calls bought
    nothing (tcpfwd's plain path, bench/results/2026-12-01-short.md). Set late, they act
    as if set at once: setting TCP_KEEPIDLE arms the probe timer for what is left of the idle
    time since the last packet received (Linux's tcp_sock_set_keepidle), so the first probe
    still goes after 60 s of silence. Two generations, so that no socket is tuned younger
    than ``delay``; one timer, running only while there is something to tune.
    """

    def __init__(self, delay: float = KEEPALIVE_DEFER) -> None:
        self.delay = delay
        self.young: list[socket.socket] = []  # added since the last tick
        self.due: list[socket.socket] = []  # added in the tick before: tuned at the next
        self.timer = None

    def add(self, sock: socket.socket) -> None:
        self.young.append(sock)
        if self.timer is None:
            self.timer = get_hub().loop.timer(self.delay, self.delay)
            self.timer.start(self._tick)

    def _tick(self) -> None:
        for sock in self.due:
            if sock.fileno() != -1:  # still open (closed ones say -1; their fd is not ours)
                try:
                    set_keepalive(sock)
                except OSError:  # reset meanwhile: the relay is about to learn it
                    pass
        self.due, self.young = self.young, []
        if not self.due:
            self.close()

    def close(self) -> None:
        """Stop the timer (the service stopped; add() starts it again)."""
        if self.timer is not None:
            self.timer.stop()
            self.timer.close()
            self.timer = None


def dial_tcp(dest: Resolved, timeout: float, early: bool = False) -> socket.socket:
    """A tuned, connected, non-blocking TCP socket to ``dest``; raises OSError (TimeoutError
    included) and closes the socket on failure: :func:`start_dial`, then, if the handshake
    has not finished yet, :func:`finish_dial`. ``early``: as start_dial's (the caller
    writes at once, then calls :func:`quick_acks`)."""
    sock, connected = start_dial(dest, early=early)
    if not connected:
        finish_dial(sock, timeout)
    return sock


def start_dial(dest: Resolved, keepalive: bool = True, early: bool = False,
               send_probes: bool = False) -> tuple[socket.socket, bool]:
    """A tuned non-blocking TCP socket, its connect to ``dest`` started, and whether it is
    connected already. Never waits. Raises OSError and closes the socket on failure; socket()
    is inside the error path too: at the fd limit it fails with EMFILE, a runtime fault for
    the caller to log, not a traceback.

    Short connections feel every step here, so: a non-blocking connect, then a second one.
    On loopback and fast LANs the handshake has finished by then (the kernel processes the
    SYN-ACK before the first call returns), and the second says so (EISCONN): no watcher,
    timer or trip through the event loop. Without ``keepalive`` the keepalive options are
    left to the caller (:class:`DeferredKeepalive`).

    ``early``: the caller has bytes in hand to send the moment the connection is up
    (TCP_QUICKACK off: see DIAL_OPTIONS). ``send_probes``: no second connect either, as the
    caller's first send says whether the handshake is over (EAGAIN while it is not, the
    connect's error if it failed).
    """
    sock: socket.socket | None = None
    try:
        # Non-blocking from birth: no ioctl(FIONBIO) after socket() (and no timeout mode).
        sock = RawSocket(dest.family, STREAM_NONBLOCK)
        if not SOCK_NONBLOCK:
            sock.setblocking(False)
        setsockopt = sock.setsockopt
        for level, option, value in DIAL_OPTIONS[bool(keepalive), bool(early)]:
            setsockopt(level, option, value)
        error = sock.connect_ex(dest.sockaddr)
        if error == errno.EINPROGRESS and send_probes:
            return sock, False
        if error == errno.EINPROGRESS:
            error = sock.connect_ex(dest.sockaddr)
            if error in (errno.EALREADY, errno.EINPROGRESS):
                return sock, False
        if error and error != errno.EISCONN:
            raise OSError(error, os.strerror(error))
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    return sock, True


def quick_acks(sock: socket.socket) -> None:
    """Back to Linux's usual ACK behaviour after an ``early`` dial (call once the
    first bytes are written)."""
    if TCP_QUICKACK is not None:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)


def finish_dial(sock: socket.socket, timeout: float) -> None:
    """Wait up to ``timeout`` s for the handshake :func:`start_dial` began (writability, then
    SO_ERROR); raises OSError (TimeoutError included) and closes the socket on failure."""
    try:
        wait_write(sock.fileno(), timeout, TimeoutError("timed out"))
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
    except BaseException:
        sock.close()
        raise


def cooperative(sock: socket.socket) -> gsocket:
    """The same connection as a gevent socket, for code that wants blocking-style calls; the
    stdlib object is detached (closed without closing the connection)."""
    return gsocket(sock.family, sock.type, fileno=sock.detach())
