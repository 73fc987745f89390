"""kcptcp/udp_endpoint.py: UdpEndpoint.send: runs of equal-size datagrams go out as one GSO send,
and arrive as the same datagrams in the same order; a refused GSO send falls back to one
datagram per syscall without losing any. Its receive side lets the hub run while a flood never
empties the socket."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator

import gevent
import pytest

from portfwd.kcptcp import udp_endpoint
from portfwd.kcptcp.udp_endpoint import FLOOD_PAUSE_S, FLOOD_RATE, YIELD_AFTER, UdpEndpoint
from portfwd.runtime import recvmmsg


class Refusing(socket.socket):
    """A UDP socket whose GSO sends fail with ``errno_`` (``times`` times)."""

    errno_ = errno.EINVAL
    times = 10**9
    calls = 0

    def sendmsg(self, *args):  # type: ignore[override]
        type(self).calls += 1
        if type(self).times > 0:
            type(self).times -= 1
            raise OSError(self.errno_, "refused")
        return super().sendmsg(*args)


@pytest.fixture
def receiver():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2)
    yield sock
    sock.close()


def received(sock: socket.socket, count: int) -> list[bytes]:
    return [sock.recv(65536) for _ in range(count)]


def batch() -> list[bytes]:
    """Runs of several sizes, an empty datagram, a run longer than 64 segments."""
    sizes = [100] * 5 + [50] + [100] * 3 + [0] + [1200] * 70 + [7]
    return [bytes([i % 251]) * size for i, size in enumerate(sizes)]


def test_runs_of_equal_size_are_one_send_each_and_arrive_intact_in_order(receiver):
    endpoint = UdpEndpoint(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    datagrams = batch()
    endpoint.send(datagrams, receiver.getsockname())
    assert received(receiver, len(datagrams)) == datagrams
    # 100 x5, 100 x3, 1200 x64 and 1200 x6: four GSO sends; the single ones go as they are
    assert (endpoint.gso_sends, endpoint.send_errors) == (4, 0)
    endpoint.close()


def test_a_refused_gso_size_falls_back_to_single_sends_for_good(receiver):
    Refusing.errno_, Refusing.times, Refusing.calls = errno.EINVAL, 10**9, 0
    endpoint = UdpEndpoint(Refusing(socket.AF_INET, socket.SOCK_DGRAM))
    datagrams = batch()
    endpoint.send(datagrams, receiver.getsockname())
    assert received(receiver, len(datagrams)) == datagrams  # nothing lost
    assert endpoint.gso_max == 99 and endpoint.send_errors == 0
    calls = Refusing.calls
    endpoint.send([b"a" * 100] * 4, receiver.getsockname())  # that size: no GSO try again
    assert Refusing.calls == calls
    assert received(receiver, 4) == [b"a" * 100] * 4
    endpoint.close()


def test_an_error_reported_for_an_earlier_datagram_costs_no_datagram_of_the_run(receiver):
    Refusing.errno_, Refusing.times, Refusing.calls = errno.ECONNREFUSED, 1, 0
    endpoint = UdpEndpoint(Refusing(socket.AF_INET, socket.SOCK_DGRAM))
    run = [b"r" * 300] * 8
    endpoint.send(run, receiver.getsockname())
    assert received(receiver, 8) == run
    assert endpoint.send_errors == 1 and endpoint.gso_max > 300  # GSO stays on
    endpoint.send(run, receiver.getsockname())
    assert received(receiver, 8) == run and endpoint.gso_sends == 1
    endpoint.close()


def connected(sock_class, receiver: socket.socket) -> UdpEndpoint:
    sock = sock_class(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(receiver.getsockname())
    return UdpEndpoint(sock)


def test_offer_sends_a_batch_without_waiting_in_runs_and_says_how_many_were_taken(receiver):
    endpoint = connected(socket.socket, receiver)  # kcpudp-server's target socket: connected
    datagrams = batch()
    assert endpoint.offer(datagrams) == len(datagrams)
    assert received(receiver, len(datagrams)) == datagrams
    assert endpoint.gso_sends == 4
    to = UdpEndpoint(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))  # the client's listener
    assert to.offer(datagrams[:5], receiver.getsockname()) == 5
    assert received(receiver, 5) == datagrams[:5]
    endpoint.close()
    to.close()


@pytest.mark.parametrize("refusal", [errno.EINVAL, errno.ECONNREFUSED])
def test_offer_sends_a_refused_run_one_by_one(receiver, refusal):
    Refusing.errno_, Refusing.times, Refusing.calls = refusal, 1, 0
    endpoint = connected(Refusing, receiver)
    run = [b"o" * 400] * 6 + [b"p" * 10]
    assert endpoint.offer(run) == len(run)
    assert received(receiver, len(run)) == run
    # a size the kernel refuses is never tried as a run again; an ICMP error for an earlier
    # datagram (returned instead of sending the run) changes nothing
    assert (endpoint.gso_max == 399) == (refusal == errno.EINVAL)
    endpoint.close()


@pytest.mark.parametrize("batched", [False, True])
def test_a_socket_that_never_empties_still_lets_other_greenlets_run(batched):
    """A flood of datagrams the screen discards: the reader never has to wait, yet another
    greenlet gets its turn before the queue is through (on a one-core server the flood otherwise
    starved every tcp side and ticker)."""
    if batched and recvmmsg._recvmmsg is None:
        pytest.skip("no recvmmsg in libc")
    queued = 4 * YIELD_AFTER
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flooder:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.bind(("127.0.0.1", 0))
        for _ in range(queued):  # queued at once: every read finds more
            flooder.sendto(b"forged", sock.getsockname())
        flooder.sendto(b"real", sock.getsockname())
        endpoint = UdpEndpoint(sock, batched=batched)
        screened = []
        other_ran_after = []
        gevent.spawn(lambda: other_ran_after.append(len(screened)))
        batch = endpoint.recv_batch(lambda data: screened.append(data) or data == b"forged")
        assert [data for data, _ in batch] == [b"real"]
        assert len(screened) == queued + 1  # all were queued: none lost to the buffer
        assert other_ran_after and other_ran_after[0] <= YIELD_AFTER


@contextlib.contextmanager
def flood_reader(monkeypatch, rcvbuf_needed: int = 0) -> Iterator[tuple]:
    """A batched endpoint, a sender, and the lists its socket waits and flood pauses go to;
    each pause delivers what ``during_pause`` holds (as if it came meanwhile), no clock."""
    if recvmmsg._recvmmsg is None:
        pytest.skip("no recvmmsg in libc")
    monkeypatch.setattr(udp_endpoint, "FLOOD_PAUSE_RCVBUF", rcvbuf_needed)
    waits: list[int] = []
    pauses: list[float] = []
    during_pause: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sock.bind(("127.0.0.1", 0))
        endpoint = UdpEndpoint(sock, batched=True)
        real_wait = udp_endpoint.wait

        def counted_wait(watcher) -> None:
            if watcher is endpoint._readable:
                waits.append(1)
            real_wait(watcher)

        def pause(seconds: float) -> None:
            pauses.append(seconds)
            while during_pause:
                sender.sendto(during_pause.pop(0), sock.getsockname())
            gevent.sleep(0)

        monkeypatch.setattr(udp_endpoint, "wait", counted_wait)
        monkeypatch.setattr(udp_endpoint, "_pause", pause)
        send = lambda data: sender.sendto(data, sock.getsockname())  # noqa: E731
        try:
            yield endpoint, send, waits, pauses, during_pause
        finally:
            endpoint.close()


def forged(data: bytes) -> bool:
    return data == b"forged"


def test_under_a_flood_the_batched_reader_pauses_and_reads_what_queued_in_one_call(monkeypatch):
    """After a read that emptied the socket while forgeries came at FLOOD_RATE or more, the
    reader sleeps one pause and reads what came meanwhile in one call, rather than waking on
    the socket for every few datagrams (a flood the server keeps up with cost ~10 us per
    wake-up)."""
    with flood_reader(monkeypatch) as (endpoint, send, waits, pauses, during_pause):
        for _ in range(FLOOD_RATE + 8):
            send(b"forged")
        during_pause[:] = [b"forged"] * 5 + [b"real"]  # sent only by a pause
        batch = gevent.spawn(endpoint.recv_batch, forged).get(timeout=5)
        assert [data for data, _ in batch] == [b"real"]
        assert pauses == [FLOOD_PAUSE_S] and waits == []


def test_a_trickle_of_forgeries_never_pauses_the_reader(monkeypatch):
    """Fewer than FLOOD_RATE forgeries per pause's length: the reader waits on the socket as
    before, so a trickle an attacker sends cannot delay every read."""
    with flood_reader(monkeypatch) as (endpoint, send, waits, pauses, _):
        for _ in range(FLOOD_RATE - 1):
            send(b"forged")
        gevent.spawn_later(0.01, send, b"real")
        assert [data for data, _ in endpoint.recv_batch(forged)] == [b"real"]
        assert pauses == [] and waits == [1]


def test_a_receive_buffer_too_small_for_a_pauses_backlog_never_pauses(monkeypatch):
    """The pause lets a flood queue up: with a buffer below FLOOD_PAUSE_RCVBUF that backlog
    could overflow it and take legitimate datagrams with it, so such a socket never pauses."""
    with flood_reader(monkeypatch, rcvbuf_needed=1 << 40) as (endpoint, send, waits, pauses, _):
        for _ in range(FLOOD_RATE + 8):
            send(b"forged")
        gevent.spawn_later(0.01, send, b"real")
        assert [data for data, _ in endpoint.recv_batch(forged)] == [b"real"]
        assert pauses == [] and waits == [1]


class Counting(socket.socket):
    """A UDP socket that counts its recvfrom calls."""

    calls = 0

    def recvfrom(self, *args):  # type: ignore[override]
        type(self).calls += 1
        return super().recvfrom(*args)


def test_a_read_that_emptied_the_socket_waits_next_time_without_asking_again():
    """One datagram at a time (a client's conversation): each batch costs the read that got it
    and the one that found the socket empty, not a third that learns it again."""
    with Counting(socket.AF_INET, socket.SOCK_DGRAM) as sock, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        sock.bind(("127.0.0.1", 0))
        endpoint = UdpEndpoint(sock)
        Counting.calls = 0
        for i in range(3):
            gevent.spawn_later(0.01, peer.sendto, bytes([i]), sock.getsockname())
            assert [data for data, _ in endpoint.recv_batch()] == [bytes([i])]
        assert Counting.calls == 3 * 2 + 1  # the first batch found the socket empty at first
        peer.sendto(b"a", sock.getsockname())
        peer.sendto(b"b", sock.getsockname())
        gevent.sleep(0.01)
        assert [data for data, _ in endpoint.recv_batch()] == [b"a", b"b"]


def test_a_buffer_shrunk_after_start_stops_the_pause(monkeypatch):
    """A reload may resize the socket's buffer (-S): the pause asks the buffer it has now."""
    with flood_reader(monkeypatch, rcvbuf_needed=100_000) as (endpoint, send, waits, pauses, _):
        assert endpoint.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 100_000
        # as a reload would: still room for the forgeries below (the kernel doubles it)
        endpoint.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 45_000)
        assert endpoint.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < 100_000
        for _ in range(FLOOD_RATE + 8):
            send(b"forged")
        gevent.spawn_later(0.01, send, b"real")
        assert [data for data, _ in endpoint.recv_batch(forged)] == [b"real"]
        assert pauses == [] and waits == [1]
