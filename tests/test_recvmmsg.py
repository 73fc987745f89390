"""runtime/recvmmsg.py: one recvmmsg for many datagrams gives what a recvfrom loop gives.

Loopback sockets only; every datagram sent is accounted for, in order.
"""

from __future__ import annotations

import socket

import pytest

from portfwd.runtime import recvmmsg
from portfwd.runtime.recvmmsg import BatchReceiver, batch_receiver

pytestmark = pytest.mark.skipif(recvmmsg._recvmmsg is None, reason="no recvmmsg in libc")


def bound(family: int, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


def drain(receiver: BatchReceiver, discard=None) -> list[list]:
    batches = []
    while (batch := receiver.receive(discard)) is not None:
        batches.append(batch)
    return batches


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"),
                                         (socket.AF_INET6, "::1")])
def test_datagrams_and_sources_are_those_recvfrom_gives(family, host):
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    with bound(family, host) as server, bound(family, host) as a, bound(family, host) as b:
        receiver = batch_receiver(server, 4)
        assert receiver is not None and receiver.receive() is None  # nothing queued
        sizes = [0, 1, 100, 1350, 9000, 65507, 3, 4, 5]  # empty and largest included
        sent = []
        for i, size in enumerate(sizes):
            sender = (a, b)[i % 2]
            datagram = bytes([i]) * size
            sender.sendto(datagram, server.getsockname())
            sent.append((datagram, sender.getsockname()))
        batches = drain(receiver)
        assert [len(batch) for batch in batches] == [4, 4, 1]  # at most ``count`` per call
        assert [d for batch in batches for d in batch] == sent
        # the same address tuples recvfrom returns (what sessions compare and sendto takes)
        a.sendto(b"x", server.getsockname())
        server.setblocking(True)
        assert server.recvfrom(10) == (b"x", a.getsockname())


def test_discarded_datagrams_are_dropped_before_their_source_is_decoded(monkeypatch):
    decoded = []
    real = recvmmsg.decode_sockaddr
    monkeypatch.setattr(recvmmsg, "decode_sockaddr", lambda raw: decoded.append(raw) or real(raw))
    with bound(socket.AF_INET, "127.0.0.1") as server, bound(socket.AF_INET, "127.0.0.2") as bad, \
            bound(socket.AF_INET, "127.0.0.3") as good:
        receiver = BatchReceiver(server, 64)
        for n in range(10):
            (bad if n % 2 else good).sendto(b"bad" if n % 2 else b"good%d" % n,
                                            server.getsockname())
        batches = drain(receiver, discard=lambda data: data == b"bad")
        got = [d for batch in batches for d in batch]
        assert got == [(b"good%d" % n, good.getsockname()) for n in range(0, 10, 2)]
        # one decode for the good sender (then the cache), none for the discarded one
        assert [real(raw) for raw in decoded] == [good.getsockname()]
        # a batch that was all discarded reads as empty, not as "nothing queued"
        bad.sendto(b"bad", server.getsockname())
        assert drain(receiver, discard=lambda data: data == b"bad") == [[]]
        # and each call says how many it left out (the tunnel's flood pause counts them)
        bad.sendto(b"bad", server.getsockname())
        good.sendto(b"good", server.getsockname())
        assert len(receiver.receive(lambda data: data == b"bad")) == 1
        assert receiver.discarded == 1
        assert receiver.receive(lambda data: data == b"bad") is None
        assert receiver.discarded == 0
