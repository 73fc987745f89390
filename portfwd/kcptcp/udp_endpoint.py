"""The tunnel's UDP socket, driven with libev watchers: datagrams read in batches (recvmmsg on
the server's shared socket, pausing between reads under a flood of forgeries), runs of
equal-size datagrams sent as one GSO sendmsg, and sends that never raise for the network (a
lost datagram is counted, KCP repairs it)."""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

import gevent
from gevent import get_hub
from gevent.socket import wait

from portfwd.runtime.logs import RateLimitedLog
from portfwd.runtime.recvmmsg import batch_receiver
from portfwd.runtime.sockets import (
    DGRAM_CAP,
    READ,
    SOFT_ERRNOS,
    SOL_UDP,
    UDP_MAX_SEGMENTS,
    UDP_SEGMENT,
    WRITE,
)

log = logging.getLogger(__name__)

RECV_BATCH = 64  # datagrams read without yielding before one transmit per touched conversation
# Datagrams read in a row from a socket that never empties (a flood) before the hub gets a turn:
# without it the reading greenlet would never block, and tcp sides and tickers would starve.
YIELD_AFTER = 8 * RECV_BATCH
# Under a flood of forgeries that the batched reader keeps up with, a wake-up per few datagrams
# (epoll, the hub, the read call: ~10 us) cost more than the forgeries themselves. So when the
# socket is empty and forgeries were arriving at FLOOD_RATE or more, the reader sleeps
# FLOOD_PAUSE_S and takes what queued meanwhile in one call (interrupt moderation, for a flood
# only). The price: legitimate datagrams wait up to one pause while forgeries keep coming.
FLOOD_PAUSE_S = 0.001  # libev's epoll waits in whole ms: a shorter pause lasts this long anyway
FLOOD_RATE = 32  # forgeries per FLOOD_PAUSE_S (32,000/s): fewer (a trickle) never cause a pause
# bytes of receive buffer (as getsockopt reports it) the pause needs, so a pause's backlog
# (1 ms of 250,000 datagrams/s at 4 KiB each) cannot overflow it; a smaller buffer never pauses
FLOOD_PAUSE_RCVBUF = 1 << 20
GSO_BYTES = 65507  # bytes one UDP send carries at most (IPv4): a GSO run's bound too

_faults = RateLimitedLog(log)
_pause = gevent.sleep  # the flood pause (tests replace it to see each one)


def _gso_segment(size: int) -> list[tuple[int, int, bytes]]:
    """The ancillary data of a GSO sendmsg that the kernel splits into ``size``-byte datagrams."""
    return [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]


class UdpEndpoint:
    """A non-blocking UDP socket driven with libev watchers; sends never raise for the network."""

    def __init__(self, sock: socket.socket, batched: bool = False) -> None:
        """``batched``: read with recvmmsg (runtime/recvmmsg.py), for the one socket that
        every conversation's datagrams (and any flood) arrive on."""
        sock.setblocking(False)
        self.sock = sock
        loop = get_hub().loop
        self._readable = loop.io(sock.fileno(), READ)
        self._writable = loop.io(sock.fileno(), WRITE)
        self._batch = batch_receiver(sock, RECV_BATCH) if batched else None
        self._loop = loop
        self._window_start = 0.0  # when the first of the forgeries counted came (FLOOD_RATE)
        self._forgeries = 0
        self._unyielded = 0  # datagrams read since this greenlet last let the hub run
        self._drained = False  # the last unbatched read found the socket empty
        self.send_errors = 0
        self.gso_sends = 0  # sendmsg calls that carried a run of datagrams
        self.gso_max = GSO_BYTES  # the largest datagram sent in GSO runs (lowered if refused)

    def recv_batch(self, discard: Callable[[bytes], bool] | None = None,
                   ) -> list[tuple[bytes, Any]]:
        """Block for one datagram, then take up to RECV_BATCH already queued ones. Those
        ``discard`` is true of are dropped before their source address is decoded. A socket
        that never empties still lets the hub run every YIELD_AFTER datagrams."""
        if self._batch is not None:
            return self._recv_batched(discard)
        recvfrom = self.sock.recvfrom
        batch: list[tuple[bytes, Any]] = []
        unyielded = self._unyielded
        if self._drained:  # the last batch ended on an empty socket: no call to learn it again
            self._drained = False
            unyielded = 0
            wait(self._readable)
        while True:
            if unyielded >= YIELD_AFTER:
                unyielded = 0
                gevent.sleep(0)
            try:
                datagram = recvfrom(DGRAM_CAP)
            except BlockingIOError:
                if batch:
                    self._drained = True
                    break
                unyielded = 0
                wait(self._readable)
                continue
            except OSError as exc:  # ICMP errors surface on connected sockets: not fatal
                _faults.log("udp-recv", logging.DEBUG, "udp receive: %s", exc)
                if batch:
                    break
                continue
            unyielded += 1
            if discard is None or not discard(datagram[0]):
                batch.append(datagram)
                if len(batch) >= RECV_BATCH:
                    break
        self._unyielded = unyielded
        return batch

    def _recv_batched(self, discard: Callable[[bytes], bool] | None) -> list[tuple[bytes, Any]]:
        reader = self._batch
        while True:
            if reader.drained:  # the last read emptied the socket: no call to learn it again
                self._unyielded = 0
                if self._forgeries and self._flood_pause_due():
                    _pause(FLOOD_PAUSE_S)
                    reader.drained = False
                else:
                    wait(self._readable)
            elif self._unyielded >= YIELD_AFTER:
                self._unyielded = 0
                gevent.sleep(0)
            try:
                batch = reader.receive(discard)
            except OSError as exc:
                _faults.log("udp-recv", logging.DEBUG, "udp receive: %s", exc)
                continue
            self._unyielded += RECV_BATCH  # at most; a short read waits (and resets) next time
            if reader.discarded:
                if not self._forgeries:  # the first since the count began anew
                    self._window_start = self._loop.now()
                self._forgeries += reader.discarded
            if batch:
                return batch

    def _flood_pause_due(self) -> bool:
        """At an emptied socket: did forgeries arrive at FLOOD_RATE or more since the first
        one counted? The count begins anew after a pause and once a pause's length has
        passed."""
        now = self._loop.now()
        elapsed = now - self._window_start
        # The buffer is asked only when a pause would come (a reload may have resized it).
        due = self._forgeries >= FLOOD_RATE * max(elapsed / FLOOD_PAUSE_S, 1.0) and \
            self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= FLOOD_PAUSE_RCVBUF
        if due or elapsed >= FLOOD_PAUSE_S:
            self._window_start, self._forgeries = now, 0
        return due

    def send(self, datagrams: list[bytes], addr: Any) -> None:
        """Send ``datagrams`` to ``addr`` in order. A run of equal-size ones goes out in one
        GSO sendmsg (the kernel splits it back into the same datagrams): what a KCP flush or a
        burst of kcpudp datagrams makes, at a fraction of a syscall each."""
        if len(datagrams) < 2 or not self.gso_max:
            for datagram in datagrams:
                self._send(datagram, addr)
            return
        start, end = 0, len(datagrams)
        while start < end:
            stop = self._run_end(datagrams, start)
            if stop - start > 1:
                self._send_run(datagrams[start:stop], len(datagrams[start]), addr)
            else:
                self._send(datagrams[start], addr)
            start = stop

    def offer(self, datagrams: list[bytes], addr: Any = None) -> int:
        """Send without waiting (a local side that must not stall the tunnel): how many of
        ``datagrams`` the kernel took, in order, equal-size runs in one GSO send each. A full
        buffer (EAGAIN) ends the offer; an error loses the one datagram it came with, as a
        plain send would. ``addr`` None: the socket's connected peer."""
        sock, taken, index, end = self.sock, 0, 0, len(datagrams)
        singles_to = 0  # datagrams before this index go one by one (their run was refused)
        while index < end:
            size = len(datagrams[index])
            stop = self._run_end(datagrams, index) if index >= singles_to else index + 1
            try:
                if stop - index > 1:
                    segment = _gso_segment(size)
                    data = [b"".join(datagrams[index:stop])]
                    if addr is None:
                        sock.sendmsg(data, segment)
                    else:
                        sock.sendmsg(data, segment, 0, addr)
                    self.gso_sends += 1
                elif addr is None:
                    sock.send(datagrams[index])
                else:
                    sock.sendto(datagrams[index], addr)
                taken += stop - index
            except BlockingIOError:
                return taken
            except OSError as exc:
                if stop - index > 1:  # the run again, one by one (never twice as a run)
                    if exc.errno not in SOFT_ERRNOS and exc.errno != errno.EPERM:
                        self.gso_max = size - 1  # refused at this size: not again
                    singles_to = stop
                    continue
            index = stop
        return taken

    def _run_end(self, datagrams: list[bytes], start: int) -> int:
        """Where the run of equal-size datagrams from ``start`` that one GSO send may carry
        ends (``start + 1``: a datagram on its own, of no size or above gso_max)."""
        size = len(datagrams[start])
        stop = start + 1
        if 0 < size <= self.gso_max:
            limit = min(len(datagrams), start + UDP_MAX_SEGMENTS, start + GSO_BYTES // size)
            while stop < limit and len(datagrams[stop]) == size:
                stop += 1
        return stop

    def _send(self, datagram: bytes, addr: Any) -> None:
        while True:
            try:
                self.sock.sendto(datagram, addr)
                return
            except BlockingIOError:
                wait(self._writable)
            except OSError as exc:  # the network lost it; KCP retransmits
                self._lost(1, exc, addr)
                return

    def _send_run(self, run: list[bytes], size: int, addr: Any) -> None:
        segment = _gso_segment(size)
        data = b"".join(run)
        while True:
            try:
                self.sock.sendmsg([data], segment, 0, addr)
                self.gso_sends += 1
                return
            except BlockingIOError:
                wait(self._writable)
            except OSError as exc:
                if exc.errno in SOFT_ERRNOS or exc.errno == errno.EPERM:
                    # An error the network reported for an earlier datagram (ICMP), returned
                    # instead of sending: counted once, as a plain send would; the run goes on.
                    self._lost(1, exc, addr)
                else:
                    # Refused for this size (a path MTU below it, no GSO at all): never again
                    # at this size or above.
                    self.gso_max = size - 1
                    _faults.log("udp-gso", logging.DEBUG, "UDP GSO refused for %d-byte "
                                "datagrams (%s): sending those one per syscall", size,
                                exc.strerror or exc)
                for datagram in run:
                    self._send(datagram, addr)
                return

    def _lost(self, count: int, exc: OSError, addr: Any) -> None:
        self.send_errors += count
        if exc.errno not in (errno.ECONNREFUSED, errno.EPERM):
            _faults.warning("udp-send", "udp send to %s failed: %s", addr, exc)

    def close(self) -> None:
        self._readable.close()
        self._writable.close()
        self.sock.close()
