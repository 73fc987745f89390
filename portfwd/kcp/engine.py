"""KCP: a sans-IO ARQ engine, segment-for-segment wire compatible with skywind3000's ikcp.

The engine never reads a clock and never touches a socket: time comes in as ``now_ms`` and
datagrams go out through :meth:`Kcp.datagrams_to_send`.  Behaviour follows ``ikcp.c``
(function names are cited as ``ikcp_*`` so the two can be read side by side).

Glossary (ikcp's words, kept so the code can be held against it):
  segment   one 24-byte header plus payload; several segments are packed into one datagram.
  sn        segment sequence number (u32, wraps); ``una`` = first sn the sender still
            waits for (everything before it is acknowledged cumulatively).
  frg       fragment countdown inside a message: the last fragment of a message has frg 0.
  snd_queue data accepted by :meth:`Kcp.send` but not yet given an sn (outside the window).
  snd_buf   segments in flight (sn assigned, not yet acknowledged).
  rcv_buf   received segments that arrived out of order (waiting for a gap to fill).
  rcv_queue in-order segments ready for :meth:`Kcp.recv`.
  rto       retransmission timeout; ``resendts`` is when a segment is retransmitted.
  mtu/mss   bytes per datagram incl. headers / payload bytes per segment (mtu - 24).

Arithmetic: sequence numbers are kept as u32 and compared by ``(a - b) & U32_MASK``.  The
caller's clock may be any int (monotonic ms or a wrapping u32 counter): it is folded into an
internal unbounded clock by signed 32-bit deltas, as ikcp's ``_itimediff`` does.

On the wire this engine is ikcp: fed the same inputs at the same times it emits
byte-identical datagrams (tests/test_kcp_interop.py checks this against the C code).
Deliberate differences, none visible to a correct peer:
  - a malformed datagram is dropped whole and counted (ikcp applies the segments before the
    bad one); a una beyond snd_nxt is ignored (ikcp would empty snd_buf);
  - check() sleeps up to IDLE_CHECK_MS when nothing is pending instead of every interval;
  - stream-mode recv() returns every queued byte at once, and stream-mode send() has no
    127-segment limit (frg is always 0 there);
  - bad configuration raises ValueError instead of being clamped (rcv_wnd below 128 is
    still raised to 128, as ikcp_wndsize does: a message may have 127 fragments);
  - a PUSH longer than our mss, or with frg above ``max_frg``, is dropped unacknowledged
    (ikcp takes any length): a peer must not use a larger MTU than ours;
  - with ``max_rcv_bytes`` or a :class:`ReassemblyBudget`, a PUSH that would exceed them is
    dropped unacknowledged, so the peer retransmits it later (see "Receive memory" below).

Receive memory: rcv_queue holds at most rcv_wnd segments and rcv_buf only sns inside
[rcv_nxt, rcv_nxt + rcv_wnd), each at most mss bytes, so without limits a peer can make us hold
2 * rcv_wnd * mss bytes (rcv_queue full because the application is not reading, rcv_buf full
too).  ``max_rcv_bytes`` caps rcv_buf + rcv_queue; a shared :class:`ReassemblyBudget` caps the
total over many engines (and shrinks the advertised window as it runs out).  Past either, an
engine still keeps one whole message's worth (``(max_frg + 1) * mss``) out of order and in
order, so a limit can slow a conversation but never deadlock it.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from itertools import islice

from .budget import ReassemblyBudget
from .wire import (
    HEADER,
    OVERHEAD,
    Cmd,
    MalformedSegment,
    unpack_headers,
)

# --- protocol constants (ikcp.c, top of file) ---------------------------------------------
RTO_NODELAY_MIN_MS = 30  # ms: minimum RTO in nodelay mode (IKCP_RTO_NDL)
RTO_MIN_MS = 100  # ms: minimum RTO otherwise (IKCP_RTO_MIN)
RTO_DEFAULT_MS = 200  # ms: RTO before the first RTT sample (IKCP_RTO_DEF)
RTO_MAX_MS = 60000  # ms: RTO ceiling (IKCP_RTO_MAX)
WND_RCV_MIN = 128  # segments: receive-window floor = max fragments per message (IKCP_WND_RCV)
WND_MAX = 0xFFFF  # segments: the header's wnd field is a u16
MTU_MIN = 50  # bytes: smallest MTU ikcp_setmtu accepts
INTERVAL_MIN_MS = 10  # ms: ikcp_interval clamps to [10, 5000]
INTERVAL_MAX_MS = 5000  # ms
DEAD_LINK_XMIT = 20  # transmissions of one segment before the link counts as dead (IKCP_DEADLINK)
THRESH_INIT = 2  # segments: initial slow-start threshold (IKCP_THRESH_INIT)
THRESH_MIN = 2  # segments: slow-start threshold floor (IKCP_THRESH_MIN)
PROBE_INIT_MS = 7000  # ms: first window probe after the peer advertised 0 (IKCP_PROBE_INIT)
PROBE_LIMIT_MS = 120000  # ms: window probe back-off ceiling (IKCP_PROBE_LIMIT)
FASTACK_LIMIT = 5  # transmissions: fast retransmit only while xmit <= this (IKCP_FASTACK_LIMIT)
CLOCK_RESYNC_MS = 10000  # ms: a flush schedule this far off is reset (ikcp_update "slap")
IDLE_CHECK_MS = 1000  # ms: check() deadline when nothing at all is pending (ours, see check())

ASK_SEND = 1  # probe flag: send WASK (IKCP_ASK_SEND)
ASK_TELL = 2  # probe flag: send WINS (IKCP_ASK_TELL)

# Modulus of ikcp's wrapping u32 sn/ts arithmetic ((a - b) & U32_MASK, U32_HALF for signed
# differences). Same number as portfwd.tunnel.wire.UINT32_MAX, a different role (that one is a
# limit the tunnel must never reach): kcp/ imports nothing of tunnel/, so it keeps its own.
U32_MASK = 0xFFFFFFFF
U32_HALF = 0x80000000

_HEADER_PACK = HEADER.pack
_HEADER_UNPACK_FROM = HEADER.unpack_from
_HEADER_ITER_UNPACK = HEADER.iter_unpack

_PUSH = int(Cmd.PUSH)
_ACK = int(Cmd.ACK)
_WASK = int(Cmd.WASK)
_WINS = int(Cmd.WINS)
_CMDS = frozenset((_PUSH, _ACK, _WASK, _WINS))
_ACK_BYTE = bytes([_ACK])


FRG_MAX = 0xFF  # the header's frg field is a u8

# --- configuration -------------------------------------------------------------------------
@dataclass(frozen=True)
class KcpConfig:
    """Tuning of one KCP engine (ikcp_setmtu / ikcp_wndsize / ikcp_nodelay)."""

    mtu: int = 1400  # bytes per datagram, including the 24-byte header of each segment
    snd_wnd: int = 1024  # segments: send window (segments in flight)
    rcv_wnd: int = 1024  # segments: receive window; raised to 128 if lower (ikcp_wndsize)
    nodelay: bool = True  # ikcp nodelay=1: minimum RTO 30 ms, RTO backs off by 1.5x not 2x
    interval: int = 10  # ms between flushes, 10..5000
    resend: int = 2  # fast-retransmit after this many skipping acks (0 = off)
    nc: bool = True  # True = no congestion control (ikcp nc=1): window = min(snd, peer)
    stream: bool = False  # stream mode (ikcp stream=1): no message boundaries, frg always 0
    minrto: int | None = None  # ms: minimum RTO; None = 30 with nodelay else 100
    dead_link: int = DEAD_LINK_XMIT  # transmissions of one segment before `dead` turns True
    fastlimit: int = FASTACK_LIMIT  # fast retransmits only while xmit <= this (<= 0: always)
    # ikcp's IKCP_FASTACK_CONSERVE (kcp-go always): an ack counts as a skip for a segment only
    # if the acked segment left after that segment's last transmission. Without it a lost
    # segment is fast-retransmitted again every `resend` acks for a whole RTT (up to
    # fastlimit copies), by acks for segments that left before the first retransmission.
    fastack_conserve: bool = False
    isn: int = 0  # initial sequence number (u32); ikcp always uses 0, both sides must agree
    probe_init: int = PROBE_INIT_MS  # ms: first window probe after the peer advertised 0
    probe_limit: int = PROBE_LIMIT_MS  # ms: window probe back-off ceiling
    # fragments: a PUSH with a larger frg is dropped (a message has at most max_frg + 1
    # fragments); 255 = no limit, as ikcp. A sender of ours never exceeds 127.
    max_frg: int = FRG_MAX
    # bytes: rcv_buf + rcv_queue beyond which out-of-order PUSHes are dropped unacknowledged;
    # None = bounded only by the windows (2 * rcv_wnd * mss)
    max_rcv_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.mtu < MTU_MIN:
            raise ValueError(f"mtu {self.mtu} is below {MTU_MIN} bytes")
        if self.snd_wnd < 1 or self.rcv_wnd < 1:
            raise ValueError("windows must be at least one segment")
        if self.rcv_wnd > WND_MAX:
            raise ValueError(f"rcv_wnd above {WND_MAX} segments cannot be advertised")
        if not INTERVAL_MIN_MS <= self.interval <= INTERVAL_MAX_MS:
            raise ValueError(f"interval must be {INTERVAL_MIN_MS}..{INTERVAL_MAX_MS} ms")
        if self.resend < 0:
            raise ValueError("resend must be >= 0")
        if self.minrto is not None and not 1 <= self.minrto <= RTO_MAX_MS:
            raise ValueError(f"minrto must be 1..{RTO_MAX_MS} ms")
        if self.dead_link < 1:
            raise ValueError("dead_link must be >= 1")
        if not 1 <= self.probe_init <= self.probe_limit:
            raise ValueError("need 1 <= probe_init <= probe_limit (ms)")
        if not 0 <= self.isn <= U32_MASK:
            raise ValueError("isn must be a u32")
        if not 0 <= self.max_frg <= FRG_MAX:
            raise ValueError(f"max_frg must be 0..{FRG_MAX}")
        if self.max_rcv_bytes is not None and self.max_rcv_bytes < 0:
            raise ValueError("max_rcv_bytes must be >= 0")



# A segment in snd_buf (ikcp's IKCPSEG minus the fields rebuilt at each transmission) is a
# list, not an object: building one is ~4x cheaper and this is the per-segment hot path.
#   [sn, frg, data, resendts (internal ms), rto (ms), fastack (skips seen), xmit (sends so far),
#    acked (acknowledged out of order; removed once it reaches the front of snd_buf),
#    sent (internal ms of its last transmission: fastack_conserve)]
_SN, _FRG, _DATA, _RESENDTS, _RTO, _FASTACK, _XMIT, _ACKED, _SENT = range(9)


# --- engine --------------------------------------------------------------------------------
class Kcp:
    """One KCP conversation (ikcpcb).

    Driving it: call :meth:`update` at (or after) the absolute time :meth:`check` returns;
    after every :meth:`input`, :meth:`send` or :meth:`recv` re-read :meth:`check` (it may be
    earlier now) and send whatever :meth:`datagrams_to_send` returns.

    Memory is bounded by the windows except for snd_queue, which holds whatever send() was
    given: the TCP reader should pause while ``waitsnd`` is at or above a limit of its
    choice (e.g. 2 * snd_wnd).  The receive side is bounded by rcv_wnd: when the TCP writer
    is slow, stop calling recv(); rcv_queue fills, the advertised window drops to 0 and the
    peer stops sending (then probes).  ``rcv_queue_bytes`` tells how much is waiting.
    """

    def __init__(self, conv: int, config: KcpConfig | None = None,
                 budget: ReassemblyBudget | None = None) -> None:
        cfg = config if config is not None else KcpConfig()
        if not 0 <= conv <= U32_MASK:
            raise ValueError(f"conv {conv} is not a u32")
        self.conv: int = conv
        self._conv_bytes: bytes = conv.to_bytes(4, "little")
        self.config: KcpConfig = cfg
        self.mtu: int = cfg.mtu
        self.mss: int = cfg.mtu - OVERHEAD
        self.snd_wnd: int = cfg.snd_wnd
        self.rcv_wnd: int = max(cfg.rcv_wnd, WND_RCV_MIN)
        self.rmt_wnd: int = WND_RCV_MIN  # peer's advertised window until it tells us
        self.interval: int = cfg.interval
        self.nodelay: int = int(cfg.nodelay)
        self.fastresend: int = cfg.resend
        self.fastlimit: int = cfg.fastlimit
        self.fastack_conserve: bool = cfg.fastack_conserve
        self.probe_init: int = cfg.probe_init
        self.probe_limit: int = cfg.probe_limit
        self.nocwnd: bool = cfg.nc
        self.stream: bool = cfg.stream
        self.dead_link: int = cfg.dead_link
        minrto = cfg.minrto
        if minrto is None:
            minrto = RTO_NODELAY_MIN_MS if cfg.nodelay else RTO_MIN_MS
        self.rx_minrto: int = minrto
        self.config_minrto: int = minrto  # rx_minrto as configured (a rate model may raise it)
        self.max_frg: int = cfg.max_frg
        self.max_rcv_bytes: int = (
            cfg.max_rcv_bytes if cfg.max_rcv_bytes is not None else 2 * self.rcv_wnd * self.mss
        )
        self.budget: ReassemblyBudget | None = budget
        # bytes: one whole message, kept past max_rcv_bytes and the budget (see _admit)
        self._rcv_floor: int = (cfg.max_frg + 1) * self.mss

        # sequence state (u32)
        self.snd_una: int = cfg.isn
        self.snd_nxt: int = cfg.isn
        self.rcv_nxt: int = cfg.isn
        # RTT estimator (ms), ikcp_update_ack
        self.rx_srtt: int = 0
        self.rx_rttval: int = 0
        self.rx_rto: int = RTO_DEFAULT_MS
        # congestion control (segments / bytes), used when nc is False
        self.cwnd: int = 0
        self.ssthresh: int = THRESH_INIT
        self.incr: int = 0
        # window probing
        self.probe: int = 0
        self.ts_probe: int = 0
        self.probe_wait: int = 0
        # clock: internal unbounded ms, plus the caller's last value to fold deltas from
        self.current: int = 0
        self._last_now: int | None = None
        self.updated: bool = False
        self.ts_flush: int = 0

        self.snd_queue: deque[tuple[int, bytes]] = deque()  # (frg, data)
        # snd_buf holds every sn in [snd_una, snd_nxt), so sn == snd_una + index; segments
        # acknowledged out of order stay (acked=True) until they reach the front.
        self.snd_buf: deque[list] = deque()  # segments, see _SN..
        self._nsnd_buf: int = 0  # unacknowledged segments in snd_buf
        # at most this many unacknowledged segments in flight (None: the windows alone), set
        # from outside each flush by --pacing's model (kcp/pacing.py); retransmissions ignore it
        self.inflight_cap: int | None = None
        self.rcv_buf: dict[int, tuple[int, bytes]] = {}  # sn -> (frg, data), out of order
        self.rcv_queue: deque[tuple[int, bytes]] = deque()  # (frg, data), in order
        self._rcv_queue_bytes: int = 0
        self._rcv_buf_bytes: int = 0
        self.acklist: list[tuple[int, int]] = []  # (sn, ts) to acknowledge at next flush
        # lower bound of every resendts in snd_buf (internal ms): lets flush and check skip
        # walking snd_buf when no timer can have fired
        self._resend_min: int | None = None
        self._fast_pending: bool = False  # some segment reached the fast-retransmit count
        self._out: list[bytes] = []
        self.dead: bool = False  # a segment was sent dead_link times (ikcp state = -1)

        # counters
        self.dropped_malformed: int = 0
        self.dropped_conv: int = 0
        self.dropped_oversize: int = 0  # PUSHes longer than mss or with frg above max_frg
        self.dropped_reassembly: int = 0  # PUSHes refused by max_rcv_bytes or the budget
        self.retransmits: int = 0  # timeout retransmissions (ikcp xmit)
        self.fast_retransmits: int = 0
        self.segments_sent: int = 0  # PUSH segments put on the wire, retransmissions included
        self.segments_received: int = 0  # PUSH segments taken in, duplicates included

    # --- sizes the driver needs for backpressure -------------------------------------------
    # One read-only property per size, alike by design: ikcp keeps these as struct fields.
    @property
    def waitsnd(self) -> int:
        """Segments not yet acknowledged: snd_queue + snd_buf (ikcp_waitsnd)."""
        return len(self.snd_queue) + self._nsnd_buf

    @property
    def snd_queue_segments(self) -> int:
        """Segments accepted by send() that have no sn yet (waiting for the window)."""
        return len(self.snd_queue)

    @property
    def snd_buf_segments(self) -> int:
        """Segments in flight, unacknowledged."""
        return self._nsnd_buf

    @property
    def rcv_queue_segments(self) -> int:
        """In-order segments waiting for recv(); at rcv_wnd the advertised window is 0."""
        return len(self.rcv_queue)

    @property
    def rcv_queue_bytes(self) -> int:
        """Payload bytes waiting for recv()."""
        return self._rcv_queue_bytes

    @property
    def rcv_buf_segments(self) -> int:
        """Out-of-order segments held for reassembly."""
        return len(self.rcv_buf)

    @property
    def rcv_bytes(self) -> int:
        """Payload bytes held on the receive side: rcv_buf + rcv_queue."""
        return self._rcv_queue_bytes + self._rcv_buf_bytes

    def discard_received(self) -> None:
        """Drop everything received and not yet read, returning its bytes to the budget."""
        if self.budget is not None:
            self.budget.release(self._rcv_queue_bytes + self._rcv_buf_bytes)
        self.rcv_buf.clear()
        self.rcv_queue.clear()
        self._rcv_queue_bytes = self._rcv_buf_bytes = 0

    # --- user side --------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Queue data (ikcp_send).  Message mode: one message of at most 127 * mss bytes."""
        if type(data) is not bytes:
            data = memoryview(data).tobytes()  # any bytes-like; TypeError for anything else
        mss = self.mss
        queue = self.snd_queue
        if self.stream:
            # ikcp stream mode tops up the last queued segment first
            if queue and data:
                frg, tail = queue[-1]
                room = mss - len(tail)
                if room > 0:
                    queue[-1] = (0, tail + data[:room])
                    data = data[room:]
            if data:
                queue.extend([(0, data[i : i + mss]) for i in range(0, len(data), mss)])
            return
        count = (len(data) + mss - 1) // mss or 1
        if count >= WND_RCV_MIN:
            # the peer could never reassemble it: its rcv_wnd may be as small as 128
            raise ValueError(
                f"message of {len(data)} bytes needs {count} fragments; max is "
                f"{WND_RCV_MIN - 1} ({(WND_RCV_MIN - 1) * mss} bytes)"
            )
        if count == 1:
            queue.append((0, data))
        else:
            queue.extend([(count - 1 - i, data[i * mss : (i + 1) * mss]) for i in range(count)])

    def peeksize(self) -> int:
        """Size of the next recv() result, -1 if none is complete (ikcp_peeksize)."""
        queue = self.rcv_queue
        if not queue:
            return -1
        if self.stream:
            return self._rcv_queue_bytes
        frg, data = queue[0]
        if frg == 0:
            return len(data)
        if len(queue) < frg + 1:
            return -1
        length = 0
        for frg, data in queue:
            length += len(data)
            if frg == 0:
                break
        return length

    def recv(self) -> bytes | None:
        """Next message (message mode) or all available bytes (stream mode); None if none."""
        queue = self.rcv_queue
        if not queue:
            return None
        recover = len(queue) >= self.rcv_wnd
        if self.stream:
            result = b"".join([data for _, data in queue])
            queue.clear()
        else:
            frg, result = queue[0]
            if frg == 0:
                queue.popleft()
            elif len(queue) < frg + 1:
                return None
            else:
                parts = []
                while queue:
                    frg, data = queue.popleft()
                    parts.append(data)
                    if frg == 0:
                        break
                result = b"".join(parts)
        self._rcv_queue_bytes -= len(result)
        if self.budget is not None:
            self.budget.release(len(result))
        if self.rcv_buf:
            self._drain_rcv_buf()
        if recover and len(queue) < self.rcv_wnd:
            # the window reopened: tell the peer at the next flush (ikcp_recv "fast recover")
            self.probe |= ASK_TELL
        return result

    def datagrams_to_send(self) -> list[bytes]:
        """Drain the datagrams produced by update()/flush(), each at most mtu bytes."""
        out = self._out
        self._out = []
        return out

    # --- network side -----------------------------------------------------------------------
    def input(self, datagram: bytes, now_ms: int | None = None) -> bool:
        """Take one datagram from the peer (ikcp_input).  Never raises; False = dropped.

        ``now_ms`` sets the clock first. ikcp measures RTT against the time of the last
        update(); its drivers call update() every interval, but ours sleeps until check()
        (up to IDLE_CHECK_MS when idle), so an ACK would be timed against a stale clock and
        the RTT underestimated, which inflates rttval and with it the RTO. Drivers pass it.

        Two shapes dominate bulk transfer and get a path that skips the general decoder: a
        datagram holding exactly one segment (a full-size PUSH) and a datagram of nothing
        but ACKs (decoded at C speed by ``struct.iter_unpack``).  Both are validated as
        strictly as :func:`unpack_segments` before any state changes.
        """
        if now_ms is not None:
            self._set_time(now_ms)
        try:
            if type(datagram) is not bytes:
                datagram = bytes(datagram)
            header = _HEADER_UNPACK_FROM(datagram, 0)
        except (TypeError, struct.error):
            self.dropped_malformed += 1
            return False
        conv, cmd, frg, wnd, ts, sn, una, length = header
        if conv != self.conv:
            self.dropped_conv += 1
            return False
        size = len(datagram)
        if size == OVERHEAD + length:
            if (
                cmd == _PUSH
                and sn == self.rcv_nxt
                and una == self.snd_una
                and not self.rcv_buf
                and len(self.rcv_queue) < self.rcv_wnd
                and length <= self.mss
                and frg <= self.max_frg
                and self._rcv_queue_bytes + length <= self.max_rcv_bytes
                and ((budget := self.budget) is None or budget.held + length <= budget.limit)
            ):
                # header prediction (Van Jacobson's TCP fast path): the next in-order PUSH,
                # nothing new acknowledged; the same effect as the general loop below
                if budget is not None:
                    budget.charge(length)
                self.acklist.append((sn, ts))
                self.rcv_queue.append((frg, datagram[OVERHEAD:]))
                self._rcv_queue_bytes += length
                self.rcv_nxt = (sn + 1) & U32_MASK
                self.rmt_wnd = wnd
                self.segments_received += 1
                return True
            headers = (header,)
        elif size % OVERHEAD == 0 and self._all_acks(datagram, size // OVERHEAD):
            headers = _HEADER_ITER_UNPACK(datagram)
        else:
            try:
                headers = unpack_headers(datagram, conv)
            except MalformedSegment:
                self.dropped_malformed += 1
                return False
        if cmd not in _CMDS:  # the general decoder checked the others
            self.dropped_malformed += 1
            return False

        prev_una = snd_una = self.snd_una
        snd_buf = self.snd_buf
        current = self.current
        have_ack = False
        maxack = maxack_ts = 0
        rcv_wnd = self.rcv_wnd
        rmt_wnd = self.rmt_wnd
        mss = self.mss
        max_frg = self.max_frg
        # ikcp_update_ack runs once per ACK; srtt/rttval evolve per sample, the RTO derived
        # from them is only read after input returns, so it is computed once at the end
        srtt = self.rx_srtt
        rttval = self.rx_rttval
        sampled = False
        offset = 0  # of the current segment's header in the datagram
        for _conv, cmd, frg, rmt_wnd, ts, sn, una, length in headers:  # noqa: B007
            # cumulative ack (ikcp_parse_una + ikcp_shrink_buf); a una beyond snd_nxt cannot
            # come from a correct peer and is ignored rather than emptying snd_buf
            if una != snd_una:
                done = (una - snd_una) & U32_MASK
                if done <= len(snd_buf):
                    self._parse_una(done)
                    snd_una = self.snd_una
            if cmd == _ACK:
                rtt = (current - ts) & U32_MASK
                if rtt < U32_HALF:
                    sampled = True
                    if srtt == 0:
                        srtt = rtt
                        rttval = rtt // 2
                    else:
                        delta = rtt - srtt
                        rttval = (3 * rttval + (-delta if delta < 0 else delta)) // 4
                        srtt = (7 * srtt + rtt) // 8
                        if srtt < 1:
                            srtt = 1
                index = (sn - snd_una) & U32_MASK
                if index < len(snd_buf):
                    seg = snd_buf[index]
                    if not seg[_ACKED]:
                        seg[_ACKED] = True
                        self._nsnd_buf -= 1
                        if index == 0:
                            self._shrink_buf()
                            snd_una = self.snd_una
                if not have_ack:
                    have_ack = True
                    maxack, maxack_ts = sn, ts
                elif 0 < (sn - maxack) & U32_MASK < U32_HALF:
                    maxack, maxack_ts = sn, ts
            elif cmd == _PUSH:
                self.segments_received += 1
                window_offset = (sn - self.rcv_nxt) & U32_MASK
                if length > mss or frg > max_frg:
                    # no sender of our MTU makes it; unacknowledged, never stored
                    self.dropped_oversize += 1
                elif window_offset < rcv_wnd:
                    data = datagram[offset + OVERHEAD : offset + OVERHEAD + length]
                    if self._parse_data(window_offset, sn, frg, data):
                        self.acklist.append((sn, ts))
                elif window_offset >= U32_HALF + rcv_wnd:
                    # left of the window: an old duplicate, ack it again
                    self.acklist.append((sn, ts))
            elif cmd == _WASK:
                self.probe |= ASK_TELL
            # WINS: the header's wnd is all it carries
            offset += OVERHEAD + length
        # ikcp stores every segment's wnd in turn; only the last one survives the loop
        self.rmt_wnd = rmt_wnd
        if sampled:
            self.rx_srtt = srtt
            self.rx_rttval = rttval
            rto = srtt + max(self.interval, 4 * rttval)
            self.rx_rto = min(max(self.rx_minrto, rto), RTO_MAX_MS)

        if have_ack:
            self._parse_fastack(maxack, maxack_ts)
        if not self.nocwnd and 0 < (snd_una - prev_una) & U32_MASK < U32_HALF:
            self._grow_cwnd()
        return True

    def _all_acks(self, datagram: bytes, count: int) -> bool:
        """Is this datagram `count` ACK headers of our conv with zero length (no payload)?"""
        if datagram[4::OVERHEAD] != _ACK_BYTE * count:
            return False
        conv = self._conv_bytes
        for i in range(4):
            if datagram[i::OVERHEAD] != conv[i : i + 1] * count:
                return False
        zero = b"\0" * count
        for i in range(20, 24):
            if datagram[i::OVERHEAD] != zero:
                return False
        return True

    def _parse_una(self, done: int) -> None:
        """Drop the first `done` segments of snd_buf: the peer has everything before una."""
        snd_buf = self.snd_buf
        popleft = snd_buf.popleft
        unacked = 0
        for _ in range(done):
            if not popleft()[_ACKED]:
                unacked += 1
        self._nsnd_buf -= unacked
        self.snd_una = (self.snd_una + done) & U32_MASK
        self._shrink_buf()

    def _shrink_buf(self) -> None:
        """Move snd_una past segments acknowledged out of order (ikcp_shrink_buf)."""
        snd_buf = self.snd_buf
        una = self.snd_una
        while snd_buf and snd_buf[0][_ACKED]:
            snd_buf.popleft()
            una += 1
        self.snd_una = una & U32_MASK

    def _parse_fastack(self, maxack: int, ts: int) -> None:
        """Count one skip for every unacknowledged sn below maxack (ikcp_parse_fastack); with
        fastack_conserve only for those last sent no later than the acked one (its ``ts``)."""
        index = (maxack - self.snd_una) & U32_MASK
        if index >= len(self.snd_buf):
            return
        resend = self.fastresend
        conserve = self.fastack_conserve
        for seg in islice(self.snd_buf, index):
            if not seg[_ACKED] and (not conserve or (ts - seg[_SENT]) & U32_MASK < U32_HALF):
                seg[_FASTACK] += 1
                if seg[_FASTACK] >= resend > 0:
                    self._fast_pending = True

    def _admit(self, length: int, in_order: bool) -> bool:
        """May a new segment of ``length`` payload bytes be stored?  Counts a refusal.

        Past max_rcv_bytes or the budget, an engine still keeps a guaranteed minimum: one
        whole message's worth out of order, and the in-order segment while rcv_queue holds
        less than a whole message (so recv() can always progress: no deadlock).
        """
        queued = self._rcv_queue_bytes
        held = queued + self._rcv_buf_bytes
        budget = self.budget
        if held + length <= self.max_rcv_bytes and (budget is None or budget.reserve(length)):
            return True
        floor = self._rcv_floor
        if held < floor or (in_order and queued < floor):
            if budget is not None:
                budget.charge(length)
            return True
        self.dropped_reassembly += 1
        return False

    def _budget_wnd(self) -> int:
        """Segments the shared budget lets the peer have in flight (advertised in wnd), so a
        correct sender slows down instead of having its segments refused."""
        budget = self.budget
        room = max(budget.limit - budget.held,
                   self._rcv_floor - self._rcv_queue_bytes - self._rcv_buf_bytes, 0)
        return (self._rcv_buf_bytes + room) // self.mss

    def _parse_data(self, offset: int, sn: int, frg: int, data: bytes) -> bool:
        """Store a PUSH inside the window and move in-order ones to rcv_queue.

        False if it was refused for lack of memory (then it must not be acknowledged).
        """
        rcv_buf = self.rcv_buf
        if sn in rcv_buf:
            return True  # a duplicate: acknowledge it again
        length = len(data)
        if offset == 0:
            if not self._admit(length, True):
                return False
            queue = self.rcv_queue
            if len(queue) < self.rcv_wnd:
                # the common in-order case: straight to rcv_queue
                queue.append((frg, data))
                self._rcv_queue_bytes += length
                self.rcv_nxt = (sn + 1) & U32_MASK
                if rcv_buf:
                    self._drain_rcv_buf()
                return True
        elif not self._admit(length, False):
            return False
        rcv_buf[sn] = (frg, data)
        self._rcv_buf_bytes += length
        if offset == 0:
            self._drain_rcv_buf()
        return True

    def _drain_rcv_buf(self) -> None:
        """Move rcv_buf -> rcv_queue while the next sn is present and the queue has room."""
        rcv_buf = self.rcv_buf
        queue = self.rcv_queue
        rcv_nxt = self.rcv_nxt
        limit = self.rcv_wnd
        added = 0
        while rcv_nxt in rcv_buf and len(queue) < limit:
            item = rcv_buf.pop(rcv_nxt)
            queue.append(item)
            added += len(item[1])
            rcv_nxt = (rcv_nxt + 1) & U32_MASK
        self.rcv_nxt = rcv_nxt
        self._rcv_queue_bytes += added
        self._rcv_buf_bytes -= added

    def _grow_cwnd(self) -> None:
        """Slow start / congestion avoidance after una advanced (end of ikcp_input)."""
        if self.cwnd >= self.rmt_wnd:
            return
        mss = self.mss
        if self.cwnd < self.ssthresh:
            self.cwnd += 1
            self.incr += mss
        else:
            if self.incr < mss:
                self.incr = mss
            self.incr += (mss * mss) // self.incr + mss // 16
            if (self.cwnd + 1) * mss <= self.incr:
                self.cwnd = (self.incr + mss - 1) // mss
        if self.cwnd > self.rmt_wnd:
            self.cwnd = self.rmt_wnd
            self.incr = self.rmt_wnd * mss

    # --- timers -----------------------------------------------------------------------------
    def _internal_time(self, now_ms: int) -> int:
        """The internal clock value for the caller's now_ms (signed 32-bit delta)."""
        if self._last_now is None:
            return now_ms
        delta = ((now_ms - self._last_now + U32_HALF) & U32_MASK) - U32_HALF
        return self.current + delta

    def _set_time(self, now_ms: int) -> None:
        self.current = self._internal_time(now_ms)
        self._last_now = now_ms

    def update(self, now_ms: int) -> None:
        """Advance the clock and flush if the interval elapsed (ikcp_update)."""
        self._set_time(now_ms)
        current = self.current
        if not self.updated:
            self.updated = True
            self.ts_flush = current
        slap = current - self.ts_flush
        if slap >= CLOCK_RESYNC_MS or slap < -CLOCK_RESYNC_MS:
            self.ts_flush = current
            slap = 0
        if slap >= 0:
            self.ts_flush += self.interval
            if current >= self.ts_flush:
                self.ts_flush = current + self.interval
            self._flush()

    def flush(self, now_ms: int) -> None:
        """Send pending acks, probes and window-permitted data now (ikcp_flush)."""
        self._set_time(now_ms)
        if not self.updated:
            self.updated = True
            self.ts_flush = self.current
        self._flush()

    def check(self, now_ms: int) -> int:
        """Absolute time (caller's ms) at which update() must next be called (ikcp_check).

        Like ikcp_check it never answers later than the next flush that has work to do or the
        next retransmission timer.  Unlike ikcp_check it does not ask for a wake-up every
        interval when nothing is pending (no acks, sendable data, probes or segments in
        flight): an idle conversation then sleeps up to IDLE_CHECK_MS; call check() again
        after send() or input().
        """
        if not self.updated:
            return now_ms
        current = self._internal_time(now_ms)
        ts_flush = self.ts_flush
        slap = current - ts_flush
        if slap >= CLOCK_RESYNC_MS or slap < -CLOCK_RESYNC_MS:
            ts_flush = current
        if self._has_work():
            deadline = ts_flush
        else:
            deadline = current + IDLE_CHECK_MS
            if self._resend_min is not None and self._nsnd_buf:
                deadline = min(deadline, max(ts_flush, self._resend_min))
            if self.rmt_wnd == 0:
                probe_at = ts_flush if self.probe_wait == 0 else max(ts_flush, self.ts_probe)
                deadline = min(deadline, probe_at)
        if deadline <= current:
            return now_ms
        return now_ms + (deadline - current)

    def _has_work(self) -> bool:
        """Would the next flush send something other than a timeout retransmission?"""
        if self.acklist or self.probe or self._fast_pending:
            return True
        if self.snd_queue:
            return self._room() > 0
        return False

    def _cwnd_limit(self) -> int:
        cwnd = min(self.snd_wnd, self.rmt_wnd)
        if not self.nocwnd:
            cwnd = min(self.cwnd, cwnd)
        return cwnd

    def _room(self) -> int:
        """New segments the windows (and the in-flight cap) let out now."""
        room = self._cwnd_limit() - len(self.snd_buf)
        cap = self.inflight_cap
        if cap is not None and cap - self._nsnd_buf < room:
            room = cap - self._nsnd_buf
        return room

    # --- output -----------------------------------------------------------------------------
    def _flush(self) -> None:
        """ikcp_flush: acks, window probes, then data (retransmissions before new data)."""
        current = self.current
        ts_wire = current & U32_MASK
        conv = self.conv
        mtu = self.mtu
        out = self._out
        wnd = self.rcv_wnd - len(self.rcv_queue)
        if wnd < 0:
            wnd = 0
        if self.budget is not None:
            wnd = min(wnd, self._budget_wnd())
        una = self.rcv_nxt
        pack = _HEADER_PACK
        parts: list[bytes] = []
        size = 0
        probe_sn = probe_ts = 0

        # acknowledgements: mtu // 24 per datagram
        acklist = self.acklist
        if acklist:
            per = mtu // OVERHEAD
            acks = [pack(conv, _ACK, 0, wnd, ts, sn, una, 0) for sn, ts in acklist]
            # ikcp reuses one header for acks and probes: probes carry the last ack's sn, ts
            probe_sn, probe_ts = acklist[-1]
            self.acklist = []
            last = len(acks) - (len(acks) - 1) % per - 1
            for i in range(0, last, per):
                out.append(b"".join(acks[i : i + per]))
            parts = acks[last:]
            size = len(parts) * OVERHEAD

        # window probing when the peer advertised zero (ikcp_flush "probe window size")
        if self.rmt_wnd == 0:
            if self.probe_wait == 0:
                self.probe_wait = self.probe_init
                self.ts_probe = current + self.probe_wait
            elif current >= self.ts_probe:
                self.probe_wait = max(self.probe_wait, self.probe_init)
                self.probe_wait = min(self.probe_wait + self.probe_wait // 2, self.probe_limit)
                self.ts_probe = current + self.probe_wait
                self.probe |= ASK_SEND
        else:
            self.ts_probe = 0
            self.probe_wait = 0
        for flag, cmd in ((ASK_SEND, _WASK), (ASK_TELL, _WINS)):
            if self.probe & flag:
                if size + OVERHEAD > mtu:
                    out.append(b"".join(parts))
                    parts = []
                    size = 0
                parts.append(pack(conv, cmd, 0, wnd, probe_ts, probe_sn, una, 0))
                size += OVERHEAD
        self.probe = 0

        snd_buf = self.snd_buf
        cwnd = self._cwnd_limit()
        resent = self.fastresend if self.fastresend > 0 else U32_MASK
        change = 0
        lost = False

        # retransmissions: walk snd_buf only if a timer may have fired or a fast ack counts
        resend_min = self._resend_min
        if snd_buf and (self._fast_pending or (resend_min is not None and current >= resend_min)):
            self._fast_pending = False
            fast_again = False
            new_min = None
            nodelay = self.nodelay
            rx_rto = self.rx_rto
            fastlimit = self.fastlimit
            for seg in snd_buf:
                sn, frg, data, resendts, rto, fastack, xmit, acked, _sent = seg
                if acked:
                    continue
                if current >= resendts:
                    xmit += 1
                    self.retransmits += 1
                    if nodelay == 0:
                        rto += max(rto, rx_rto)
                    else:
                        rto += (rto if nodelay < 2 else rx_rto) // 2
                    resendts = current + rto
                    lost = True
                    if fastack >= resent and (xmit <= fastlimit or fastlimit <= 0):
                        # ikcp does not reset fastack here: it fast-retransmits next flush
                        fast_again = True
                elif fastack >= resent and (xmit <= fastlimit or fastlimit <= 0):
                    xmit += 1
                    fastack = 0
                    resendts = current + rto
                    change += 1
                    self.fast_retransmits += 1
                else:
                    if new_min is None or resendts < new_min:
                        new_min = resendts
                    continue
                seg[_RESENDTS:_ACKED] = resendts, rto, fastack, xmit
                seg[_SENT] = current
                if new_min is None or resendts < new_min:
                    new_min = resendts
                need = OVERHEAD + len(data)
                if size + need > mtu:
                    out.append(b"".join(parts))
                    parts = []
                    size = 0
                parts.append(pack(conv, _PUSH, frg, wnd, ts_wire, sn, una, len(data)))
                parts.append(data)
                size += need
                self.segments_sent += 1
                if xmit >= self.dead_link:
                    self.dead = True
            self._resend_min = new_min
            self._fast_pending = fast_again

        # new data: move snd_queue -> snd_buf as the window allows, and send it
        queue = self.snd_queue
        room = self._room()
        if queue and room > 0:
            rto = self.rx_rto
            rtomin = 0 if self.nodelay else rto >> 3
            resendts = current + rto + rtomin
            sn = self.snd_nxt
            popleft = queue.popleft
            append = snd_buf.append
            n = min(room, len(queue))
            full = mtu - 2 * OVERHEAD  # a payload above this leaves no room for another header
            for _ in range(n):
                frg, data = popleft()
                append([sn, frg, data, resendts, rto, 0, 1, False, current])
                length = len(data)
                if size + OVERHEAD + length > mtu:
                    out.append(b"".join(parts))
                    parts = []
                    size = 0
                header = pack(conv, _PUSH, frg, wnd, ts_wire, sn, una, length)
                if length > full and not size:
                    out.append(header + data)  # a datagram of its own: skip the join
                else:
                    parts.append(header)
                    parts.append(data)
                    size += OVERHEAD + length
                sn = (sn + 1) & U32_MASK
            self.snd_nxt = sn
            self._nsnd_buf += n
            self.segments_sent += n
            if self._resend_min is None or resendts < self._resend_min:
                self._resend_min = resendts
            if self.dead_link <= 1:
                self.dead = True

        if parts:
            out.append(b"".join(parts))

        if not self._nsnd_buf:
            self._resend_min = None

        # congestion window reaction (ikcp_flush tail); harmless bookkeeping when nc
        if change:
            inflight = (self.snd_nxt - self.snd_una) & U32_MASK
            self.ssthresh = max(inflight // 2, THRESH_MIN)
            self.cwnd = self.ssthresh + resent
            self.incr = self.cwnd * self.mss
        if lost:
            self.ssthresh = max(cwnd // 2, THRESH_MIN)
            self.cwnd = 1
            self.incr = self.mss
        if self.cwnd < 1:
            self.cwnd = 1
            self.incr = self.mss
