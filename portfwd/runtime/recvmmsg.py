"""Many datagrams per system call: recvmmsg(2) through ctypes, into buffers allocated once.

Python's socket module has no recvmmsg. A ``recvfrom`` costs about 1.1 us per datagram here, of
which the kernel's part is 0.8 and the rest is the method call, a fresh 64 KiB bytes object
shrunk to size and the source address turned into a tuple. One recvmmsg for up to ``count``
queued datagrams costs the kernel's part and a fraction of the rest, and a caller that can tell
a datagram is worthless from its bytes alone (a forged HELLO under a flood: kcptcp-server) drops
it before its address is decoded at all. Addresses that are decoded come from a small cache
keyed by the raw sockaddr: a real peer sends many datagrams from one address.

Linux only (glibc and musl both export recvmmsg); :func:`batch_receiver` returns None where
the call is missing, and the caller reads one datagram per ``recvfrom`` as before.
"""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
import socket
import sys
from collections.abc import Callable
from typing import Any

from portfwd.runtime.sockets import DGRAM_CAP

SOCKADDR_SIZE = 28  # bytes: sockaddr_in6, the larger of the two families a UDP socket has
SLOT_SIZE = DGRAM_CAP  # bytes per datagram: any UDP payload fits
ADDRESS_CACHE_SIZE = 1024  # decoded source addresses kept (cleared when full)
_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK)


class Iovec(ctypes.Structure):  # struct iovec; Msghdr, Mmsghdr: sendmmsg's too (bench/)
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                ("iov", ctypes.c_void_p), ("iovlen", ctypes.c_size_t),
                ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]


_STRIDE = ctypes.sizeof(Mmsghdr) // 4  # the array as 32-bit words: one message's
_NAMELEN = Msghdr.namelen.offset // 4  # word of msg_namelen within a message
_LEN = Mmsghdr.len.offset // 4  # word of msg_len (the datagram's size) within a message


def _load() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):  # the structures above are Linux's layout
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).recvmmsg
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    call.restype = ctypes.c_int
    return call


_recvmmsg = _load()


class BatchReceiver:
    """Reads up to ``count`` queued datagrams of one non-blocking UDP socket per call."""

    def __init__(self, sock: socket.socket, count: int) -> None:
        assert _recvmmsg is not None
        self._fd = sock.fileno()
        self._sock = sock  # the descriptor stays ours while we read it
        self._count = count
        # Anonymous mappings: only the pages datagrams land in are ever backed by memory.
        self._data = mmap.mmap(-1, count * SLOT_SIZE)
        self._names = mmap.mmap(-1, count * SOCKADDR_SIZE)
        self._iovs = (Iovec * count)()
        self._msgs = (Mmsghdr * count)()
        data = ctypes.addressof(ctypes.c_char.from_buffer(self._data))
        names = ctypes.addressof(ctypes.c_char.from_buffer(self._names))
        for i in range(count):
            self._iovs[i].base, self._iovs[i].len = data + i * SLOT_SIZE, SLOT_SIZE
            hdr = self._msgs[i].hdr
            hdr.name, hdr.namelen = names + i * SOCKADDR_SIZE, SOCKADDR_SIZE
            hdr.iov, hdr.iovlen = ctypes.addressof(self._iovs[i]), 1
        self._words = memoryview(self._msgs).cast("B").cast("I")
        self._name_sizes = memoryview(array.array("I", [SOCKADDR_SIZE] * count))
        self._at = ctypes.addressof(self._msgs)
        self._used = count  # messages whose msg_namelen the kernel may have changed
        # The last call took what was queued (fewer than ``count``): the caller waits for the
        # socket to be readable rather than spend a system call to learn it is empty.
        self.drained = False
        self.discarded = 0  # datagrams the last call left out (``discard`` was true of them)
        self._addresses: dict[bytes, Any] = {}

    def receive(self, discard: Callable[[bytes], bool] | None = None,
                ) -> list[tuple[bytes, Any]] | None:
        """``(datagram, source address)`` pairs of what is queued, in order (as ``recvfrom``
        returns them), at most ``count``; None if nothing is. Datagrams ``discard`` is true of
        are left out before their address is decoded (so the list may be empty). Raises
        OSError for an error the socket reports (an ICMP error on a connected socket)."""
        words, stride, used = self._words, _STRIDE, self._used
        # The kernel wrote each name's actual size back: one strided store resets them all.
        words[_NAMELEN:used * stride:stride] = self._name_sizes[:used]
        got = _recvmmsg(self._fd, self._at, self._count, socket.MSG_DONTWAIT, None)
        if got < 0:
            self._used = 0
            self.drained = True
            self.discarded = 0
            code = ctypes.get_errno()
            if code in _WOULD_BLOCK:
                return None
            raise OSError(code, errno.errorcode.get(code, str(code)))
        self._used = got
        self.drained = got < self._count  # the kernel found no more: wait before the next call
        # Slices of the mmap itself: one bytes object each, no memoryview in between.
        data_map, names, addresses, out = self._data, self._names, self._addresses, []
        start = 0
        for i, size in enumerate(words[_LEN:got * stride:stride].tolist()):
            data = data_map[start:start + size]
            start += SLOT_SIZE
            if discard is not None and discard(data):
                continue
            at = i * SOCKADDR_SIZE
            raw = names[at:at + words[i * stride + _NAMELEN]]
            addr = addresses.get(raw)
            if addr is None:
                if len(addresses) >= ADDRESS_CACHE_SIZE:
                    addresses.clear()
                addr = addresses[raw] = decode_sockaddr(raw)
            out.append((data, addr))
        self.discarded = got - len(out)
        return out


def decode_sockaddr(raw: bytes) -> Any:
    """A sockaddr_in / sockaddr_in6 as the address tuple ``recvfrom`` returns for it."""
    family = int.from_bytes(raw[:2], sys.byteorder)  # sa_family_t: host order
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    flowinfo, scope_id = int.from_bytes(raw[4:8], "big"), int.from_bytes(raw[24:28], sys.byteorder)
    host = socket.inet_ntop(socket.AF_INET6, raw[8:24])
    if scope_id:  # the "%zone" suffix recvfrom gives a scoped (link-local) source
        host = socket.getnameinfo((host, port, flowinfo, scope_id),
                                  socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)[0]
    return host, port, flowinfo, scope_id


def batch_receiver(sock: socket.socket, count: int) -> BatchReceiver | None:
    """A BatchReceiver for ``sock``, or None where recvmmsg is not available."""
    return BatchReceiver(sock, count) if _recvmmsg is not None else None
