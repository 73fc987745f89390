"""Datagrams the kernel dropped on a UDP socket before the process could read them.

A burst that overflows a socket's receive buffer is lost inside the kernel: the process never
sees it, so no counter of ours can. The kernel counts it per socket (``sk_drops``). Reading it
at snapshot time costs nothing per packet (``SO_RXQ_OVFL`` would need ``recvmsg`` with
ancillary data for every datagram). Two ways to read it:

* sock_diag (netlink, ``NETLINK_SOCK_DIAG``): an exact lookup of the socket by its bound
  address, asking for ``INET_DIAG_SKMEMINFO``, whose ``SK_MEMINFO_DROPS`` entry is the count.
  One request and one reply, whatever else is open: a few microseconds.
* ``/proc/net/udp`` and ``/proc/net/udp6``, last column, on the line of the socket's inode: the
  fallback where sock_diag is missing (no ``udp_diag`` module) or finds another socket (an
  ``SO_REUSEPORT`` group). The file lists every UDP socket of the network namespace, and the
  kernel's cost to list them grows faster than their number: 250 ms with 20,000 sockets here,
  which is why it is not the first choice for a udpfwd holding 10,000 sessions.
"""

from __future__ import annotations

import os
import socket
import struct

PROC_FILES = {socket.AF_INET: "/proc/net/udp", socket.AF_INET6: "/proc/net/udp6"}
INODE_COLUMN = 9  # 0-based: sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...

NETLINK_SOCK_DIAG = 4  # linux/netlink.h
SOCK_DIAG_BY_FAMILY = 20  # linux/sock_diag.h
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
INET_DIAG_SKMEMINFO = 7  # linux/inet_diag.h: attribute with u32[SK_MEMINFO_VARS]
SK_MEMINFO_DROPS = 8  # linux/sock_diag.h: index of sk_drops in that array
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
NLMSG_HEADER = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid: sport, dport
# (big-endian), src[16], dst[16], interface, cookie[2]
DIAG_REQUEST_HEAD = struct.Struct("=BBBxI")
DIAG_PORTS = struct.Struct(">HH")
DIAG_ADDRS_TAIL = struct.Struct("=16s16sIII")
DIAG_MSG_SIZE = 72  # inet_diag_msg: 4 bytes, sockid (48), expires, rqueue, wqueue, uid, inode
DIAG_MSG_INODE = 68  # offset of idiag_inode
RTATTR = struct.Struct("=HH")


class KernelDrops:
    """Reads the kernel's drop count of one bound UDP socket; 0 where the kernel does not
    tell. :meth:`read` never raises."""

    def __init__(self, sock: socket.socket) -> None:
        self._family = sock.family
        self._inode = os.fstat(sock.fileno()).st_ino
        self._request = _diag_request(sock)
        self._netlink: socket.socket | None = None
        if self._request is not None:
            # Opened now, not at the first read: the service's fd count is steady from start.
            try:
                self._netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM
                                              | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG)
                self._netlink.setblocking(False)
            except OSError:
                self._netlink = None
        self._use_netlink = self._netlink is not None
        self._last = 0

    @property
    def source(self) -> str:
        """Where the count comes from: "netlink" (sock_diag) or "proc" (the fallback)."""
        return "netlink" if self._use_netlink else "proc"

    def read(self) -> int:
        """The socket's drop count now (the last value read once it cannot be read)."""
        if self._use_netlink:
            drops = self._read_netlink()
            if drops is not None:
                self._last = drops
                return drops
            self.close()  # unavailable or ambiguous here: /proc from now on
        drops = _read_proc(PROC_FILES.get(self._family), self._inode)
        if drops is not None:
            self._last = drops
        return self._last

    def _read_netlink(self) -> int | None:
        assert self._request is not None and self._netlink is not None
        try:
            self._netlink.send(self._request)
            # The kernel answers a non-dump request inside send(): the reply is queued now.
            reply = self._netlink.recv(8192)
        except OSError:
            return None
        return _parse_reply(reply, self._inode)

    def close(self) -> None:
        """Release the netlink socket; later reads fall back to /proc (or the last value)."""
        self._use_netlink = False
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None


def _diag_request(sock: socket.socket) -> bytes | None:
    """The sock_diag lookup of ``sock`` by its bound address (udp_diag looks it up as the
    receiver of a datagram to ``dst``, so our local address goes in ``dst``)."""
    family = sock.family
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    host, port = sock.getsockname()[:2]
    packed = socket.inet_pton(family, host).ljust(16, b"\0")
    body = (DIAG_REQUEST_HEAD.pack(family, socket.IPPROTO_UDP, 1 << (INET_DIAG_SKMEMINFO - 1),
                                   0xFFFFFFFF)
            + DIAG_PORTS.pack(0, port)
            + DIAG_ADDRS_TAIL.pack(bytes(16), packed, 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    return NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST,
                             1, 0) + body


def _parse_reply(reply: bytes, inode: int) -> int | None:
    """SK_MEMINFO_DROPS from a sock_diag reply about the socket ``inode``; None otherwise."""
    if len(reply) < NLMSG_HEADER.size + DIAG_MSG_SIZE:
        return None
    length, mtype = NLMSG_HEADER.unpack_from(reply)[:2]
    if mtype == NLMSG_ERROR:
        return None
    msg = NLMSG_HEADER.size
    if struct.unpack_from("=I", reply, msg + DIAG_MSG_INODE)[0] != inode:
        return None  # another socket answers for this address (SO_REUSEPORT)
    at = msg + DIAG_MSG_SIZE
    end = min(length, len(reply))
    while at + RTATTR.size <= end:
        size, kind = RTATTR.unpack_from(reply, at)
        if size < RTATTR.size:
            return None
        if kind == INET_DIAG_SKMEMINFO and size >= RTATTR.size + 4 * (SK_MEMINFO_DROPS + 1):
            return struct.unpack_from("=I", reply, at + RTATTR.size + 4 * SK_MEMINFO_DROPS)[0]
        at += (size + 3) & ~3
    return None


def _read_proc(path: str | None, inode: int) -> int | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError:
        return None
    needle = f" {inode} ".encode()
    at = text.find(needle)
    while at >= 0:
        start = text.rfind(b"\n", 0, at) + 1
        end = text.find(b"\n", at)
        fields = text[start:end if end >= 0 else len(text)].split()
        if len(fields) > INODE_COLUMN and fields[INODE_COLUMN] == str(inode).encode():
            return int(fields[-1])
        at = text.find(needle, at + 1)
    return None
