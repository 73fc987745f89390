"""A TCP accept loop that survives fd exhaustion, shared by tcpfwd and kcptcp-client.

gevent's StreamServer prints a traceback for every failed accept(); at the fd limit that is a
flood. Here a shortage (EMFILE, ENFILE, ENOBUFS, ENOMEM) is logged once per interval and
accepting pauses with exponential back-off instead of spinning on a listener that stays
readable; a connection that died in the backlog (ECONNABORTED) is skipped silently.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from collections.abc import Callable

from gevent import get_hub

from portfwd.runtime.logs import RateLimitedLog
from portfwd.runtime.metrics import ErrorCounts
from portfwd.runtime.sockets import LISTEN_BACKLOG, READ, RawSocket, tune_tcp
from portfwd.runtime.workers import Workers

log = logging.getLogger(__name__)

# One connection's failure, not the listener's: skip it. accept(2) on Linux also passes on the
# new connection's pending network errors, to be treated like EAGAIN (its NOTES).
SKIP_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.ENETDOWN,
               errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.EOPNOTSUPP,
               errno.ENETUNREACH, *([errno.ENONET] if hasattr(errno, "ENONET") else [])}
BACKOFF_MIN = 0.01  # s before accepting again after a shortage
BACKOFF_MAX = 1.0  # s
# Connections accepted per wake-up at most: under load one epoll wake-up finds many in the
# backlog, and accepting them all at once saves a loop turn (epoll_wait and a callback) per
# connection; the bound lets the open ones run in between.
ACCEPT_BATCH = 64

Handler = Callable[[socket.socket, tuple], None]


class AcceptLoop:
    """Accepts on a bound listener and runs ``handler(sock, peer)`` in a greenlet per connection.

    The handler owns the accepted socket (a plain one of CPython's C socket type,
    ``sockets.RawSocket``: tcpfwd relays on those, others wrap it with
    ``portfwd.runtime.sockets.cooperative``) and must close it. Accepted sockets come with the
    seed's per-connection options (buffers, TCP_NODELAY, keepalive) already set. Handlers run in
    ``workers``, which they may share for more per-connection jobs (tcpfwd's relays);
    stop() drains and then cuts every job there. With ``inline`` the handler is called in the
    hub instead, from the accept callback (no greenlet hop per connection): it must never
    wait, and spawns into ``workers`` whatever has to.

    Accepting itself is a hub callback on the listener's readable watcher, which stays
    started: no greenlet of its own, so a wake-up costs no switch to a greenlet and back and
    no watcher start and stop (sequential connections pay that once each).
    """

    def __init__(self, listener: socket.socket, handler: Handler,
                 workers: Workers | None = None, inline: bool = False) -> None:
        listener.setblocking(False)
        self.listener = listener
        self._hub = get_hub()
        self._readable = self._hub.loop.io(listener.fileno(), READ)
        self._pause = None  # the back-off timer while a shortage pauses accepting
        self._backoff = BACKOFF_MIN
        self.handler = handler
        self.inline = inline
        self.workers = workers if workers is not None else Workers()
        self.accepted = 0
        self.errors = ErrorCounts()  # failed accept() calls, skipped ones included
        self._listener_owned = True  # False once release() handed the listener on
        self._faults = RateLimitedLog(log)
        # socket.accept() without its two enum conversions (family and type, ~1 us per
        # connection): the C accept, and the socket built as it builds it but of the C type
        # (sockets.RawSocket: no Python __init__ or close). ``_accept`` is CPython's own
        # name for it (socket.accept calls it, 3.8 through 3.13).
        self._raw_accept = listener._accept
        self._kind = (int(listener.family), int(listener.type), listener.proto)

    @property
    def address(self) -> tuple:
        return self.listener.getsockname()

    def start(self) -> None:
        # Accepted sockets inherit these options from the listener (Linux copies the socket):
        # 7 setsockopt calls once, instead of per connection on the hot accept path.
        tune_tcp(self.listener)
        self.listener.listen(LISTEN_BACKLOG)
        self._readable.start(self._accept_pending)

    def _accept_pending(self) -> None:
        """The listener is readable (a hub callback: never waits): accept until EAGAIN, at
        most ACCEPT_BATCH. The watcher is level-triggered, so with more in the backlog libev
        calls again at its next turn, after the connections just accepted have had theirs."""
        raw_accept, new_socket, handler = self._raw_accept, RawSocket, self.handler
        family, kind, proto = self._kind
        for _ in range(ACCEPT_BATCH):
            try:
                fd, peer = raw_accept()
            except BlockingIOError:
                return
            except OSError as exc:
                self.errors.add(exc)
                if exc.errno in SKIP_ERRNOS:
                    continue
                # A shortage (EMFILE, ENFILE, ENOBUFS, ENOMEM) or an error nothing foresaw:
                # pause and try again, never stop accepting for good while the service looks up.
                self._faults.warning("accept", "accept failed: %s; pausing %.2f s", exc,
                                     self._backoff)
                self._readable.stop()
                self._pause = self._hub.loop.timer(self._backoff)
                self._pause.start(self._resume)
                self._backoff = min(self._backoff * 2, BACKOFF_MAX)
                return
            self._backoff = BACKOFF_MIN
            self.accepted += 1
            sock = None
            try:
                sock = new_socket(family, kind, proto, fd)
                if self.inline:
                    handler(sock, peer)
                else:
                    self.workers.spawn(handler, sock, peer)
            except Exception:  # a bug: reported as a job's would be; accepting goes on
                if sock is None:
                    os.close(fd)
                elif not self.inline:  # not handed over: nobody owns the connection
                    sock.close()
                self._hub.handle_error(self, *sys.exc_info())

    def _resume(self) -> None:
        """The back-off after a shortage is over: accept again."""
        self._close_pause()
        self._readable.start(self._accept_pending)

    def _close_pause(self) -> None:
        if self._pause is not None:
            self._pause.stop()
            self._pause.close()
            self._pause = None

    def release(self) -> socket.socket:
        """Stop accepting and hand the listener over, still bound and listening (a config
        reload gives it to the rule's next service); stop() then only drains."""
        self._stop_accepting()
        listener, self._listener_owned = self.listener, False
        return listener

    def _stop_accepting(self) -> None:
        self._close_pause()
        self._readable.stop()
        self._readable.close()  # libev must never poll an fd after it is handed on or closed

    def stop(self, timeout: float) -> None:
        """Stop accepting now; give open connections ``timeout`` seconds, then cut them."""
        self._stop_accepting()
        if self._listener_owned:
            self.listener.close()
        if not self.workers.join(timeout):
            self.workers.kill(timeout=1)
