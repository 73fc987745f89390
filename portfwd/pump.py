"""One direction of a TCP relay: move bytes from one socket to another until EOF.

Two ways, chosen per process (seed "Linux zero-copy acceleration (splice)"):

* splice: socket -> pipe -> socket inside the kernel, no copy through Python. The pipe is made
  only once a read shows bulk data, so idle and chatty connections hold no pipe, and it is
  enlarged to 1 MiB (F_SETPIPE_SZ) so one wake-up moves a lot.
* copy: ``recv`` into a fresh bytes object and ``sendall`` it; nothing is kept between reads,
  so an idle connection holds no 64 KiB buffer (DESIGN: 148 kB per connection otherwise).

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
from gevent.socket import socket as gsocket
from gevent.socket import wait

PIPE_SIZE = 1 << 20  # bytes; DESIGN: 1 MiB pipes reached 0.76x direct loopback
COPY_CHUNK = 1 << 16  # bytes per recv on the copy path (seed TCP_PROXY_USERBUF_CAP)
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
READ, WRITE = 1, 2  # libev event masks

SPLICE_AVAILABLE = hasattr(os, "splice")
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


def use_splice() -> bool:
    """splice unless unavailable or PORTFWD_NO_SPLICE=1 forces the copy path (tests, bench)."""
    return SPLICE_AVAILABLE and os.environ.get("PORTFWD_NO_SPLICE", "") in ("", "0")


class Counter:
    """Bytes moved so far in one direction; readable even when the pump ended in an error."""

    __slots__ = ("moved",)

    def __init__(self) -> None:
        self.moved = 0


def pump(src: gsocket, dst: gsocket, splice: bool, counter: Counter) -> None:
    """Relay src -> dst until EOF, then half-close dst. Raises OSError on a socket error."""
    if splice:
        _splice_pump(src, dst, counter)
    else:
        _copy_pump(src, dst, counter)
    try:
        dst.shutdown(socket.SHUT_WR)  # pass the EOF on; the other direction keeps flowing
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise


def _copy_pump(src: gsocket, dst: gsocket, counter: Counter, until_bulk: bool = False) -> bool:
    """recv/sendall until EOF (True), or with ``until_bulk`` until a read fills a chunk (False)."""
    recv, send = src.recv, dst.send
    while True:
        data = recv(COPY_CHUNK)
        if not data:
            return True
        # send() until done, not gevent's sendall(): that asks for SO_SNDBUF on every call.
        sent = send(data)
        while sent < len(data):
            sent += send(memoryview(data)[sent:])
        counter.moved += len(data)
        if until_bulk and len(data) == COPY_CHUNK:
            return False


def _splice_pump(src: gsocket, dst: gsocket, counter: Counter) -> None:
    """Copy while reads are small; switch to splice() once one read fills a whole chunk.

    Short and interactive flows (a 100-byte request, an ssh keystroke) then cost one recv and
    one send, not a pipe and four extra syscalls; bulk flows move in the kernel.
    """
    if _copy_pump(src, dst, counter, until_bulk=True):
        return
    loop = get_hub().loop
    src_fd, dst_fd = src.fileno(), dst.fileno()
    readable = loop.io(src_fd, READ)
    writable = loop.io(dst_fd, WRITE)
    splice = os.splice
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
                wait(readable)
                continue
            if n == 0:
                return
            counter.moved += n
            while n:
                try:
                    n -= splice(pipe_r, dst_fd, n, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    wait(writable)
    finally:
        readable.close()
        writable.close()
        os.close(pipe_r)
        os.close(pipe_w)
