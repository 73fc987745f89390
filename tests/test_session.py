"""Sans-IO tunnel session on a virtual clock: handshake, data, rekey, replay, migration, keepalive,
hostile input and a seeded lossy link."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tunnel_helpers import Header, pack_header, unpack_header

from portfwd.tunnel import events, wire
from portfwd.tunnel.events import (
    ConnectionClosed,
    DatagramReceived,
    EpochSwitched,
    HandshakeCompleted,
    PeerAddressChanged,
    RekeyStarted,
)
from portfwd.tunnel.handshake import HandshakeAcceptor
from portfwd.tunnel.rekey import CLOSE_REKEY_TIMEOUT
from portfwd.tunnel.session import (
    CLOSE_BY_PEER,
    CLOSE_HANDSHAKE_TIMEOUT,
    CLOSE_LOCAL,
    CLOSE_PEER_SILENT,
    CLOSE_WRAPAROUND,
    MAX_PAYLOAD_SIZE,
    TunnelConfig,
    TunnelSession,
)

PSK = bytes.fromhex("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
OTHER_PSK = bytes(32)
WALL = 1_700_000_000_000  # Unix ms at virtual time 0
CONV = 0x1234ABCD
CLIENT_ADDR = ("192.0.2.1", 40000)
SERVER_ADDR = ("198.51.100.2", 4000)
LOG = "portfwd.tunnel.session"


def make_config(**overrides: Any) -> TunnelConfig:
    overrides.setdefault("psk", PSK)
    overrides.setdefault("confirm_delay_ms", 0)  # the confirmation PINGs at once: exact counts
    return TunnelConfig(**overrides)


@dataclass
class Pair:
    client: TunnelSession
    server: TunnelSession
    acceptor: HandshakeAcceptor
    hello: bytes
    welcome: bytes
    rng: random.Random = field(repr=False)


def addr_of(session: TunnelSession) -> tuple[str, int]:
    return CLIENT_ADDR if session.is_client else SERVER_ADDR


def transfer(sender: TunnelSession, receiver: TunnelSession, now: int = 0) -> int:
    """Deliver everything ``sender`` has to ``receiver``; returns the datagram count."""
    datagrams = sender.datagrams_to_send(now)
    for datagram in datagrams:
        receiver.receive_datagram(datagram, addr_of(sender), now)
    return len(datagrams)


def roundtrip(a: TunnelSession, b: TunnelSession, now: int = 0) -> tuple[int, int]:
    return transfer(a, b, now), transfer(b, a, now)


def drop(sender: TunnelSession, now: int = 0) -> int:
    return len(sender.datagrams_to_send(now))


def drain(session: TunnelSession) -> list[events.Event]:
    out = []
    while (event := session.next_event()) is not None:
        out.append(event)
    return out


def client_and_server(seed: int = 0, **overrides: Any) -> Pair:
    config = make_config(**overrides)
    rng = random.Random(seed)
    client = TunnelSession.client(config, CONV, SERVER_ADDR, 0, WALL, rng.randbytes)
    acceptor = HandshakeAcceptor(config, rng.randbytes)
    [hello] = client.datagrams_to_send(0)
    server = acceptor.accept(hello, CLIENT_ADDR, 0, WALL)
    assert server is not None
    assert server.datagrams_to_send(0) == []  # nothing on the path before confirmation
    [(welcome, to)] = server.probes_to_send()
    assert to == CLIENT_ADDR
    client.receive_datagram(welcome, SERVER_ADDR, 0)
    assert drain(client) == [HandshakeCompleted(CONV)]
    assert drain(server) == []  # not established until the client proves its keys
    [confirm] = client.datagrams_to_send(0)  # a sealed PING
    server.receive_datagram(confirm, CLIENT_ADDR, 0)
    assert drain(server) == [HandshakeCompleted(CONV)]
    [answer] = server.datagrams_to_send(0)  # a sealed PING back: the client is confirmed too
    client.receive_datagram(answer, SERVER_ADDR, 0)
    assert client.confirmed and server.confirmed
    return Pair(client, server, acceptor, hello, welcome, rng)


def payloads(session: TunnelSession) -> list[bytes]:
    return [e.data for e in drain(session) if isinstance(e, DatagramReceived)]


# --- handshake --------------------------------------------------------------------------------

def test_handshake_success() -> None:
    p = client_and_server()
    assert len(p.hello) == wire.HELLO_SIZE == 128
    assert len(p.welcome) == wire.WELCOME_SIZE == 54
    assert p.client.established and p.server.established
    assert p.client.epoch == p.server.epoch == 0
    assert p.server.peer_addr == CLIENT_ADDR and p.client.peer_addr == SERVER_ADDR
    assert p.client.send_seq == p.server.send_seq == 1  # each side's confirmation PING
    assert p.client.get_timer() == 10000  # keepalive (the idle timeout is later)
    assert p.acceptor.accepted == 1


def test_wrong_psk_creates_nothing_and_sends_nothing() -> None:
    rng = random.Random(1)
    client = TunnelSession.client(make_config(psk=OTHER_PSK), CONV, SERVER_ADDR, 0, WALL,
                                  rng.randbytes)
    acceptor = HandshakeAcceptor(make_config(), rng.randbytes)
    [hello] = client.datagrams_to_send(0)
    assert acceptor.accept(hello, CLIENT_ADDR, 0, WALL) is None
    assert acceptor.dropped_auth == 1
    assert acceptor.accepted == 0 and acceptor.cache_size == 0


def test_plaintext_client_cannot_open_encrypted_server() -> None:
    client = TunnelSession.client(make_config(psk=None), CONV, SERVER_ADDR, 0, WALL)
    acceptor = HandshakeAcceptor(make_config())
    assert acceptor.accept(client.datagrams_to_send(0)[0], CLIENT_ADDR, 0, WALL) is None
    assert acceptor.dropped_auth == 1


def test_wrong_psk_welcome_is_ignored_by_client() -> None:
    p = client_and_server()
    rng = random.Random(2)
    client = TunnelSession.client(make_config(psk=OTHER_PSK), CONV, SERVER_ADDR, 0, WALL,
                                  rng.randbytes)
    client.datagrams_to_send(0)
    client.receive_datagram(p.welcome, SERVER_ADDR, 0)
    assert not client.established and client.dropped_auth == 1
    assert client.datagrams_to_send(0) == []


@pytest.mark.parametrize("skew", [-30001, 30001, -10**9])
def test_stale_hello_rejected(skew: int) -> None:
    client = TunnelSession.client(make_config(), CONV, SERVER_ADDR, 0, WALL + skew)
    acceptor = HandshakeAcceptor(make_config())
    assert acceptor.accept(client.datagrams_to_send(0)[0], CLIENT_ADDR, 0, WALL) is None
    assert acceptor.dropped_stale == 1


@pytest.mark.parametrize("skew", [-30000, 0, 30000])
def test_hello_inside_timestamp_window_accepted(skew: int) -> None:
    client = TunnelSession.client(make_config(), CONV, SERVER_ADDR, 0, WALL + skew)
    acceptor = HandshakeAcceptor(make_config())
    assert acceptor.accept(client.datagrams_to_send(0)[0], CLIENT_ADDR, 0, WALL) is not None


def test_replayed_hello_creates_no_second_session() -> None:
    p = client_and_server()
    # The driver forgot the conv (session closed); a replay reaches the acceptor again,
    # from the same or from another address.
    assert p.acceptor.accept(p.hello, CLIENT_ADDR, 1000, WALL + 1000) is None
    assert p.acceptor.accept(p.hello, ("203.0.113.9", 1), 1000, WALL + 1000) is None
    assert p.acceptor.dropped_replay == 2
    # Much later the cache entry is gone, but the timestamp is stale by then.
    assert p.acceptor.accept(p.hello, CLIENT_ADDR, 60001, WALL + 60001) is None
    assert p.acceptor.dropped_stale == 1
    assert p.acceptor.accepted == 1


def test_hello_cache_is_bounded_in_size_and_time() -> None:
    config = make_config(hello_cache_size=3)
    acceptor = HandshakeAcceptor(config, random.Random(3).randbytes)
    rng = random.Random(4)

    def hello(wall: int) -> bytes:
        return TunnelSession.client(config, rng.getrandbits(32), SERVER_ADDR, 0, wall,
                                    rng.randbytes).datagrams_to_send(0)[0]

    for _ in range(3):
        assert acceptor.accept(hello(WALL), CLIENT_ADDR, 0, WALL) is not None
    assert acceptor.accept(hello(WALL), CLIENT_ADDR, 0, WALL) is None  # fail closed
    assert acceptor.dropped_cache_full == 1 and acceptor.cache_size == 3
    later = WALL + 2 * config.timestamp_window_ms + 1
    assert acceptor.accept(hello(later), CLIENT_ADDR, 0, later) is not None
    assert acceptor.cache_size == 1


def hello_from(config: TunnelConfig, rng: random.Random, forged: bool = False) -> bytes:
    data = bytearray(TunnelSession.client(config, rng.getrandbits(32), SERVER_ADDR, 0, WALL,
                                          rng.randbytes).datagrams_to_send(0)[0])
    if forged:
        data[-1] ^= 1  # bad MAC
    return bytes(data)


def test_forged_hellos_get_nothing_and_lock_nobody_out() -> None:
    """Without the PSK a HELLO fails its MAC: no state, no answer, no budget spent, so a flood of
    forgeries from (or spoofing) a client's own address cannot keep it out."""
    config = make_config(hello_verify_rate_per_s=5)
    acceptor = HandshakeAcceptor(config, random.Random(5).randbytes)
    rng = random.Random(6)
    victim = ("203.0.113.99", 4000)
    for _ in range(1000):
        assert acceptor.accept(hello_from(config, rng, forged=True), victim, 0, WALL) is None
    assert acceptor.dropped_auth == 1000 and acceptor.replies_to_send() == []
    assert acceptor.accept(hello_from(config, rng), victim, 0, WALL) is not None


def test_forgery_screen_drops_forgeries_and_passes_the_rest(caplog) -> None:
    """A receive loop's screen (run before source addresses are decoded): a HELLO that fails
    its MAC is dropped and counted; a valid HELLO and anything that is not HELLO-shaped pass.
    While a "handshake rejected" line is due, the batch's first forgery passes too, so the
    acceptor logs it with its source; the rest of the batch is dropped."""
    config = make_config()
    acceptor = HandshakeAcceptor(config, random.Random(7).randbytes)
    rng = random.Random(8)
    clock = [0]
    screen = acceptor.forgery_screen(lambda: clock[0])
    forgeries = [hello_from(config, rng, forged=True) for _ in range(3)]
    valid = hello_from(config, rng)
    assert [screen(d) for d in forgeries] == [False, True, True]  # the first one: a line is due
    assert acceptor.dropped_auth == 2
    with caplog.at_level(logging.WARNING, logger="portfwd.tunnel.handshake"):
        assert acceptor.accept(forgeries[0], CLIENT_ADDR, 0, WALL) is None
    assert acceptor.dropped_auth == 3 and "bad MAC" in caplog.text
    assert CLIENT_ADDR[0] in caplog.text  # the line names the source
    screen = acceptor.forgery_screen(lambda: clock[0])  # the next batch: no line due now
    assert not screen(valid) and not screen(b"\x02" + bytes(40)) and not screen(b"")
    assert screen(forgeries[0]) and acceptor.dropped_auth == 4
    clock[0] = 10**6  # the interval has passed: the batch's first forgery goes on to be logged
    screen = acceptor.forgery_screen(lambda: clock[0])
    assert [screen(d) for d in forgeries] == [False, True, True]
    assert acceptor.accept(valid, CLIENT_ADDR, 0, WALL) is not None  # nothing was spent on it


def test_over_budget_a_valid_hello_gets_a_cookie_and_its_retry_is_taken() -> None:
    config = make_config(hello_verify_rate_per_s=1)
    acceptor = HandshakeAcceptor(config, random.Random(5).randbytes)
    rng = random.Random(6)
    attacker, victim = ("203.0.113.7", 1), ("203.0.113.99", 4000)
    assert acceptor.accept(hello_from(config, rng), attacker, 0, WALL) is not None  # the budget
    # Over budget: the victim's valid HELLO makes no session but gets a cookie, smaller than it.
    client = TunnelSession.client(config, CONV, SERVER_ADDR, 0, WALL, rng.randbytes)
    [hello] = client.datagrams_to_send(0)
    assert acceptor.accept(hello, victim, 0, WALL) is None
    [(reply, to)] = acceptor.replies_to_send()
    assert to == victim and len(reply) == wire.COOKIE_REPLY_SIZE < len(hello)
    # The client repeats its HELLO with the cookie at once, and that one is taken.
    client.receive_datagram(reply, SERVER_ADDR, 1)
    [again] = client.datagrams_to_send(1)
    assert client.hellos.cookie != wire.NO_COOKIE and client.cookies_received == 1
    assert acceptor.accept(again, victim, 1, WALL + 1) is not None
    assert acceptor.cookie_hellos == 1
    # The cookie belongs to the victim's address: from the attacker's it proves nothing.
    stolen = TunnelSession.client(config, 77, SERVER_ADDR, 2, WALL + 2, rng.randbytes,
                                  cookie=client.hellos.cookie).datagrams_to_send(2)[0]
    assert acceptor.accept(stolen, attacker, 2, WALL + 2) is None
    assert [to for _, to in acceptor.replies_to_send()] == [attacker]
    # A COOKIE for another HELLO, or for another conv, is ignored by the client.
    other = TunnelSession.client(config, CONV, SERVER_ADDR, 0, WALL, rng.randbytes)
    other.datagrams_to_send(0)
    other.receive_datagram(reply, SERVER_ADDR, 3)
    assert other.hellos.cookie == wire.NO_COOKIE and other.datagrams_to_send(3) == []


def test_over_the_verify_budget_cookies_keep_to_the_reply_budget() -> None:
    config = make_config(hello_verify_rate_per_s=2, cookie_reply_rate_per_s=3)
    acceptor = HandshakeAcceptor(config, random.Random(5).randbytes)
    rng = random.Random(7)
    sources = [(f"198.18.{i}.1", 1000 + i) for i in range(10)]  # replaying PSK holders, say
    results = [acceptor.accept(hello_from(config, rng), src, 0, WALL) for src in sources]
    assert [r is not None for r in results] == [True, True] + [False] * 8
    assert acceptor.cookies_sent == 3 and acceptor.dropped_load == 5
    replies = acceptor.replies_to_send()
    assert [to for _, to in replies] == sources[2:5]
    assert all(len(reply) < wire.HELLO_SIZE for reply, _ in replies)
    # A second later the budgets have refilled.
    assert acceptor.accept(hello_from(config, rng), CLIENT_ADDR, 1000, WALL + 1000) is not None


def test_replays_spend_no_budget() -> None:
    config = make_config(hello_verify_rate_per_s=1)
    acceptor = HandshakeAcceptor(config, random.Random(5).randbytes)
    rng = random.Random(8)
    hello = hello_from(config, rng)
    assert acceptor.accept(hello, CLIENT_ADDR, 0, WALL) is not None
    for i in range(100):
        assert acceptor.accept(hello, (f"198.18.0.{i}", 9), 500, WALL + 500) is None
    assert acceptor.dropped_replay == 100 and acceptor.replies_to_send() == []
    assert acceptor.accept(hello_from(config, rng), CLIENT_ADDR, 1000, WALL + 1000) is not None


def test_hello_retransmitted_on_loss() -> None:
    rng = random.Random(7)
    config = make_config()
    client = TunnelSession.client(config, CONV, SERVER_ADDR, 0, WALL, rng.randbytes)
    [first] = client.datagrams_to_send(0)
    assert client.get_timer() == 250
    client.handle_timer(250)
    [second] = client.datagrams_to_send(250)
    # A fresh HELLO, never a copy: new key share and timestamp.
    assert wire.unpack_hello(second).client_share != wire.unpack_hello(first).client_share
    assert wire.unpack_hello(second).timestamp_ms == wire.unpack_hello(first).timestamp_ms + 250
    assert client.get_timer() == 750
    acceptor = HandshakeAcceptor(config, rng.randbytes)
    server = acceptor.accept(first, CLIENT_ADDR, 260, WALL + 260)
    # A WELCOME to the first HELLO still completes the handshake after the retry.
    [(welcome, _)] = server.probes_to_send()
    client.receive_datagram(welcome, SERVER_ADDR, 270)
    assert client.established


def test_handshake_timeout() -> None:
    client = TunnelSession.client(make_config(), CONV, SERVER_ADDR, 0, WALL)
    sent = drop(client)
    now = 0
    while (timer := client.get_timer()) is not None:
        assert timer > now
        now = timer
        client.handle_timer(now)
        sent += drop(client, now)
    assert now == 10000
    assert sent == 8  # at 0, 250, 750, 1750, 3750, 5750, 7750, 9750
    assert drain(client) == [ConnectionClosed(CLOSE_HANDSHAKE_TIMEOUT, by_peer=False)]


def test_copy_of_hello_gets_same_welcome_from_any_address_and_first_sealed_packet_wins() -> None:
    rng = random.Random(5)
    config = make_config()
    client = TunnelSession.client(config, CONV, SERVER_ADDR, 0, WALL, rng.randbytes)
    [hello] = client.datagrams_to_send(0)
    racer = ("203.0.113.9", 9)
    # A copy raced in from elsewhere arrives first and opens the session...
    server = HandshakeAcceptor(config, rng.randbytes).accept(hello, racer, 0, WALL)
    [(welcome, to)] = server.probes_to_send()
    assert to == racer and len(welcome) < len(hello)
    # ...the real client's own HELLO gets the very same WELCOME, at its own address.
    server.receive_datagram(hello, CLIENT_ADDR, 1)
    assert server.probes_to_send() == [(welcome, CLIENT_ADDR)]
    assert server.welcomes_resent == 1 and server.datagrams_to_send(1) == []
    assert drain(server) == []  # nothing established, nothing for the driver to dial
    client.receive_datagram(welcome, SERVER_ADDR, 2)
    transfer(client, server, 3)  # the client's confirmation fixes the path
    assert server.confirmed and server.peer_addr == CLIENT_ADDR
    assert drain(server) == [HandshakeCompleted(CONV)]
    # Once confirmed, a HELLO is a replay: no answer to anyone.
    server.receive_datagram(hello, racer, 4)
    assert server.probes_to_send() == [] and server.datagrams_to_send(4) != [welcome]
    assert server.dropped_replay == 1


def test_unconfirmed_server_sends_nothing_but_welcomes_and_expires() -> None:
    rng = random.Random(6)
    config = make_config()
    client = TunnelSession.client(config, CONV, SERVER_ADDR, 0, WALL, rng.randbytes)
    [hello] = client.datagrams_to_send(0)
    server = HandshakeAcceptor(config, rng.randbytes).accept(hello, CLIENT_ADDR, 0, WALL)
    server.send_datagram(b"target banner")  # what a server that speaks first would send
    assert not server.established
    sent = len(server.probes_to_send()[0][0])
    now = 0
    while (timer := server.get_timer()) is not None:  # a replayed HELLO: nobody confirms
        now = timer
        server.handle_timer(now)
        sent += sum(len(d) for d in server.datagrams_to_send(now))
        sent += sum(len(d) for d, _ in server.probes_to_send())
    assert now == config.handshake_timeout_ms
    assert sent == wire.WELCOME_SIZE  # one WELCOME for one HELLO, nothing else, ever
    assert drain(server) == [ConnectionClosed(CLOSE_HANDSHAKE_TIMEOUT, by_peer=False)]


def test_unconfirmed_server_expires_at_idle_timeout_if_shorter() -> None:
    # kcptcp --keepalive 3 sets idle_timeout_ms = 3000: an unconfirmed session, which has heard
    # nothing authenticated at all, is not held for the longer handshake timeout.
    rng = random.Random(7)
    config = make_config(idle_timeout_ms=3000)
    client = TunnelSession.client(config, CONV, SERVER_ADDR, 0, WALL, rng.randbytes)
    [hello] = client.datagrams_to_send(0)
    server = HandshakeAcceptor(config, rng.randbytes).accept(hello, CLIENT_ADDR, 0, WALL)
    assert server.get_timer() == 3000
    server.handle_timer(3000)
    assert drain(server) == [ConnectionClosed(CLOSE_HANDSHAKE_TIMEOUT, by_peer=False)]


def test_hello_stamped_before_server_start_is_refused() -> None:
    rng = random.Random(9)
    config = make_config()
    client = TunnelSession.client(config, CONV, SERVER_ADDR, 0, WALL, rng.randbytes)
    [hello] = client.datagrams_to_send(0)
    restarted = HandshakeAcceptor(config, rng.randbytes, started_wall_ms=WALL + 1)
    assert restarted.accept(hello, CLIENT_ADDR, 0, WALL + 5) is None
    assert restarted.dropped_before_start == 1
    client.handle_timer(250)  # the client's retry is stamped after the restart
    [retry] = client.datagrams_to_send(250)
    assert restarted.accept(retry, CLIENT_ADDR, 250, WALL + 255) is not None


def test_payloads_queued_before_handshake_flow_after() -> None:
    rng = random.Random(8)
    config = make_config(max_pending_payloads=2)
    client = TunnelSession.client(config, CONV, SERVER_ADDR, 0, WALL, rng.randbytes)
    for payload in (b"a", b"b", b"c"):
        client.send_datagram(payload)
    assert client.dropped_send_queue == 1
    [hello] = client.datagrams_to_send(0)
    server = HandshakeAcceptor(config, rng.randbytes).accept(hello, CLIENT_ADDR, 0, WALL)
    [(welcome, _)] = server.probes_to_send()
    client.receive_datagram(welcome, SERVER_ADDR, 0)
    assert transfer(client, server) == 2  # the payloads confirm: no PING needed
    assert payloads(server) == [b"a", b"b"]


# --- data -------------------------------------------------------------------------------------

def test_data_both_ways() -> None:
    p = client_and_server()
    p.client.send_datagram(b"ping")
    p.server.send_datagram(b"pong")
    p.server.send_datagram(b"")
    assert roundtrip(p.client, p.server, 5) == (1, 2)
    assert payloads(p.server) == [b"ping"]
    assert payloads(p.client) == [b"pong", b""]
    assert p.client.send_seq == 2 and p.server.send_seq == 3


def test_replayed_data_dropped() -> None:
    p = client_and_server()
    p.client.send_datagram(b"once")
    [datagram] = p.client.datagrams_to_send(1)
    for _ in range(3):
        p.server.receive_datagram(datagram, CLIENT_ADDR, 1)
    assert payloads(p.server) == [b"once"]
    assert p.server.dropped_replay == 2
    assert p.server.datagrams_to_send(1) == []


def test_reordered_data_inside_window_delivered_once() -> None:
    p = client_and_server()
    for i in range(100):
        p.client.send_datagram(b"%d" % i)
    datagrams = p.client.datagrams_to_send(1)
    order = list(range(100))
    random.Random(9).shuffle(order)
    for i in order + order[:10]:
        p.server.receive_datagram(datagrams[i], CLIENT_ADDR, 1)
    assert sorted(payloads(p.server), key=int) == [b"%d" % i for i in range(100)]
    assert p.server.dropped_replay == 10


def test_peer_address_changes_only_on_authenticated_packets() -> None:
    p = client_and_server()
    new_addr = ("192.0.2.77", 50000)
    p.client.send_datagram(b"a")
    [first] = p.client.datagrams_to_send(1)
    p.server.receive_datagram(first, CLIENT_ADDR, 1)
    # Forged, garbage and replayed packets from elsewhere do not move the session.
    forged = bytearray(first)
    forged[-1] ^= 1
    forged[5:9] = (7).to_bytes(4, "big")
    p.server.receive_datagram(bytes(forged), new_addr, 2)
    junk = b"\x03" + CONV.to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes(36)
    p.server.receive_datagram(junk, new_addr, 2)
    p.server.receive_datagram(first, new_addr, 2)
    assert p.server.peer_addr == CLIENT_ADDR
    assert p.server.dropped_auth == 2 and p.server.dropped_replay == 1
    assert p.server.probes_to_send() == []
    # A fresh authenticated packet from the new address (NAT rebinding) is delivered, and the
    # new address is challenged; replies keep going to the old path meanwhile.
    p.client.send_datagram(b"b")
    [second] = p.client.datagrams_to_send(3)
    p.server.receive_datagram(second, new_addr, 3)
    assert p.server.peer_addr == CLIENT_ADDR
    [(challenge, to)] = p.server.probes_to_send()
    assert to == new_addr and len(challenge) <= 3 * len(second)
    p.server.send_datagram(b"reply")
    assert len(p.server.datagrams_to_send(3)) == 1  # still to CLIENT_ADDR
    # The client, now behind new_addr, answers the challenge: the path moves.
    p.client.receive_datagram(challenge, SERVER_ADDR, 4)
    [response] = p.client.datagrams_to_send(4)  # to where the challenge came from: its path
    p.server.receive_datagram(response, new_addr, 5)
    assert p.server.peer_addr == new_addr
    assert drain(p.server) == [DatagramReceived(b"a"), DatagramReceived(b"b"),
                               PeerAddressChanged(CLIENT_ADDR, new_addr)]


def test_copies_from_another_address_cannot_move_or_flood_the_path() -> None:
    """A man-on-the-side re-sends client datagrams from its own address (before the
    originals, so they authenticate): the data is delivered once, the path never moves, and
    the attacker's address gets only challenges, at most 3x what it sent and once per 250 ms."""
    p = client_and_server()
    attacker = ("203.0.113.66", 6666)
    injected = sent_there = 0
    for now in range(10, 5010, 10):
        p.client.send_datagram(b"x" * 1000)
        [datagram] = p.client.datagrams_to_send(now)
        if now % 100 == 0:  # one in ten, raced from the attacker's address
            p.server.receive_datagram(datagram, attacker, now)
            injected += len(datagram)
        p.server.receive_datagram(datagram, CLIENT_ADDR, now)
        p.server.send_datagram(b"y" * 1000)
        p.server.datagrams_to_send(now)
        for probe, to in p.server.probes_to_send():
            assert to == attacker
            sent_there += len(probe)
    assert p.server.peer_addr == CLIENT_ADDR
    assert len(payloads(p.server)) == 500  # every datagram delivered exactly once
    assert 0 < sent_there <= 3 * injected and sent_there <= 21 * 33  # 5 s / 250 ms challenges


def test_close_is_authenticated_and_prompt() -> None:
    p = client_and_server()
    p.client.close()
    p.client.close()  # idempotent
    assert drain(p.client) == [ConnectionClosed(CLOSE_LOCAL, by_peer=False)]
    [close] = p.client.datagrams_to_send(1)
    assert unpack_header(close).ptype is wire.PacketType.CLOSE
    forged = close[:-1] + bytes([close[-1] ^ 1])
    p.server.receive_datagram(forged, CLIENT_ADDR, 2)
    assert p.server.established
    p.server.receive_datagram(close, CLIENT_ADDR, 2)
    assert drain(p.server) == [ConnectionClosed(CLOSE_BY_PEER, by_peer=True)]
    assert p.server.closed and p.server.datagrams_to_send(2) == []
    assert p.server.get_timer() is None and p.client.get_timer() is None
    p.client.send_datagram(b"ignored after close")
    assert p.client.datagrams_to_send(3) == []
    p.server.receive_datagram(close, CLIENT_ADDR, 3)
    assert p.server.dropped_stale == 1


def test_misuse_raises_value_error() -> None:
    p = client_and_server()
    with pytest.raises(ValueError):
        p.client.send_datagram(bytes(MAX_PAYLOAD_SIZE + 1))
    p.client.send_datagram(bytes(MAX_PAYLOAD_SIZE))
    with pytest.raises(ValueError):
        TunnelConfig(psk=b"short")
    with pytest.raises(ValueError):
        TunnelConfig(rekey_seq_threshold=0)
    with pytest.raises(ValueError):
        TunnelConfig(replay_window=0)
    with pytest.raises(ValueError):
        TunnelSession.client(make_config(), 2**32, SERVER_ADDR, 0, WALL)


# --- keepalive / idle -------------------------------------------------------------------------

def test_keepalive_ping_keeps_both_sides_alive() -> None:
    p = client_and_server()
    now = 0
    for _ in range(20):  # 200 s of idle tunnel
        now = min(p.client.get_timer(), p.server.get_timer())
        for side in (p.client, p.server):
            if side.get_timer() <= now:
                side.handle_timer(now)
        roundtrip(p.client, p.server, now)
    assert now >= 190000
    assert p.client.established and p.server.established
    assert drain(p.client) == [] and drain(p.server) == []


def test_keepalive_is_one_small_ping() -> None:
    p = client_and_server()
    assert p.server.get_timer() == 10000
    p.server.handle_timer(10000)
    [ping] = p.server.datagrams_to_send(10000)
    assert len(ping) == wire.HEADER_SIZE + 16
    assert unpack_header(ping).ptype is wire.PacketType.PING
    p.client.receive_datagram(ping, SERVER_ADDR, 10000)
    assert drain(p.client) == [] and p.client.datagrams_received == 3  # WELCOME, PING, PING


def test_idle_timeout_closes_silent_peer() -> None:
    p = client_and_server()
    now = 0
    while p.client.established:
        now = p.client.get_timer()
        p.client.handle_timer(now)
        drop(p.client, now)
    assert now == 30000
    assert drain(p.client) == [ConnectionClosed(CLOSE_PEER_SILENT, by_peer=False)]


# --- rekey ------------------------------------------------------------------------------------

def rekey_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG and r.levelno >= logging.INFO]


def test_rekey_normal_path(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    p = client_and_server(rekey_seq_threshold=11)
    for i in range(12):
        p.client.send_datagram(b"%d" % i)
    datagrams = p.client.datagrams_to_send(100)
    assert len(datagrams) == 13  # 10 DATA at 1-10, REKEY_INIT at send_seq 11, 2 DATA at 12, 13
    init = unpack_header(datagrams[10])
    assert (init.ptype, init.seq, init.phase) == (wire.PacketType.REKEY_INIT, 11, 0)
    assert p.client.rekey_in_progress
    for datagram in datagrams:
        p.server.receive_datagram(datagram, CLIENT_ADDR, 100)
    [ack] = p.server.datagrams_to_send(100)
    assert unpack_header(ack) == Header(wire.PacketType.REKEY_ACK, 1, CONV, 0)
    p.client.receive_datagram(ack, SERVER_ADDR, 101)
    assert rekey_lines(caplog) == [
        f"rekey trigger conv={CONV} epoch=0->1 send_seq=11 deadline=5100",
        f"recv REKEY_INIT conv={CONV} seq=11",
        f"epoch switch conv={CONV} -> epoch=1",
        f"recv REKEY_ACK conv={CONV}",
        f"epoch switch conv={CONV} -> epoch=1",
    ]
    assert p.client.epoch == p.server.epoch == 1
    assert p.client.send_seq == 0 and p.server.send_seq == 1
    assert not p.client.rekey_in_progress
    assert drain(p.client) == [RekeyStarted(0, 11, 5100), EpochSwitched(1)]
    assert payloads(p.server) == [b"%d" % i for i in range(12)]
    # Traffic continues in epoch 1 with the phase bit set.
    p.client.send_datagram(b"new epoch")
    [datagram] = p.client.datagrams_to_send(102)
    assert unpack_header(datagram).phase == 1
    p.server.receive_datagram(datagram, CLIENT_ADDR, 102)
    assert payloads(p.server) == [b"new epoch"]


def test_rekey_many_epochs_and_simultaneous_triggers() -> None:
    p = client_and_server(rekey_seq_threshold=7)
    for step in range(200):
        p.client.send_datagram(b"c%d" % step)
        p.server.send_datagram(b"s%d" % step)
        roundtrip(p.client, p.server, step)
        roundtrip(p.client, p.server, step)
    assert payloads(p.server) == [b"c%d" % i for i in range(200)]
    assert payloads(p.client) == [b"s%d" % i for i in range(200)]
    assert p.client.epoch == p.server.epoch >= 20
    for side in (p.client, p.server):
        assert side.dropped_auth == side.dropped_replay == side.dropped_stale == 0


def test_rekey_timeout(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    p = client_and_server(rekey_seq_threshold=3)
    for i in range(4):
        p.client.send_datagram(b"%d" % i)
    assert drop(p.client, 1000) == 5  # the server is stopped (SIGSTOP in it_kcp timeout)
    now = 1000
    retries = 0
    while p.client.established:
        now = p.client.get_timer()
        p.client.handle_timer(now)
        for datagram in p.client.datagrams_to_send(now):
            retries += unpack_header(datagram).ptype is wire.PacketType.REKEY_INIT
    assert now == 6000
    assert retries == 9  # REKEY_INIT repeated every 500 ms, from 1500 to 5500
    assert rekey_lines(caplog)[-1] == f"rekey timeout, closing conv={CONV}"
    assert drain(p.client)[-1] == ConnectionClosed(CLOSE_REKEY_TIMEOUT, by_peer=False)


def test_rekey_init_lost_then_repeated() -> None:
    p = client_and_server(rekey_seq_threshold=3)
    for i in range(3):
        p.client.send_datagram(b"%d" % i)
    datagrams = p.client.datagrams_to_send(0)
    for datagram in datagrams[:2] + datagrams[3:]:  # the REKEY_INIT is lost
        p.server.receive_datagram(datagram, CLIENT_ADDR, 0)
    assert p.server.epoch == 0
    assert p.client.get_timer() == 500
    p.client.handle_timer(500)
    transfer(p.client, p.server, 500)
    transfer(p.server, p.client, 500)
    assert p.client.epoch == p.server.epoch == 1


def test_rekey_ack_lost_initiator_repeats_and_gets_fresh_ack() -> None:
    p = client_and_server(rekey_seq_threshold=3)
    for i in range(3):
        p.client.send_datagram(b"%d" % i)
    transfer(p.client, p.server, 0)
    assert p.server.epoch == 1
    assert drop(p.server, 0) == 1  # the REKEY_ACK (seq 0) is lost
    p.client.handle_timer(500)  # REKEY_INIT again, still under epoch 0
    transfer(p.client, p.server, 500)
    [reack] = p.server.datagrams_to_send(500)
    # Seq 0 of epoch 1 is spent: the repeated ACK must use a fresh seq (no nonce reuse).
    assert unpack_header(reack) == Header(wire.PacketType.REKEY_ACK, 1, CONV, 1)
    p.client.receive_datagram(reack, SERVER_ADDR, 500)
    assert p.client.epoch == 1 and not p.client.rekey_in_progress


def test_rekey_ack_lost_new_epoch_data_is_implicit_ack() -> None:
    p = client_and_server(rekey_seq_threshold=3)
    for i in range(3):
        p.client.send_datagram(b"%d" % i)
    transfer(p.client, p.server, 0)
    drop(p.server, 0)
    p.server.send_datagram(b"from epoch 1")
    transfer(p.server, p.client, 10)
    assert p.client.epoch == 1 and not p.client.rekey_in_progress
    assert payloads(p.client) == [b"from epoch 1"]


def test_wraparound_guard(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOG)
    start = 0xFFFFFFF0
    p = client_and_server(rekey_seq_threshold=start, initial_send_seq=start)
    for i in range(20):
        p.client.send_datagram(b"%d" % i)
    datagrams = p.client.datagrams_to_send(0)  # the peer never answers the REKEY_INIT
    assert len(datagrams) == 14  # INIT at ...F1, DATA ...F2 to ...FE; ...FF is never used
    assert unpack_header(datagrams[-1]).seq == 0xFFFFFFFE
    assert rekey_lines(caplog)[-1] == f"send_seq wraparound guard hit, closing conv={CONV}"
    assert drain(p.client)[-1] == ConnectionClosed(CLOSE_WRAPAROUND, by_peer=False)
    assert p.client.closed


def test_grace_period_opens_late_old_epoch_packets() -> None:
    # The grace period may not be shorter than the rekey timeout (TunnelConfig checks).
    p = client_and_server(rekey_seq_threshold=4, rekey_grace_ms=2000, rekey_timeout_ms=2000)
    for i in range(6):
        p.client.send_datagram(b"%d" % i)
    datagrams = p.client.datagrams_to_send(0)  # DATA 0-3, INIT 4, DATA 5-6
    late_early, late_later = datagrams[1], datagrams[2]
    for datagram in datagrams[:1] + datagrams[3:]:
        p.server.receive_datagram(datagram, CLIENT_ADDR, 0)
    transfer(p.server, p.client, 0)  # REKEY_ACK
    assert p.client.epoch == p.server.epoch == 1
    drain(p.server)
    p.server.receive_datagram(late_early, CLIENT_ADDR, 1999)
    p.server.receive_datagram(late_early, CLIENT_ADDR, 1999)  # replay inside the grace period
    assert payloads(p.server) == [b"1"]
    assert p.server.dropped_replay == 1
    p.server.receive_datagram(late_later, CLIENT_ADDR, 2000)  # grace over
    assert payloads(p.server) == []
    assert p.server.dropped_stale == 1


# --- plaintext --------------------------------------------------------------------------------

def test_plaintext_mode() -> None:
    p = client_and_server(psk=None, rekey_seq_threshold=4)
    assert p.client.overhead == 9
    for i in range(5):
        p.client.send_datagram(b"clear %d" % i)
    datagrams = p.client.datagrams_to_send(1)
    assert datagrams[0] == pack_header(wire.PacketType.DATA, 0, CONV, 1) + b"clear 0"
    for datagram in datagrams:
        p.server.receive_datagram(datagram, CLIENT_ADDR, 1)
    transfer(p.server, p.client, 1)
    assert payloads(p.server) == [b"clear %d" % i for i in range(5)]
    assert p.client.epoch == p.server.epoch == 1


# --- hostile input ----------------------------------------------------------------------------

def _mutations(rng: random.Random, valid: list[bytes], count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        base = rng.choice(valid)
        kind = rng.randrange(4)
        if kind == 0:
            out.append(rng.randbytes(rng.randrange(0, 200)))
        elif kind == 1:
            out.append(base[:rng.randrange(len(base))])
        elif kind == 2:
            flipped = bytearray(base)
            for _ in range(rng.randrange(1, 4)):
                bit = rng.randrange(len(flipped) * 8)
                flipped[bit // 8] ^= 1 << (bit % 8)
            out.append(bytes(flipped))
        else:
            out.append(base + rng.randbytes(rng.randrange(1, 50)))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_garbage_never_raises_and_never_gets_a_reply(seed: int) -> None:
    rng = random.Random(seed)
    p = client_and_server(seed)
    for i in range(10):
        p.client.send_datagram(b"c%d" % i)
        p.server.send_datagram(b"s%d" % i)
    valid = p.client.datagrams_to_send(1) + p.server.datagrams_to_send(1)
    valid += [p.hello, p.welcome]
    fuzz = _mutations(rng, valid, 2000)
    fuzz = [d for d in fuzz if d not in valid]
    waiting = TunnelSession.client(make_config(), CONV, SERVER_ADDR, 0, WALL, rng.randbytes)
    hello = waiting.datagrams_to_send(0)[0]
    for datagram in fuzz:
        for side in (p.client, p.server, waiting):
            side.receive_datagram(datagram, ("203.0.113.66", 6666), 2)
            assert side.datagrams_to_send(2) == []
        assert p.acceptor.accept(datagram, ("203.0.113.66", 6666), 2, WALL) is None
    for side in (p.client, p.server):
        assert side.peer_addr == addr_of(p.server if side is p.client else p.client)
        assert side.established and drain(side) == []
        dropped = side.dropped_auth + side.dropped_malformed + side.dropped_replay
        assert dropped + side.dropped_stale == len(fuzz)
    assert p.acceptor.accepted == 1 and p.acceptor.dropped_auth > 0
    assert not waiting.established and drain(waiting) == []
    assert waiting.datagrams_to_send(2) == [] and hello
    # The valid traffic still gets through afterwards.
    for datagram in valid[:10]:
        p.server.receive_datagram(datagram, CLIENT_ADDR, 3)
    assert payloads(p.server) == [b"c%d" % i for i in range(10)]


_FUZZ_PAIR = client_and_server(99)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), prefix=st.sampled_from([b"", bytes([1]), bytes([2]),
                                                            bytes([3]), bytes([0x84])]))
def test_any_bytes_never_raise_never_reply(data: bytes, prefix: bytes) -> None:
    datagram = prefix + CONV.to_bytes(4, "big") + data if prefix else data
    p = _FUZZ_PAIR
    for side in (p.client, p.server):
        side.receive_datagram(datagram, ("203.0.113.5", 5), 1)
        assert side.datagrams_to_send(1) == [] and side.next_event() is None
        assert side.established
    assert p.acceptor.accept(datagram, ("203.0.113.5", 5), 1, WALL) is None


def test_truncated_datagrams_byte_at_a_time() -> None:
    p = client_and_server()
    p.client.send_datagram(b"x" * 40)
    [datagram] = p.client.datagrams_to_send(1)
    for n in range(len(datagram)):
        p.server.receive_datagram(datagram[:n], CLIENT_ADDR, 1)
    assert p.server.datagrams_to_send(1) == [] and drain(p.server) == []
    p.server.receive_datagram(datagram, CLIENT_ADDR, 1)
    assert payloads(p.server) == [b"x" * 40]


# --- seeded lossy link ------------------------------------------------------------------------

class LossyLink:
    """One direction of a terrible network: drop, duplicate, delay (reorder), all seeded."""

    def __init__(self, rng: random.Random, loss: float) -> None:
        self.rng = rng
        self.loss = loss
        self.queue: list[tuple[int, int, bytes]] = []
        self.serial = 0

    def send(self, datagrams: list[bytes], now: int) -> None:
        for datagram in datagrams:
            roll = self.rng.random()
            if roll < self.loss:
                continue
            copies = 2 if roll > 0.95 else 1
            for _ in range(copies):
                self.serial += 1
                self.queue.append((now + self.rng.randrange(1, 80), self.serial, datagram))

    def deliver(self, now: int) -> list[bytes]:
        due = sorted(item for item in self.queue if item[0] <= now)
        self.queue = [item for item in self.queue if item[0] > now]
        return [datagram for _, _, datagram in due]


@pytest.mark.parametrize("seed", range(40))
def test_lossy_link(seed: int) -> None:
    rng = random.Random(seed)
    config = make_config(rekey_seq_threshold=50)
    client = TunnelSession.client(config, CONV, SERVER_ADDR, 0, WALL, rng.randbytes)
    acceptor = HandshakeAcceptor(config, rng.randbytes)
    up, down = LossyLink(rng, 0.2), LossyLink(rng, 0.2)
    server: TunnelSession | None = None
    sent: dict[bool, set[bytes]] = {True: set(), False: set()}
    got: dict[bool, list[bytes]] = {True: [], False: []}
    both_up = {True: 0, False: 0}
    for now in range(0, 20000, 10):
        for datagram in up.deliver(now):
            fresh_hello = server is None or (
                not server.confirmed and datagram[0] == wire.PacketType.HELLO
                and datagram != server.hello)
            if fresh_hello:  # what kcptcp-server does: a client's retry replaces its session
                server = acceptor.accept(datagram, CLIENT_ADDR, now, WALL + now) or server
            else:
                server.receive_datagram(datagram, CLIENT_ADDR, now)
        for datagram in down.deliver(now):
            client.receive_datagram(datagram, SERVER_ADDR, now)
        for side in (client, server):
            if side is None:
                continue
            if side.established and now < 15000 and rng.random() < 0.5:
                payload = b"%d %d" % (side.is_client, now)
                sent[side.is_client].add(payload)
                if client.established:  # the server sends before the client can open
                    both_up[side.is_client] += 1
                side.send_datagram(payload)
            timer = side.get_timer()
            if timer is not None and timer <= now:
                side.handle_timer(now)
            link = up if side.is_client else down
            link.send(side.datagrams_to_send(now), now)
            link.send([datagram for datagram, _ in side.probes_to_send()], now)
            got[side.is_client] += [
                e.data for e in drain(side) if isinstance(e, DatagramReceived)
            ]
    assert server is not None and acceptor.accepted >= 1
    assert client.established and server.established
    assert client.epoch >= 4 and server.epoch >= 4
    for receiver_is_client in (True, False):
        received = got[receiver_is_client]
        assert len(received) == len(set(received))  # never delivered twice
        assert set(received) <= sent[not receiver_is_client]  # never invented
        assert len(received) > 0.6 * both_up[not receiver_is_client]
