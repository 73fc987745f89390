"""FEC between a tunnel session and its datagram socket, sans-IO (docs/PROTOCOL.md, "FEC").

A driver that has a ``FecChannel`` passes every datagram it is about to send through
:meth:`FecChannel.outgoing` (which adds the sealed FEC packets of groups that closed), tells it
which received datagrams the session authenticated (:meth:`authenticated`), hands it the bodies
of the session's ``FecReceived`` events (:meth:`fec_received`), and calls
:meth:`handle_timer` at :meth:`get_timer`. The datagrams it gets back from the last two
are recovered sealed datagrams: feed them to the session as if they had arrived.

Every receiver decodes, whatever its own ``--fec``: parity needs no negotiation (a peer that
sends none costs nothing: the decoder is made at its first FEC packet, and until then the
channel only keeps the peer's last MAX_DATA protected datagrams, the most one group names, so
that packet's group is recovered as if the decoder had been there all along). Only payload
packets are protected: DATA (the KCP segments) and DATAGRAM (kcpudp's datagram mode, where FEC
is the only loss repair); handshake and control packets are not worth the parity (they are
retransmitted on their own timers).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from .fec import MAX_DATA, FecDecoder, FecEncoder, FecSettings, Kind, LossHint, body_kind
from .wire import TYPE_MASK, MalformedPacket, PacketType

_PROTECTED = frozenset({int(PacketType.DATA), int(PacketType.DATAGRAM)})


class Sealer(Protocol):
    """What the channel needs of a TunnelSession."""

    def seal_fec(self, body: bytes, now: int) -> bytes | None: ...


@dataclass(frozen=True)
class FecMetrics:
    """FEC counters of one conversation (both halves)."""

    parity: int  #: parity shards per full group now (auto: follows the peer's reports)
    peer_loss: float  #: the loss the peer last reported (auto), 0..1
    loss: float  #: the loss of the peer's datagrams measured here, 0..1
    groups_sent: int  #: groups closed
    shards_sent: int  #: FEC packets sent (parity shards and manifests)
    overhead_bytes: int  #: bytes of FEC bodies sent (before sealing)
    sent_bytes: int  #: bytes of the sealed FEC packets sent (what FEC adds on the wire)
    protected_bytes: int  #: bytes of DATA and DATAGRAM packets the groups covered
    recovered: int  #: the peer's datagrams rebuilt from parity
    unrecoverable: int  #: groups given up with datagrams missing


class FecChannel:
    """The FEC encoder (when this end sends parity) and decoder (always) of one conversation."""

    def __init__(self, settings: FecSettings | None, hint: LossHint | None = None) -> None:
        self.encoder: FecEncoder | None = FecEncoder(settings, hint) if settings else None
        self.decoder: FecDecoder | None = None  # made at the peer's first FEC packet
        # Until then, the peer's last protected datagrams (what its first group can name).
        self._early: deque[bytes] | None = deque(maxlen=MAX_DATA)
        self.protected_bytes = 0  # DATA and DATAGRAM bytes the encoder grouped
        self.reports_sent = 0
        self.sent_bytes = 0  # sealed FEC packets (shards, manifests, reports)

    def outgoing(self, session: Sealer, datagrams: list[bytes], now: int) -> list[bytes]:
        """``datagrams`` (unchanged, first) and the sealed FEC packets of the groups they
        closed."""
        encoder = self.encoder
        if encoder is None:
            return datagrams
        bodies: list[bytes] = []
        for datagram in datagrams:
            if datagram[0] & TYPE_MASK in _PROTECTED:
                self.protected_bytes += len(datagram)
                bodies += encoder.add(datagram, now)
        return datagrams + self._seal(session, bodies, now) if bodies else datagrams

    def authenticated(self, datagram: bytes) -> list[bytes]:
        """A datagram the session accepted; recovered datagrams it completed a group with."""
        if datagram[0] & TYPE_MASK in _PROTECTED:
            decoder = self.decoder
            if decoder is None:
                self._early.append(datagram)
                return []
            return decoder.record(datagram)
        return []

    def _decoder(self) -> FecDecoder:
        """The decoder, made (from the datagrams kept so far) at the peer's first FEC packet."""
        decoder = self.decoder
        if decoder is None:
            decoder = self.decoder = FecDecoder()
            for datagram in self._early:  # no group is pending yet: nothing is recovered
                decoder.record(datagram)
            self._early = None
        return decoder

    def fec_received(self, body: bytes, now: int) -> list[bytes]:
        """The body of an authenticated FEC packet; recovered datagrams (sealed, to open).
        Only a SHARD (or a malformed body, which the decoder counts) makes the decoder: a
        peer that just reports its loss needs none."""
        try:
            kind = body_kind(body)
            if kind == Kind.SHARD:
                return self._decoder().shard_received(body, now)
            if kind != Kind.REPORT:
                raise MalformedPacket(f"unknown FEC body kind {kind}")
            if self.encoder is not None:
                self.encoder.report_received(body)
        except MalformedPacket:
            self._decoder().dropped_malformed += 1
        return []

    def get_timer(self) -> int | None:
        """Absolute ms of the next group close or loss report, or None."""
        encoder, decoder = self.encoder, self.decoder
        report = None if decoder is None else decoder.get_timer()
        group = None if encoder is None else encoder.get_timer()
        if group is None or report is None:
            return report if group is None else group
        return min(group, report)

    def handle_timer(self, session: Sealer, now: int) -> list[bytes]:
        """Sealed FEC packets due now (a timed-out group's parity, a loss report)."""
        bodies = self.encoder.handle_timer(now) if self.encoder else []
        report = None if self.decoder is None else self.decoder.report_to_send(now)
        if report is not None:
            bodies.append(report)
            self.reports_sent += 1
        return self._seal(session, bodies, now)

    def _seal(self, session: Sealer, bodies: list[bytes], now: int) -> list[bytes]:
        sealed = [d for body in bodies if (d := session.seal_fec(body, now)) is not None]
        self.sent_bytes += sum(map(len, sealed))
        return sealed

    def metrics(self) -> FecMetrics:
        enc, dec = self.encoder, self.decoder
        return FecMetrics(
            parity=enc.parity if enc else 0, peer_loss=enc.peer_loss if enc else 0.0,
            loss=dec.loss if dec else 0.0, groups_sent=enc.groups_sent if enc else 0,
            shards_sent=enc.shards_sent if enc else 0,
            overhead_bytes=enc.shard_bytes if enc else 0, sent_bytes=self.sent_bytes,
            protected_bytes=self.protected_bytes,
            recovered=dec.recovered if dec else 0,
            unrecoverable=dec.unrecoverable if dec else 0)
