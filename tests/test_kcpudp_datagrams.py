"""tunnel/datagrams.py on a virtual clock, no sockets: both modes end to end through the real
session and HandshakeAcceptor, the REFUSE of another kind, DATAGRAM replay protection,
fragmentation and its bounds, and a seeded lossy link."""

from __future__ import annotations

import random
from typing import Any

import pytest

from portfwd.tunnel.datagrams import (
    FRAGMENT,
    REASSEMBLY_TIMEOUT_MS,
    RECEIVE_QUEUE,
    ReliableDatagrams,
    UnreliableDatagrams,
)
from portfwd.tunnel.events import ConnectionClosed
from portfwd.tunnel.handshake import HandshakeAcceptor
from portfwd.tunnel.session import MAX_DATAGRAM_SIZE, TunnelConfig
from portfwd.tunnel.stream import Conversation, ConversationConfig
from portfwd.tunnel.wire import HELLO_CARRIES_OFFSET, TYPE_MASK, Carries, PacketType

try:  # tests/ is not a package: pytest puts it on sys.path
    from test_session import CLIENT_ADDR, CONV, PSK, SERVER_ADDR, WALL
except ImportError:  # pragma: no cover
    from .test_session import CLIENT_ADDR, CONV, PSK, SERVER_ADDR, WALL

KINDS = {"reliable": (ReliableDatagrams, Carries.RELIABLE_DATAGRAMS),
         "datagram": (UnreliableDatagrams, Carries.DATAGRAMS)}


def config(carries: int, psk: bytes | None = PSK) -> ConversationConfig:
    return ConversationConfig(tunnel=TunnelConfig(psk=psk, carries=carries), mtu=1350)


class Net:
    """A client and the server it handshakes with, joined by a seeded link."""

    def __init__(self, mode: str, server_carries: int | None = None, client_cls: Any = None,
                 loss: float = 0.0, dup: float = 0.0, reorder: float = 0.0, seed: int = 0,
                 psk: bytes | None = PSK) -> None:
        cls, carries = KINDS[mode] if mode in KINDS else (client_cls, Carries.STREAM)
        self.client_cfg = config(carries, psk)
        self.server_carries = carries if server_carries is None else server_carries
        self.server_cfg = config(self.server_carries, psk)
        self.server_cls = {Carries.RELIABLE_DATAGRAMS: ReliableDatagrams,
                           Carries.DATAGRAMS: UnreliableDatagrams,
                           Carries.STREAM: Conversation}[self.server_carries]
        self.now = 1000
        self.client = cls.client(self.client_cfg, CONV, SERVER_ADDR, self.now, WALL)
        self.acceptor = HandshakeAcceptor(self.server_cfg.tunnel)
        self.server: Any = None
        self.rng = random.Random(seed)
        self.loss, self.dup, self.reorder = loss, dup, reorder
        self.up: list[bytes] = []  # every datagram the client sent (for replays)
        self.down_from_server: list[bytes] = []
        self.held: list[tuple[str, bytes]] = []

    def _link(self, direction: str, datagram: bytes) -> None:
        draw = self.rng.random()
        if draw < self.loss:
            return
        if draw < self.loss + self.reorder:
            self.held.append((direction, datagram))
            return
        for _ in range(2 if self.rng.random() < self.dup else 1):
            self._deliver(direction, datagram)
        held, self.held = self.held, []
        for d, data in held:
            self._deliver(d, data)

    def _deliver(self, direction: str, datagram: bytes) -> None:
        if direction == "up":
            if self.server is None:
                session = self.acceptor.accept(datagram, CLIENT_ADDR, self.now, WALL + self.now)
                if session is not None:
                    self.server = self.server_cls(session, self.server_cfg, self.now)
                for reply, _ in self.acceptor.replies_to_send():
                    self._link("down", reply)
            else:
                self.server.receive_datagram(datagram, CLIENT_ADDR, self.now)
        else:
            self.client.receive_datagram(datagram, SERVER_ADDR, self.now)

    def pump(self, ms: int = 1) -> None:
        """Move everything queued, then advance the clock and run due timers."""
        for _ in range(50):
            moved = False
            for datagram in self.client.datagrams_to_send(self.now):
                self.up.append(datagram)
                self._link("up", datagram)
                moved = True
            if self.server is not None:
                for datagram in self.server.datagrams_to_send(self.now):
                    self.down_from_server.append(datagram)
                    self._link("down", datagram)
                    moved = True
                for datagram, _ in self.server.probes_to_send():
                    self._link("down", datagram)
                    moved = True
            if not moved:
                break
        self.now += ms
        for side in (self.client, self.server):
            if side is not None and not side.closed:
                timer = side.get_timer()
                if timer is not None and self.now >= timer:
                    side.handle_timer(self.now)

    def run(self, ms: int) -> None:
        for _ in range(ms):
            self.pump()

    def established(self) -> None:
        for _ in range(2000):
            self.pump()
            if self.client.established and self.server is not None and (
                    self.server.session.confirmed):
                return
        raise AssertionError("no handshake")


def drain(side: Any) -> list[bytes]:
    out = []
    while (datagram := side.read()) is not None:
        out.append(datagram)
    return out


def events_of(side: Any) -> list[Any]:
    out = []
    while (event := side.next_event()) is not None:
        out.append(event)
    return out


@pytest.mark.parametrize("mode", KINDS)
def test_every_size_both_ways(mode: str) -> None:
    net = Net(mode)
    net.client.send(b"first")  # queued until the handshake completes
    net.established()
    net.run(20)
    assert drain(net.server) == [b"first"]
    rng = random.Random(3)
    sizes = [0, 1, 1319, 1320, 1321, 2641, 30000, MAX_DATAGRAM_SIZE]
    for size in sizes:
        up, down = rng.randbytes(size), rng.randbytes(size)
        assert net.client.send(up) and net.server.send(down)
        net.run(50)
        assert drain(net.server) == [up]
        assert drain(net.client) == [down]


def test_datagram_mode_uses_datagram_packets_outside_kcp() -> None:
    net = Net("datagram")
    net.established()
    net.client.send(b"x" * 3000)  # three fragments
    net.pump()
    sealed = [d for d in net.up if d[0] & TYPE_MASK == PacketType.DATAGRAM]
    assert len(sealed) == 3 and all(len(d) <= 1350 for d in sealed)
    assert not any(d[0] & TYPE_MASK == PacketType.DATA for d in net.up)
    assert net.client.get_timer() == net.client.session.get_timer()  # no KCP timer


def test_datagram_replays_are_dropped() -> None:
    net = Net("datagram")
    net.established()
    net.client.send(b"once")
    net.pump()
    assert drain(net.server) == [b"once"]
    for datagram in net.up:  # the whole capture again, HELLO included
        net.server.receive_datagram(datagram, CLIENT_ADDR, net.now)
    assert drain(net.server) == []
    assert net.server.session.dropped_replay >= 1


def test_lost_fragment_loses_the_datagram_and_its_slot_expires() -> None:
    net = Net("datagram")
    net.established()
    net.client.send(b"a" * 5000)
    sealed = net.client.datagrams_to_send(net.now)
    for datagram in sealed[1:]:  # the first fragment is lost
        net.server.receive_datagram(datagram, CLIENT_ADDR, net.now)
    assert drain(net.server) == []
    net.now += REASSEMBLY_TIMEOUT_MS + 1
    net.client.send(b"b" * 5000)
    net.pump()
    assert drain(net.server) == [b"b" * 5000]
    assert net.server.dropped_incomplete == 1


def test_receive_queue_is_bounded() -> None:
    net = Net("datagram")
    net.established()
    for n in range(RECEIVE_QUEUE + 10):
        net.client.send(b"%d" % n)
        net.pump()
    assert len(drain(net.server)) == RECEIVE_QUEUE
    assert net.server.dropped_queue == 10


def test_reliable_send_queue_is_bounded() -> None:
    net = Net("reliable")
    net.established()
    sent = sum(net.client.send(b"z" * 1300) for _ in range(5000))  # never pumped: no acks
    assert sent < 5000 and net.client.dropped_queue == 5000 - sent


def test_forged_fragment_headers_are_dropped() -> None:
    net = Net("datagram")
    net.established()
    session = net.client.session
    for body in (b"", b"abc", FRAGMENT.pack(1, 5, 3) + b"x", FRAGMENT.pack(3, 0, 2) + b"x",
                 FRAGMENT.pack(3, 1, 3) + b"x"):  # the last: a count that changed
        session.send_datagram(body)
    net.pump()
    assert drain(net.server) == []
    assert net.server.dropped_malformed == 4


@pytest.mark.parametrize("mode", KINDS)
@pytest.mark.parametrize("seed", range(3))
def test_lossy_link(mode: str, seed: int) -> None:
    net = Net(mode, seed=seed)
    net.established()  # (retried HELLOs are the server driver's business: test_kcpudp.py)
    net.loss, net.dup, net.reorder = 0.1, 0.05, 0.1
    rng = random.Random(seed)
    sent = [rng.randbytes(rng.choice([0, 40, 1400, 4000])) for _ in range(200)]
    for datagram in sent:
        net.client.send(datagram)
        net.pump()
    got: list[bytes] = []
    for _ in range(20000 if mode == "reliable" else 100):
        net.pump()
        got += drain(net.server)
        if len(got) == len(sent):
            break
    if mode == "reliable":
        assert got == sent
    else:
        index = {d: n for n, d in enumerate(sent)}
        assert all(d in index for d in got)  # never corrupted
        assert len(got) == len({index[d] for d in got}) or len(set(sent)) < len(sent)
        assert 0 < len(got) < len(sent)


@pytest.mark.parametrize(("mode", "server_carries"), [
    ("reliable", Carries.DATAGRAMS), ("datagram", Carries.RELIABLE_DATAGRAMS),
    ("reliable", Carries.STREAM), ("stream", Carries.DATAGRAMS),
])
def test_other_kind_is_refused_and_the_client_closes(mode: str, server_carries: int) -> None:
    net = Net(mode, server_carries=server_carries, client_cls=Conversation)
    net.run(10)
    assert net.server is None  # nothing created, nothing dialled
    assert net.acceptor.refused_carries == 1
    assert net.client.closed
    closed = [e for e in events_of(net.client) if isinstance(e, ConnectionClosed)]
    assert len(closed) == 1 and closed[0].reason.startswith("refused by the server: it carries")
    assert len(net.up) == 1  # one HELLO: the REFUSE ended it at once


def test_refuse_for_another_hello_is_ignored() -> None:
    net = Net("reliable", server_carries=Carries.DATAGRAMS)
    other = Net("reliable", server_carries=Carries.DATAGRAMS)
    hello = other.client.datagrams_to_send(other.now)[0]
    other.acceptor.accept(hello, CLIENT_ADDR, other.now, WALL + other.now)
    refuse = other.acceptor.replies_to_send()[0][0]
    net.client.receive_datagram(refuse, SERVER_ADDR, net.now)  # same conv, not our HELLO
    assert not net.client.closed
    assert net.client.session.dropped_malformed == 1


def test_hello_says_what_it_carries() -> None:
    for mode, (cls, carries) in KINDS.items():
        client = cls.client(config(carries), CONV, SERVER_ADDR, 0, WALL)
        assert client.datagrams_to_send(0)[0][HELLO_CARRIES_OFFSET] == carries, mode


@pytest.mark.parametrize(("mode", "wrong"), [("datagram", PacketType.DATA),
                                             ("reliable", PacketType.DATAGRAM)])
def test_payload_packets_of_the_other_kind_are_dropped(mode: str, wrong: PacketType) -> None:
    """A session takes payloads only in its own packet type: DATAGRAM in datagram mode, DATA
    (KCP) otherwise; the other, even authenticated, is dropped as malformed."""
    net = Net(mode)
    net.established()
    before = net.server.session.dropped_malformed
    net.client.session._seal_raw(int(wrong), FRAGMENT.pack(0, 0, 1) + b"payload")
    net.pump()
    assert drain(net.server) == []
    assert net.server.session.dropped_malformed == before + 1
    net.client.send(b"still fine")
    net.run(30)
    assert drain(net.server) == [b"still fine"]
