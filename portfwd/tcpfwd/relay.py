"""One relayed connection: its two directions, on hub callbacks while it is short and on
greenlets once it carries bulk data or a side stops reading.

Glossary: *client* is the accepted connection, *upstream* the one dialled to the destination;
*up* is client -> upstream, *down* upstream -> client.

Why two modes: a greenlet per direction costs, per short connection, about six switches
between greenlets and the hub, each with a watcher start and stop, which was most of tcpfwd's
Python time per connection under concurrency. Most connections (an HTTP request and its
response, a DNS-over-TCP query) are a few small reads each way and never find a socket full,
so each direction starts as a callback on its source's readable watcher, kept started: recv
what is there, send it on, return to the hub. The first time that is not enough (a send that
does not take everything, or a read that fills a whole chunk, which on the splice path means
bulk data is coming) the relay hands both remaining directions over to greenlet pumps
(:mod:`portfwd.tcpfwd.pump`), with the unsent rest first: from there on backpressure,
splice() and half-close work as they always have. The callbacks keep the pumps' rules: a
source's EOF becomes ``shutdown(SHUT_WR)`` of the other side and the other direction goes
on; a socket error ends both (shutdown of both sockets, which wakes the other direction with
EOF); sockets are closed once both directions are over.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time

import gevent

from portfwd.runtime.logs import hot_log
from portfwd.runtime.relay_timeouts import HalfCloseSweeper, IdleTimer
from portfwd.runtime.workers import Workers
from portfwd.tcpfwd.metrics import TcpCounters
from portfwd.tcpfwd.pump import COPY_CHUNK, MSG_DONTWAIT, Counter, RelaySocket, pump

MSG_PEEK = int(socket.MSG_PEEK)  # plain ints, as pump.MSG_DONTWAIT
MSG_MORE = int(getattr(socket, "MSG_MORE", 0))  # Linux: hold a partial segment for what follows

log = logging.getLogger(__name__)


def _reason(exc: OSError) -> str:
    """What a relay's error says of it: the errno's text, else the exception."""
    return exc.strerror or repr(exc)

# The "conn N open" and "conn N closed" lines. At INFO they cost a third of the forwarder's
# throughput on short connections (bench/results/2026-12-01-short.md: a write(2) and a record
# each); at INFO the periodic stats line (--stats-interval) sums them up instead.
CONN_LOG_LEVEL = logging.DEBUG


def reset_on_close(sock: socket.socket) -> None:
    """Make the next close() send RST instead of FIN (SO_LINGER on, timeout 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Relay:
    """One connection's two directions, client -> upstream and upstream -> client.

    :meth:`start` relays on callbacks (counted as a job of ``workers`` until it hands over);
    after a hand-over each direction is a job in ``workers``. Directions never wait for each
    other: whichever ends last closes both sockets and writes the closing line. When the
    drain period is over every job is cut; the last one to go resets both sockets, so
    neither peer mistakes a truncated transfer for a finished one.
    """

    __slots__ = ("conn_id", "client", "upstream", "splice", "started", "up", "down", "running",
                 "error", "killed", "counters", "idle", "sweeper", "adopted")

    def __init__(self, conn_id: int, client: RelaySocket, upstream: RelaySocket,
                 splice: bool, counters: TcpCounters, idle_timeout: float = 0.0,
                 sweeper: HalfCloseSweeper | None = None) -> None:
        self.conn_id = conn_id
        self.client, self.upstream = client, upstream
        self.splice = splice
        self.started = time.monotonic()
        self.up, self.down = Counter(), Counter()
        self.running = 2  # directions not yet over
        self.error = ""  # the first socket error is the connection's fate; later ones are echoes
        self.killed = False  # cut at the end of the drain period
        self.counters = counters  # the forwarder's: live while running, totals once closed
        self.sweeper = sweeper  # --half-close-timeout, shared by the forwarder's relays
        self.idle = IdleTimer(self, idle_timeout, self._moved) if idle_timeout else None
        self.adopted: Workers | None = None  # set while relaying on callbacks
        counters.live.add(self)

    def _moved(self) -> int:
        return self.up.moved + self.down.moved

    # --- on callbacks ---------------------------------------------------------------------

    def start(self, workers: Workers, rest: bytes = b"") -> None:
        """Relay both directions on callbacks in the hub; returns at once. ``rest``: client
        bytes read before the relay that the upstream has not taken yet (the pumps send
        them first)."""
        self.adopted = workers
        workers.adopt(self)
        if not MSG_DONTWAIT:  # no per-call non-blocking flag here: the whole sockets, then
            self.client.make_nonblocking()
            self.upstream.make_nonblocking()
        self.client.readable.start(self._readable, self.client, self.upstream, self.up)
        self.upstream.readable.start(self._readable, self.upstream, self.client, self.down)
        if rest:
            self._hand_over(self.client, rest)

    def _readable(self, src: RelaySocket, dst: RelaySocket, counter: Counter) -> None:
        """``src`` has data or EOF (a hub callback: never blocks)."""
        try:
            # MSG_DONTWAIT: the accepted socket is still in blocking mode (RelaySocket)
            data = src.sock.recv(COPY_CHUNK, MSG_DONTWAIT)
            if not data:
                self._eof(src, dst)
                return
            flags, ended, failed = MSG_DONTWAIT, False, None
            if counter is self.down and not counter.moved and len(data) < COPY_CHUNK:
                # A server's first reply often comes with its FIN (a response, then close):
                # if so, the FIN goes in the same segment as the data (MSG_MORE holds the
                # data for the shutdown or close right after), as HAProxy does when epoll
                # says RDHUP. A peek: one syscall per connection (clients rarely close
                # right after their first bytes, so their direction does not peek).
                try:
                    ended = not src.sock.recv(1, MSG_DONTWAIT | MSG_PEEK)
                except BlockingIOError:
                    pass
                except OSError as exc:  # a reset after the reply: the reply still goes on
                    failed = exc  # (the peek took the socket's error: it is reported here)
                if ended:
                    flags |= MSG_MORE
            try:
                sent = dst.sock.send(data, flags)
            except BlockingIOError:
                sent = 0
        except BlockingIOError:
            return  # woken for nothing (another reader, or a spurious wake-up)
        except OSError as exc:
            self._broken(src, _reason(exc))
            return
        counter.moved += sent
        if failed is not None:
            if sent == len(data):
                self._broken(src, _reason(failed))
                return
            self.error = self.error or _reason(failed)  # the pumps send the rest, then EOF
        if sent < len(data) or (self.splice and len(data) == COPY_CHUNK):
            self._hand_over(src, data[sent:])  # (the pumps' next send pushes held data)
        elif ended:
            self._eof(src, dst)

    def _broken(self, src: RelaySocket, reason: str) -> None:
        """A callback met a socket error: this direction is over, and so is the other."""
        src.readable.stop()
        self._end_both(reason)
        self._ended()

    def _eof(self, src: RelaySocket, dst: RelaySocket) -> None:
        """``src`` is at EOF: pass it on; the other way goes on. When the other way ended at
        EOF already, close() is about to send the FIN (dst has nothing unread): one syscall
        fewer per short connection."""
        src.readable.stop()
        try:
            if self.running > 1 or self.error:
                dst.pass_eof()
        except OSError as exc:
            self._end_both(_reason(exc))
        self._ended()

    def _hand_over(self, src: RelaySocket, rest: bytes) -> None:
        """Both directions still running go on in greenlet pumps; ``src``'s starts by sending
        ``rest``, the part of its last read its destination did not take yet."""
        workers = self.adopted
        assert workers is not None
        for side in (self.client, self.upstream):  # the pumps wait on EAGAIN
            side.make_nonblocking()
        for side, other, counter in ((self.client, self.upstream, self.up),
                                     (self.upstream, self.client, self.down)):
            if side.readable.active:
                side.readable.stop()
                workers.spawn(self._direction, side, other, counter,
                              rest if side is src else b"")
        self.adopted = None
        workers.release(self)

    def cut(self) -> None:
        """The drain period is over (Workers.kill, in the hub): close now, with RST."""
        for side in (self.client, self.upstream):
            side.readable.stop()
        self.killed = True
        self.running = 0
        self._close()

    # --- on greenlets ---------------------------------------------------------------------

    def _direction(self, src: RelaySocket, dst: RelaySocket, counter: Counter,
                   rest: bytes = b"") -> None:
        try:
            if rest:
                dst.send_all(rest)
                counter.moved += len(rest)
            pump(src, dst, self.splice, counter)
        except OSError as exc:
            self._end_both(_reason(exc))
        except gevent.GreenletExit:
            self.killed = True
            raise
        finally:
            self._ended()

    # --- either way -----------------------------------------------------------------------

    def _ended(self) -> None:
        """One direction is over."""
        self.running -= 1
        if not self.running:
            self._close()
        elif self.sweeper is not None and not self.error:
            if self.idle is not None:  # one direction is over: the idle check gives way
                self.idle.stop()
            self.sweeper.add(self)

    def expire(self, reason: str) -> None:
        """A timeout (called in the hub, must not block): shut both sockets down, which wakes
        each direction with EOF or an error; the last one to end closes the relay as usual."""
        if reason == "idle timeout":
            self.counters.idle_timeouts += 1
        else:
            self.counters.half_close_timeouts += 1
        self._end_both(reason)

    def _end_both(self, reason: str) -> None:
        """Shut both sockets down, which wakes each direction with EOF or an error; the first
        reason is the connection's fate, later ones are echoes."""
        self.error = self.error or reason
        for end in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def _close(self) -> None:
        if self.idle is not None:
            self.idle.stop()
        if self.sweeper is not None:
            self.sweeper.discard(self)
        counters = self.counters
        counters.live.discard(self)
        counters.closed += 1
        counters.bytes_up += self.up.moved
        counters.bytes_down += self.down.moved
        if self.killed:
            counters.reset += 1
            for end in (self.client, self.upstream):
                reset_on_close(end.sock)
            log.info("conn %d reset: service stopping", self.conn_id)
        else:
            counters.failed += bool(self.error)
            if log.isEnabledFor(CONN_LOG_LEVEL):  # off by default: not even the arguments
                hot_log(log, CONN_LOG_LEVEL, "conn %d closed: %d bytes up, %d down, %.1f s%s",
                        self.conn_id, self.up.moved, self.down.moved,
                        time.monotonic() - self.started, f" ({self.error})" if self.error else "")
        self.client.close()
        self.upstream.close()
        if self.adopted is not None:
            self.adopted.release(self)
            self.adopted = None
