"""FEC between a tunnel session and its datagram socket, sans-IO (docs/PROTOCOL.md, "FEC").

A driver that has a ``FecChannel`` passes every datagram it is about to send through
:meth:`FecChannel.outgoing` (which adds the sealed FEC packets of groups that closed), tells it
which received datagrams the session authenticated (:meth:`authenticated`), hands it the bodies
of the session's ``FecReceived`` events (:meth:`fec_received`), and calls
:meth:`handle_timer` at :meth:`get_timer`. The datagrams it gets back from the last two
are recovered sealed datagrams: feed them to the session as if they had arrived.

Every receiver decodes, whatever its own ``--fec``: parity needs no negotiation (a peer that
sends none costs nothing). Only payload packets are protected: DATA (the KCP segments) and
DATAGRAM (kcpudp's datagram mode, where FEC is the only loss repair); handshake and control
packets are not worth the parity (they are retransmitted on their own timers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .fec import FecDecoder, FecEncoder, FecSettings, Kind, LossHint, body_kind
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
        self.decoder = FecDecoder()
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
            return self.decoder.record(datagram)
        return []

    def fec_received(self, body: bytes, now: int) -> list[bytes]:
        """The body of an authenticated FEC packet; recovered datagrams (sealed, to open)."""
        try:
            kind = body_kind(body)
            if kind == Kind.SHARD:
                return self.decoder.shard_received(body, now)
            if kind == Kind.REPORT and self.encoder is not None:
                self.encoder.report_received(body)
            elif kind != Kind.REPORT:
                self.decoder.dropped_malformed += 1
        except MalformedPacket:
            self.decoder.dropped_malformed += 1
        return []

    def get_timer(self) -> int | None:
        """Absolute ms of the next group close or loss report, or None."""
        timers = [t for t in (self.encoder.get_timer() if self.encoder else None,
                              self.decoder.get_timer()) if t is not None]
        return min(timers) if timers else None

    def handle_timer(self, session: Sealer, now: int) -> list[bytes]:
        """Sealed FEC packets due now (a timed-out group's parity, a loss report)."""
        bodies = self.encoder.handle_timer(now) if self.encoder else []
        report = self.decoder.report_to_send(now)
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
            loss=dec.loss, groups_sent=enc.groups_sent if enc else 0,
            shards_sent=enc.shards_sent if enc else 0,
            overhead_bytes=enc.shard_bytes if enc else 0, sent_bytes=self.sent_bytes,
            protected_bytes=self.protected_bytes,
            recovered=dec.recovered, unrecoverable=dec.unrecoverable)
