"""Forward error correction over sealed tunnel datagrams (docs/PROTOCOL.md, "FEC"), sans-IO.

Glossary: a *group* is up to ``data`` consecutive sealed datagrams the sender sent to its
peer; its *parity shards* are Reed–Solomon shards (zfec) computed over the group's datagrams,
each zero-padded to the longest. The datagrams themselves go out unchanged and at once (FEC
never holds a datagram back); the parity shards follow when the group closes, after ``data``
datagrams or ``group_ms`` after its first, whichever comes first. Each parity shard is the body
of an FEC packet (type 13) that the session seals like any other packet, and it carries the
group's *manifest*: for each datagram its type byte, its seq and its length (and, from a sender
in auto mode, the sender's clock when the group closed). So a shard is
authenticated before anything in it is read, a forged one is dropped by the session's AEAD,
and the lengths a recovery trims to are authenticated ones. A recovered datagram is itself a
sealed packet the session opens (and replay-checks) as if it had arrived.

The receiver keeps the peer's recent *authenticated* datagrams by (type byte, seq) and
recovers every group that lost at most as many datagrams as it has parity shards. It also
measures the loss the manifests reveal and, when the sender asks for it (``auto``), reports
it back (a REPORT body, sealed the same way); the sender's parity then follows the loss.
What it reports is the *random* part of the loss, with bottleneck queue drops left out
(``fec_loss.py``: parity cannot repair a full queue, it only overfills it).

No clock is read here: ``now`` (ms) comes in as an argument.
"""

from __future__ import annotations

import collections
import enum
import math
import struct
from dataclasses import dataclass
from typing import NamedTuple

import zfec

from .fec_loss import LossEstimator
from .wire import HEADER_SIZE, MalformedPacket

GROUP_MS = 5  # ms a group stays open after its first datagram (a lone request is not held)
MAX_SHARDS = 255  # zfec: data + parity <= 256; one index value is kept free
MAX_DATA = 32  # datagrams per group at most: bounds the room a shard needs (MAX_ROOM)
HISTORY = 1024  # the peer's authenticated datagrams kept for recovery, once it sends FEC:
# ~1.4 MB, 120 ms of a 100 Mbit/s stream, where a group's parity follows it within ~5 ms
PENDING_GROUPS = 256  # groups with shards but not yet complete (oldest dropped beyond)
REPORT_MS = 200  # ms between loss reports to a sender in auto mode
AUTO_DATA = 10  # group size in auto mode
AUTO_MAX_OVERHEAD = 0.5  # parity / data at most in auto mode (a full group: 5 of 10)
AUTO_OFF_BELOW = 0.002  # reported loss under which auto sends no parity (manifests only)
AUTO_MIN_OVER = 200  # datagrams: a report over fewer does not turn parity below the service's
# Auto picks the least parity with P(group lost) under a target; ARQ repairs the rest, and more
# parity only fills the bottleneck. A group that fills before its timer belongs to a bulk
# stream, which a lost packet holds up by one retransmission (its window moves on) while each
# shard costs a packet of its goodput: AUTO_TARGET (5 % loss: 2 of 10; a target of 1e-2 gives
# 3, as 10:3, and measured 0.93x the fixed row's throughput). A short group (a request, a
# keystroke: closed by the timer) is what a loss delays by a round trip, and its shards cost
# little: AUTO_SHORT_TARGET for its own size, with at most a full group's shards (5 % loss: 2
# for a lone packet; 1 would leave ~1 % of request/response exchanges a round behind, right at
# their p99).
AUTO_TARGET = 0.05
AUTO_SHORT_TARGET = 0.001
LOSS_SCALE = 10000  # loss on the wire: in units of 1/10000

_SHARD_HEAD = struct.Struct(">BIBBBH")  # kind|flags, group, data, parity, index, shard size
_SENT = struct.Struct(">I")  # after the head of an AUTO shard: the sender's clock (ms, u32)
_ENTRY = struct.Struct(">BIH")  # type byte, seq, length of one data datagram
_REPORT = struct.Struct(">BHH")  # kind, loss (1/10000), datagrams the figure is over
MAX_ROOM = _SHARD_HEAD.size + _SENT.size + MAX_DATA * _ENTRY.size  # bytes: the most
# FecSettings.room can be


class Kind(enum.IntEnum):
    """First byte of an FEC body (low 7 bits; the high bit of a SHARD is ``AUTO_FLAG``)."""

    SHARD = 0  #: one parity shard (or, with parity 0, only the manifest) of a group
    REPORT = 1  #: the receiver's measured loss, for a sender in auto mode


AUTO_FLAG = 0x80  # in a SHARD's kind byte: "the sender adapts: report your loss"


class Shard(NamedTuple):
    auto: bool  #: the sender wants loss reports
    group: int  #: the sender's group number (wraps at 2**32)
    data: int  #: datagrams in the group
    parity: int  #: parity shards of the group (0: a manifest only)
    index: int  #: which parity shard this is, 0..parity-1 (0 when parity is 0)
    entries: tuple[tuple[bytes, int], ...]  #: per datagram: (key, length); key = type + seq
    shard: bytes  #: the parity bytes (empty when parity is 0)
    sent: int | None = None  #: auto: the sender's clock (ms mod 2**32) when the group closed


def datagram_key(datagram: bytes) -> bytes:
    """What names a sealed datagram in a manifest: its type byte and seq (5 bytes)."""
    return datagram[:1] + datagram[5:HEADER_SIZE]


def pack_shard(auto: bool, group: int, index: int, parity: int, datagrams: list[bytes],
               shard: bytes, sent: int = 0) -> bytes:
    """The body of an FEC SHARD packet (``sent``: the sender's ms clock, auto mode only).

    ::

        0       1       5      6        7       8         10       [14]          +7*data
        +-------+-------+------+--------+-------+---------+--------+-- ... -----+-----------+
        |A| 0   | group | data | parity | index | size    | [sent] | manifest   | shard     |
        +-------+-------+------+--------+-------+---------+--------+-- ... -----+-----------+
            1       4      1       1        1       2       [4]      data x 7     size

        sent: only when A is set (the sender's clock in ms, u32, when the group closed)
        manifest entry: type byte (1) | seq (4) | length (2) of one datagram of the group
    """
    head = _SHARD_HEAD.pack(Kind.SHARD | (AUTO_FLAG if auto else 0), group, len(datagrams),
                            parity, index, len(shard))
    if auto:
        head += _SENT.pack(sent & 0xFFFFFFFF)
    return head + b"".join(_ENTRY.pack(d[0], int.from_bytes(d[5:HEADER_SIZE], "big"), len(d))
                           for d in datagrams) + shard


def unpack_shard(body: bytes) -> Shard:
    """Parse a SHARD body (layout in :func:`pack_shard`); ``MalformedPacket`` if it is not one."""
    if len(body) < _SHARD_HEAD.size:
        raise MalformedPacket("FEC shard shorter than its header")
    kind, group, data, parity, index, size = _SHARD_HEAD.unpack_from(body)
    if kind & ~AUTO_FLAG != Kind.SHARD:
        raise MalformedPacket(f"not an FEC shard: kind {kind}")
    if not 1 <= data <= MAX_DATA or data + parity > MAX_SHARDS or (parity and index >= parity):
        raise MalformedPacket(f"FEC shard {index} of {data}:{parity}")
    if parity == 0 and (index or size):
        raise MalformedPacket("FEC manifest with shard bytes")
    auto = bool(kind & AUTO_FLAG)
    start = _SHARD_HEAD.size + (_SENT.size if auto else 0)
    end = start + data * _ENTRY.size
    if len(body) != end + size:
        raise MalformedPacket(f"FEC shard of {len(body)} bytes, expected {end + size}")
    sent = _SENT.unpack_from(body, _SHARD_HEAD.size)[0] if auto else None
    entries = []
    for offset in range(start, end, _ENTRY.size):
        type_byte, seq, length = _ENTRY.unpack_from(body, offset)
        if not HEADER_SIZE <= length <= size and parity:
            raise MalformedPacket(f"FEC manifest length {length} with shards of {size}")
        entries.append((bytes([type_byte]) + seq.to_bytes(4, "big"), length))
    return Shard(auto, group, data, parity, index, tuple(entries), bytes(body[end:]), sent)


def pack_report(loss: float, over: int) -> bytes:
    """The body of an FEC REPORT: the random loss the receiver measured (queue drops out).

    ::

        0      1                  3                  5
        +------+------------------+------------------+
        | 1    | loss (1/10000)   | over (datagrams) |
        +------+------------------+------------------+
    """
    return _REPORT.pack(Kind.REPORT, min(LOSS_SCALE, round(loss * LOSS_SCALE)),
                        min(0xFFFF, over))


def unpack_report(body: bytes) -> tuple[float, int]:
    """``(loss, over)`` of a REPORT body (layout in :func:`pack_report`)."""
    if len(body) != _REPORT.size or body[0] != Kind.REPORT:
        raise MalformedPacket("not an FEC report")
    _, loss, over = _REPORT.unpack(body)
    if loss > LOSS_SCALE:
        raise MalformedPacket(f"FEC report loss {loss} > {LOSS_SCALE}")
    return loss / LOSS_SCALE, over


def body_kind(body: bytes) -> int:
    """The kind of an FEC body (``Kind``), the AUTO flag masked; MalformedPacket if empty."""
    if not body:
        raise MalformedPacket("empty FEC body")
    return body[0] & ~AUTO_FLAG


@dataclass(frozen=True)
class FecSettings:
    """What a sender does (``--fec``): fixed ``data:parity``, or ``auto``."""

    data: int = AUTO_DATA  #: datagrams per group
    parity: int = 0  #: parity shards per full group (the starting point in auto mode)
    auto: bool = False  #: parity follows the loss the peer reports
    group_ms: int = GROUP_MS  #: ms a group stays open at most
    max_overhead: float = AUTO_MAX_OVERHEAD  #: auto: parity / data at most

    @property
    def room(self) -> int:
        """Bytes an FEC shard adds to the longest datagram of its group (its header and
        manifest, and in auto mode the sender's clock): what the datagrams must leave free for
        the shard to fit the same MTU."""
        return _SHARD_HEAD.size + (_SENT.size if self.auto else 0) + self.data * _ENTRY.size

    def __post_init__(self) -> None:
        if not 1 <= self.data <= MAX_DATA or not 0 <= self.parity <= MAX_SHARDS - self.data:
            raise ValueError(f"data must be in 1..{MAX_DATA}, data + parity at most "
                             f"{MAX_SHARDS}")
        if not self.auto and self.parity < 1:
            raise ValueError("parity must be at least 1 (or use auto)")
        if self.group_ms < 1:
            raise ValueError("group_ms must be at least 1")

    @classmethod
    def parse(cls, spec: str) -> FecSettings | None:
        """``off`` -> None, ``auto``, or ``<data>:<parity>``; ValueError on anything else."""
        if spec == "off":
            return None
        if spec == "auto":
            return cls(auto=True)
        data, sep, parity = spec.partition(":")
        if not sep or not data.isdigit() or not parity.isdigit():
            raise ValueError(f"expected <data>:<parity>, auto or off, got {spec!r}")
        return cls(data=int(data), parity=int(parity))


def parity_for(loss: float, data: int, max_overhead: float, target: float = AUTO_TARGET,
               cap: int | None = None) -> int:
    """Auto mode: the least parity that makes losing a group of ``data`` datagrams (more than
    ``parity`` of ``data + parity`` lost, each independently with ``loss``) rarer than
    ``target``; none on a clean link; at most ``cap`` (default ``max_overhead`` x data, at
    least 1)."""
    if loss < AUTO_OFF_BELOW:
        return 0
    if cap is None:
        cap = max(1, math.floor(max_overhead * data))
    for parity in range(1, cap + 1):
        n = data + parity
        lost_group = 1.0 - sum(math.comb(n, i) * loss ** i * (1 - loss) ** (n - i)
                               for i in range(parity + 1))
        if lost_group < target:
            return parity
    return cap


@dataclass
class LossHint:
    """The loss the peers of one service last reported, shared by its conversations: a new
    conversation in auto mode starts from it rather than unprotected until its first report."""

    loss: float = 0.0  #: 0..1


class FecEncoder:
    """The sending half: groups outgoing sealed datagrams, returns parity bodies to seal."""

    def __init__(self, settings: FecSettings, hint: LossHint | None = None) -> None:
        self.settings = settings
        self.hint = hint
        self.peer_loss = hint.loss if hint and settings.auto else 0.0  # last reported (auto)
        self.parity = settings.parity  # parity per full group now (auto: follows reports)
        self.basis = self.peer_loss  # auto: the loss its parity is chosen for
        if settings.auto:
            self._choose(self.peer_loss)
        self._group: list[bytes] = []
        self._opened = 0  # ms the open group got its first datagram
        self._number = 0  # next group number
        self._coders: dict[tuple[int, int], zfec.Encoder] = {}
        self.groups_sent = 0
        self.shards_sent = 0
        self.shard_bytes = 0  # bytes of FEC bodies produced (the overhead, before sealing)

    def add(self, datagram: bytes, now: int) -> list[bytes]:
        """One sealed datagram sent to the peer; the FEC bodies to seal (a group closed)."""
        if not self._group:
            self._opened = now
        self._group.append(datagram)
        if len(self._group) >= self.settings.data:
            return self._close(now)
        return []

    def get_timer(self) -> int | None:
        """Absolute ms at which the open group must close, or None."""
        return self._opened + self.settings.group_ms if self._group else None

    def handle_timer(self, now: int) -> list[bytes]:
        if self._group and now >= self._opened + self.settings.group_ms:
            return self._close(now)
        return []

    def report_received(self, body: bytes) -> None:
        """An authenticated REPORT from the peer (auto mode follows it; fixed mode ignores)."""
        loss, over = unpack_report(body)
        self.peer_loss = loss
        if self.settings.auto:
            hint = self.hint
            # Over a few datagrams (a new or a quiet conversation: requests, keystrokes) "no
            # loss seen" means little: the service's last figure protects it meanwhile.
            basis = max(loss, hint.loss) if hint is not None and over < AUTO_MIN_OVER else loss
            self._choose(basis)
            if hint is not None:  # moved as far as the report's sample allows
                hint.loss += min(1.0, over / AUTO_MIN_OVER) * (loss - hint.loss)

    def _choose(self, loss: float) -> None:
        """Auto mode: parity per full group for ``loss`` (AUTO_TARGET)."""
        self.basis = loss
        self.parity = parity_for(loss, self.settings.data, self.settings.max_overhead)

    def _close(self, now: int) -> list[bytes]:
        group, self._group = self._group, []
        number, self._number = self._number, (self._number + 1) & 0xFFFFFFFF
        data = len(group)
        auto = self.settings.auto
        if data == self.settings.data:
            parity = self.parity
        elif auto:  # closed by the timer: AUTO_SHORT_TARGET for its own size, at most what a
            # full group gets (a slow bulk stream's groups are all short: never more overhead)
            parity = parity_for(self.basis, data, self.settings.max_overhead, AUTO_SHORT_TARGET,
                                self.parity)
        else:  # a fixed group closed by the timer gets its share, at least one shard
            parity = min(self.parity, math.ceil(self.parity * data / self.settings.data))
        self.groups_sent += 1
        if parity == 0:
            bodies = [pack_shard(auto, number, 0, 0, group, b"", now)] if auto else []
        else:
            size = max(len(d) for d in group)
            blocks = [d.ljust(size, b"\0") for d in group]
            coder = self._coders.get((data, parity))
            if coder is None:
                coder = self._coders[data, parity] = zfec.Encoder(data, data + parity)
            shards = coder.encode(blocks, list(range(data, data + parity)))
            bodies = [pack_shard(auto, number, i, parity, group, bytes(s), now)
                      for i, s in enumerate(shards)]
        self.shards_sent += len(bodies)
        self.shard_bytes += sum(len(b) for b in bodies)
        return bodies


class _Pending:
    """A group the receiver has a manifest for and has not finished with."""

    __slots__ = ("shard", "parity")

    def __init__(self, shard: Shard) -> None:
        self.shard = shard  # the first shard seen: its manifest names the group
        self.parity: dict[int, bytes] = {}  # index -> parity bytes


class FecDecoder:
    """The receiving half: keeps the peer's authenticated datagrams, recovers lost ones."""

    def __init__(self) -> None:
        self._history: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._waiting: dict[bytes, int] = {}  # key of a missing datagram -> its group
        self._done: collections.deque[int] = collections.deque(maxlen=PENDING_GROUPS)
        self._coders: dict[tuple[int, int], zfec.Decoder] = {}
        self.estimator = LossEstimator()  # the loss the manifests reveal, queue drops apart
        self._report_due: int | None = None  # ms: a sender in auto mode waits for a report
        self.active = False  # the peer sends FEC: keep HISTORY of its datagrams, not MAX_DATA
        self.recovered = 0  # datagrams rebuilt from parity
        self.unrecoverable = 0  # groups given up with datagrams still missing
        self.dropped_malformed = 0  # FEC bodies that did not parse (authenticated, yet wrong)

    # --- input -------------------------------------------------------------------------------

    def record(self, datagram: bytes) -> list[bytes]:
        """An authenticated datagram from the peer; datagrams recovered thanks to it."""
        key = datagram_key(datagram)
        history = self._history
        history[key] = datagram
        # A peer without --fec costs one group's worth, enough for its first shard to use.
        if len(history) > (HISTORY if self.active else MAX_DATA):
            history.popitem(last=False)
        group = self._waiting.pop(key, None)
        if group is not None and group in self._pending:
            return self._attempt(group)
        return []

    def shard_received(self, body: bytes, now: int) -> list[bytes]:
        """An authenticated SHARD body; the datagrams it lets us recover (sealed, to open)."""
        try:
            shard = unpack_shard(body)
        except MalformedPacket:
            self.dropped_malformed += 1
            return []
        self.active = True
        if shard.group in self._done:
            return []
        pending = self._pending.get(shard.group)
        if pending is None:
            pending = self._pending[shard.group] = _Pending(shard)
            self._measure(shard, now)
            if len(self._pending) > PENDING_GROUPS:
                old, gone = self._pending.popitem(last=False)
                self._forget(old, gone)
        elif (pending.shard.entries != shard.entries or pending.shard.parity != shard.parity
              or len(pending.shard.shard) != len(shard.shard)):
            self.dropped_malformed += 1  # the same group cannot have two manifests
            return []
        if shard.parity:
            pending.parity[shard.index] = shard.shard
        return self._attempt(shard.group)

    # --- recovery ----------------------------------------------------------------------------

    def _attempt(self, group: int) -> list[bytes]:
        pending = self._pending[group]
        manifest = pending.shard
        history = self._history
        have = [(i, history.get(key)) for i, (key, _) in enumerate(manifest.entries)]
        missing = [i for i, d in have if d is None]
        if not missing:
            self._finish(group)
            return []
        for i in missing:
            self._waiting[manifest.entries[i][0]] = group
        if len(missing) > len(pending.parity):
            return []
        data, parity = manifest.data, manifest.parity
        size = len(manifest.shard)
        blocks, numbers = [], []
        for i, d in have:
            if d is not None:
                if len(d) != manifest.entries[i][1]:
                    return []  # not the datagram the manifest names (cannot be, unless forged)
                blocks.append(d.ljust(size, b"\0"))
                numbers.append(i)
        for index, shard in sorted(pending.parity.items()):
            if len(blocks) == data:
                break
            blocks.append(shard)
            numbers.append(data + index)
        coder = self._coders.get((data, parity))
        if coder is None:
            coder = self._coders[data, parity] = zfec.Decoder(data, data + parity)
        primary = coder.decode(blocks, numbers)
        out = [bytes(primary[i][:manifest.entries[i][1]]) for i in missing]
        self.recovered += len(out)
        for datagram in out:
            history[datagram_key(datagram)] = datagram
        self._finish(group)
        return out

    def _finish(self, group: int) -> None:
        pending = self._pending.pop(group)
        self._done.append(group)
        for key, _ in pending.shard.entries:
            self._waiting.pop(key, None)

    def _forget(self, group: int, pending: _Pending) -> None:
        history = self._history
        if any(key not in history for key, _ in pending.shard.entries):
            self.unrecoverable += 1
        for key, _ in pending.shard.entries:
            if self._waiting.get(key) == group:
                del self._waiting[key]

    # --- loss measurement (auto) -------------------------------------------------------------

    def _measure(self, shard: Shard, now: int) -> None:
        """The first shard of a group: how many of its datagrams did not arrive (yet), and
        how long the shard took (auto: the sender stamped it)."""
        lost = sum(1 for key, _ in shard.entries if key not in self._history)
        delay = None if shard.sent is None else (now - shard.sent) & 0xFFFFFFFF
        self.estimator.group(lost, shard.data, delay, now)
        if shard.auto and self._report_due is None:
            self._report_due = now + REPORT_MS

    @property
    def loss(self) -> float:
        """The loss of the peer's datagrams over the last ones the manifests named."""
        return self.estimator.loss

    @property
    def random_loss(self) -> float:
        """That loss without what a full bottleneck queue dropped (what gets reported)."""
        return self.estimator.random_loss

    def get_timer(self) -> int | None:
        """Absolute ms at which a loss report is due, or None."""
        return self._report_due

    def report_to_send(self, now: int) -> bytes | None:
        """A REPORT body when one is due (a sender in auto mode is listening), else None."""
        if self._report_due is None or now < self._report_due:
            return None
        self._report_due = None
        return pack_report(self.estimator.random_loss, self.estimator.clear.total)
