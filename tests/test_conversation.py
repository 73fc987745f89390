"""Sans-IO Conversation on a virtual clock: TCP bytes as stream records in KCP in a TunnelSession.

No sockets and no sleep.  A client ``Conversation.client(...)`` and a server
``Conversation(acceptor.accept(hello), ...)`` (built exactly as portfwd.kcptcp.server does, and
``restart``-ed with a fresh session when a client's retried HELLO reaches an unconfirmed one)
exchange datagrams through test_kcp's seeded ``Link`` (drop / duplicate / delay = reorder); time
jumps to the earliest conversation timer or delivery.  Each ``Side`` is driven the way
``tunnel.ConversationDriver`` drives a conversation: after every input it reads what is ready,
queues TCP bytes while ``can_send()``, then sends ``datagrams_to_send(now)`` and the
``probes_to_send()`` (here all for the one peer address), and drains events.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest

from portfwd.tunnel.events import (
    ConnectionClosed,
    EpochSwitched,
    Event,
    HandshakeCompleted,
    RekeyStarted,
)
from portfwd.tunnel.handshake import HandshakeAcceptor
from portfwd.tunnel.session import (
    CLOSE_BY_PEER,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_LOCAL,
    CLOSE_PEER_SILENT,
    OVERHEAD,
    PLAINTEXT_OVERHEAD,
    TunnelConfig,
)
from portfwd.tunnel.stream import (
    CLOSE_FINISHED,
    CLOSE_LINK_DEAD,
    MAX_RECORD_PAYLOAD,
    Conversation,
    ConversationConfig,
)
from portfwd.tunnel.wire import PacketType

try:  # tests/ is not a package: pytest puts it on sys.path
    from test_kcp import Link
    from test_session import CLIENT_ADDR, CONV, OTHER_PSK, PSK, SERVER_ADDR, WALL
except ImportError:  # pragma: no cover
    from .test_kcp import Link
    from .test_session import CLIENT_ADDR, CONV, OTHER_PSK, PSK, SERVER_ADDR, WALL

UDP_MTU = 1350  # bytes: the -M default
SEGMENT_HEADER = 24  # bytes of each KCP segment header
ONE_SEGMENT_CHUNK = UDP_MTU - OVERHEAD - SEGMENT_HEADER - 1  # stream bytes filling one segment
FINISHED = ConnectionClosed(CLOSE_FINISHED, by_peer=False)
CLOSED_BY_PEER = ConnectionClosed(CLOSE_BY_PEER, by_peer=True)


def make_config(psk: bytes | None = PSK, kcp: dict[str, Any] | None = None,
                **tunnel: Any) -> ConversationConfig:
    """``kcp``: ConversationConfig's KCP settings; the rest is TunnelConfig's."""
    return ConversationConfig(tunnel=TunnelConfig(psk=psk, **tunnel), mtu=UDP_MTU, **(kcp or {}))


def payload(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


class Side:
    """One end of the tunnel with a scripted TCP side (what it will write, whether it reads)."""

    def __init__(self, addr: Any, rng: random.Random, chunk: tuple[int, int]) -> None:
        self.addr = addr
        self.rng = rng
        self.chunk = chunk  # (min, max) bytes per TCP read, like recv(TCP_CHUNK) returning less
        self.conv: Conversation | None = None
        self.outgoing = b""  # bytes our TCP side produces
        self.offset = 0  # how much of outgoing the conversation has taken
        self.eof = False  # send_eof() once outgoing is all taken
        self.reading = True  # the TCP writer drains records
        self.received = bytearray()
        self.reads: list[int] = []  # len() of every non-None read(), in order (0 = EOF)
        self.events: list[Event] = []
        self.closed_at: int | None = None
        self.max_datagram = 0

    def write(self, data: bytes, eof: bool = False) -> None:
        self.outgoing += data
        self.eof = eof

    def pump(self, now: int) -> list[bytes]:
        """The driver's transmit(): read, fill while can_send, send everything, drain events."""
        conv = self.conv
        if conv is None:
            return []
        while self.reading and not conv.closed and (data := conv.read()) is not None:
            self.reads.append(len(data))
            self.received += data
        # The driver's TCP reader starts once the handshake completed.
        while conv.established and self.offset < len(self.outgoing) and conv.can_send():
            size = self.rng.randint(*self.chunk)
            conv.send_stream_data(self.outgoing[self.offset : self.offset + size])
            self.offset = min(self.offset + size, len(self.outgoing))
        if (self.eof and self.offset == len(self.outgoing) and conv.established
                and not conv.eof_sent):
            conv.send_eof()
        datagrams = conv.datagrams_to_send(now)
        # The server's WELCOME goes out as a probe to the HELLO's source: the client's address.
        datagrams += [datagram for datagram, _ in conv.probes_to_send()]
        for datagram in datagrams:
            self.max_datagram = max(self.max_datagram, len(datagram))
        while (event := conv.next_event()) is not None:
            self.events.append(event)
            if isinstance(event, ConnectionClosed):
                self.closed_at = now
        return datagrams

    @property
    def close_event(self) -> ConnectionClosed | None:
        closes = [e for e in self.events if isinstance(e, ConnectionClosed)]
        assert len(closes) <= 1
        return closes[0] if closes else None


class Net:
    """A client, a server created by the acceptor from the first HELLO, two seeded links."""

    def __init__(self, config: ConversationConfig | None = None, seed: int = 0,
                 server_config: ConversationConfig | None = None, loss: float = 0.0,
                 dup: float = 0.0, delay: tuple[int, int] = (5, 5),
                 chunk: tuple[int, int] = (1, 64 * 1024)) -> None:
        config = config or make_config()
        self.server_config = server_config or config
        rng = random.Random(seed)
        self.rng = rng
        self.now = 0
        self.acceptor = HandshakeAcceptor(self.server_config.tunnel, rng.randbytes)
        self.up = Link(random.Random(rng.getrandbits(64)), loss, dup, delay)  # client -> server
        self.down = Link(random.Random(rng.getrandbits(64)), loss, dup, delay)  # server -> client
        self.client = Side(CLIENT_ADDR, random.Random(rng.getrandbits(64)), chunk)
        self.server = Side(SERVER_ADDR, random.Random(rng.getrandbits(64)), chunk)
        self.client.conv = Conversation.client(config, CONV, SERVER_ADDR, 0, WALL)
        self.cut = False  # True: both links drop everything from now on (peer vanished)
        self.restarts = 0  # server conversations restarted by a client's retried HELLO

    def _to_server(self, datagram: bytes, now: int) -> None:
        # As portfwd.kcptcp.server does: an unknown conv goes to the acceptor, and so does a
        # client's retried (fresh) HELLO while the session it would replace is unconfirmed.
        conv = self.server.conv
        if conv is None:
            session = self.acceptor.accept(datagram, CLIENT_ADDR, now, WALL + now)
            if session is not None:
                self.server.conv = Conversation(session, self.server_config, now)
        elif (not conv.session.confirmed and datagram[0] == PacketType.HELLO
              and datagram != conv.session.hello):
            session = self.acceptor.accept(datagram, CLIENT_ADDR, now, WALL + now)
            if session is not None:
                conv.restart(session)
                self.restarts += 1
        else:
            conv.receive_datagram(datagram, CLIENT_ADDR, now)

    def run(self, until: Callable[[], bool], limit_ms: int = 600_000) -> int:
        """Pump both sides, jump to the next deadline, deliver, fire timers; returns the time."""
        sides = (self.client, self.server)
        while True:
            now = self.now
            for side, link in ((self.client, self.up), (self.server, self.down)):
                datagrams = side.pump(now)
                if not self.cut:
                    link.put(now, datagrams)
            if until():
                return now
            deadlines = [t for t in (s.conv.get_timer() for s in sides if s.conv) if t is not None]
            deadlines += [t for t in (self.up.next_due(), self.down.next_due()) if t is not None]
            if not deadlines:
                return now
            now = self.now = max(now, min(deadlines))
            assert now <= limit_ms, "did not finish in virtual time"
            for datagram in self.up.take(now):
                self._to_server(datagram, now)
            for datagram in self.down.take(now):
                self.client.conv.receive_datagram(datagram, SERVER_ADDR, now)
            for side in sides:
                conv = side.conv
                if conv is not None and (t := conv.get_timer()) is not None and now >= t:
                    conv.handle_timer(now)

    def run_to_close(self, limit_ms: int = 600_000) -> int:
        return self.run(lambda: self.client.closed_at is not None
                        and self.server.closed_at is not None, limit_ms)


def assert_finished_cleanly(net: Net, up: bytes, down: bytes) -> None:
    """Everything arrived once, in order, then exactly one EOF; one side finished, one was told."""
    client, server = net.client, net.server
    assert bytes(server.received) == up and bytes(client.received) == down
    for side in (client, server):
        assert side.reads.count(0) == 1 and side.reads[-1] == 0  # b"" once, after all data
        assert side.conv.read() is None and side.conv.read() is None
        assert not side.conv.readable
        assert side.conv.get_timer() is None
    assert client.conv.bytes_sent == server.conv.bytes_received == len(up)
    assert server.conv.bytes_sent == client.conv.bytes_received == len(down)
    assert {client.close_event, server.close_event} <= {FINISHED, CLOSED_BY_PEER}
    assert FINISHED in (client.close_event, server.close_event)


# --- streams ------------------------------------------------------------------------------------

def test_handshake_then_stream_both_ways() -> None:
    net = Net(seed=1)
    rng = random.Random(11)
    up, down = payload(rng, 3 * 1024 * 1024), payload(rng, 2 * 1024 * 1024 + 17)
    net.client.write(up, eof=True)
    net.run(lambda: net.server.conv is not None)
    assert net.acceptor.accepted == 1
    net.server.write(down, eof=True)
    net.run_to_close()
    assert_finished_cleanly(net, up, down)
    assert net.client.events[0] == net.server.events[0] == HandshakeCompleted(CONV)
    assert len(net.client.events) == len(net.server.events) == 2
    # KCP MTU = UDP MTU - session overhead, and no datagram exceeds the UDP MTU.
    assert net.client.conv.kcp.mtu == net.server.conv.kcp.mtu == UDP_MTU - OVERHEAD == 1325
    assert net.client.max_datagram == net.server.max_datagram == UDP_MTU


def test_half_close_then_peer_sends_then_finished() -> None:
    net = Net(seed=2)
    rng = random.Random(12)
    up, down = payload(rng, 100_000), payload(rng, 300_000)
    net.client.write(up, eof=True)
    net.run(lambda: net.server.reads[-1:] == [0])  # the server saw the client's EOF
    assert bytes(net.server.received) == up
    assert net.client.conv.eof_sent and not net.client.conv.eof_received
    assert net.server.conv.eof_received and not net.server.conv.eof_sent
    assert not net.client.conv.closed and not net.server.conv.closed
    assert net.client.conv.can_send()  # the window is open; only the stream is at EOF
    # Half-closed: the server keeps sending for a while, then ends its side too.
    net.server.write(down)
    net.run(lambda: len(net.client.received) == len(down))
    assert not net.client.conv.closed and not net.server.conv.closed
    net.server.eof = True
    net.run_to_close()
    assert_finished_cleanly(net, up, down)
    # The client read the last FIN, with its own FIN long acknowledged: it finishes and closes.
    assert net.client.events == [HandshakeCompleted(CONV), FINISHED]
    assert net.server.events == [HandshakeCompleted(CONV), CLOSED_BY_PEER]
    assert net.client.closed_at < net.server.closed_at


def test_fin_queued_with_data_arrives_after_all_data() -> None:
    net = Net(seed=3)
    data = payload(random.Random(13), 5 * MAX_RECORD_PAYLOAD + 1)
    net.run(lambda: net.client.conv.established)
    net.client.conv.send_stream_data(data)  # one call: 6 DATA records, then the FIN, unflushed
    net.client.conv.send_eof()
    net.run(lambda: net.server.reads[-1:] == [0])
    assert net.server.reads == [MAX_RECORD_PAYLOAD] * 5 + [1, 0]
    assert bytes(net.server.received) == data
    assert net.server.conv.read() is None and net.server.conv.read() is None


def test_read_returns_eof_exactly_once_then_none() -> None:
    net = Net(seed=4)
    net.client.write(b"", eof=True)
    net.server.reading = False
    net.run(lambda: net.server.conv is not None and net.server.conv.readable)
    server = net.server.conv
    assert server.read() == b""
    assert [server.read() for _ in range(3)] == [None, None, None]
    assert not server.readable and server.eof_received and server.bytes_received == 0
    net.server.write(b"", eof=True)
    net.server.reading = True
    net.run_to_close()
    assert server.read() is None and net.client.conv.read() is None
    assert net.client.reads == [0] and net.server.reads == []


def test_send_stream_data_after_send_eof_raises() -> None:
    net = Net(seed=5)
    net.run(lambda: net.client.conv.established)
    conv = net.client.conv
    conv.send_stream_data(b"abc")
    conv.send_eof()
    waitsnd = conv.kcp.waitsnd
    assert waitsnd == 2  # one DATA record, one FIN record
    with pytest.raises(ValueError, match="after EOF"):
        conv.send_stream_data(b"more")
    with pytest.raises(ValueError):
        conv.send_stream_data(b"")
    conv.send_eof()  # idempotent: no second FIN
    assert conv.kcp.waitsnd == waitsnd and conv.bytes_sent == 3


def test_plaintext_stream() -> None:
    net = Net(make_config(psk=None), seed=6)
    rng = random.Random(16)
    up, down = payload(rng, 1024 * 1024), payload(rng, 100_000)
    net.client.write(up, eof=True)
    net.server.write(down, eof=True)
    net.run_to_close()
    assert_finished_cleanly(net, up, down)
    assert net.client.conv.session.overhead == PLAINTEXT_OVERHEAD == 9
    assert net.client.conv.kcp.mtu == UDP_MTU - PLAINTEXT_OVERHEAD == 1341
    assert net.client.max_datagram == UDP_MTU


def test_late_welcome_to_an_earlier_hello_still_completes() -> None:
    """The client's retry (a fresh HELLO) restarted the server conversation, but the WELCOME to
    its first HELLO was only late: the client completes with it, and the server goes on with
    the session that WELCOME came from instead of the one the retry made."""
    config = make_config()
    acceptor = HandshakeAcceptor(config.tunnel, random.Random(23).randbytes)
    client = Conversation.client(config, CONV, SERVER_ADDR, 0, WALL)
    [hello1] = client.datagrams_to_send(0)
    first = acceptor.accept(hello1, CLIENT_ADDR, 0, WALL)
    assert first is not None
    server = Conversation(first, config, 0)
    [(welcome1, _)] = server.probes_to_send()  # held back by the network
    client.handle_timer(250)
    [hello2] = client.datagrams_to_send(250)
    assert hello2 != hello1
    second = acceptor.accept(hello2, CLIENT_ADDR, 250, WALL + 250)
    assert second is not None
    server.restart(second)
    assert server.session is second
    assert len(server.probes_to_send()) == 1  # the WELCOME to the retry: lost
    client.receive_datagram(welcome1, SERVER_ADDR, 260)
    assert client.established
    client.send_stream_data(b"after a late WELCOME")
    for now in range(260, 400, 5):
        for datagram in client.datagrams_to_send(now):
            server.receive_datagram(datagram, CLIENT_ADDR, now)
        for datagram in server.datagrams_to_send(now):
            client.receive_datagram(datagram, SERVER_ADDR, now)
        for conv in (client, server):
            if (timer := conv.get_timer()) is not None and timer <= now:
                conv.handle_timer(now)
    assert server.session is first and server.established and client.session.confirmed
    assert server.next_event() == HandshakeCompleted(CONV)
    assert server.read() == b"after a late WELCOME"
    assert first.dropped_auth == 0


# --- flow control -------------------------------------------------------------------------------

def test_receiver_not_reading_closes_the_window_then_resumes() -> None:
    net = Net(seed=7, chunk=(ONE_SEGMENT_CHUNK, ONE_SEGMENT_CHUNK))  # one segment per record
    data = payload(random.Random(17), 8 * 1024 * ONE_SEGMENT_CHUNK)  # 8192 segments
    net.client.write(data, eof=True)
    net.server.write(b"", eof=True)
    net.server.reading = False
    sender, receiver = net.client, net.server

    def stalled() -> bool:
        return net.now >= 60_000

    peak_waitsnd = peak_rcv_queue = 0

    def bounded() -> bool:
        nonlocal peak_waitsnd, peak_rcv_queue
        peak_waitsnd = max(peak_waitsnd, sender.conv.kcp.waitsnd)
        if receiver.conv is not None:
            peak_rcv_queue = max(peak_rcv_queue, receiver.conv.kcp.rcv_queue_segments)
        return stalled()

    net.run(bounded)
    skcp, rkcp = sender.conv.kcp, receiver.conv.kcp
    snd_wnd, rcv_wnd = skcp.snd_wnd, rkcp.rcv_wnd
    assert (snd_wnd, rcv_wnd) == (1024, 1024)
    # The receiver holds exactly one window, all acknowledged; the sender holds two windows
    # unsent and was told to stop reading its TCP side.
    assert not sender.conv.can_send()
    assert peak_waitsnd == skcp.waitsnd == skcp.snd_queue_segments == 2 * snd_wnd
    assert skcp.snd_buf_segments == 0
    assert peak_rcv_queue == rkcp.rcv_queue_segments == rcv_wnd
    assert rkcp.rcv_buf_segments == 0
    assert sender.offset == (2 * snd_wnd + rcv_wnd) * ONE_SEGMENT_CHUNK
    assert not sender.conv.closed and not receiver.conv.closed  # probes and pings kept it up
    # The TCP writer drains again: the window reopens and the rest flows.
    receiver.reading = True
    net.run_to_close()
    assert_finished_cleanly(net, data, b"")
    assert net.now < 61_000


# --- hostile network ----------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(24))
def test_lossy_link_delivers_intact(seed: int) -> None:
    loss = 0.04 * (seed % 5 + 1)  # 4 % .. 20 %
    net = Net(seed=100 + seed, loss=loss, dup=0.05, delay=(1, 40))
    rng = random.Random(seed)
    up, down = payload(rng, 1024 * 1024 + seed), payload(rng, 64 * 1024)
    net.client.write(up, eof=True)
    net.server.write(down, eof=True)
    net.run_to_close()
    # The link did its worst: KCP resent lost segments, the session dropped the duplicates.
    assert net.client.conv.kcp.retransmits + net.client.conv.kcp.fast_retransmits > 0
    assert net.server.conv.session.dropped_replay > 0
    assert net.client.conv.session.dropped_auth == net.server.conv.session.dropped_auth == 0
    # The finisher's last datagrams (the ack of the peer's FIN, then CLOSE) cross the lossy link
    # too; for these seeds at least one arrives, so the peer ends cleanly as well.  (Were both
    # lost, the peer would resend its FIN into a closed session until "peer silent".)
    assert_finished_cleanly(net, up, down)


# --- closing ------------------------------------------------------------------------------------

def test_abort_closes_both_without_fin() -> None:
    net = Net(seed=8)
    net.client.write(payload(random.Random(18), 200_000))
    net.run(lambda: len(net.server.received) >= 100_000)
    net.client.conv.abort()
    datagrams = net.client.pump(net.now)
    assert [len(d) for d in datagrams] == [OVERHEAD]  # exactly one CLOSE, empty sealed body
    net.client.conv.abort()  # idempotent
    net.up.put(net.now, datagrams)
    net.run_to_close()
    assert net.client.events == [HandshakeCompleted(CONV), ConnectionClosed(CLOSE_LOCAL, False)]
    assert net.server.events == [HandshakeCompleted(CONV), CLOSED_BY_PEER]
    assert 0 not in net.server.reads and not net.server.conv.eof_received  # no FIN, no EOF
    assert not net.client.conv.can_send() and not net.server.conv.can_send()
    assert net.client.conv.get_timer() is None and net.server.conv.get_timer() is None


def test_abort_reports_its_reason() -> None:
    net = Net(seed=9)
    # The server has a TCP side (its dialled target) only once its session is established.
    net.run(lambda: net.server.conv is not None and net.server.conv.established)
    net.server.conv.abort("tcp read: Connection reset by peer")
    net.run_to_close()
    assert net.server.events == [HandshakeCompleted(CONV),
                                 ConnectionClosed("tcp read: Connection reset by peer", False)]
    assert net.client.events == [HandshakeCompleted(CONV), CLOSED_BY_PEER]


def test_silent_peer_idle_timeout() -> None:
    net = Net(seed=10)
    net.run(lambda: net.server.conv is not None and net.client.conv.session.confirmed)
    confirmed_at = net.now
    # HELLO 5 ms there, WELCOME 5 ms back, the client's PING 10 ms later (no stream data to
    # confirm for it) and 5 ms there, the server's PING likewise: 5 + 5 + 15 + 15.
    assert confirmed_at == 40
    net.cut = True  # the server host vanished
    net.run(lambda: net.client.closed_at is not None)
    assert net.client.events == [HandshakeCompleted(CONV), ConnectionClosed(CLOSE_PEER_SILENT,
                                                                            False)]
    assert net.client.closed_at == confirmed_at + TunnelConfig().idle_timeout_ms == 30_040
    assert net.client.conv.get_timer() is None


def test_server_silent_after_welcome_handshake_timeout() -> None:
    """The client got its WELCOME but never hears the server answer its sealed PING: the server
    never confirmed, so the client gives up at the handshake timeout, not after idle_timeout."""
    net = Net(seed=10)
    net.run(lambda: net.client.conv.established)
    assert net.now == 10
    net.down.loss = 1.0  # nothing more from the server
    net.run(lambda: net.client.closed_at is not None)
    assert net.client.events == [HandshakeCompleted(CONV),
                                 ConnectionClosed(CLOSE_HANDSHAKE_TIMEOUT, False)]
    assert net.client.closed_at == TunnelConfig().handshake_timeout_ms
    assert net.server.conv.established  # it heard the client, its answers were lost


def test_lost_welcomes_fresh_hello_restarts_the_server_conversation() -> None:
    """Every WELCOME lost for a while: each client retry is a fresh HELLO, which replaces the
    unconfirmed server conversation (as kcptcp-server does), and the stream still flows."""
    net = Net(seed=15)
    net.down.loss = 1.0
    rng = random.Random(22)
    up, down = payload(rng, 50_000), payload(rng, 20_000)
    net.client.write(up, eof=True)
    net.server.write(down, eof=True)
    net.run(lambda: net.now >= 800)  # HELLOs at 0, 250 and 750 ms
    assert net.acceptor.accepted == 3 and net.restarts == 2
    assert not net.server.conv.established and not net.client.conv.established
    net.down.loss = 0.0
    net.run_to_close()
    assert_finished_cleanly(net, up, down)
    assert net.server.events[0] == HandshakeCompleted(CONV)


def test_dead_link_mid_stream() -> None:
    net = Net(make_config(kcp={"dead_link": 5}), seed=11)
    net.client.write(payload(random.Random(19), 500_000))
    net.run(lambda: len(net.server.received) >= 100_000)
    net.cut = True
    net.run(lambda: net.client.closed_at is not None)
    assert net.client.events[-1] == ConnectionClosed(CLOSE_LINK_DEAD, by_peer=False)
    assert net.client.conv.kcp.dead
    assert net.client.closed_at < TunnelConfig().idle_timeout_ms


def test_peer_close_leaves_acknowledged_records_readable() -> None:
    """A side closed by the peer's CLOSE may still hold acknowledged, unread records."""
    net = Net(seed=12)
    rng = random.Random(20)
    up, down = payload(rng, 300_000), payload(rng, 1000)
    net.client.write(up, eof=True)
    net.server.write(down, eof=True)
    net.server.reading = False  # the server's TCP writer is stuck
    net.run_to_close()
    assert net.client.events == [HandshakeCompleted(CONV), FINISHED]
    assert net.server.events == [HandshakeCompleted(CONV), CLOSED_BY_PEER]
    server = net.server.conv
    assert server.closed and server.readable and net.server.received == b""
    records = []
    while (data := server.read()) is not None:
        records.append(data)
    assert b"".join(records) == up and records[-1] == b""


# --- security layer under the stream ------------------------------------------------------------

@pytest.mark.parametrize("delay", [(5, 5), (2, 8)], ids=["in-order", "reordering"])
def test_rekey_during_transfer(delay: tuple[int, int]) -> None:
    # A 64-segment send window spreads the transfer over many round trips (with 1024 segments
    # 1 MiB crosses in two); the jittered link reorders packets around each epoch switch.
    config = make_config(kcp={"snd_wnd": 64}, rekey_seq_threshold=50)
    net = Net(config, seed=13, delay=delay)
    rng = random.Random(21)
    up, down = payload(rng, 1024 * 1024), payload(rng, 256 * 1024)
    net.client.write(up, eof=True)
    net.server.write(down, eof=True)
    net.run_to_close()
    assert_finished_cleanly(net, up, down)
    client, server = net.client.conv.session, net.server.conv.session
    epoch = client.epoch
    assert epoch == server.epoch >= 10
    for side in (net.client, net.server):
        switches = [e.epoch for e in side.events if isinstance(e, EpochSwitched)]
        assert switches == list(range(1, epoch + 1))
    started = [e for s in (net.client, net.server) for e in s.events
               if isinstance(e, RekeyStarted)]
    # Each epoch's rekey was started at send_seq 50 by one side, or by both at once
    # (docs/PROTOCOL.md "Rekeying": a simultaneous trigger, where each REKEY_INIT also serves
    # as the other's answer).
    # The last one may still be under way when the conversation closes (started, not switched).
    assert set(range(epoch)) <= {e.epoch for e in started} <= set(range(epoch + 1))
    assert len(started) >= epoch
    # At send_seq 50 (a server defers a rekey until the client is confirmed; it sends nothing
    # sealed before that anyway).
    assert {e.send_seq for e in started if e.epoch > 0} == {50}
    assert min(e.send_seq for e in started) == 50
    if delay[0] == delay[1]:
        assert client.dropped_auth == server.dropped_auth == 0
    # Reordered, an epoch switch every round trip lets a packet arrive two epochs late: its
    # phase bit names the current epoch, so it fails the tag (dropped_auth) and KCP resends it.
    # Only a threshold this low makes that possible.


def test_wrong_psk_creates_nothing_and_client_times_out() -> None:
    net = Net(make_config(psk=OTHER_PSK), seed=14, server_config=make_config())
    net.client.write(b"never sent", eof=True)
    net.run(lambda: net.client.closed_at is not None)
    assert net.server.conv is None
    assert net.acceptor.accepted == 0 and net.acceptor.cache_size == 0
    # HELLO at 0 and retransmitted at 250, 750, 1750, 3750, 5750, 7750, 9750 ms
    assert net.acceptor.dropped_auth == 8
    assert net.client.events == [ConnectionClosed(CLOSE_HANDSHAKE_TIMEOUT, False)]
    assert net.client.closed_at == TunnelConfig().handshake_timeout_ms == 10_000
    assert net.client.conv.bytes_sent == 0 and net.client.conv.get_timer() is None



@pytest.mark.parametrize("record", [b"", b"\x02", b"\x00", b"\x01extra"])
def test_malformed_record_closes_the_stream(record: bytes) -> None:
    """An authenticated peer that breaks the record format ends the stream, never crashes it."""
    net = Net(seed=7)
    net.run(lambda: net.server.conv is not None and net.client.conv.established)
    net.client.conv.kcp.send(record)  # bypass send_stream_data: a broken peer
    net.run_to_close()
    assert net.server.conv.malformed_records == 1
    assert net.server.close_event == ConnectionClosed("malformed stream record", by_peer=False)
    assert net.client.close_event == CLOSED_BY_PEER
    assert net.server.received == b""
