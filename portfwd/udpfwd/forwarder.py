"""The UDP forwarder service: one listening socket, one connected upstream socket per client.

Glossary: *client* is a peer that sends to our listening socket; *upstream* is the connected
socket we open per client towards the destination (so the destination sees one stable source
port per client); *up* is client -> destination, *down* destination -> client. A *session* is
the pair (client address, upstream socket), kept in a ``SessionTable`` (runtime/session_table.py).

Shape (why no greenlets here): every socket is a plain non-blocking stdlib socket with a
libev io watcher whose callback drains it, at most ``RECV_BUDGET`` datagrams per wake-up so
one busy socket cannot starve the others (libev is level-triggered: what is left is read on
the next loop iteration). Callbacks never block: a send that would block drops the datagram
and counts it, which is what a full UDP queue does anyway. Compared with a greenlet per
session this costs no greenlet stack per idle client and no switch per datagram.

gevent's DatagramServer is not used: it reads at most 8192 bytes (silently truncating larger
datagrams, like the C original's 1472-byte cap) and spawns a greenlet per datagram. We read
into one shared 64 KiB buffer, so datagrams up to 65,507 (IPv4) / 65,527 (IPv6) bytes pass
intact, and empty datagrams pass too.

Batching. Python has no ``recvmmsg``/``sendmmsg``, and calling libc's recvmmsg through ctypes
measured slower per datagram than a plain ``recvfrom_into`` loop (bench/bench_udp.py), so reads
stay one syscall each, drained until EAGAIN. Sends are where the kernel time goes (on loopback a
send runs the whole receive path: ~4 us of the ~7 us per datagram), and there Linux offers UDP
GSO (``UDP_SEGMENT``, 4.18+): consecutive equal-size datagrams read in one burst for the same
socket and peer are handed to the kernel as one buffer that it splits back into the same
datagrams (measured 4.1 -> 1.2 us per 1200 B datagram at 16 per send). Only datagrams of
1..``GSO_SEGMENT_MAX`` bytes are coalesced, so a segment always fits the IPv6 minimum MTU; if
the kernel refuses, GSO is switched off for the process and the run is sent one by one.
"""

from __future__ import annotations

import itertools
import logging
import socket
import struct
import time

from gevent import get_hub

from portfwd.runtime.addr import format_sockaddr
from portfwd.runtime.admission import SourceFilter
from portfwd.runtime.kerneldrops import KernelDrops
from portfwd.runtime.logs import RateLimitedLog
from portfwd.runtime.session_table import SessionTable
from portfwd.runtime.sockets import DGRAM_CAP, READ, SOFT_ERRNOS, SOL_UDP, UDP_SEGMENT, set_buffers
from portfwd.runtime.stats_lines import StatsLines
from portfwd.udpfwd.config import UdpConfig
from portfwd.udpfwd.metrics import UdpMetrics, render_status

log = logging.getLogger(__name__)

RECV_BUDGET = 64  # datagrams read per wake-up of one socket before others get their turn
SWEEP_INTERVAL_MAX = 1.0  # s between idle sweeps; shorter for short timeouts (timeout / 4)
SWEEP_LIMIT = 4096  # sessions closed per sweep tick, so a mass expiry cannot stall the loop
GSO_SEGMENT_MAX = 1200  # bytes; 1200 + 48 (IPv6+UDP headers) fits the 1280-byte IPv6 min MTU
GSO_MAX_SEGMENTS = 32  # datagrams per GSO send (kernel limit UDP_MAX_SEGMENTS is 64)


class Stats:
    """Cumulative counters of the datagram path (:meth:`UdpForwarder.metrics` copies them)."""

    __slots__ = ("datagrams_up", "bytes_up", "datagrams_down", "bytes_down", "dropped_up",
                 "dropped_down", "upstream_errors", "opened", "gso_sends")

    def __init__(self) -> None:
        self.datagrams_up = 0  # client -> destination, sent
        self.bytes_up = 0
        self.datagrams_down = 0  # destination -> client, sent
        self.bytes_down = 0
        self.dropped_up = 0  # lost because a socket queue was full or a session could not open
        self.dropped_down = 0
        self.upstream_errors = 0  # ICMP errors (refused, unreachable) reported on upstreams
        self.opened = 0  # sessions opened
        self.gso_sends = 0  # sends that carried several datagrams (UDP GSO)


class Session:
    """One client: its address, its connected upstream socket and that socket's watcher."""

    __slots__ = ("id", "client", "sock", "watcher")

    def __init__(self, session_id: int, client: tuple, sock: socket.socket, watcher) -> None:
        self.id = session_id
        self.client = client  # the client's address as recvfrom() reported it
        self.sock = sock  # non-blocking, connected to the destination
        self.watcher = watcher  # libev io watcher (READ) on sock


class UdpForwarder:
    """A bound listening socket plus the destination; :func:`portfwd.runtime.daemon.run`
    drives it."""

    def __init__(self, config: UdpConfig, listener: socket.socket) -> None:
        self.config = config
        self.listener = listener
        self.table: SessionTable[tuple, Session] = SessionTable(config.max_sessions,
                                                                config.idle_timeout)
        self.stats = Stats()
        self._buf = bytearray(DGRAM_CAP)  # shared: every datagram is sent before the next read
        self._view = memoryview(self._buf)
        # Where a run of equal-size datagrams is gathered for one GSO send.
        self._run = memoryview(bytearray(GSO_SEGMENT_MAX * GSO_MAX_SEGMENTS))
        self._gso = config.gso
        self._ids = itertools.count(1)
        self._faults = RateLimitedLog(log)
        self._kernel_drops = KernelDrops(listener)
        self._loop = None  # the hub's loop, taken in start() (after a daemon fork's reinit)
        self._listen_watcher = None
        self._sweep_timer = None
        self.stats_lines = StatsLines(log, self.metrics, render_status)
        self.sources = SourceFilter(config.access, log, "datagram")  # --allow / --deny

    @property
    def address(self) -> tuple:
        return self.listener.getsockname()

    def metrics(self) -> UdpMetrics:
        """A snapshot of the counters (no socket I/O; the kernel's drop count is read from
        /proc)."""
        s, table = self.stats, self.table
        return UdpMetrics(
            sessions=len(table), opened=s.opened, expired=table.expired, evicted=table.evicted,
            datagrams_up=s.datagrams_up, bytes_up=s.bytes_up, datagrams_down=s.datagrams_down,
            bytes_down=s.bytes_down, dropped_up=s.dropped_up, dropped_down=s.dropped_down,
            upstream_errors=s.upstream_errors, gso_sends=s.gso_sends,
            kernel_drops=self._kernel_drops.read(), denied=self.sources.denied)

    def start(self) -> None:
        self.listener.setblocking(False)
        self._loop = get_hub().loop
        self._listen_watcher = self._loop.io(self.listener.fileno(), READ)
        self._listen_watcher.start(self._relay, True)
        self._start_timers()
        log.info("forwarding %s -> %s (udp, timeout %s, max %d sessions, %s)",
                 format_sockaddr(self.address), self.config.dest,
                 f"{self.config.idle_timeout:g} s" if self.config.idle_timeout else "never",
                 self.config.max_sessions, "gso" if self._gso else "no gso")

    def _start_timers(self) -> None:
        if self.config.idle_timeout:
            interval = min(SWEEP_INTERVAL_MAX, self.config.idle_timeout / 4)
            self._sweep_timer = self._loop.timer(interval, interval)
            self._sweep_timer.start(self._sweep)
        self.stats_lines.start(self.config.stats_interval)

    def _stop_timers(self) -> None:
        if self._sweep_timer is not None:
            self._sweep_timer.stop()
            self._sweep_timer.close()
            self._sweep_timer = None
        self.stats_lines.stop()

    def reconfigure(self, config: UdpConfig) -> None:
        """New settings for the same listening socket (config reload): sessions opened from
        now on go to the new destination; the timeout and the cap apply to the whole table at
        once, since it is one LRU. Open sessions keep their upstream socket."""
        self.config = config
        self.table.capacity = config.max_sessions
        self.table.idle_timeout = config.idle_timeout
        self.sources.update(config.access)
        set_buffers(self.listener, config.sockbuf)
        self._stop_timers()
        self._start_timers()

    def stop(self, timeout: float) -> None:
        """Close everything now: UDP has nothing to drain (``timeout`` is for TCP's sake)."""
        self._stop_timers()
        if self._listen_watcher is not None:
            self._listen_watcher.stop()
            self._listen_watcher.close()
        for _, session in self.table.clear():
            self._close(session, "stopped")
        self.listener.close()
        self.stats_lines.write(force=True)
        self._kernel_drops.close()

    # -- forwarding, both ways ------------------------------------------------------------

    def _relay(self, up: bool, session: Session | None = None) -> None:
        """Drain one socket: up, the listener (``session`` None: found per datagram by client
        address); down, ``session``'s upstream socket. Both directions share this loop and
        :meth:`_send`, with ``up`` tested inline rather than through per-direction callables,
        so a datagram costs no function call beyond its recv and its send."""
        view, table, run, sources = self._view, self.table, self._run, self.sources
        if up:
            recv = self.listener.recvfrom_into
            now = time.monotonic()  # one reading per burst: a burst takes microseconds
        else:
            recv = session.sock.recv_into
        run_session: Session | None = None  # the pending GSO run: whose, what size, how many
        run_size = run_count = 0
        moved = False
        try:
            for _ in range(RECV_BUDGET):
                try:
                    if up:
                        size, client = recv(self._buf)
                    else:
                        size = recv(self._buf)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if up:  # e.g. ENOMEM; the next wake-up tries again
                        self._faults.warning("recv", "receive on listener failed: %s",
                                             exc.strerror or exc)
                        break
                    self._upstream_error(session, exc)  # reading consumes the error: no spin
                    if exc.errno not in SOFT_ERRNOS:
                        break
                    continue
                if up:
                    session = table.get(client, now)
                    if session is None:
                        if run_count:  # opening may evict (close) the run's session: flush
                            self._send(run_session, run[:run_size * run_count], run_size,
                                       run_count, up)
                            run_count = 0
                        if sources.active and not sources.permits(client):
                            continue
                        session = self._open(client, now)
                        if session is None:
                            self.stats.dropped_up += 1
                            continue
                else:
                    moved = True
                if run_count and (session is not run_session or size != run_size
                                  or run_count == GSO_MAX_SEGMENTS):
                    self._send(run_session, run[:run_size * run_count], run_size, run_count, up)
                    run_count = 0
                if self._gso and 0 < size <= GSO_SEGMENT_MAX:
                    run[size * run_count:size * (run_count + 1)] = view[:size]
                    run_session, run_size = session, size
                    run_count += 1
                else:
                    self._send(session, view[:size], size, 1, up)
        finally:
            if run_count:
                self._send(run_session, run[:run_size * run_count], run_size, run_count, up)
        if moved:  # replies keep a session alive too (server-push protocols, keepalives)
            table.touch(session.client, time.monotonic())

    def _send(self, session: Session, data: memoryview, size: int, count: int,
              up: bool) -> None:
        """Send ``count`` datagrams of ``size`` bytes (one GSO send when count > 1): up on the
        session's connected socket, down to its client from the listener."""
        stats = self.stats
        try:
            if count == 1:
                if up:
                    session.sock.send(data)
                else:
                    self.listener.sendto(data, session.client)
            else:
                segment = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
                if up:
                    session.sock.sendmsg([data], segment)
                else:
                    self.listener.sendmsg([data], segment, 0, session.client)
        except BlockingIOError:
            if up:
                stats.dropped_up += count
            else:
                stats.dropped_down += count
            return
        except OSError as exc:
            if count > 1 and exc.errno not in SOFT_ERRNOS:
                self._gso_refused(exc)
                for start in range(0, len(data), size):
                    self._send(session, data[start:start + size], size, 1, up)
                return
            if up:
                # A pending ICMP error from an earlier datagram surfaces on send: these are
                # lost, the session stays (the target may come back).
                stats.dropped_up += count
                self._upstream_error(session, exc)
            else:
                stats.dropped_down += count
                self._faults.warning("down", "session %d: send to client %s failed: %s",
                                     session.id, format_sockaddr(session.client),
                                     exc.strerror or exc)
            return
        if up:
            stats.datagrams_up += count
            stats.bytes_up += size * count
        else:
            stats.datagrams_down += count
            stats.bytes_down += size * count
        stats.gso_sends += count > 1

    def _gso_refused(self, exc: OSError) -> None:
        if self._gso:
            self._gso = False
            log.warning("UDP GSO refused (%s): sending one datagram per syscall from now on",
                        exc.strerror or exc)

    def _open(self, client: tuple, now: float) -> Session | None:
        dest = self.config.dest
        sock = None
        try:
            sock = socket.socket(dest.family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            set_buffers(sock, self.config.sockbuf)
            sock.connect(dest.sockaddr)  # UDP connect: fixes the peer, no packet sent
        except OSError as exc:  # EMFILE at the fd limit, ENETUNREACH, ...
            if sock is not None:
                sock.close()
            self._faults.warning("open", "cannot open session for %s: %s",
                                 format_sockaddr(client), exc.strerror or exc)
            return None
        watcher = self._loop.io(sock.fileno(), READ)
        session = Session(next(self._ids), client, sock, watcher)
        for old_client, old, live in self.table.add(client, session, now):
            if live:
                self._faults.warning("evict", "session table full (%d sessions): evicted the "
                                     "least recently active session, client %s",
                                     self.config.max_sessions, format_sockaddr(old_client))
            self._close(old, "evicted" if live else "expired")
        watcher.start(self._relay, False, session)
        self.stats.opened += 1
        log.debug("session %d open %s -> %s via %s", session.id, format_sockaddr(client), dest,
                  format_sockaddr(sock.getsockname()))
        return session

    def _upstream_error(self, session: Session, exc: OSError) -> None:
        self.stats.upstream_errors += 1
        self._faults.warning(f"upstream-{exc.errno}", "session %d: destination %s: %s "
                             "(datagram lost, session kept)", session.id, self.config.dest,
                             exc.strerror or exc)

    # -- housekeeping ---------------------------------------------------------------------

    def _sweep(self) -> None:
        for _, session in self.table.expire(time.monotonic(), SWEEP_LIMIT):
            self._close(session, "expired")

    def _close(self, session: Session, why: str) -> None:
        # Stop the watcher before closing: libev must never poll a closed (or reused) fd.
        session.watcher.stop()
        session.watcher.close()
        session.sock.close()
        log.debug("session %d %s (%s)", session.id, why, format_sockaddr(session.client))

