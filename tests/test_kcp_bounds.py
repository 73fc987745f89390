"""Receive memory under hostile input: what a PSK holder can make one conversation hold.

Two levels, both sans-IO on a virtual clock (no sockets, no sleep, seeded):

* a bare ``Kcp`` fed forged segments: oversize payloads, frg beyond any message, a window's
  worth of out-of-order segments, byte-at-a-time truncations, a shared budget run dry;
* a server ``Conversation`` built as tunnel_server builds one (HandshakeAcceptor, then
  Conversation) attacked by a client *session* that holds the PSK, so every attack datagram is
  properly sealed and authenticates. ``tracemalloc`` measures what the server holds afterwards.

The measured numbers are printed (``pytest -s``) for docs/SECURITY.md.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections.abc import Iterable

import pytest

from portfwd.kcp import OVERHEAD, Cmd, Kcp, KcpConfig, ReassemblyBudget, pack_segment
from portfwd.tunnel.handshake import HandshakeAcceptor
from portfwd.tunnel.session import MAX_PAYLOAD_SIZE, TunnelConfig, TunnelSession
from portfwd.tunnel.stream import (
    CLOSE_BAD_RECORD,
    MAX_RECORD_SIZE,
    Conversation,
    ConversationConfig,
)

try:  # tests/ is not a package: pytest puts it on sys.path
    from test_kcp import Endpoint, Link, run_pair
    from test_session import CLIENT_ADDR, CONV, PSK, SERVER_ADDR, WALL
except ImportError:  # pragma: no cover
    from .test_kcp import Endpoint, Link, run_pair
    from .test_session import CLIENT_ADDR, CONV, PSK, SERVER_ADDR, WALL

KCONV = 0x11223344  # conv of the bare-engine tests
MIB = 1024 * 1024
GOAL_PER_CONVERSATION = 2 * MIB  # bytes: the design bound per conversation
BIG = MAX_PAYLOAD_SIZE - OVERHEAD  # bytes: the largest KCP payload a session will seal (65458)
UDP_MTU = 1350  # bytes: the -M default
PUSH = int(Cmd.PUSH)


def FLOOR(kcp: Kcp) -> int:  # noqa: N802 - reads like the constant it is
    """Bytes an engine keeps past its limits: one whole message."""
    return (kcp.max_frg + 1) * kcp.mss


def push(sn: int, data: bytes, frg: int = 0, conv: int = KCONV, una: int = 0) -> bytes:
    return pack_segment(conv, PUSH, frg, 1024, 0, sn, una, data)


def state(kcp: Kcp) -> tuple[int, ...]:
    """Everything a dropped segment must leave unchanged."""
    return (kcp.rcv_nxt, kcp.rcv_bytes, kcp.rcv_buf_segments, kcp.rcv_queue_segments,
            len(kcp.acklist), kcp.rcv_queue_bytes)


# --- bare engine ----------------------------------------------------------------------------

def test_push_over_mss_dropped_unacknowledged_and_counted() -> None:
    kcp = Kcp(KCONV, KcpConfig(mtu=1400))
    before = state(kcp)
    assert kcp.input(push(0, bytes(kcp.mss + 1)))  # well-formed datagram, its PUSH refused
    assert kcp.input(push(1, bytes(kcp.mss + 1)))  # the general (out-of-order) path too
    assert kcp.dropped_oversize == 2
    assert state(kcp) == before
    kcp.flush(0)
    assert kcp.datagrams_to_send() == []  # nothing acknowledged: a real peer retransmits
    assert kcp.input(push(0, bytes(kcp.mss)))  # exactly mss is fine
    assert kcp.rcv_bytes == kcp.mss and kcp.dropped_oversize == 2


def test_oversize_push_inside_a_datagram_does_not_stop_the_others() -> None:
    kcp = Kcp(KCONV, KcpConfig(mtu=200))
    datagram = push(0, b"a") + push(1, bytes(kcp.mss + 1)) + push(2, b"c")
    assert kcp.input(datagram)
    assert kcp.dropped_oversize == 1
    assert kcp.rcv_queue_segments == 1 and kcp.rcv_buf_segments == 1
    assert [sn for sn, _ in kcp.acklist] == [0, 2]


def test_frg_beyond_max_frg_dropped_only_when_configured() -> None:
    ikcp_like = Kcp(KCONV, KcpConfig())
    assert ikcp_like.input(push(0, b"x", frg=254))
    assert ikcp_like.dropped_oversize == 0 and ikcp_like.rcv_queue_segments == 1

    kcp = Kcp(KCONV, KcpConfig(max_frg=25))
    before = state(kcp)
    for sn, frg in ((0, 26), (3, 200), (7, 255)):
        assert kcp.input(push(sn, b"x", frg=frg))
    assert kcp.dropped_oversize == 3
    assert state(kcp) == before
    assert kcp.input(push(0, b"x", frg=25))
    assert kcp.rcv_queue_segments == 1


@pytest.mark.parametrize("kwargs", [{"max_frg": -1}, {"max_frg": 256}, {"max_rcv_bytes": -1}])
def test_config_rejects_bad_limits(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        KcpConfig(**kwargs)


def test_finding_1023_out_of_order_65k_segments_all_dropped() -> None:
    """The finding's input against a bare engine: 1,023 out-of-order segments of 65 KB."""
    kcp = Kcp(KCONV, KcpConfig())
    for sn in range(1, 1024):
        assert kcp.input(push(sn, bytes(BIG)))
    assert kcp.dropped_oversize == 1023
    assert kcp.rcv_bytes == 0 and kcp.rcv_buf_segments == 0 and kcp.acklist == []


def test_finding_255_fragment_record_of_65k_fragments_dropped() -> None:
    kcp = Kcp(KCONV, KcpConfig(max_frg=25))
    for i, frg in enumerate(range(254, -1, -1)):
        assert kcp.input(push(i, bytes(BIG), frg=frg))
    assert kcp.dropped_oversize == 255
    assert kcp.recv() is None and kcp.rcv_bytes == 0


def test_window_bounds_receive_bytes_without_a_byte_cap() -> None:
    """Defaults (ikcp): at most rcv_wnd in rcv_queue plus rcv_wnd in rcv_buf, each <= mss."""
    kcp = Kcp(KCONV, KcpConfig(rcv_wnd=128, mtu=200))
    mss = kcp.mss
    for sn in range(128):  # the application never reads: rcv_queue fills
        kcp.input(push(sn, bytes(mss), frg=1))
    for sn in range(128, 512):  # then the next window, and beyond it
        kcp.input(push(sn, bytes(mss), frg=1))
    assert kcp.rcv_queue_segments == 128 and kcp.rcv_buf_segments == 128
    assert kcp.rcv_bytes == 2 * 128 * mss == kcp.max_rcv_bytes


@pytest.mark.parametrize("out_of_order_first", [False, True])
def test_max_rcv_bytes_caps_what_out_of_order_segments_add(out_of_order_first: bool) -> None:
    rcv_wnd, mtu = 1024, 1325
    kcp = Kcp(KCONV, KcpConfig(rcv_wnd=rcv_wnd, mtu=mtu, max_rcv_bytes=rcv_wnd * (mtu - 24)))
    mss = kcp.mss
    order = list(range(2 * rcv_wnd))
    if out_of_order_first:
        order = order[1:rcv_wnd] + [0] + order[rcv_wnd:]
    for sn in order:
        kcp.input(push(sn, bytes(mss), frg=1))  # frg 1 throughout: no message ever completes
    # rcv_queue full (it holds far more than one message's worth): the next window is refused
    assert kcp.rcv_queue_segments == rcv_wnd and kcp.rcv_buf_segments == 0
    assert kcp.rcv_bytes == rcv_wnd * mss == kcp.max_rcv_bytes
    assert kcp.dropped_reassembly == rcv_wnd
    refused = set(range(rcv_wnd, 2 * rcv_wnd))
    assert not refused & {sn for sn, _ in kcp.acklist}  # refused segments are not acknowledged


def test_byte_at_a_time_truncations_change_nothing() -> None:
    """h11's t_body_reader idea: every strict prefix of a datagram is dropped whole, except the
    one that ends exactly after the first segment, which is that segment alone."""
    kcp = Kcp(KCONV, KcpConfig(mtu=200, max_frg=3))
    first, second = push(1, b"b" * 40, frg=0), push(0, b"a" * 100, frg=1)
    datagram = first + second
    before = state(kcp)
    for cut in range(len(datagram)):
        if cut == len(first):
            continue
        assert not kcp.input(datagram[:cut])
        assert state(kcp) == before
    assert kcp.dropped_malformed == len(datagram) - 1
    assert kcp.input(datagram[: len(first)])  # sn 1 alone: out of order
    assert kcp.rcv_buf_segments == 1 and kcp.rcv_bytes == 40
    assert kcp.input(datagram)  # sn 1 again (a duplicate, acked again) and sn 0
    assert kcp.recv() == b"a" * 100 + b"b" * 40
    assert kcp.rcv_bytes == 0
    assert [sn for sn, _ in kcp.acklist] == [1, 1, 0]


@pytest.mark.parametrize("seed", range(20))
def test_random_forgeries_keep_byte_accounting_exact(seed: int) -> None:
    """Engines sharing a budget under random segments: held bytes always add up."""
    rng = random.Random(seed)
    budget = ReassemblyBudget(rng.choice([0, 500, 5000, 50_000]))
    engines = [Kcp(KCONV, KcpConfig(mtu=100, rcv_wnd=128, max_frg=3,
                                    max_rcv_bytes=rng.choice([None, 300, 3000])), budget)
               for _ in range(3)]
    for _ in range(3000):
        kcp = rng.choice(engines)
        action = rng.random()
        if action < 0.15:
            while kcp.recv() is not None:
                pass
        elif action < 0.17:
            kcp.discard_received()
        else:
            sn = (kcp.rcv_nxt + rng.randint(-5, 140)) & 0xFFFFFFFF
            data = bytes(rng.choice([0, 1, 50, kcp.mss, kcp.mss + 1, 300]))
            kcp.input(push(sn, data, frg=rng.choice([0, 0, 1, 2, 3, 4, 255])))
        for k in engines:
            held = sum(len(d) for _, d in k.rcv_queue) + sum(len(d) for _, d in k.rcv_buf.values())
            assert k.rcv_bytes == held <= k.max_rcv_bytes + FLOOR(k) + k.mss
        assert budget.held == sum(k.rcv_bytes for k in engines)
        assert budget.held <= max(budget.limit, budget.held - sum(
            max(0, k.rcv_bytes - k.max_rcv_bytes) for k in engines)) + len(engines) * 2 * (
            FLOOR(engines[0]) + engines[0].mss)
    for k in engines:
        k.discard_received()
    assert budget.held == 0


@pytest.mark.parametrize("seed", range(6))
def test_exhausted_budget_slows_but_never_stalls_a_transfer(seed: int) -> None:
    """Another conversation holds the whole shared budget: in-order delivery still proceeds,
    each whole message at a time; refused segments are retransmitted, nothing is lost."""
    rng = random.Random(seed)
    budget = ReassemblyBudget(10_000)
    budget.charge(10_000)  # some other conversation holds it all
    cfg = KcpConfig(mtu=200, snd_wnd=64, rcv_wnd=128)
    receiver_cfg = KcpConfig(mtu=200, snd_wnd=64, rcv_wnd=128, max_frg=126)
    a, b = Kcp(KCONV, cfg), Kcp(KCONV, receiver_cfg, budget)
    mss = a.mss
    payload = [rng.randbytes(rng.choice([1, mss, 5 * mss + 3, 127 * mss])) for _ in range(20)]
    ep_a = Endpoint(a, payload, max_waitsnd=128)
    ep_b = Endpoint(b, [], max_waitsnd=1)
    link_ab = Link(rng, loss=0.1, dup=0.05, delay=(1, 20))
    link_ba = Link(rng, loss=0.1, dup=0.05, delay=(1, 20))
    run_pair(ep_a, ep_b, link_ab, link_ba, lambda: len(ep_b.received) == len(payload),
             limit_ms=5_000_000)
    assert ep_b.received == payload
    assert not a.dead  # the shrunken advertised window kept refusals (and backoff) rare
    assert budget.held == 10_000  # everything b took was released again when read


# --- a server conversation attacked by a PSK holder -------------------------------------------

class Attack:
    """A server Conversation (HandshakeAcceptor + Conversation, as tunnel_server builds it)
    and a client TunnelSession holding the PSK that seals whatever KCP bytes it is given."""

    def __init__(self, seed: int = 0, conv: int = CONV,
                 budget: ReassemblyBudget | None = None) -> None:
        rng = random.Random(seed)
        # Confirmation PINGs at once, not after the delay that lets stream data carry them.
        self.config = ConversationConfig(tunnel=TunnelConfig(psk=PSK, confirm_delay_ms=0),
                                         mtu=UDP_MTU)
        self.client = TunnelSession.client(self.config.tunnel, conv, SERVER_ADDR, 0, WALL,
                                           rng.randbytes)
        acceptor = HandshakeAcceptor(self.config.tunnel, rng.randbytes)
        [hello] = self.client.datagrams_to_send(0)
        session = acceptor.accept(hello, CLIENT_ADDR, 0, WALL)
        assert session is not None
        self.server = Conversation(session, self.config, 0, budget)
        assert self.server.datagrams_to_send(0) == []  # nothing on the path before confirmation
        for datagram, _ in self.server.probes_to_send():  # the WELCOME
            self.client.receive_datagram(datagram, SERVER_ADDR, 0)
        assert self.client.established
        for datagram in self.client.datagrams_to_send(0):  # the client's confirming PING
            self.server.receive_datagram(datagram, CLIENT_ADDR, 0)
        for datagram in self.server.datagrams_to_send(0):  # the server's PING back
            self.client.receive_datagram(datagram, SERVER_ADDR, 0)
        assert self.server.established and self.client.confirmed
        while self.client.next_event() is not None:
            pass
        self.conv = conv
        self.now = 0
        self.authentic = 0  # sealed datagrams that reached the server

    @property
    def mss(self) -> int:
        return self.server.kcp.mss

    def send(self, kcp_datagrams: Iterable[bytes]) -> None:
        """Seal each with the PSK-derived keys and feed it to the server, which transmits."""
        server = self.server
        for kcp_datagram in kcp_datagrams:
            self.now += 1
            self.client.send_datagram(kcp_datagram)
            for sealed in self.client.datagrams_to_send(self.now):
                self.authentic += 1
                server.receive_datagram(sealed, CLIENT_ADDR, self.now)
            server.datagrams_to_send(self.now)  # the driver's transmit(): acks go out

    def push(self, sn: int, data: bytes, frg: int = 0) -> bytes:
        return push(sn, data, frg, conv=self.conv)


def measure(attacks: list[Attack], script) -> int:
    """Bytes still allocated after ``script`` ran (tracemalloc, after a collection)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        script()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


def report(name: str, held: int, conversations: int = 1) -> None:
    print(f"\n[kcp-bounds] {name}: {held} bytes ({held / MIB:.2f} MiB) held by "
          f"{conversations} conversation(s), {held / conversations / MIB:.2f} MiB each")


def test_finding_out_of_order_65k_segments_through_a_conversation() -> None:
    attack = Attack()
    held = measure([attack], lambda: attack.send(attack.push(sn, bytes(BIG))
                                                 for sn in range(1, 1024)))
    report("1,023 out-of-order 65 KB segments", held)
    server = attack.server
    assert attack.authentic == 1023  # every one of them sealed with the PSK and authentic
    assert server.dropped_oversize == 1023  # over the UDP MTU: dropped before decryption
    assert server.session.dropped_auth == 0 and server.kcp.rcv_bytes == 0
    assert held < 64 * 1024
    assert not server.closed


def test_finding_255_fragment_record_through_a_conversation() -> None:
    attack = Attack()
    held = measure([attack], lambda: attack.send(
        attack.push(i, bytes(BIG), frg=frg) for i, frg in enumerate(range(254, -1, -1))))
    report("255-fragment record of 65 KB fragments", held)
    assert attack.server.dropped_oversize == 255
    assert attack.server.read() is None and attack.server.kcp.rcv_bytes == 0
    assert held < 64 * 1024


def test_largest_fragment_count_at_the_mss_is_refused_by_kcp() -> None:
    """Segments that fit the MTU but count down from 254: KCP's max_frg refuses the first 229;
    the rest are held out of order, waiting for sn 0..228 that never come."""
    attack = Attack()
    kcp = attack.server.kcp
    assert kcp.max_frg == -(-MAX_RECORD_SIZE // attack.mss) - 1 == 25
    attack.send(attack.push(i, bytes(attack.mss), frg=frg)
                for i, frg in enumerate(range(254, -1, -1)))
    assert kcp.dropped_oversize == 254 - 25  # frg 254..26
    assert attack.server.dropped_oversize == 0
    assert kcp.rcv_buf_segments == 26 and attack.server.read() is None
    # a legal largest record, sent in order, is read whole
    attack = Attack()
    record = bytes(MAX_RECORD_SIZE)
    mss = attack.mss
    attack.send(attack.push(i, record[i * mss : (i + 1) * mss], frg=25 - i) for i in range(26))
    assert attack.server.read() == record[1:]


def test_record_larger_than_any_of_ours_closes_the_stream() -> None:
    """A broken frg countdown (every fragment says frg=1) lets KCP hand up one huge record;
    the stream layer refuses it as it refuses any malformed record."""
    attack = Attack()
    attack.send(attack.push(sn, bytes(attack.mss), frg=1) for sn in range(100))
    server = attack.server
    assert server.kcp.peeksize() > MAX_RECORD_SIZE
    assert server.read() is None
    assert server.closed and server.malformed_records == 1
    closes = [e for e in iter(server.next_event, None) if hasattr(e, "reason")]
    assert closes[-1].reason == CLOSE_BAD_RECORD


@pytest.mark.parametrize("size", ["mss", "one byte"])
def test_worst_case_per_conversation_at_most_2_mib(size: str) -> None:
    """The server's TCP side never reads (a stalled target): fill rcv_queue in order with
    messages that never complete, then offer every out-of-order sn of the next window, then
    repeat everything (duplicates), all sealed with the PSK."""
    attack = Attack()
    kcp = attack.server.kcp
    rcv_wnd, mss = kcp.rcv_wnd, kcp.mss
    data = bytes(mss if size == "mss" else 1)

    def script() -> None:
        for _ in range(2):
            attack.send(attack.push(sn, data, frg=1) for sn in range(rcv_wnd))
            attack.send(attack.push(sn, data, frg=1) for sn in range(2 * rcv_wnd, rcv_wnd, -1))
            attack.send([attack.push(rcv_wnd, data, frg=1)])

    held = measure([attack], script)
    report(f"worst case, {size} segments (rcv_bytes={kcp.rcv_bytes})", held)
    assert kcp.rcv_queue_segments == rcv_wnd
    if size == "mss":
        assert kcp.rcv_bytes == rcv_wnd * mss == kcp.max_rcv_bytes
        assert kcp.dropped_reassembly >= rcv_wnd
    assert held <= GOAL_PER_CONVERSATION
    attack.server.discard_received()
    assert kcp.rcv_bytes == 0


def test_shared_budget_bounds_many_conversations() -> None:
    """Eight attacked conversations sharing a 4 MiB budget hold about the budget in all."""
    limit = 4 * MIB
    budget = ReassemblyBudget(limit)
    attacks = [Attack(seed=i, conv=CONV + i, budget=budget) for i in range(8)]
    rcv_wnd = attacks[0].server.kcp.rcv_wnd

    def script() -> None:
        for attack in attacks:
            attack.send(attack.push(sn, bytes(attack.mss), frg=1) for sn in range(1, rcv_wnd))
            attack.send(attack.push(sn, bytes(attack.mss), frg=1) for sn in range(rcv_wnd))

    held = measure(attacks, script)
    report(f"8 conversations, shared budget of {limit} (budget.held={budget.held})", held,
           len(attacks))
    kcp = attacks[0].server.kcp
    floor = (kcp.max_frg + 1) * kcp.mss
    assert budget.held <= limit + len(attacks) * (floor + kcp.mss)
    assert sum(a.server.kcp.rcv_bytes for a in attacks) == budget.held
    assert sum(a.server.kcp.dropped_reassembly for a in attacks) > 0
    assert held <= 1.25 * (limit + len(attacks) * (floor + kcp.mss))
    for attack in attacks:
        attack.server.discard_received()
    assert budget.held == 0
