"""kcpudp's conversation driver: kcptcp's ConversationDriver with a UDP local side.

Where kcptcp's driver runs a TCP reader and writer, a datagram conversation needs no greenlet
of its own for the local side: datagrams from it are handed to the conversation by whoever
reads the local socket (:meth:`DatagramDriver.from_local`), and every :meth:`transmit` first
hands what the peer sent to the local socket, dropping (and counting) what it does not take
at once, as a full UDP buffer would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from portfwd.kcptcp.driver import ConversationDriver, now_ms
from portfwd.kcptcp.metrics import counts_of
from portfwd.kcptcp.udp_endpoint import UdpEndpoint
from portfwd.kcpudp.metrics import DatagramConversationMetrics
from portfwd.tunnel.datagrams import ReliableDatagrams, UnreliableDatagrams
from portfwd.tunnel.fec import FecSettings, LossHint

log = logging.getLogger(__name__)

CONVERSATIONS = {"reliable": ReliableDatagrams, "datagram": UnreliableDatagrams}  # by --mode
SWEEP_INTERVAL_MAX = 1.0  # s between idle sweeps; shorter for short -t (timeout / 4)
SWEEP_LIMIT = 4096  # conversations closed per sweep, so a mass expiry cannot stall the loop


class DatagramDriver(ConversationDriver):
    """Runs one ReliableDatagrams or UnreliableDatagrams between its peer and a local UDP side.

    ``to_local`` sends one datagram to the local side and says whether it was taken."""

    def __init__(self, conv: ReliableDatagrams | UnreliableDatagrams, udp: UdpEndpoint,
                 name: str, fec: FecSettings | None = None,
                 fec_hint: LossHint | None = None) -> None:
        super().__init__(conv, udp, name, fec, fec_hint)  # type: ignore[arg-type]
        self.to_local: Callable[[bytes], bool] | None = None  # None: no local side yet
        # Or all of a transmit's datagrams at once (GSO); returns how many were taken.
        self.to_local_many: Callable[[list[bytes]], int] | None = None
        self.on_local_activity: Callable[[], None] | None = None  # e.g. the client's LRU touch
        self.local_close: Callable[[], None] | None = None  # releases the local side
        self.dropped_local = 0  # datagrams the local side did not take

    def attach_local(self, to_local: Callable[[bytes], bool], close: Callable[[], None],
                     reader: Callable[[], None],
                     many: Callable[[list[bytes]], int] | None = None) -> None:
        """Start bridging to a local side: ``to_local`` sends it one datagram, ``close``
        releases it, ``reader`` (a greenlet until the conversation ends) feeds from_local;
        ``many`` (optional) sends a list of datagrams at once, without waiting, and says how
        many were taken (UdpEndpoint.offer: equal-size runs in one GSO send each)."""
        self.to_local = to_local
        self.to_local_many = many
        self.local_close = close
        self.spawn(reader)  # a pooled job, ended by wait_finished

    def from_local(self, datagram: bytes) -> None:
        """A datagram from the local side, for the peer; call :meth:`transmit` after a batch."""
        self.conv.send(datagram)
        self.last_active = now_ms()

    def transmit(self) -> None:
        self._deliver()
        super().transmit()
        if self.conv.readable:  # datagrams FEC rebuilt while the events were handled
            self._deliver()

    def _deliver(self) -> None:
        """Hand what the peer sent to the local side (once there is one)."""
        to_local = self.to_local
        if to_local is None:
            return
        conv = self.conv
        delivered = False
        many = self.to_local_many
        if many is not None:  # one call for what arrived: a run of datagrams, one syscall
            batch = []
            while (datagram := conv.read()) is not None:
                batch.append(datagram)
            if batch:
                taken = many(batch)
                self.dropped_local += len(batch) - taken  # not taken: lost, as a full buffer
                delivered = taken > 0
        else:
            while (datagram := conv.read()) is not None:
                if to_local(datagram):
                    delivered = True
                else:
                    self.dropped_local += 1
        if delivered:
            self.last_active = now_ms()
            if self.on_local_activity is not None:
                self.on_local_activity()

    def wait_finished(self) -> None:
        super().wait_finished()
        if self.local_close is not None:
            self.local_close()
            self.local_close = None

    def counts(self) -> tuple[int, ...]:
        """What this conversation adds to the ended ones' totals (from its snapshot)."""
        return counts_of(self.metrics(time.monotonic()))

    def metrics(self, now: float) -> DatagramConversationMetrics:  # type: ignore[override]
        """This conversation's counters; ``now`` is ``time.monotonic()`` (for the age)."""
        conv, session = self.conv, self.conv.session
        kcp = conv.kcp if isinstance(conv, ReliableDatagrams) else None
        fec = self.fec.metrics()
        return DatagramConversationMetrics(
            conv=conv.conv, up=conv.datagrams_sent, down=conv.datagrams_received,
            up_bytes=conv.bytes_sent, down_bytes=conv.bytes_received,
            # the session's own queue drops what comes before the handshake completes
            dropped_queue=conv.dropped_queue + session.dropped_send_queue,
            dropped_local=self.dropped_local,
            dropped_incomplete=getattr(conv, "dropped_incomplete", 0),
            srtt=kcp.rx_srtt if kcp else 0,
            retrans=kcp.retransmits + kcp.fast_retransmits if kcp else 0,
            epoch=session.epoch, dropped_auth=session.dropped_auth,
            dropped_replay=session.dropped_replay, age=now - self.started,
            fec_out=fec.shards_sent, fec_recovered=fec.recovered)


def sweep_interval(idle_timeout: float) -> float:
    return min(SWEEP_INTERVAL_MAX, idle_timeout / 4)


def monotonic() -> float:
    """Seconds, the session table's clock."""
    return time.monotonic()
