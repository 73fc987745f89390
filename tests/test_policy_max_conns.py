"""kcptcp-server --max-conns, sans-IO: a valid HELLO beyond the cap gets one REFUSE_FULL, bound
to it and smaller than it, and the client closes at once with "server full"; forged, stale and
replayed HELLOs get nothing (docs/PROTOCOL.md "REFUSE", docs/SECURITY.md)."""

from __future__ import annotations

from portfwd.tunnel.events import ConnectionClosed
from portfwd.tunnel.handshake import HandshakeAcceptor
from portfwd.tunnel.hello import CLOSE_SERVER_FULL
from portfwd.tunnel.session import TunnelConfig
from portfwd.tunnel.stream import Conversation, ConversationConfig
from portfwd.tunnel.wire import HELLO_SIZE, REFUSE_FULL, REFUSE_SIZE, unpack_refuse

try:
    from test_session import CLIENT_ADDR, CONV, OTHER_PSK, PSK, SERVER_ADDR, WALL
except ImportError:  # run as a package
    from .test_session import CLIENT_ADDR, CONV, OTHER_PSK, PSK, SERVER_ADDR, WALL

NOW = 1000


def client(psk: bytes = PSK, conv: int = CONV) -> Conversation:
    return Conversation.client(ConversationConfig(tunnel=TunnelConfig(psk=psk)), conv,
                               SERVER_ADDR, NOW, WALL)


def closed_reasons(conv: Conversation) -> list[str]:
    reasons = []
    while (event := conv.next_event()) is not None:
        if isinstance(event, ConnectionClosed):
            reasons.append(event.reason)
    return reasons


def test_a_hello_beyond_the_cap_is_refused_and_the_client_closes_at_once() -> None:
    acceptor = HandshakeAcceptor(TunnelConfig(psk=PSK))
    conv = client()
    hello = conv.datagrams_to_send(NOW)[0]
    assert len(hello) == HELLO_SIZE
    acceptor.refuse_full(hello, CLIENT_ADDR, NOW, WALL + NOW)
    (refuse, addr), = acceptor.replies_to_send()
    assert addr == CLIENT_ADDR
    assert len(refuse) == REFUSE_SIZE < HELLO_SIZE  # no amplification
    assert unpack_refuse(refuse).carries == REFUSE_FULL
    assert acceptor.refused_full == 1 and acceptor.accepted == 0
    conv.receive_datagram(refuse, SERVER_ADDR, NOW + 1)
    assert conv.closed
    assert closed_reasons(conv) == [CLOSE_SERVER_FULL]


def test_one_refuse_per_hello_and_a_replay_gets_nothing() -> None:
    acceptor = HandshakeAcceptor(TunnelConfig(psk=PSK))
    hello = client().datagrams_to_send(NOW)[0]
    acceptor.refuse_full(hello, CLIENT_ADDR, NOW, WALL + NOW)
    assert len(acceptor.replies_to_send()) == 1
    acceptor.refuse_full(hello, CLIENT_ADDR, NOW + 5, WALL + NOW + 5)  # the same HELLO again
    assert acceptor.replies_to_send() == []
    assert acceptor.dropped_replay == 1
    # ... and once there is room, the replayed HELLO cannot open a conversation either
    assert acceptor.accept(hello, CLIENT_ADDR, NOW + 6, WALL + NOW + 6) is None


def test_forged_and_stale_hellos_are_not_answered() -> None:
    acceptor = HandshakeAcceptor(TunnelConfig(psk=PSK))
    forged = client(psk=OTHER_PSK).datagrams_to_send(NOW)[0]
    acceptor.refuse_full(forged, CLIENT_ADDR, NOW, WALL + NOW)
    stale = client().datagrams_to_send(NOW)[0]
    late = TunnelConfig().timestamp_window_ms + 1
    acceptor.refuse_full(stale, CLIENT_ADDR, NOW + late, WALL + NOW + late)
    assert acceptor.replies_to_send() == []
    assert acceptor.dropped_auth == 1 and acceptor.dropped_stale == 1


def test_refuses_stay_within_the_reply_budget() -> None:
    config = TunnelConfig(psk=PSK, cookie_reply_rate_per_s=3)
    acceptor = HandshakeAcceptor(config)
    for n in range(10):
        acceptor.refuse_full(client(conv=CONV + n).datagrams_to_send(NOW)[0], CLIENT_ADDR, NOW,
                             WALL + NOW)
    assert len(acceptor.replies_to_send()) == 3
    assert acceptor.dropped_load == 7


def test_a_refuse_for_another_hello_does_not_close_the_client() -> None:
    acceptor = HandshakeAcceptor(TunnelConfig(psk=PSK))
    acceptor.refuse_full(client().datagrams_to_send(NOW)[0], CLIENT_ADDR, NOW, WALL + NOW)
    refuse = acceptor.replies_to_send()[0][0]
    conv = client()  # same conv and PSK, another HELLO
    conv.datagrams_to_send(NOW)
    conv.receive_datagram(refuse, SERVER_ADDR, NOW + 1)
    assert not conv.closed
