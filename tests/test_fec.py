"""FEC (tunnel/fec.py, tunnel/fec_channel.py), sans-IO on a virtual clock, loss always seeded.

Three levels: the codec and the encoder/decoder on fake sealed datagrams (hypothesis over loss
patterns); a real pair of TunnelSessions with an FecChannel each over a seeded lossy link
(authentication of shards, recovery, auto mode); parsing of hostile bodies."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_session import CLIENT_ADDR, SERVER_ADDR, client_and_server, drain

from portfwd.tunnel import events, fec, fec_loss
from portfwd.tunnel.fec import (
    FecDecoder,
    FecEncoder,
    FecSettings,
    pack_report,
    pack_shard,
    parity_for,
    unpack_report,
    unpack_shard,
)
from portfwd.tunnel.fec_channel import FecChannel
from portfwd.tunnel.wire import HEADER, MalformedPacket, PacketType

CONV = 0x1234ABCD


def fake_datagram(seq: int, rng: random.Random) -> bytes:
    """A stand-in for a sealed DATA packet: a real header and random bytes of random length."""
    return HEADER.pack(PacketType.DATA, CONV, seq) + rng.randbytes(rng.randint(1, 1300))


def encode_group(data: int, parity: int, rng: random.Random, first_seq: int = 0
                 ) -> tuple[list[bytes], list[bytes]]:
    """One full group: its datagrams and the FEC bodies the encoder returns for it."""
    encoder = FecEncoder(FecSettings(data=data, parity=parity))
    datagrams = [fake_datagram(first_seq + i, rng) for i in range(data)]
    bodies: list[bytes] = []
    for d in datagrams:
        bodies += encoder.add(d, 0)
    assert len(bodies) == parity
    return datagrams, bodies


def deliver(datagrams: list[bytes], bodies: list[bytes], lost: set[int],
            shards_first: bool = False) -> tuple[FecDecoder, list[bytes]]:
    """Index i < len(datagrams) is a datagram, beyond it a parity body; the recovered ones."""
    decoder = FecDecoder()
    recovered: list[bytes] = []
    kept = [d for i, d in enumerate(datagrams) if i not in lost]
    shards = [b for j, b in enumerate(bodies) if len(datagrams) + j not in lost]
    if shards_first:
        for body in shards:
            recovered += decoder.shard_received(body, 0)
        for d in kept:
            recovered += decoder.record(d)
    else:
        for d in kept:
            recovered += decoder.record(d)
        for body in shards:
            recovered += decoder.shard_received(body, 0)
    return decoder, recovered


# --- the codec and the two halves on fake datagrams -------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_seeded_lossy_link_recovers_every_group_within_parity(seed: int) -> None:
    """Groups of 10:3 over a link losing 15 % of all packets (data and parity alike): every
    group that kept at least 10 of its 13 packets is rebuilt exactly; no other is."""
    rng = random.Random(seed)
    for group in range(30):
        datagrams, bodies = encode_group(10, 3, rng, first_seq=group * 10)
        lost = {i for i in range(13) if rng.random() < 0.15}
        decoder, recovered = deliver(datagrams, bodies, lost)
        missing = sorted(d for i, d in enumerate(datagrams) if i in lost)
        if len(lost) <= 3:
            assert sorted(recovered) == missing
            assert decoder.recovered == len(missing)
        else:
            assert recovered == []


@settings(max_examples=300, deadline=None)
@given(data=st.integers(1, 20), parity=st.integers(1, 6), seed=st.integers(0, 2**32),
       pattern=st.integers(0, 2**26 - 1), shards_first=st.booleans())
def test_any_loss_pattern_within_parity_is_recovered(data: int, parity: int, seed: int,
                                                     pattern: int, shards_first: bool) -> None:
    rng = random.Random(seed)
    datagrams, bodies = encode_group(data, parity, rng)
    lost = {i for i in range(data + parity) if pattern >> i & 1}
    _, recovered = deliver(datagrams, bodies, lost, shards_first)
    kept = {d for i, d in enumerate(datagrams) if i not in lost}
    assert set(recovered) <= set(datagrams)  # byte for byte, trimmed to the manifest length
    if len(lost) <= parity:
        assert set(recovered) | kept == set(datagrams)
    else:
        assert set(recovered) | kept != set(datagrams)
    if not shards_first:  # parity after the data, as sent: exactly the lost ones come back
        missing = sorted(d for i, d in enumerate(datagrams) if i in lost)
        assert sorted(recovered) == (missing if len(lost) <= parity else [])


def test_short_group_closes_on_its_timer_with_its_share_of_parity() -> None:
    encoder = FecEncoder(FecSettings(data=10, parity=3, group_ms=5))
    rng = random.Random(1)
    lone = fake_datagram(7, rng)
    assert encoder.add(lone, 100) == []
    assert encoder.get_timer() == 105
    assert encoder.handle_timer(104) == []
    [body] = encoder.handle_timer(105)  # ceil(3 * 1 / 10) = 1 shard
    assert encoder.get_timer() is None
    shard = unpack_shard(body)
    assert (shard.data, shard.parity, shard.index) == (1, 1, 0)
    decoder = FecDecoder()
    assert decoder.shard_received(body, 0) == [lone]  # the lone datagram lost: rebuilt


def test_manifest_is_exact() -> None:
    rng = random.Random(2)
    datagrams, [first, *_] = encode_group(4, 2, rng, first_seq=1000)
    shard = unpack_shard(first)
    assert shard.entries == tuple((d[:1] + d[5:9], len(d)) for d in datagrams)
    assert len(shard.shard) == max(len(d) for d in datagrams)
    assert not shard.auto and shard.group == 0


def test_a_datagram_named_in_the_manifest_but_different_is_not_used() -> None:
    rng = random.Random(3)
    datagrams, bodies = encode_group(3, 1, rng)
    decoder = FecDecoder()
    decoder.record(datagrams[0][:-1])  # same (type, seq), other length: not that datagram
    decoder.record(datagrams[1])
    assert decoder.shard_received(bodies[0], 0) == []


def test_conflicting_manifest_for_a_group_is_dropped() -> None:
    rng = random.Random(4)
    _, bodies_a = encode_group(3, 2, rng)
    _, bodies_b = encode_group(3, 2, rng, first_seq=50)  # also group 0, other datagrams
    decoder = FecDecoder()
    assert decoder.shard_received(bodies_a[0], 0) == []
    assert decoder.shard_received(bodies_b[1], 0) == []
    assert decoder.dropped_malformed == 1


@pytest.mark.parametrize("body", [
    b"",
    bytes([0, 0, 0, 0, 0, 1, 1, 0, 0, 5]),  # says 1 entry, has none
    bytes([0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),  # data 0
    bytes([0, 0, 0, 0, 0, 200, 100, 0, 0, 0]),  # data + parity > 255
    bytes([0, 0, 0, 0, 0, 1, 1, 1, 0, 0]) + bytes(7),  # index >= parity
    bytes([0, 0, 0, 0, 0, 1, 0, 0, 0, 1]) + bytes(8),  # a manifest with shard bytes
    # one entry claiming 1000 bytes, shards of 20 bytes: a length beyond the shard
    bytes([0, 0, 0, 0, 0, 1, 1, 0, 0, 20, 3, 0, 0, 0, 1, 0x03, 0xE8]) + bytes(20),
    bytes([5]) + bytes(20),  # unknown kind
])
def test_malformed_shards_are_rejected(body: bytes) -> None:
    with pytest.raises(MalformedPacket):
        unpack_shard(body)
    decoder = FecDecoder()
    assert decoder.shard_received(body, 0) == []
    assert decoder.dropped_malformed == 1


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_any_body_parses_or_is_malformed(body: bytes) -> None:
    try:
        shard = unpack_shard(body)
    except MalformedPacket:
        return
    assert len(shard.entries) == shard.data
    FecDecoder().shard_received(body, 0)  # never raises


def test_report_codec() -> None:
    assert unpack_report(pack_report(0.0537, 1234)) == (0.0537, 1234)
    with pytest.raises(MalformedPacket):
        unpack_report(bytes([1, 0xFF, 0xFF, 0, 0]))  # loss > 100 %


def test_settings_parse() -> None:
    assert FecSettings.parse("off") is None
    assert FecSettings.parse("10:3") == FecSettings(data=10, parity=3)
    assert FecSettings.parse("auto") == FecSettings(auto=True)
    for bad in ("10", "10:0", "0:3", "200:100", "33:1", "a:b", "10:3:1", ""):
        with pytest.raises(ValueError):
            FecSettings.parse(bad)


def test_auto_parity_policy() -> None:
    assert parity_for(0.0, 10, 0.5) == 0  # off on a clean link
    assert parity_for(0.001, 10, 0.5) == 0
    assert parity_for(0.01, 10, 0.5) in (1, 2, 3)
    low, mid, high = (parity_for(p, 10, 0.5) for p in (0.01, 0.05, 0.10))
    assert 0 < low <= mid <= high <= 5  # follows the loss, capped at 50 % overhead
    assert parity_for(0.5, 10, 0.3) == 3


# --- real sessions: shards sealed and authenticated like everything else ----------------------

class Link:
    """A client and a server session, each with an FecChannel, over a seeded lossy link."""

    def __init__(self, client_fec: FecSettings | None, server_fec: FecSettings | None = None,
                 loss: float = 0.0, seed: int = 0) -> None:
        pair = client_and_server(seed)
        self.client, self.server = pair.client, pair.server
        self.channels = {id(self.client): FecChannel(client_fec),
                         id(self.server): FecChannel(server_fec)}
        self.rng = random.Random(seed)
        self.loss = loss
        self.wire_bytes = 0

    def channel(self, session) -> FecChannel:
        return self.channels[id(session)]

    def send(self, sender, receiver, payloads: list[bytes], now: int) -> list[bytes]:
        """Queue payloads, move everything (the sender's FEC timers run out at once); the
        payloads the receiver got."""
        for p in payloads:
            sender.send_datagram(p)
        channel = self.channel(sender)
        datagrams = channel.outgoing(sender, sender.datagrams_to_send(now), now)
        while (deadline := channel.get_timer()) is not None:
            datagrams += channel.handle_timer(sender, deadline)
        return self.arrive(receiver, datagrams, now)

    def arrive(self, receiver, datagrams: list[bytes], now: int) -> list[bytes]:
        channel = self.channel(receiver)
        addr = SERVER_ADDR if receiver.is_client else CLIENT_ADDR
        got: list[bytes] = []
        queue = [d for d in datagrams if self.rng.random() >= self.loss]
        self.wire_bytes += sum(len(d) for d in datagrams)
        while queue:
            datagram = queue.pop(0)
            before = receiver.datagrams_received
            receiver.receive_datagram(datagram, addr, now)
            if receiver.datagrams_received != before:
                queue += channel.authenticated(datagram)
            for event in drain(receiver):
                if isinstance(event, events.DatagramReceived):
                    got.append(event.data)
                elif isinstance(event, events.FecReceived):
                    queue += channel.fec_received(event.data, now)
        return got


@pytest.mark.parametrize("seed", range(10))
def test_sessions_over_a_lossy_link_recover_through_parity(seed: int) -> None:
    link = Link(FecSettings(data=10, parity=3), loss=0.10, seed=seed)
    rng = random.Random(seed)
    sent: list[bytes] = []
    got: list[bytes] = []
    for group in range(50):
        payloads = [rng.randbytes(rng.randint(1, 1200)) for _ in range(10)]
        sent += payloads
        got += link.send(link.client, link.server, payloads, now=group * 10)
    channel = link.channel(link.server)
    assert channel.decoder.recovered > 0
    assert set(got) <= set(sent)
    # Each group of 13 packets loses more than 3 with probability ~3.4 % at 10 % loss: what
    # FEC cannot repair is only in those groups (KCP would retransmit it).
    assert len(sent) - len(got) <= channel.decoder.unrecoverable * 10 + 10 * 10
    assert len(got) >= 0.97 * len(sent) - 20
    assert link.server.dropped_auth == 0


def test_forged_shard_is_dropped_by_the_session_and_cannot_corrupt_a_group() -> None:
    link = Link(FecSettings(data=4, parity=2))
    rng = random.Random(5)
    payloads = [rng.randbytes(100) for _ in range(4)]
    for p in payloads:
        link.client.send_datagram(p)
    channel = link.channel(link.client)
    datagrams = channel.outgoing(link.client, link.client.datagrams_to_send(0), 0)
    data, shards = datagrams[:4], datagrams[4:]
    assert len(shards) == 2 and all(s[0] & 0x7F == PacketType.FEC for s in shards)
    forged = bytearray(shards[0])
    forged[-20] ^= 1  # one bit of the sealed body: the tag no longer matches
    got = link.arrive(link.server, [bytes(forged)], 0)
    assert got == [] and link.server.dropped_auth == 1
    # The genuine shards still rebuild the two datagrams that were lost.
    got = link.arrive(link.server, [data[0], data[2], *shards], 0)
    assert sorted(got) == sorted(payloads)
    assert link.channel(link.server).decoder.recovered == 2


def test_replayed_shard_is_dropped() -> None:
    link = Link(FecSettings(data=2, parity=1))
    link.client.send_datagram(b"x" * 50)
    link.client.send_datagram(b"y" * 50)
    channel = link.channel(link.client)
    datagrams = channel.outgoing(link.client, link.client.datagrams_to_send(0), 0)
    link.arrive(link.server, datagrams, 0)
    assert link.arrive(link.server, [datagrams[-1]], 0) == []
    assert link.server.dropped_replay == 1


def test_receiver_without_fec_still_decodes_what_the_peer_protects() -> None:
    link = Link(None, FecSettings(data=3, parity=1))  # only the server sends parity
    payloads = [b"a" * 30, b"b" * 40, b"c" * 50]
    for p in payloads:
        link.server.send_datagram(p)
    channel = link.channel(link.server)
    datagrams = channel.outgoing(link.server, link.server.datagrams_to_send(0), 0)
    got = link.arrive(link.client, [datagrams[0], datagrams[2], datagrams[3]], 0)
    assert sorted(got) == sorted(payloads)


def run_auto(loss: float, seed: int, rounds: int = 60) -> Link:
    """Client sends in auto mode; the server reports back after each round."""
    link = Link(FecSettings(auto=True), loss=loss, seed=seed)
    rng = random.Random(seed)
    now = 0
    for _ in range(rounds):
        link.send(link.client, link.server, [rng.randbytes(1000) for _ in range(20)], now)
        now += fec.REPORT_MS
        server_channel = link.channel(link.server)
        reports = server_channel.handle_timer(link.server, now)
        link.loss, saved = 0.0, link.loss  # reports cross unharmed (they are few)
        link.arrive(link.client, reports, now)
        link.loss = saved
    return link


def test_auto_turns_parity_on_under_loss_and_follows_it() -> None:
    link = run_auto(0.05, seed=1)
    encoder = link.channel(link.client).encoder
    assert 0.03 <= encoder.peer_loss <= 0.08  # measured by the server from the manifests
    assert encoder.parity == parity_for(encoder.peer_loss, 10, fec.AUTO_MAX_OVERHEAD)
    assert encoder.parity >= 2
    assert link.channel(link.server).decoder.recovered > 0


def test_auto_stays_off_on_a_clean_link_with_small_overhead() -> None:
    link = run_auto(0.0, seed=2)
    channel = link.channel(link.client)
    assert channel.encoder.parity == 0
    metrics = channel.metrics()
    assert metrics.overhead_bytes <= 0.02 * metrics.protected_bytes  # manifests only
    assert link.channel(link.server).decoder.loss == 0.0


def test_auto_goes_back_off_when_loss_stops() -> None:
    link = run_auto(0.10, seed=3, rounds=30)
    assert link.channel(link.client).encoder.parity > 0
    link.loss = 0.0
    rng = random.Random(9)
    now = 10_000
    for _ in range(fec_loss.LOSS_WINDOW // 20 + 20):  # the window slides past the lossy ones
        link.send(link.client, link.server, [rng.randbytes(1000) for _ in range(20)], now)
        now += fec.REPORT_MS
        link.arrive(link.client, link.channel(link.server).handle_timer(link.server, now), now)
    assert link.channel(link.client).encoder.parity == 0


def test_fixed_mode_ignores_reports() -> None:
    encoder = FecEncoder(FecSettings(data=10, parity=3))
    encoder.report_received(pack_report(0.0, 100))
    assert encoder.parity == 3


def test_pack_shard_roundtrip_with_auto_flag() -> None:
    rng = random.Random(6)
    group = [fake_datagram(i, rng) for i in range(3)]
    body = pack_shard(True, 0xFFFFFFFF, 1, 2, group, bytes(max(map(len, group))))
    shard = unpack_shard(body)
    assert shard.auto and shard.group == 0xFFFFFFFF and shard.index == 1


@pytest.mark.parametrize("data,parity", [(10, 3), (1, 1), (20, 5)])
def test_a_sealed_shard_is_its_longest_datagram_plus_room(data: int, parity: int) -> None:
    """kcptcp leaves ``room`` free in every KCP datagram, so shards fit the same MTU."""
    settings_ = FecSettings(data=data, parity=parity)
    link = Link(settings_)
    rng = random.Random(data)
    for _ in range(data):
        link.client.send_datagram(rng.randbytes(rng.randint(1, 1300)))
    channel = link.channel(link.client)
    out = channel.outgoing(link.client, link.client.datagrams_to_send(0), 0)
    sealed, shards = out[:data], out[data:]
    assert len(shards) == parity
    assert all(len(s) == max(map(len, sealed)) + settings_.room + link.client.overhead
               for s in shards)


def test_auto_starts_from_the_services_last_report() -> None:
    hint = fec.LossHint()
    first = FecEncoder(FecSettings(auto=True), hint)
    assert first.parity == 0
    first.report_received(pack_report(0.05, 2000))
    assert hint.loss == 0.05
    second = FecEncoder(FecSettings(auto=True), hint)  # a new conversation of that service
    assert second.parity == parity_for(0.05, 10, fec.AUTO_MAX_OVERHEAD) > 0
    assert FecEncoder(FecSettings(data=4, parity=1), hint).parity == 1  # fixed: unaffected


def test_a_report_over_few_datagrams_does_not_drop_below_the_services_loss() -> None:
    hint = fec.LossHint(0.05)  # another conversation of the service saw 5 %
    quiet = FecEncoder(FecSettings(auto=True), hint)
    quiet.report_received(pack_report(0.0, 20))  # 20 requests, none lost: proves little
    assert quiet.parity == parity_for(0.05, 10, fec.AUTO_MAX_OVERHEAD) > 0
    assert hint.loss == pytest.approx(0.045)  # ... but a little: it nudges the service's figure
    quiet.report_received(pack_report(0.0, fec.AUTO_MIN_OVER))  # enough to say "clean"
    assert quiet.parity == 0 and hint.loss == 0.0
    hint.loss = 0.05
    quiet.report_received(pack_report(0.10, 20))  # more than the service: taken
    assert quiet.parity == parity_for(0.10, 10, fec.AUTO_MAX_OVERHEAD)


def test_decoder_keeps_one_group_until_the_peer_sends_fec() -> None:
    rng = random.Random(8)
    decoder = FecDecoder()
    for seq in range(100):
        decoder.record(fake_datagram(seq, rng))
    assert not decoder.active and len(decoder._history) == fec.MAX_DATA
    datagrams, bodies = encode_group(3, 1, rng, first_seq=100)
    for d in datagrams[1:]:
        decoder.record(d)
    assert decoder.shard_received(bodies[0], 0) == [datagrams[0]]  # the first group too
    assert decoder.active
    for seq in range(200, 200 + fec.HISTORY + 50):
        decoder.record(fake_datagram(seq, rng))
    assert len(decoder._history) == fec.HISTORY


def test_auto_protects_short_groups_more_and_full_groups_less() -> None:
    """A full group (a bulk stream) gets parity for AUTO_TARGET, a group the timer closed (a
    request) AUTO_SHORT_TARGET for its own size, up to a full group's shards."""
    encoder = FecEncoder(FecSettings(auto=True))
    encoder.report_received(pack_report(0.05, 2000))
    assert encoder.parity == 2  # of 10 at 5 %: P(more than 2 of 12 lost) ~2 % < AUTO_TARGET
    packet = bytes(100)
    full = [body for i in range(fec.AUTO_DATA) for body in encoder.add(packet, i)]
    assert len(full) == 2
    assert encoder.add(packet, 100) == []  # a lone request: its group closes by the timer
    lone = encoder.handle_timer(100 + fec.GROUP_MS)
    assert len(lone) == 2  # P(all 3 lost) ~1e-4 < AUTO_SHORT_TARGET; one copy left ~2.5e-3
    clean = FecEncoder(FecSettings(auto=True))
    clean.add(packet, 0)
    assert [unpack_shard(b).parity for b in clean.handle_timer(fec.GROUP_MS)] == [0]  # manifest


def test_auto_never_gives_a_short_group_more_parity_than_a_full_one() -> None:
    """A slow bulk stream's groups are all closed by the timer: each gets at most the full
    group's parity, so its overhead stays within what a full group costs."""
    encoder = FecEncoder(FecSettings(auto=True))
    encoder.report_received(pack_report(0.10, 2000))
    assert encoder.parity == 3  # of 10 at 10 %
    for data in range(1, fec.AUTO_DATA):
        shards = [body for i in range(data) for body in encoder.add(bytes(100), 1000 * data + i)]
        assert shards == []
        parity = encoder.handle_timer(1000 * data + fec.GROUP_MS)
        assert 1 <= len(parity) <= encoder.parity, (data, len(parity))

