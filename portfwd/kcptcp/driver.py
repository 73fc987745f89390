"""gevent drivers for tunnelled conversations: the thin layer between sockets and Conversation.

Glossary: the *tcp side* is the local TCP connection (the accepted client on kcptcp-client, the
dialled target on kcptcp-server); the *udp side* is the datagram socket towards the peer.

Per conversation there are three greenlets: the *ticker* (a pooled job, or on kcptcp-client the
greenlet that owns the connection and has nothing else to do) sleeps until the conversation's
timer (woken early through an Event when new work makes the deadline sooner), the *tcp reader*
moves TCP bytes in while the conversation has room, and the *tcp writer* moves peer bytes out as
fast as the TCP socket drains. Datagrams are fed in by whoever reads the UDP socket (one greenlet
per conversation on the client, one shared loop on the server), and every change is followed by
:meth:`ConversationDriver.transmit`, which sends every datagram the conversation has queued, then
handles its events, then re-arms the ticker (aioquic's protocol.py does the same steps with the
events first; here handling an event only sets gevent Events, so the order changes nothing the
conversation emits, and the datagrams leave before any woken greenlet runs).
"""

from __future__ import annotations

import contextlib
import logging
import operator
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
from gevent.socket import socket as gsocket

from portfwd.kcp.pacing import Allowance, RateModel, steer
from portfwd.kcptcp.alarm import Alarm
from portfwd.kcptcp.metrics import (
    TOTAL_FIELDS,
    ConversationMetrics,
    ConversationTotals,
    Snapshot,
    close_reason_label,
    render_conversation,
    render_stats,
    sum_totals,
)
from portfwd.kcptcp.udp_endpoint import UdpEndpoint
from portfwd.runtime.jobs import Jobs
from portfwd.runtime.logs import RateLimitedLog
from portfwd.tunnel import events
from portfwd.tunnel.fec import FecSettings, LossHint
from portfwd.tunnel.fec_channel import FecChannel
from portfwd.tunnel.hello import CLOSE_SERVER_FULL
from portfwd.tunnel.origin import Origin
from portfwd.tunnel.stream import CLOSE_UNKNOWN, Conversation

log = logging.getLogger(__name__)

TCP_CHUNK = 64 * 1024  # bytes per TCP read
DRAIN_TIMEOUT = 10.0  # s to write out what was received after the conversation closed
RESET_LINGER = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

_faults = RateLimitedLog(log)


def now_ms() -> int:
    """The one clock of the tunnel (style: time.monotonic everywhere)."""
    return int(time.monotonic() * 1000)


def wall_ms() -> int:
    """Unix time in ms, for HELLO timestamps only."""
    return int(time.time() * 1000)


def _first(a: int | None, b: int | None) -> int | None:
    """The earlier of two timers, either of which may be unset (None)."""
    if a is None:
        return b
    return a if b is None or a <= b else b


class ConversationDriver:
    """Runs one Conversation between a TCP socket and a UDP endpoint."""

    def __init__(self, conv: Conversation, udp: UdpEndpoint, name: str,
                 fec: FecSettings | None = None, fec_hint: LossHint | None = None,
                 pacing: bool = False) -> None:
        self.conv = conv
        self.fec = FecChannel(fec, fec_hint)  # decodes always; sends parity only with --fec
        # --pacing: the path's model and the new segments it lets out (kcp/pacing.py)
        self.rate: RateModel | None = RateModel(conv.kcp.mtu) if pacing else None
        self.allowance: Allowance | None = Allowance() if pacing else None
        self.udp = udp
        self.name = name  # for log lines: "conv=<id>"
        self.tcp: gsocket | None = None
        self.established = gevent.event.Event()
        self.finished = gevent.event.Event()
        self.close_reason = ""
        self.reset_tcp = False  # close the tcp side with RST (SO_LINGER 0), not FIN
        self._wake = Alarm()  # ticker: deadline may have moved earlier
        self._room = gevent.event.Event()  # tcp reader: conversation can take more
        self._data = gevent.event.Event()  # tcp writer: records are waiting
        self._armed: int | None = None  # deadline the ticker sleeps towards
        # The conversation's greenlets (ticker, TCP reader and writer, a client's UDP
        # receiver, kcpudp's local reader) are pooled jobs, ended together by wait_finished().
        self._jobs = Jobs()
        self._writer_done: gevent.event.Event | None = None  # set when the TCP writer ends
        self.started = time.monotonic()
        self.last_active = now_ms()  # ms: last stream bytes either way (session cap LRU)
        self.rekeys_started = 0  # events counted for the metrics snapshot
        self.epoch_switches = 0
        self.peer_address_changes = 0
        # Called once when the first direction of the TCP side ends (--half-close-timeout)
        self.half_closed: Callable[[], None] | None = None

    # --- network input ---------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any, now: int) -> None:
        """Feed one datagram; call :meth:`transmit` after a batch."""
        conv = self.conv
        session = conv.session
        before, was_established = session.datagrams_received, session.established
        conv.receive_datagram(data, addr, now)
        if conv.session.datagrams_received != before:  # authenticated: FEC may keep it
            for recovered in self.fec.authenticated(data):
                conv.receive_datagram(recovered, addr, now)
            if not was_established and self.tcp is not None and conv.established:
                self._read_ahead()

    def _read_ahead(self) -> None:
        """The client's handshake just completed: what its application sent meanwhile goes
        into the first flush, in the datagram of the ORIGIN record (one datagram less each way
        per connection: the server acknowledges both records at once). Never waits; EOF is
        left for the TCP reader, which starts now; an error ends the conversation as the
        reader's would (the kernel reports a reset once)."""
        sock, conv = self.tcp, self.conv
        if not conv.can_send():
            return
        timeout = sock.gettimeout()
        sock.settimeout(0.0)
        try:
            data = sock.recv(TCP_CHUNK)
        except BlockingIOError:
            return  # nothing there yet
        except OSError as exc:
            self.abort(f"tcp read: {exc.strerror or exc}")
            return
        finally:
            sock.settimeout(timeout)
        if data:
            conv.send_stream_data(data)
            self.last_active = now_ms()

    def transmit(self) -> None:
        """Send everything, handle events, wake whoever can move now, re-arm the ticker."""
        conv = self.conv
        now = now_ms()
        datagrams = self.fec.outgoing(conv.session, conv.datagrams_to_send(now), now)
        self._steer(now)
        if datagrams:
            self.udp.send(datagrams, conv.peer_addr)
        # WELCOMEs and path probes: each answers a datagram from its own address, which need
        # not be the path (yet).
        for data, addr in conv.probes_to_send():
            self.udp.send([data], addr)
        while (event := conv.next_event()) is not None:
            self._handle_event(event)
        if conv.readable:
            self._data.set()
        if conv.can_send():
            self._room.set()
        deadline = self._deadline()
        if deadline is not None and (self._armed is None or deadline < self._armed):
            self._wake.set()

    def _steer(self, now: int) -> None:
        """--pacing: update the path's model from what was acknowledged and set the engine's
        in-flight cap for its next flush (kcp/pacing.py)."""
        if self.rate is not None:
            steer(self.rate, self.allowance, self.conv.kcp, now)

    def _pace_timer(self) -> int | None:
        """--pacing: when the next new segment may leave, if data waits for that."""
        if self.rate is None or not self.conv.kcp.snd_queue_segments:
            return None
        return self.allowance.wake

    def _deadline(self) -> int | None:
        """The conversation's timer, the FEC channel's or the pacing's, whichever is first."""
        deadline = _first(self.conv.get_timer(), self.fec.get_timer())
        return deadline if self.rate is None else _first(deadline, self._pace_timer())

    def _handle_event(self, event: events.Event) -> None:
        if isinstance(event, events.HandshakeCompleted):
            self.established.set()
        elif isinstance(event, events.ConnectionClosed):
            self.close_reason = event.reason
            # The peer lost the conversation (or never took it: at --max-conns): what we hold
            # can never arrive, so the local application is told at once and unmistakably
            # (RST), not with a clean EOF.
            self.reset_tcp = event.reason in (CLOSE_UNKNOWN, CLOSE_SERVER_FULL)
            self._room.set()
            self._data.set()
            self._wake.set()
            self.finished.set()
        elif isinstance(event, events.PeerAddressChanged):
            self.peer_address_changes += 1
            # One line per interval for all conversations: a client behind a NAT that keeps
            # rebinding (or many such clients) must not turn into a log flood.
            _faults.log("migrate", logging.INFO, "%s peer address changed %s -> %s", self.name,
                        event.old, event.new)
        elif isinstance(event, events.FecReceived):
            now = now_ms()
            for recovered in self.fec.fec_received(event.data, now):
                self.conv.receive_datagram(recovered, self.conv.peer_addr, now)
        elif isinstance(event, events.RekeyStarted):
            self.rekeys_started += 1
        elif isinstance(event, events.EpochSwitched):
            self.epoch_switches += 1

    # --- greenlets -------------------------------------------------------------------------

    def spawn(self, job: Callable[..., object], *args: object) -> None:
        """Run ``job(*args)`` in a greenlet that ends with the conversation (wait_finished)."""
        self._jobs.spawn(job, *args)

    def start_ticker(self) -> None:
        self._jobs.spawn(self._tick)

    def tick_until_finished(self) -> None:
        """Be the conversation's ticker in the calling greenlet until the conversation closes,
        then :meth:`wait_finished`: for a caller that would only wait for the end (one pooled
        job less per connection than start_ticker + wait_finished)."""
        self._tick()
        self.wait_finished()

    def attach_tcp(self, sock: gsocket,
                   prelude: Callable[[Origin | None], bytes] | None = None) -> None:
        """Start moving bytes between ``sock`` and the conversation; ``prelude`` (server,
        --proxy-protocol) makes what is written to ``sock`` first from the client's ORIGIN."""
        self.tcp = sock
        self._writer_done = gevent.event.Event()
        self._jobs.spawn(self._tcp_writer, sock, prelude, done=self._writer_done)
        self._jobs.spawn(self._tcp_reader, sock)

    def _tick(self) -> None:
        """Run whatever timer is due, else sleep towards the first one. Each timer is read
        once per turn: what it read decides both whether to act and how long to sleep."""
        conv, fec_channel = self.conv, self.fec
        while not conv.closed:
            now = now_ms()
            fec = fec_channel.get_timer()
            if fec is not None and now >= fec:
                self.udp.send(fec_channel.handle_timer(conv.session, now), conv.peer_addr)
                fec = fec_channel.get_timer()
            deadline = conv.get_timer()
            if deadline is not None and now >= deadline:
                conv.handle_timer(now)
                self.transmit()
                continue
            pace = self._pace_timer()
            if pace is not None and now >= pace:
                self.transmit()  # --pacing lets the next new segment out
                continue
            # Nothing due (the deadline moved later: what it waited for happened; or earlier:
            # the transmit() that woke us has sent everything already): sleep towards it.
            deadline = self._armed = _first(_first(deadline, fec), pace)
            if deadline is None:
                self._wake.wait()
            else:
                delay = (deadline - now_ms()) / 1000.0
                if delay > 0:
                    self._wake.wait(delay)
            self._wake.clear()

    def _tcp_reader(self, sock: gsocket) -> None:
        conv = self.conv
        self.established.wait()
        try:
            while not conv.closed:
                if not conv.can_send():
                    self._room.clear()
                    if not conv.can_send():
                        self._room.wait()
                    continue
                data = sock.recv(TCP_CHUNK)
                if conv.closed:
                    return
                if not data:
                    conv.send_eof()
                    self.transmit()
                    self._direction_ended()
                    return
                conv.send_stream_data(data)
                self.last_active = now_ms()
                self.transmit()
        except OSError as exc:
            self.abort(f"tcp read: {exc.strerror or exc}")

    def _tcp_writer(self, sock: gsocket,
                    prelude: Callable[[Origin | None], bytes] | None = None) -> None:
        """Peer bytes to TCP. Runs on after the conversation closed until what KCP already
        received is written: the peer closes once its data is *acknowledged*, which can be
        before we handed it all to TCP."""
        conv = self.conv
        try:
            if prelude is not None:
                while not conv.poll_origin():
                    self._data.clear()
                    if not conv.readable and not conv.closed:
                        self._data.wait()
                sock.sendall(prelude(conv.origin))
            while True:
                data = conv.read()
                if data is None:
                    if conv.closed:
                        return
                    self._data.clear()
                    if not conv.readable and not conv.closed:
                        self._data.wait()
                    continue
                if not data:  # the peer's EOF: pass the half-close on
                    sock.shutdown(socket.SHUT_WR)
                    if not conv.closed:
                        self.transmit()
                        self._direction_ended()
                    return
                # One send() takes a record whole unless the socket is full; gevent's sendall()
                # costs several layers more per call, so it only finishes what send() left.
                sent = sock.send(data)
                if sent < len(data):
                    sock.sendall(memoryview(data)[sent:])
                self.last_active = now_ms()
                if conv.window_reopened and not conv.closed:
                    # The read freed a full receive window: the peer must hear it now. Any
                    # other read changes nothing a flush would send (acks go with each input).
                    self.transmit()
        except OSError as exc:
            self.abort(f"tcp write: {exc.strerror or exc}")

    # --- ending ------------------------------------------------------------------------------

    def _direction_ended(self) -> None:
        hook, self.half_closed = self.half_closed, None
        if hook is not None:
            hook()

    def expire(self, reason: str) -> None:
        """--idle-timeout or --half-close-timeout (called in the hub, which must not block):
        abort the conversation from a greenlet; the TCP side closes as after any abort."""
        gevent.spawn(self.abort, reason)

    def abort(self, reason: str) -> None:
        if not self.conv.closed:
            self.conv.abort(reason)
            self.transmit()

    def stop_jobs(self) -> None:
        """End the conversation's pooled greenlets (at most 2 s); idempotent."""
        self._jobs.stop(timeout=2)

    def wait_finished(self) -> None:
        """Block until the conversation is closed and received data is written, then release
        the TCP side and the greenlets."""
        self.finished.wait()
        if self._writer_done is not None:
            self._writer_done.wait(timeout=DRAIN_TIMEOUT)
        self.stop_jobs()
        if self.tcp is not None:
            if self.reset_tcp:
                with contextlib.suppress(OSError):  # already reset by the application
                    self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_LINGER)
            self.tcp.close()


    def counts(self) -> tuple[int, ...]:
        """What this conversation adds to the ended ones' ConversationTotals when it ends, in
        its field order: metrics() through metrics.counts_of, read without the snapshot
        (which costs several times more, once per connection). The order is by hand:
        test_a_drivers_counts_are_what_its_snapshot_adds_to_the_totals holds it to the
        snapshot's."""
        conv, kcp, session = self.conv, self.conv.kcp, self.conv.session
        return (int(self.established.is_set()), conv.bytes_sent, conv.bytes_received,
                kcp.retransmits, kcp.fast_retransmits, session.datagrams_sent,
                session.datagrams_received, session.dropped_auth, session.dropped_replay,
                session.dropped_malformed, session.dropped_stale, self.rekeys_started,
                self.epoch_switches, self.peer_address_changes)

    def metrics(self, now: float) -> ConversationMetrics:
        """This conversation's counters; ``now`` is ``time.monotonic()`` (for the age)."""
        conv, kcp, session = self.conv, self.conv.kcp, self.conv.session
        fec = self.fec.metrics()
        return ConversationMetrics(
            conv=conv.conv, up=conv.bytes_sent, down=conv.bytes_received, srtt=kcp.rx_srtt,
            rto=kcp.rx_rto, inflight=kcp.snd_buf_segments, queued=kcp.snd_queue_segments,
            peer_wnd=kcp.rmt_wnd, rcv_queue=kcp.rcv_queue_segments, retrans=kcp.retransmits,
            fast_retrans=kcp.fast_retransmits, epoch=session.epoch,
            dgrams_out=session.datagrams_sent, dgrams_in=session.datagrams_received,
            dropped_auth=session.dropped_auth, dropped_replay=session.dropped_replay,
            age=now - self.started, rekeys_started=self.rekeys_started,
            epoch_switches=self.epoch_switches, peer_address_changes=self.peer_address_changes,
            dropped_malformed=session.dropped_malformed, dropped_stale=session.dropped_stale,
            established=self.established.is_set(), fec_parity=fec.parity,
            fec_out=fec.shards_sent, fec_recovered=fec.recovered, fec_loss=fec.loss,
            fec_bytes=fec.sent_bytes,
            pace_mbit=self.rate.mbit() if self.rate else 0.0,
            inflight_cap=self.conv.kcp.inflight_cap if self.rate else None)


class ConversationService:
    """What kcptcp-client and kcptcp-server share: the table of live conversations, the
    clean-up when one ends, and the periodic stats lines."""

    # What a stats round (--stats-interval) renders: each tool's total line and conversation
    # line (kcpudp's conversations count datagrams).
    render_totals: Callable[[Any], str]
    render_conversation = staticmethod(render_conversation)

    def __init__(self, stats_interval: float) -> None:
        self.stats_interval = stats_interval
        self.drivers: dict[int, ConversationDriver] = {}  # live conversations by conv id
        self.fec_hint = LossHint()  # --fec auto: new conversations start from the last report
        self.finished = 0  # conversations ended since start
        self._ended = [0] * len(TOTAL_FIELDS)  # the ended conversations' counts, summed
        self.closed: dict[str, int] = {}  # ended conversations by close_reason_label

    def _retire(self, driver: ConversationDriver) -> None:
        """A conversation's greenlet is ending, however: make sure the peer heard it is over
        and the TCP side is released, then take it out of the table and count it."""
        if not driver.finished.is_set():  # stopped by a signal: tell the peer
            driver.abort("shutting down")
            driver.wait_finished()
        conv_id = driver.conv.conv
        if self.drivers.get(conv_id) is driver:  # an evicted one is already gone
            del self.drivers[conv_id]
        self.finished += 1
        # Once per conversation, so the exported counters never go down when one ends.
        self._ended = list(map(operator.add, self._ended, driver.counts()))
        reason = close_reason_label(driver.close_reason)
        self.closed[reason] = self.closed.get(reason, 0) + 1

    def _announce(self, local: str, remote: object, plaintext: bool) -> None:
        """The start line of both tools, e.g. ``tunnelling tcp A -> udp B (encrypted)``, after
        the warning that a tunnel without -K has no protection at all."""
        if plaintext:
            log.warning("no -K given: the tunnel is NOT encrypted or authenticated")
        log.info("tunnelling %s -> %s (%s)", local, remote, "plaintext" if plaintext else
                 "encrypted")

    def _start_stats(self) -> gevent.Greenlet | None:
        """The periodic stats lines (--stats-interval), None when they are off."""
        if self.stats_interval <= 0:
            return None
        return gevent.spawn(stats_loop, self.stats_interval, self.metrics, self.render_totals,
                            self.render_conversation)

    @property
    def ended(self) -> ConversationTotals:
        """The counters of the ended conversations, summed."""
        return ConversationTotals(*self._ended)

    def _per_conversation(self) -> tuple[ConversationMetrics, ...]:
        now = time.monotonic()
        return tuple(driver.metrics(now) for driver in self.drivers.values())

    def _totals(self, live: tuple[ConversationMetrics, ...]) -> ConversationTotals:
        return sum_totals(self.ended, live)


def stats_loop(interval: float, metrics: Callable[[], Snapshot],
               render_totals: Callable[[Snapshot], str],
               render_conv: Callable[[Any], str]) -> None:
    """Every ``interval`` seconds: a line per conversation and one total line."""
    while True:
        gevent.sleep(interval)
        for line in render_stats(metrics(), render_totals, render_conv):
            log.info("%s", line)
