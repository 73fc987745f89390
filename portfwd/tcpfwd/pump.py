"""One direction of a TCP relay: move bytes from one socket to another until EOF.

Two ways, chosen per process (seed "Linux zero-copy acceleration (splice)"):

* splice: socket -> pipe -> socket inside the kernel, no copy through Python. The pipe is made
  only once a read shows bulk data, so idle and chatty connections hold no pipe, and it is
  enlarged to 1 MiB (F_SETPIPE_SZ) so one wake-up moves a lot.
* copy: ``recv`` into a fresh bytes object and send it; nothing is kept between reads, so an
  idle connection holds no 64 KiB buffer (a kept buffer costs 148 kB per connection).

Either way a slow writer blocks the reader: at most one pipe or one chunk is in flight per
direction, so the forwarder never buffers without bound. EOF is passed on with
``shutdown(SHUT_WR)`` and the other direction keeps flowing (half-close).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

from gevent import get_hub
from gevent.socket import wait

from portfwd.runtime.sockets import READ, WRITE

PIPE_SIZE = 1 << 20  # bytes; with 1 MiB pipes tcpfwd reaches 0.76x direct loopback throughput
COPY_CHUNK = 1 << 16  # bytes per recv on the copy path (seed TCP_PROXY_USERBUF_CAP)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

# Linux, BSDs: one non-blocking call. The MSG_* flags are plain ints here: ``|`` of two
# socket.MsgFlag members runs enum.Flag.__or__ in Python (0.4 us, twice per short connection).
MSG_DONTWAIT = int(getattr(socket, "MSG_DONTWAIT", 0))
MAX_SPARE_WATCHERS = 1024  # stopped readable watchers kept for the next RelaySocket
_SPARE_WATCHERS: list = []  # all of one loop: tcpfwd relays in one hub

SPLICE_AVAILABLE = hasattr(os, "splice")
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class RelaySocket:
    """One side of a relay: a stdlib socket and its libev watchers.

    gevent's socket wrapper does the same waiting with more work per call (timeouts, a
    getsockopt per sendall, a deferred close); dropping it took tcpfwd from 293 to 255 us of
    CPU per short connection. The price is one rule: close a RelaySocket only when no greenlet
    waits on it (``portfwd.tcpfwd.forwarder`` closes them once both directions are over).

    An accepted socket stays in blocking mode while the relay runs on callbacks, which pass
    MSG_DONTWAIT instead (one ioctl fewer per short connection); :meth:`make_nonblocking`
    switches it before greenlet pumps take over. Readable watchers are reused: a new one
    costs gevent an fcntl(F_GETFD) to check the fd, a spare one only a new fd.
    """

    __slots__ = ("sock", "fd", "readable", "writable")

    def __init__(self, sock: socket.socket, loop: object = None) -> None:
        """``loop``: the hub's (tcpfwd passes its own: no get_hub() call per socket)."""
        self.sock = sock
        self.fd = fd = sock.fileno()
        if loop is None:
            loop = get_hub().loop
        if _SPARE_WATCHERS and _SPARE_WATCHERS[-1].loop is loop:
            self.readable = _SPARE_WATCHERS.pop()
            self.readable.fd = fd
        else:
            self.readable = loop.io(fd, READ)
        self.writable = None  # made when a send first blocks: most connections never do

    def make_nonblocking(self) -> None:
        """For the pumps, which wait on EAGAIN (no syscall for a socket that is already:
        tcpfwd's dialled sockets are born non-blocking)."""
        if self.sock.getblocking():
            self.sock.setblocking(False)

    def wait_writable(self) -> None:
        if self.writable is None:
            self.writable = get_hub().loop.io(self.fd, WRITE)
        wait(self.writable)

    def send_all(self, data: bytes | memoryview) -> None:
        send, sent = self.sock.send, 0
        while True:
            try:
                sent += send(memoryview(data)[sent:] if sent else data, MSG_DONTWAIT)
            except BlockingIOError:
                self.wait_writable()
                continue
            if sent == len(data):
                return

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def pass_eof(self) -> None:
        """shutdown(SHUT_WR): the other side's EOF goes on here (ENOTCONN, a peer that is gone
        already, is no error); the other direction keeps flowing."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise

    def close(self) -> None:
        readable = self.readable
        readable.stop()
        if _SPARE_WATCHERS and _SPARE_WATCHERS[-1].loop is not readable.loop:
            _SPARE_WATCHERS.clear()  # a new hub (tests make several): the old loop's are void
        if len(_SPARE_WATCHERS) < MAX_SPARE_WATCHERS:
            _SPARE_WATCHERS.append(readable)
        else:
            readable.close()
        self.readable = None  # another RelaySocket's from now on: never touch it again
        if self.writable is not None:
            self.writable.close()
        self.sock.close()


class Counter:
    """Bytes moved so far in one direction; readable even when the pump ended in an error."""

    __slots__ = ("moved",)

    def __init__(self) -> None:
        self.moved = 0


def pump(src: RelaySocket, dst: RelaySocket, splice: bool, counter: Counter) -> None:
    """Relay src -> dst until EOF, then half-close dst. Raises OSError on a socket error."""
    if not _copy_pump(src, dst, counter, until_bulk=splice):
        _splice_pump(src, dst, counter)
    dst.pass_eof()


def _copy_pump(src: RelaySocket, dst: RelaySocket, counter: Counter, until_bulk: bool) -> bool:
    """recv/send until EOF (True), or with ``until_bulk`` until a read fills a chunk (False).

    The splice path starts here too: short and interactive flows (a 100-byte request, an ssh
    keystroke) then cost one recv and one send, not a pipe and four extra syscalls.
    """
    recv, send_all = src.sock.recv, dst.send_all
    while True:
        try:
            data = recv(COPY_CHUNK)
        except BlockingIOError:
            wait(src.readable)
            continue
        if not data:
            return True
        send_all(data)
        counter.moved += len(data)
        if len(data) == COPY_CHUNK:
            if until_bulk:
                return False
        else:
            # A short read emptied the socket: sleep until it is readable again rather than
            # make the recv() that would only say EAGAIN (request/response traffic saves a
            # syscall and an exception per exchange; data that came meanwhile wakes us at once).
            wait(src.readable)


def _splice_pump(src: RelaySocket, dst: RelaySocket, counter: Counter) -> None:
    """splice() src -> pipe -> dst until EOF: bulk data never passes through Python."""
    splice, src_fd, dst_fd = os.splice, src.fd, dst.fd
    pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        try:
            fcntl.fcntl(pipe_w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size or the per-user quota: default size works
        while True:
            try:
                n = splice(src_fd, pipe_w, PIPE_SIZE, flags=SPLICE_FLAGS)
            except BlockingIOError:
                wait(src.readable)
                continue
            if n == 0:
                return
            counter.moved += n
            while n:
                try:
                    n -= splice(pipe_r, dst_fd, n, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    dst.wait_writable()
    finally:
        os.close(pipe_r)
        os.close(pipe_w)
