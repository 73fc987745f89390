"""What a tunnelled connection costs in datagrams and work, beside what it carries: the cuts of
bench/results/2026-12-01-conncost.md, each with the behaviour it must keep.

The client driver here is the real ConversationDriver on loopback sockets (a UDP socket for the
tunnel, a socket pair or a TCP connection for the application); the server is the sans-IO
session and conversation, built as kcptcp-server builds them, fed by hand.
"""

from __future__ import annotations

import socket

import gevent
import pytest

from portfwd.kcptcp.driver import ConversationDriver, UdpEndpoint
from portfwd.tunnel.handshake import SCREEN_CLOCK_EVERY, HandshakeAcceptor
from portfwd.tunnel.origin import Origin
from portfwd.tunnel.session import TunnelConfig
from portfwd.tunnel.stream import Conversation, ConversationConfig
from portfwd.tunnel.wire import PacketType

try:  # tests/ is not a package: pytest puts it on sys.path
    from test_session import PSK, WALL
except ImportError:  # pragma: no cover
    from .test_session import PSK, WALL

CONFIG = ConversationConfig(tunnel=TunnelConfig(psk=PSK))
ORIGIN = Origin(("192.0.2.7", 40000), ("127.0.0.1", 8080))


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """The application's end and the tunnel's end of a loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        app = socket.create_connection(listener.getsockname())
        tunnel, _ = listener.accept()
    return app, tunnel


class Lab:
    """A client driver talking to a hand-fed server over two loopback UDP sockets."""

    def __init__(self, tcp: bool = False) -> None:
        """``tcp``: the application on a loopback TCP connection (one that can be reset), not
        a socket pair."""
        # a gevent socket: waiting for the client's datagram lets the driver's greenlets run
        self.server_sock = gevent.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server_sock.bind(("127.0.0.1", 0))
        self.server_sock.settimeout(2)
        client_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client_sock.bind(("127.0.0.1", 0))
        self.client_addr = client_sock.getsockname()
        self.udp = UdpEndpoint(client_sock)
        self.app, tcp = tcp_pair() if tcp else socket.socketpair()
        conv = Conversation.client(CONFIG, 7, self.server_sock.getsockname(), 0, WALL)
        conv.send_origin(ORIGIN)
        self.driver = ConversationDriver(conv, self.udp, "conv=7")
        self.driver.attach_tcp(gevent.socket.socket(fileno=tcp.detach()))
        self.acceptor = HandshakeAcceptor(CONFIG.tunnel)
        self.server: Conversation | None = None

    def from_client(self) -> bytes:
        return self.server_sock.recv(65536)

    def welcome(self) -> None:
        """The HELLO reaches the server, its WELCOME the client driver."""
        self.driver.transmit()
        hello = self.from_client()
        assert hello[0] & 0x7F == PacketType.HELLO
        session = self.acceptor.accept(hello, self.client_addr, 0, WALL)
        assert session is not None
        self.server = Conversation(session, CONFIG, 0)
        (welcome, _), = self.server.probes_to_send()
        self.driver.datagram_received(welcome, self.server_sock.getsockname(), 1)
        self.driver.transmit()

    def close(self) -> None:
        self.driver.abort("test over")
        self.driver.stop_jobs()
        self.udp.close()
        self.app.close()
        self.server_sock.close()


@pytest.fixture
def lab():
    lab = Lab()
    yield lab
    lab.close()


def test_bytes_sent_before_the_welcome_ride_in_the_origin_datagram(lab):
    lab.app.sendall(b"GET / HTTP/1.0\r\n\r\n")
    gevent.sleep(0.01)  # the bytes are in the tunnel's TCP socket before the WELCOME comes
    lab.welcome()
    first = lab.from_client()
    assert first[0] & 0x7F == PacketType.DATA
    server = lab.server
    server.receive_datagram(first, lab.client_addr, 2)
    assert server.established
    assert server.poll_origin() and server.origin == ORIGIN
    # Without the read-ahead this datagram held the ORIGIN alone and read() had nothing yet.
    assert server.read() == b"GET / HTTP/1.0\r\n\r\n"


def test_no_bytes_yet_the_origin_goes_alone_and_the_reader_takes_the_rest(lab):
    lab.welcome()
    server = lab.server
    server.receive_datagram(lab.from_client(), lab.client_addr, 2)
    assert server.poll_origin() and server.origin == ORIGIN
    assert server.read() is None
    lab.app.sendall(b"later")
    server.receive_datagram(lab.from_client(), lab.client_addr, 3)
    assert server.read() == b"later"


def test_an_application_that_closed_before_the_welcome_still_sends_its_bytes_then_eof(lab):
    lab.app.sendall(b"bye")
    lab.app.shutdown(socket.SHUT_WR)
    gevent.sleep(0.01)
    lab.welcome()
    server = lab.server
    got = []
    while True:
        server.receive_datagram(lab.from_client(), lab.client_addr, 2)
        server.poll_origin()
        while (data := server.read()) is not None:
            got.append(data)
        if b"" in got:
            break
    assert got == [b"bye", b""]


# --- FEC: no decoder until the peer sends FEC --------------------------------------------------

def test_a_channel_makes_no_decoder_until_the_peer_sends_fec_and_still_recovers_its_first_group():
    from test_fec import Link

    from portfwd.tunnel import fec
    from portfwd.tunnel.fec import FecSettings

    link = Link(None, FecSettings(data=fec.MAX_DATA, parity=1))  # only the server sends parity
    receiver = link.channel(link.client)
    for i in range(100):  # the server's datagrams without parity (as with auto mode off)
        link.server.send_datagram(bytes([i]) * 20)
    assert len(link.arrive(link.client, link.server.datagrams_to_send(0), 0)) == 100
    assert receiver.decoder is None and receiver.get_timer() is None
    assert receiver.metrics().recovered == 0 and receiver.metrics().loss == 0.0
    payloads = [bytes([i]) * (30 + i) for i in range(fec.MAX_DATA)]
    for p in payloads:
        link.server.send_datagram(p)
    sender = link.channel(link.server)
    datagrams = sender.outgoing(link.server, link.server.datagrams_to_send(1), 1)
    assert len(datagrams) == fec.MAX_DATA + 1  # one parity shard for the full group
    # The group's first datagram is lost; the others came before the shard made the decoder.
    got = link.arrive(link.client, datagrams[1:], 1)
    assert sorted(got) == sorted(payloads)
    assert receiver.decoder is not None and receiver.decoder.recovered == 1


def test_a_loss_report_makes_no_decoder():
    """A peer that sends no parity still reports its loss to an auto-mode sender: a REPORT
    reaches the encoder and builds no decoder; a body of no known kind is counted."""
    from portfwd.tunnel import fec
    from portfwd.tunnel.fec_channel import FecChannel

    channel = FecChannel(fec.FecSettings(auto=True))
    assert channel.fec_received(fec.pack_report(0.05, 1000), 0) == []
    assert channel.decoder is None
    assert channel.fec_received(b"\x7f", 0) == [] and channel.decoder.dropped_malformed == 1


# --- the close-time counts ---------------------------------------------------------------------

def test_a_drivers_counts_are_what_its_snapshot_adds_to_the_totals(lab):
    from portfwd.kcptcp.metrics import NO_TOTALS, counts_of

    lab.app.sendall(b"x" * 5000)
    lab.welcome()
    server = lab.server
    for _ in range(3):
        server.receive_datagram(lab.from_client(), lab.client_addr, 2)
    driver = lab.driver
    driver.rekeys_started, driver.epoch_switches, driver.peer_address_changes = 1, 2, 3
    driver.conv.session.dropped_auth = 4
    snapshot = driver.metrics(0.0)
    assert driver.counts() == counts_of(snapshot)
    assert tuple(vars(NO_TOTALS.plus(snapshot)).values()) == driver.counts()
    assert driver.counts()[:3] == (1, 5000, 0) and driver.counts()[-3:] == (1, 2, 3)
    assert driver.counts()[7] == 4  # dropped_auth


# --- a valid HELLO is MACed once ---------------------------------------------------------------

class CountingMac:
    def __init__(self, mac) -> None:
        self.mac, self.calls = mac, 0

    def __call__(self, data: bytes) -> bytes:
        self.calls += 1
        return self.mac(data)


def counted_acceptor() -> tuple[HandshakeAcceptor, CountingMac]:
    acceptor = HandshakeAcceptor(CONFIG.tunnel)
    counter = acceptor._hello_mac = CountingMac(acceptor._hello_mac)
    return acceptor, counter


def a_hello(conv: int = 9) -> bytes:
    return Conversation.client(CONFIG, conv, ("127.0.0.1", 1), 0, WALL).datagrams_to_send(0)[0]


ADDR = ("127.0.0.1", 5555)


def test_a_valid_hello_is_maced_once_through_the_screen_authentic_and_accept():
    acceptor, counter = counted_acceptor()
    hello = a_hello()
    screen = acceptor.forgery_screen(lambda: 0)
    assert not screen(hello)
    assert acceptor.authentic(hello, ADDR, 0)
    assert acceptor.accept(hello, ADDR, 0, WALL) is not None
    assert counter.calls == 1 and acceptor.accepted == 1
    # Without the screen (--allow/--deny in force): authentic() and accept(), one MAC too.
    other = a_hello(10)
    assert acceptor.authentic(other, ADDR, 0) and acceptor.accept(other, ADDR, 0, WALL)
    assert counter.calls == 2


def test_a_forged_hello_creates_nothing_however_it_comes():
    acceptor, counter = counted_acceptor()
    hello = a_hello()
    forged = hello[:-1] + bytes([hello[-1] ^ 1])
    screen = acceptor.forgery_screen(lambda: 0)
    assert not screen(forged)  # the batch's first forgery goes on, to be logged with its source
    assert screen(bytes(forged))  # the next is dropped in the read
    assert not acceptor.authentic(forged, ADDR, 0)
    assert acceptor.accept(forged, ADDR, 0, WALL) is None
    assert acceptor.accepted == 0 and acceptor.cache_size == 0
    # Each look at a forgery costs a MAC (none is vouched for); the one the screen let on to
    # be logged is counted by authentic(), not twice.
    assert counter.calls == 4 and acceptor.dropped_auth == 3


def test_only_the_very_object_that_verified_is_taken_on_trust():
    acceptor, counter = counted_acceptor()
    hello = a_hello()
    assert acceptor.authentic(hello, ADDR, 0)
    mutable = bytearray(hello)
    assert acceptor.authentic(mutable, ADDR, 0)  # equal bytes, another (mutable) object: MACed
    assert counter.calls == 2
    mutable[-1] ^= 1
    assert not acceptor.authentic(mutable, ADDR, 0)
    acceptor.forgery_screen(lambda: 0)  # a new batch: nothing of the last one is vouched for
    assert acceptor.authentic(hello, ADDR, 0) and counter.calls == 4


def test_the_screen_reads_the_clock_once_per_run_of_forgeries_and_still_lets_a_due_line_out():
    """Reading the clock costs a third of a MAC: a flood's screen looks at it for its first forgery
    and then once per SCREEN_CLOCK_EVERY, so a line that falls due meanwhile still gets its
    forgery (with its source) within that many."""
    acceptor, _ = counted_acceptor()
    hello = a_hello()
    forged = hello[:-1] + bytes([hello[-1] ^ 1])
    reads, clock = [], [0]
    screen = acceptor.forgery_screen(lambda: reads.append(1) or clock[0])
    assert not screen(forged)  # the first: a line is due, it goes on to be logged
    assert not acceptor.authentic(forged, ADDR, 0)  # logged now; the next line in 10 s
    flood = 3 * SCREEN_CLOCK_EVERY
    assert all(screen(bytes(forged)) for _ in range(flood))
    assert len(reads) == 1  # this batch's one forgery to log is gone: no need to look again
    screen = acceptor.forgery_screen(lambda: reads.append(1) or clock[0])
    reads.clear()
    assert all(screen(bytes(forged)) for _ in range(flood))
    assert len(reads) == flood // SCREEN_CLOCK_EVERY  # ... while the next batch looks 3 times
    clock[0] = 10**6  # the interval is over, in the middle of a run
    passed = [not screen(bytes(forged)) for _ in range(flood)]
    assert passed.count(True) == 1 and passed.index(True) < SCREEN_CLOCK_EVERY
    assert acceptor.dropped_auth == 1 + 2 * flood + flood - 1

# --- the TCP writer flushes after a read only when the read reopened the window ------------------

def drain(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    out = []
    try:
        while True:
            out.append(sock.recv(65536))
    except BlockingIOError:
        return out
    finally:
        sock.setblocking(True)


def test_the_window_a_read_reopens_is_announced_by_the_writer_itself(lab):
    lab.welcome()  # (no ticker runs here: the TCP writer's flush is the only one)
    server, client = lab.server, lab.driver.conv
    server.receive_datagram(lab.from_client(), lab.client_addr, 2)
    server_addr, now = lab.server_sock.getsockname(), 3
    lab.app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    chunk = b"z" * 16384
    for _ in range(400):  # bounded: until the client's window is closed
        if client.kcp.rcv_queue_segments >= client.kcp.rcv_wnd:
            break
        while server.can_send() and server.bytes_sent < 40 * 1024 * 1024:
            server.send_stream_data(chunk)
        for datagram in server.datagrams_to_send(now):
            lab.driver.datagram_received(datagram, server_addr, now)
        lab.driver.transmit()
        gevent.sleep(0.001)  # the writer fills the application's socket, then waits
        for datagram in drain(lab.server_sock):
            server.receive_datagram(datagram, lab.client_addr, now)
        now += 20
    assert client.kcp.rcv_queue_segments >= client.kcp.rcv_wnd
    assert server.kcp.rmt_wnd == 0  # the server sees the window closed
    lab.app.setblocking(False)
    for _ in range(400):  # the application reads; the writer empties KCP's queue into it
        try:
            while lab.app.recv(1 << 20):
                pass
        except BlockingIOError:
            pass
        gevent.sleep(0.001)
        for datagram in drain(lab.server_sock):
            server.receive_datagram(datagram, lab.client_addr, now)
        if server.kcp.rmt_wnd > 0:
            break
    assert server.kcp.rmt_wnd > 0


def test_an_application_that_reset_before_the_welcome_aborts_the_conversation():
    lab = Lab(tcp=True)
    try:
        reset_then_welcome(lab)
    finally:
        lab.close()


def reset_then_welcome(lab: Lab) -> None:
    lab.app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    lab.app.close()  # RST: the tunnel's end reads ECONNRESET, once
    gevent.sleep(0.01)
    lab.welcome()
    assert lab.driver.conv.closed
    assert lab.driver.close_reason.startswith("tcp read:")
