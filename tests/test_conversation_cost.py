"""What a tunnelled connection costs in datagrams and work, beside what it carries: the cuts of
bench/results/2026-12-01-conncost.md, each with the behaviour it must keep.

The client driver here is the real ConversationDriver on loopback sockets (a UDP socket for the
tunnel, a socket pair for the application); the server is the sans-IO session and conversation,
built as kcptcp-server builds them, fed by hand.
"""

from __future__ import annotations

import socket

import gevent
import pytest

from portfwd.kcptcp.driver import ConversationDriver, UdpEndpoint
from portfwd.tunnel.handshake import HandshakeAcceptor
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


class Lab:
    """A client driver talking to a hand-fed server over two loopback UDP sockets."""

    def __init__(self) -> None:
        self.server_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server_sock.bind(("127.0.0.1", 0))
        self.server_sock.settimeout(2)
        client_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client_sock.bind(("127.0.0.1", 0))
        self.client_addr = client_sock.getsockname()
        self.udp = UdpEndpoint(client_sock)
        self.app, tcp = socket.socketpair()
        conv = Conversation.client(CONFIG, 7, self.server_sock.getsockname(), 0, WALL)
        conv.send_origin(ORIGIN)
        self.driver = ConversationDriver(conv, self.udp, "conv=7")
        self.driver.attach_tcp(gevent.socket.socket(fileno=tcp.detach()))
        self.acceptor = HandshakeAcceptor(CONFIG.tunnel)
        self.server: Conversation | None = None

    def from_client(self) -> bytes:
        gevent.sleep(0.02)  # the driver's greenlets (its TCP reader) run first
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
