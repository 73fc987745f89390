"""The ORIGIN a datagram conversation's HELLO carries (HELLO byte 63 bit 0, the extension field;
docs/PROTOCOL.md 11.6), sans-IO: sealed per HELLO, authenticated by the HELLO's MAC, ignored by
a server that does not look for it, and the PROXY v2 header kcpudp-server builds from it."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from portfwd.kcpudp.server import DatagramServer
from portfwd.policy.proxy import Command, Family, ProxyParser, Transport
from portfwd.tunnel import crypto
from portfwd.tunnel.config import TunnelConfig
from portfwd.tunnel.datagrams import ReliableDatagrams, UnreliableDatagrams
from portfwd.tunnel.handshake import HandshakeAcceptor
from portfwd.tunnel.origin import (
    MalformedOrigin,
    Origin,
    hello_origin_key,
    open_hello_origin,
    origin_from_hello,
    pack_origin,
    seal_hello_origin,
)
from portfwd.tunnel.stream import ConversationConfig
from portfwd.tunnel.wire import (
    HELLO_EXTENSION_OFFSET,
    HELLO_EXTENSION_SIZE,
    HELLO_FLAGS_OFFSET,
    Carries,
    pack_hello,
    unpack_hello,
)

PSK = bytes(range(32))
V4 = Origin(("192.0.2.7", 40000), ("127.0.0.1", 5353))
V6 = Origin(("2001:db8::7", 1), ("::1", 65535))
WALL = 1_700_000_000_000


def config(carries: int = Carries.RELIABLE_DATAGRAMS, psk: bytes | None = PSK
           ) -> ConversationConfig:
    return ConversationConfig(tunnel=TunnelConfig(psk=psk, carries=carries))


def client_hello(origin: Origin | None, cls=ReliableDatagrams, psk: bytes | None = PSK,
                 seed: int = 1) -> bytes:
    carries = Carries.RELIABLE_DATAGRAMS if cls is ReliableDatagrams else Carries.DATAGRAMS
    conv = cls.client(config(carries, psk), 77, "server", 0, WALL, origin=origin)
    return conv.session.hello


@pytest.mark.parametrize("origin", [V4, V6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("cls", [ReliableDatagrams, UnreliableDatagrams])
def test_the_hello_carries_the_origin(origin, cls):
    hello = client_hello(origin, cls)
    assert hello[HELLO_FLAGS_OFFSET] == 0x01
    assert origin_from_hello(hello, hello_origin_key(PSK)) == origin


def test_hidden_and_fresh_per_hello():
    """The field is encrypted (the record's bytes do not show) under each HELLO's own share:
    two HELLOs for the same client have unrelated fields."""
    first, second = client_hello(V4), client_hello(V4)
    field = first[HELLO_EXTENSION_OFFSET:HELLO_EXTENSION_OFFSET + HELLO_EXTENSION_SIZE]
    assert pack_origin(V4)[2:] not in field and bytes(4) not in field[14:]
    assert field != second[HELLO_EXTENSION_OFFSET:HELLO_EXTENSION_OFFSET + HELLO_EXTENSION_SIZE]
    # another PSK's key does not open it
    with pytest.raises(MalformedOrigin):
        origin_from_hello(first, hello_origin_key(bytes(32)))


def test_no_origin_no_flag():
    """A stream conversation (kcptcp: ORIGIN is a stream record) and a client given none send
    byte 63 and the field as zero, as before the flag existed."""
    hello = client_hello(None)
    assert hello[HELLO_FLAGS_OFFSET:HELLO_EXTENSION_OFFSET + HELLO_EXTENSION_SIZE] == bytes(49)
    assert origin_from_hello(hello, hello_origin_key(PSK)) is None


def test_malformed_fields():
    key, share = hello_origin_key(PSK), bytes(range(32))
    sealed = bytearray(seal_hello_origin(key, share, V4))
    assert open_hello_origin(key, share, bytes(sealed)) == V4
    sealed[-1] ^= 1  # the padding after the record must stay zero
    with pytest.raises(MalformedOrigin, match="padding"):
        open_hello_origin(key, share, bytes(sealed))
    with pytest.raises(MalformedOrigin):
        open_hello_origin(key, share, bytes(47))
    family = bytearray(seal_hello_origin(key, share, V4))
    family[1] ^= 4 ^ 5  # version 4 -> 5
    with pytest.raises(MalformedOrigin, match="family"):
        open_hello_origin(key, share, bytes(family))


def acceptor(carries: int = Carries.RELIABLE_DATAGRAMS) -> HandshakeAcceptor:
    return HandshakeAcceptor(config(carries).tunnel, random.Random(2).randbytes)


def test_only_a_psk_holder_can_set_it():
    """Byte 63 and the field are inside the HELLO's MAC: a changed bit is a forgery."""
    hello = bytearray(client_hello(V4))
    hello[HELLO_EXTENSION_OFFSET] ^= 0x01
    server = acceptor()
    assert server.accept(bytes(hello), "client", 0, WALL) is None
    assert server.dropped_auth == 1
    hello[HELLO_EXTENSION_OFFSET] ^= 0x01
    assert server.accept(bytes(hello), "client", 0, WALL) is not None


def test_a_server_that_does_not_look_ignores_it():
    """What a server before the flag does, and what one without --proxy-protocol does: the
    HELLO parses and authenticates as any other (nothing reads byte 63 or the field)."""
    hello = client_hello(V6)
    assert unpack_hello(hello).carries == Carries.RELIABLE_DATAGRAMS
    session = acceptor().accept(hello, "client", 0, WALL)
    assert session is not None and session.hello == hello


class _Conv:
    def __init__(self, hello: bytes) -> None:
        session = acceptor().accept(hello, "client", 0, WALL)
        assert session is not None
        self.session, self.peer_addr = session, ("127.0.0.1", 1)


class _Driver:
    name = "conv=77"

    def __init__(self, hello: bytes) -> None:
        self.conv = _Conv(hello)
        self.reason: str | None = None

    def abort(self, reason: str) -> None:
        self.reason = reason


class _Server:
    """The part of DatagramServer its _proxy_header reads."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(conversation=config())
        self.no_origin = 0
        self._faults = SimpleNamespace(warning=lambda *args: None)


def header_for(hello: bytes):
    server, driver = _Server(), _Driver(hello)
    header = DatagramServer._proxy_header(server, driver)  # type: ignore[arg-type]
    return header, server, driver


@pytest.mark.parametrize("origin, family", [(V4, Family.INET), (V6, Family.INET6)])
def test_the_header_names_the_client(origin, family):
    header, server, driver = header_for(client_hello(origin))
    parsed = ProxyParser(allow_v1=False).feed(header + b"payload")
    assert parsed is not None and parsed.rest == b"payload"
    h = parsed.header
    assert (h.command, h.family, h.transport) == (Command.PROXY, family, Transport.DGRAM)
    assert (h.source, h.destination) == (origin.source, origin.destination)
    assert server.no_origin == 0 and driver.reason is None


def test_an_older_client_gets_a_local_header():
    """A HELLO without the flag (a kcpudp-client before it): LOCAL, counted."""
    header, server, _ = header_for(client_hello(None))
    parsed = ProxyParser(allow_v1=False).feed(header)
    assert parsed is not None and parsed.header.command == Command.LOCAL
    assert server.no_origin == 1


def test_a_malformed_origin_closes_the_conversation():
    """A PSK holder's HELLO with the flag and a field that does not open: no header, the
    conversation aborted (nothing reaches the target)."""
    body = pack_hello(77, WALL, bytes(range(32)), carries=Carries.RELIABLE_DATAGRAMS,
                      flags=0x01, extension=bytes(48))
    mac = crypto.handshake_mac_for(PSK)(crypto.HELLO_LABEL, body)
    header, _, driver = header_for(body + mac)
    assert header is None and driver.reason == "malformed ORIGIN"
