"""Liveness probes on a virtual clock (tunnel/probe.py, docs/PROTOCOL.md "Liveness probes"):
a client notices a server that lost its conversation, and a server answers nothing that does
not authenticate, nothing twice, nothing larger than what it got."""

from __future__ import annotations

import logging
import random

import pytest
from test_conversation import Net, make_config
from test_session import CONV, OTHER_PSK, PSK, WALL

from portfwd.tunnel import crypto
from portfwd.tunnel.events import ConnectionClosed
from portfwd.tunnel.handshake import HandshakeAcceptor
from portfwd.tunnel.probe import (
    NONCE_SIZE,
    PROBE_INTERVAL_MS,
    PROBE_SILENCE_MS,
    PROBE_SIZE,
    UNKNOWN_SIZE,
    ClientProbes,
    ProbeResponder,
    pack_unknown,
)
from portfwd.tunnel.session import TunnelConfig, TunnelSession
from portfwd.tunnel.stream import CLOSE_UNKNOWN
from portfwd.tunnel.wire import PacketType

WINDOW = 30_000  # ms: TunnelConfig().timestamp_window_ms


class RestartingNet(Net):
    """A Net whose server can be replaced by a fresh process that holds no conversation and
    answers PROBEs as kcptcp-server does."""

    responder: ProbeResponder | None = None

    def restart_server(self, psk: bytes | None = PSK) -> None:
        started = WALL + self.now
        acceptor = HandshakeAcceptor(make_config(psk).tunnel, self.rng.randbytes, started)
        self.responder = ProbeResponder(psk, WINDOW, acceptor.first_sight, started)
        self.server.conv = None
        self.probes: list[bytes] = []
        self.replies: list[bytes] = []

    def _to_server(self, datagram: bytes, now: int) -> None:
        if self.responder is None:
            return super()._to_server(datagram, now)
        if datagram[0] == PacketType.PROBE:
            # test_conversation's Side.pump appends probes_to_send() to the list the session
            # handed out, which may be the session's own empty queue: a datagram can go twice.
            if datagram in self.probes:
                return
            self.probes.append(datagram)
            reply = self.responder.answer(datagram, now, WALL + now)
            if reply is not None:
                self.replies.append(reply)
                self.down.put(now, [reply])


def established(net: Net) -> None:
    net.run(lambda: net.server.conv is not None and net.client.conv.session.confirmed
            and net.server.conv.session.confirmed)


def test_sending_client_learns_of_a_restart_within_two_seconds() -> None:
    net = RestartingNet(seed=3)
    established(net)
    net.run(lambda: net.now >= 500)  # idle a while: the last word came at ~40 ms
    restart = net.now
    net.restart_server()
    net.client.write(b"x" * 1000)  # the application sends after the restart
    net.run(lambda: net.client.closed_at is not None)
    assert net.client.close_event == ConnectionClosed(CLOSE_UNKNOWN, by_peer=False)
    # The first probe goes out once the data has been unanswered for PROBE_SILENCE_MS.
    assert len(net.probes) == 1 and len(net.replies) == 1
    assert net.client.closed_at - restart < 2000
    assert all(len(reply) == UNKNOWN_SIZE < PROBE_SIZE == len(net.probes[0])
               for reply in net.replies)


def test_idle_client_learns_at_its_keepalive() -> None:
    net = RestartingNet(seed=4)
    established(net)
    last_heard = net.client.conv.probes.last_heard
    net.restart_server()
    net.run(lambda: net.client.closed_at is not None)
    assert net.client.close_event == ConnectionClosed(CLOSE_UNKNOWN, by_peer=False)
    keepalive = make_config().tunnel.keepalive_interval_ms
    first_probe_due = last_heard + keepalive + PROBE_SILENCE_MS
    assert first_probe_due <= net.client.closed_at <= first_probe_due + 10  # + the round trip
    assert net.client.closed_at < make_config().tunnel.idle_timeout_ms  # long before silence


def test_probes_repeat_while_unanswered_then_the_session_gives_up() -> None:
    net = RestartingNet(seed=5)
    established(net)
    net.restart_server(psk=OTHER_PSK)  # a server that cannot verify our probes: no answer
    net.client.write(b"y" * 100)
    net.run(lambda: net.client.closed_at is not None)
    assert net.replies == []
    idle_ms = make_config().tunnel.idle_timeout_ms
    # One probe per PROBE_INTERVAL_MS from the first, until the idle timeout closes it.
    assert abs(len(net.probes) - (idle_ms - PROBE_SILENCE_MS) // PROBE_INTERVAL_MS) <= 1
    assert net.client.close_event.reason != CLOSE_UNKNOWN


@pytest.mark.parametrize("seed", range(4))
def test_no_probe_while_the_server_answers(seed: int) -> None:
    rng = random.Random(seed)
    net = Net(seed=seed, loss=0.02)
    net.client.write(rng.randbytes(300_000), eof=True)
    net.server.write(rng.randbytes(100_000), eof=True)
    net.run_to_close()
    assert bytes(net.server.received) == net.client.outgoing  # a live server: nothing reset
    assert net.client.close_event.reason != CLOSE_UNKNOWN


def responder(psk: bytes | None = PSK, started: int | None = WALL) -> ProbeResponder:
    acceptor = HandshakeAcceptor(make_config(psk).tunnel, random.Random(1).randbytes, started)
    return ProbeResponder(psk, WINDOW, acceptor.first_sight, started)


def client_probes(psk: bytes | None = PSK, seed: int = 2) -> ClientProbes:
    return ClientProbes(crypto.handshake_mac_for(psk), CONV, WALL, 10_000, 0,
                        random.Random(seed).randbytes)


def test_valid_probe_answered_once_and_smaller() -> None:
    server, client = responder(), client_probes()
    probe = client.next(1000)
    reply = server.answer(probe, 1000, WALL + 1000)
    assert reply is not None and len(reply) == UNKNOWN_SIZE < len(probe) == PROBE_SIZE
    assert reply[:5] == bytes([PacketType.UNKNOWN]) + CONV.to_bytes(4, "big")
    assert client.is_unknown(reply)
    assert server.answer(probe, 1001, WALL + 1001) is None  # the replay cache: once per probe
    assert server.dropped_replay == 1 and server.answered == 1


def test_forged_mutated_and_foreign_probes_get_nothing() -> None:
    server, client = responder(), client_probes()
    probe = client.next(1000)
    rng = random.Random(7)
    for i in range(PROBE_SIZE):  # every single-byte change
        mutated = bytearray(probe)
        mutated[i] ^= 1 + rng.randrange(255)
        assert server.answer(bytes(mutated), 1000, WALL + 1000) is None
    assert server.answer(rng.randbytes(PROBE_SIZE), 1000, WALL + 1000) is None
    assert server.answer(probe[:-1], 1000, WALL + 1000) is None
    for other in (OTHER_PSK, None):  # another key, or plaintext vs encrypted
        assert server.answer(client_probes(other).next(1000), 1000, WALL + 1000) is None
    assert server.answered == 0
    assert server.answer(probe, 1000, WALL + 1000) is not None  # the genuine one still works


def test_stale_and_pre_start_probes_get_nothing() -> None:
    server, client = responder(started=WALL + 5000), client_probes()
    assert server.answer(client.next(1000), 6000, WALL + 6000) is None  # stamped before start
    late = client.next(6000)
    assert server.answer(late, 6000 + WINDOW + 1, WALL + 6000 + WINDOW + 1) is None
    assert server.dropped_stale == 2


def test_reply_budget() -> None:
    acceptor = HandshakeAcceptor(make_config().tunnel, random.Random(1).randbytes, WALL)
    server = ProbeResponder(PSK, WINDOW, acceptor.first_sight, WALL, rate_per_s=3)
    client = client_probes()
    answers = [server.answer(client.next(1000), 1000, WALL + 1000) for _ in range(5)]
    assert [a is not None for a in answers] == [True, True, True, False, False]
    assert server.dropped_rate == 2


def test_client_takes_only_an_answer_to_its_own_recent_probe() -> None:
    client, stranger = client_probes(seed=2), client_probes(seed=3)
    mac = crypto.handshake_mac_for(PSK)
    assert not client.is_unknown(pack_unknown(mac, client.next(0)[:-1] + b"\0"))
    mine = client.next(0)
    assert client.is_unknown(pack_unknown(mac, mine))
    assert not client.is_unknown(pack_unknown(mac, stranger.next(0)))
    assert not client.is_unknown(pack_unknown(crypto.handshake_mac_for(OTHER_PSK), mine))
    client.heard(5)  # the server spoke: earlier probes are answered, an UNKNOWN now is stale
    assert not client.is_unknown(pack_unknown(mac, mine))
    assert len(mine) == PROBE_SIZE and NONCE_SIZE == 16


def hello_from(psk: bytes | None) -> bytes:
    session = TunnelSession.client(TunnelConfig(psk=psk), CONV, "server", 0, WALL,
                                   random.Random(9).randbytes)
    return session.datagrams_to_send(0)[0]


@pytest.mark.parametrize("server_psk, client_psk, said", [
    (None, PSK, "the client encrypts (it has -K) and this server runs without a key"),
    (PSK, None, "the client runs without a key (plaintext) and this server has one (-K)"),
    (PSK, OTHER_PSK, "bad MAC (wrong PSK?)"),
])
def test_mode_mismatch_is_named_not_blamed_on_the_psk(caplog, server_psk, client_psk, said):
    acceptor = HandshakeAcceptor(TunnelConfig(psk=server_psk), random.Random(1).randbytes)
    with caplog.at_level(logging.WARNING):
        assert acceptor.accept(hello_from(client_psk), ("127.0.0.1", 9), 0, WALL) is None
    assert said in caplog.text
    if client_psk is not None and server_psk is not None:
        assert "plaintext" not in caplog.text


def test_other_protocol_version_is_named(caplog):
    hello = bytearray(hello_from(PSK))
    hello[5] = 2  # a protocol 2 client; the MAC covers the version, so re-MAC it
    hello[-16:] = crypto.handshake_mac_for(PSK)(crypto.HELLO_LABEL, bytes(hello[:-16]))
    acceptor = HandshakeAcceptor(TunnelConfig(psk=PSK), random.Random(1).randbytes)
    with caplog.at_level(logging.WARNING):
        assert acceptor.accept(bytes(hello), ("127.0.0.1", 9), 0, WALL) is None
    assert "protocol version 2, this server speaks 3" in caplog.text
