"""Wire interop of portfwd.kcp with the C ikcp (PyPI ``kcp``, a Cython wrapper of ikcp.c).

Two kinds of evidence:
- lockstep: our engine and the C engine, fed identical inputs at identical times, must emit
  byte-identical datagrams (segment for segment, packing included);
- transfers: 8 MiB each way between ours and C at the same time, over a seeded link with loss,
  duplication, delay and reordering, in message and in stream mode.
"""

from __future__ import annotations

import ctypes
import random

import pytest

try:  # tests/ is not a package: pytest puts it on sys.path
    from test_kcp import Endpoint, Link, run_pair
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from .test_kcp import Endpoint, Link, run_pair

from portfwd.kcp import Kcp, KcpConfig

ckcp = pytest.importorskip("kcp")

CONV = 0x0BADF00D
MIB = 1 << 20

# The wrapper exposes no setter for ikcpcb.stream nor for the sequence numbers.  Its KCP
# object is a Cython cdef class: PyObject_HEAD (16 bytes) + vtable pointer (8) + ``IKCPCB*``.
# In IKCPCB (ikcp.h) the 33 u32 fields, 4 queue heads and 4 pointer/u32 fields put
# fastresend, fastlimit, nocwnd, stream at byte offsets 232, 236, 240, 244; snd_una,
# snd_nxt, rcv_nxt are u32 number 4, 5, 6.  CEngine checks known fields before writing.
_KCP_PTR_OFFSET = 24  # bytes into the Python object
_IKCPCB_U32 = {"conv": 0, "mtu": 1, "interval": 20, "fastresend": 58, "fastlimit": 59}
_IKCPCB_STREAM = 61  # u32 index of ``int stream``
_IKCPCB_SEQUENCE = (4, 5, 6)  # snd_una, snd_nxt, rcv_nxt: to start near the u32 wrap


class CEngine:
    """The C ikcp behind the same duck-typed surface as portfwd.kcp.Kcp (no check())."""

    def __init__(self, conv: int, cfg: KcpConfig) -> None:
        self.kcp = ckcp.KCP(
            conv,
            cfg.mtu,
            cfg.nodelay,
            cfg.interval,
            cfg.resend,
            cfg.nc,
            cfg.snd_wnd,
            cfg.rcv_wnd,
        )
        self._out: list[bytes] = []
        self.kcp.include_outbound_handler(lambda _kcp, data: self._out.append(data))
        if cfg.stream or cfg.isn:
            self._patch_ikcpcb(conv, cfg)

    def _patch_ikcpcb(self, conv: int, cfg: KcpConfig) -> None:
        address = ctypes.c_void_p.from_address(id(self.kcp) + _KCP_PTR_OFFSET).value
        fields = (ctypes.c_uint32 * 64).from_address(address)
        expected = {
            "conv": conv,
            "mtu": cfg.mtu,
            "interval": cfg.interval,
            "fastresend": cfg.resend,
            "fastlimit": 5,
        }
        for name, index in _IKCPCB_U32.items():
            if fields[index] != expected[name]:
                pytest.skip(f"unexpected ikcpcb layout ({name}); cannot patch it")
        fields[_IKCPCB_STREAM] = int(cfg.stream)
        for index in _IKCPCB_SEQUENCE:
            fields[index] = cfg.isn

    def send(self, data: bytes) -> None:
        self.kcp.enqueue(data)

    def input(self, datagram: bytes) -> bool:
        self.kcp.receive(datagram)
        return True

    def recv(self) -> bytes | None:
        if self.kcp.get_next_packet_size() < 0:
            return None
        return bytes(self.kcp.get_received())

    def update(self, now: int) -> None:
        self.kcp.update(now & 0xFFFFFFFF)

    def datagrams_to_send(self) -> list[bytes]:
        out = self._out
        self._out = []
        return out

    @property
    def waitsnd(self) -> int:
        return self.kcp.get_outbound_packets()


def _drain(engine) -> list[bytes]:
    out = []
    while (data := engine.recv()) is not None:
        out.append(data)
    return out


# --- lockstep: byte-identical output --------------------------------------------------------
LOCKSTEP_CASES = [
    # (name, config, loss)
    ("tunnel-defaults", KcpConfig(mtu=1350 - 40), 0.0),
    ("tunnel-defaults-lossy", KcpConfig(mtu=1350 - 40), 0.2),
    ("small-window", KcpConfig(snd_wnd=16, rcv_wnd=128, mtu=300), 0.2),
    ("congestion-control", KcpConfig(snd_wnd=256, rcv_wnd=256, nc=False), 0.1),
    ("classic", KcpConfig(nodelay=False, interval=40, resend=0, nc=False, snd_wnd=32), 0.3),
    ("stream", KcpConfig(stream=True, snd_wnd=64, rcv_wnd=128, mtu=500), 0.2),
    ("sn-wraps", KcpConfig(snd_wnd=128, rcv_wnd=128, mtu=200, isn=0xFFFFFFFF - 300), 0.2),
]


@pytest.mark.parametrize(
    "config, loss", [c[1:] for c in LOCKSTEP_CASES], ids=[c[0] for c in LOCKSTEP_CASES]
)
@pytest.mark.parametrize("seed", range(3))
def test_lockstep_byte_identical_to_c(config, loss, seed):
    """Same inputs at the same times => the very same datagrams as ikcp, every flush.

    Also checks our timer: whenever update() produced output, check() had asked for a call
    no later than that.  The readers stall now and then so the window closes and reopens
    (zero-window probing, WASK/WINS).
    """
    rng = random.Random(seed)
    ours = [Kcp(CONV, config), Kcp(CONV, config)]
    theirs = [CEngine(CONV, config), CEngine(CONV, config)]
    links: list[list[tuple[int, float, bytes]]] = [[], []]
    deadlines = [0, 0]
    max_message = 127 * (config.mtu - 24)
    now = 0
    datagrams = 0
    stalled_until = [0, 0]
    for _step in range(4000):
        for i in (0, 1):
            if rng.random() < 0.3 and ours[i].waitsnd < 3 * config.snd_wnd:
                data = rng.randbytes(rng.randint(1, min(max_message, 8000)))
                ours[i].send(data)
                theirs[i].send(data)
                deadlines[i] = ours[i].check(now)  # the driver re-reads the timer after send
        for i in (0, 1):
            ours[i].update(now)
            theirs[i].update(now)
            mine, ref = ours[i].datagrams_to_send(), theirs[i].datagrams_to_send()
            assert mine == ref, f"step {_step} side {i}: output differs from ikcp"
            if mine:
                assert now >= deadlines[i], "check() asked for a call later than needed"
            datagrams += len(mine)
            for datagram in mine:
                if rng.random() >= loss:
                    links[i].append((now + rng.randint(1, 40), rng.random(), datagram))
        for i in (0, 1):
            links[i].sort()
            while links[i] and links[i][0][0] <= now:
                datagram = links[i].pop(0)[2]
                assert ours[1 - i].input(datagram)
                theirs[1 - i].input(datagram)
            if now >= stalled_until[1 - i]:
                if rng.random() < 0.002:
                    stalled_until[1 - i] = now + rng.randint(1000, 12000)
                mine, ref = _drain(ours[1 - i]), _drain(theirs[1 - i])
                if config.stream:  # we hand out all queued bytes at once, ikcp a segment
                    mine, ref = [b"".join(mine)], [b"".join(ref)]
                assert mine == ref
        deadlines = [ours[0].check(now), ours[1].check(now)]
        now += rng.randint(1, 8)
    assert datagrams > 100
    if config.isn:  # the run really crossed the u32 wrap, on both sides
        assert all(k.snd_nxt < config.isn and k.rcv_nxt < config.isn for k in ours)


# --- 8 MiB each way, ours <-> C at once -----------------------------------------------------
NETWORKS = {
    "clean": dict(loss=0.0, dup=0.0, delay=(10, 10)),
    "lossy": dict(loss=0.1, dup=0.02, delay=(5, 40)),
    "terrible": dict(loss=0.3, dup=0.05, delay=(1, 80)),
}


def _payload(rng: random.Random, total: int, stream: bool, mss: int) -> list[bytes]:
    blob = rng.randbytes(total)
    chunks, offset = [], 0
    while offset < total:
        size = rng.randint(1, 65536) if stream else rng.randint(1, 127 * mss)
        chunks.append(blob[offset : offset + size])
        offset += size
    return chunks


@pytest.mark.parametrize("network", list(NETWORKS))
@pytest.mark.parametrize("stream", [False, True], ids=["message", "stream"])
def test_8mib_each_way_ours_and_c(stream, network):
    rng = random.Random(f"8mib-{stream}-{network}")  # str seeds are deterministic
    cfg = KcpConfig(mtu=1350 - 40, stream=stream)  # the tunnel's defaults
    ours, theirs = Kcp(CONV, cfg), CEngine(CONV, cfg)
    to_c = _payload(rng, 8 * MIB, stream, cfg.mtu - 24)
    to_ours = _payload(rng, 8 * MIB, stream, cfg.mtu - 24)
    ep_ours = Endpoint(ours, to_c, max_waitsnd=2 * cfg.snd_wnd)
    ep_c = Endpoint(theirs, to_ours, max_waitsnd=2 * cfg.snd_wnd)
    link_to_c = Link(rng, **NETWORKS[network])
    link_to_ours = Link(rng, **NETWORKS[network])

    def done() -> bool:
        return ep_ours.received_bytes >= 8 * MIB and ep_c.received_bytes >= 8 * MIB

    run_pair(ep_ours, ep_c, link_to_c, link_to_ours, done)
    if stream:
        assert b"".join(ep_c.received) == b"".join(to_c)
        assert b"".join(ep_ours.received) == b"".join(to_ours)
    else:
        assert ep_c.received == to_c
        assert ep_ours.received == to_ours
    if network != "clean":
        assert ours.retransmits + ours.fast_retransmits > 0
    assert ours.dropped_malformed == ours.dropped_conv == 0
