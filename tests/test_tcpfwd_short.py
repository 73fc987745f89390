"""The short-connection path of tcpfwd, in process on real loopback TCP: relays on hub
callbacks and their hand-over to greenlet pumps, accepting until EAGAIN, and the stats line
that replaced the per-connection lines at INFO (the end-to-end tests in test_tcpfwd.py cover
the same relay through the real tool)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import time

import gevent
import pytest
from conftest import connect, echo_roundtrip, free_port, run_cli
from gevent import socket as gsocket

from portfwd.runtime import sockets
from portfwd.runtime.acceptloop import ACCEPT_BATCH, AcceptLoop
from portfwd.runtime.workers import Workers
from portfwd.tcpfwd import pump
from portfwd.tcpfwd.metrics import TcpCounters
from portfwd.tcpfwd.pump import COPY_CHUNK, RelaySocket
from portfwd.tcpfwd.relay import Relay

MIB = 1 << 20


class CountingWorkers(Workers):
    """Workers that count the jobs spawned: a relay that stays on callbacks spawns none."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned = 0

    def spawn(self, job, *args) -> None:
        self.spawned += 1
        super().spawn(job, *args)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of one loopback TCP connection: (the peer's end, the forwarder's end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = socket.create_connection(listener.getsockname())
        mine, _ = listener.accept()
    return peer, mine


def cooperative(sock: socket.socket) -> gsocket.socket:
    """A test peer's end as a gevent socket, so it can block while the relay runs."""
    return gsocket.socket(fileno=sock.detach())


class Rig:
    """client peer <-> [client side | Relay | upstream side] <-> upstream peer, in process."""

    def __init__(self, splice: bool = False, upstream_buffers: int = 0,
                 rest: bytes = b"") -> None:
        client_peer, client_side = tcp_pair()
        upstream_side, upstream_peer = tcp_pair()
        if upstream_buffers:  # small and fixed: the destination's side fills up soon
            upstream_side.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, upstream_buffers)
            upstream_peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, upstream_buffers)
        self.client = cooperative(client_peer)  # what the user's program holds
        self.server = cooperative(upstream_peer)  # the destination's end
        self.counters = TcpCounters()
        self.workers = CountingWorkers()
        self.relay = Relay(1, RelaySocket(client_side), RelaySocket(upstream_side), splice,
                           self.counters)
        self.relay.start(self.workers, rest)

    def done(self) -> bool:
        return self.workers.join(10) and not self.counters.live

    def close(self) -> None:
        self.client.close()
        self.server.close()


def read_all(sock, limit: int = 64 * MIB) -> bytes:
    out = bytearray()
    while len(out) < limit and (data := sock.recv(65536)):
        out += data
    return bytes(out)


def test_request_response_stays_on_callbacks():
    rig = Rig()
    rig.client.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert rig.server.recv(100) == b"GET / HTTP/1.0\r\n\r\n"
    rig.server.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 1024)
    rig.server.close()  # the server ends first, as HTTP/1.0 servers do
    assert read_all(rig.client) == b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 1024
    rig.client.close()
    assert rig.done()
    assert rig.workers.spawned == 0  # never left the callbacks
    assert (rig.counters.closed, rig.counters.failed, rig.counters.reset) == (1, 0, 0)
    assert (rig.counters.bytes_up, rig.counters.bytes_down) == (18, 19 + 1024)


def test_half_close_on_callbacks_passes_eof_and_the_other_way_goes_on():
    rig = Rig()
    rig.client.sendall(b"question")
    rig.client.shutdown(socket.SHUT_WR)  # the client is done sending, not reading
    assert read_all(rig.server) == b"question"  # data, then the EOF passed on
    for _ in range(3):  # the other direction still works after the EOF
        rig.server.sendall(b"answer")
        assert rig.client.recv(100) == b"answer"
    rig.server.shutdown(socket.SHUT_WR)
    assert rig.client.recv(100) == b""
    assert rig.done()
    assert rig.workers.spawned == 0
    rig.close()


@pytest.mark.parametrize("splice", [False, True], ids=["copy", "splice"])
def test_bulk_hands_over_and_arrives_intact_both_ways(splice):
    rig = Rig(splice)
    size = 16 * MIB
    payload = hashlib.shake_128(b"up").digest(size)
    back = hashlib.shake_128(b"down").digest(size)

    def send_and_read(sock, data: bytes) -> bytes:
        """Send ``data`` then EOF while reading everything the other end sends."""
        sender = gevent.spawn(lambda: (sock.sendall(data), sock.shutdown(socket.SHUT_WR)))
        got = read_all(sock)
        sender.join()
        return got

    c = gevent.spawn(send_and_read, rig.client, payload)
    s = gevent.spawn(send_and_read, rig.server, back)
    gevent.joinall([c, s], timeout=60, raise_error=True)
    assert s.value == payload and c.value == back
    assert rig.done()
    if splice:  # full chunks: both directions went on in greenlet pumps (splice)
        assert rig.workers.spawned == 2
    # (copy: a reader that keeps up never makes a send() partial, so the relay may stay on
    # callbacks all along; test_slow_reader_... hands over on the copy path)
    assert (rig.counters.bytes_up, rig.counters.bytes_down) == (size, size)
    rig.close()


def test_full_chunk_on_splice_path_hands_over_at_once():
    rig = Rig(splice=True)
    rig.client.sendall(b"b" * (4 * COPY_CHUNK))
    got = b""
    while len(got) < 4 * COPY_CHUNK:
        got += rig.server.recv(COPY_CHUNK)
    assert got == b"b" * (4 * COPY_CHUNK)
    assert rig.workers.spawned == 2
    rig.close()
    assert rig.done()


def test_slow_reader_hands_over_with_the_unsent_rest_first():
    """Small writes the destination does not read: a send() takes only part, the rest waits
    in the pump (backpressure) and comes out first, in order, once the reader reads."""
    rig = Rig(upstream_buffers=4096)
    blocks = [os.urandom(1000) for _ in range(4000)]  # 4 MB in small writes
    sender = gevent.spawn(lambda: [rig.client.sendall(b) for b in blocks])
    # Wait, bounded, until the destination's buffers are full. (The sender may be done by
    # then: with a large net.ipv4.tcp_rmem the client's socket takes all 4 MB.)
    for _ in range(1000):
        if rig.workers.spawned:
            break
        gevent.sleep(0.01)
    assert rig.workers.spawned
    got = bytearray()
    while len(got) < len(blocks) * 1000:
        got += rig.server.recv(65536)
    sender.join(10)
    assert bytes(got) == b"".join(blocks)
    rig.close()
    assert rig.done()


def reset(sock) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_bytes_read_before_the_relay_and_not_sent_go_first_through_the_pumps():
    """Client bytes the dial's first send did not take are the first the destination
    reads, before what the client sends next; the relay carries on in the pumps."""
    rig = Rig(rest=b"early ")
    rig.client.sendall(b"later")
    rig.client.shutdown(socket.SHUT_WR)
    assert read_all(rig.server) == b"early later"
    rig.server.sendall(b"reply")
    rig.server.close()
    assert read_all(rig.client) == b"reply"
    assert rig.done()
    assert rig.workers.spawned == 2
    rig.client.close()


def test_reply_with_its_eof_on_callbacks_passes_both_and_the_other_way_goes_on():
    """A first read whose EOF is already queued: the data and the EOF both reach the client
    on callbacks (that they share one segment, test_tcpfwd_segments counts); the client's
    direction keeps working until it ends too."""
    rig = Rig()
    rig.server.sendall(b"banner")
    rig.server.shutdown(socket.SHUT_WR)
    assert read_all(rig.client) == b"banner"
    rig.client.sendall(b"after")
    rig.client.close()
    assert read_all(rig.server) == b"after"
    assert rig.done()
    assert rig.workers.spawned == 0
    assert (rig.counters.closed, rig.counters.failed) == (1, 0)
    rig.server.close()


def test_reset_by_the_server_on_callbacks_ends_both_and_counts_a_failure():
    rig = Rig()
    rig.client.sendall(b"hello")
    assert rig.server.recv(10) == b"hello"
    reset(rig.server)
    try:
        assert rig.client.recv(10) == b""
    except ConnectionResetError:
        pass
    assert rig.done()
    assert rig.counters.failed == 1
    assert "reset" in rig.relay.error.lower()
    rig.client.close()


def test_a_reply_followed_by_a_reset_still_reaches_the_client():
    """A server that writes its reply and closes with input unread sends the data, then RST:
    the reply is relayed, and the reset (which the first read's EOF peek meets) is the
    connection's fate."""
    rig = Rig()
    rig.client.sendall(b"request, then more")
    assert rig.server.recv(7) == b"request"  # the rest stays unread: close() resets
    rig.server.sendall(b"reply")
    reset(rig.server)
    got = b""
    with contextlib.suppress(ConnectionResetError):
        got = read_all(rig.client)
    assert got == b"reply"
    assert rig.done()
    assert rig.counters.failed == 1 and "reset" in rig.relay.error.lower()
    rig.client.close()


def test_kill_cuts_a_relay_on_callbacks_with_rst():
    rig = Rig()
    rig.client.sendall(b"x")
    assert rig.server.recv(1) == b"x"
    assert len(rig.workers) == 1  # the relay counts as a running job
    assert rig.workers.kill(5)
    assert rig.counters.reset == 1 and not rig.counters.live
    with pytest.raises(ConnectionResetError):
        rig.server.recv(10)
    with pytest.raises(ConnectionResetError):
        rig.client.recv(10)
    rig.close()


def test_accepted_socket_blocks_on_callbacks_and_not_in_the_pumps():
    """The callbacks pass MSG_DONTWAIT, so the accepted socket keeps its blocking mode (no
    ioctl per connection); the pumps wait on EAGAIN, so the hand-over makes both sides
    non-blocking first (the upstream side of this rig is a blocking one too)."""
    rig = Rig(splice=True)
    rig.client.sendall(b"ping")
    assert rig.server.recv(10) == b"ping"
    assert rig.relay.client.sock.getblocking() and rig.relay.upstream.sock.getblocking()
    rig.server.sendall(b"x" * (4 * COPY_CHUNK))  # a full chunk: hand-over on the splice path
    got = b""
    while len(got) < 4 * COPY_CHUNK:
        got += rig.client.recv(COPY_CHUNK)
    assert rig.workers.spawned == 2
    assert not rig.relay.client.sock.getblocking()
    assert not rig.relay.upstream.sock.getblocking()
    rig.close()
    assert rig.done()


def test_reused_watchers_serve_only_their_own_connection():
    """A closed relay's readable watchers go to the next relays, with the new fd: data never
    crosses connections, however the fds and watchers are shuffled."""
    first = [Rig() for _ in range(10)]
    for index, rig in enumerate(first[:5]):  # five end: their watchers become spares
        rig.client.sendall(b"early %d" % index)
        assert rig.server.recv(100) == b"early %d" % index
        rig.server.close()
        rig.client.close()
        assert rig.done()
    spares = len(pump._SPARE_WATCHERS)
    assert spares >= 10
    second = [Rig() for _ in range(5)]  # built from the spares
    assert len(pump._SPARE_WATCHERS) == spares - 10
    for index, rig in enumerate(first[5:] + second):
        rig.client.sendall(b"up %d" % index)
        assert rig.server.recv(100) == b"up %d" % index
        rig.server.sendall(b"down %d" % index)
        assert rig.client.recv(100) == b"down %d" % index
        rig.server.close()
        assert read_all(rig.client) == b""
        rig.client.close()
        assert rig.done()
    assert all(rig.counters.failed == 0 for rig in first + second)


def keepalive_options(sock: socket.socket) -> list[int]:
    return [sock.getsockopt(level, option) for level, option, _ in sockets.KEEPALIVE_OPTIONS]


def test_deferred_keepalive_tunes_the_sockets_still_open_a_delay_later():
    wanted = [value for _, _, value in sockets.KEEPALIVE_OPTIONS]
    deferred = sockets.DeferredKeepalive(delay=0.05)
    kept, gone = tcp_pair(), tcp_pair()
    deferred.add(kept[1])
    deferred.add(gone[1])
    gone[1].close()  # a short connection, over before the delay
    assert keepalive_options(kept[1])[0] == 0  # not yet: only the hub's timer sets them
    deadline = time.monotonic() + 10
    while deferred.timer is not None and time.monotonic() < deadline:
        gevent.sleep(0.05)
    assert deferred.timer is None  # stopped once nothing was left to tune
    assert keepalive_options(kept[1]) == wanted
    for sock in (*kept, gone[0]):
        sock.close()


@pytest.mark.skipif(not shutil.which("ss"), reason="ss (iproute2) not installed")
def test_dialled_socket_of_a_lasting_connection_gets_the_seed_options(tool, echo_server):
    """Through the tool: the buffers at once, keepalive within two seconds (ss shows the
    keepalive timer and the buffer sizes of tcpfwd's socket to the destination)."""
    port = free_port()
    fwd = tool("tcpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}")
    fwd.wait_for_log("forwarding")
    sock = connect("127.0.0.1", port)
    echo_roundtrip(sock, 1000, shutdown=False)  # and the connection stays open
    with socket.socket() as probe:  # what the kernel makes of SO_RCVBUF/SO_SNDBUF here
        sockets.set_buffers(probe, sockets.SOCKBUF_CAP)
        rcv = probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        snd = probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    deadline, line = time.monotonic() + 10, ""
    while time.monotonic() < deadline:
        line = subprocess.run(["ss", "-tnmoiH", "state", "established",
                               f"( dport = :{echo_server.port} )"],
                              capture_output=True, text=True, timeout=10).stdout
        if "keepalive" in line:
            break
        gevent.sleep(0.2)
    assert "timer:(keepalive," in line, line
    assert f"rb{rcv}," in line and f"tb{snd}," in line, line
    sock.close()
    assert fwd.stop() == 0


def test_accept_takes_every_pending_connection_per_wake_up_up_to_the_batch():
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    port = listener.getsockname()[1]
    pending = ACCEPT_BATCH + 36
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(pending)]
    seen: list[int] = []  # accept_loop.accepted when each handler started

    def handler(sock: socket.socket, peer: tuple) -> None:
        seen.append(loop.accepted)
        sock.close()

    loop = AcceptLoop(listener, handler)
    loop.start()
    for _ in range(500):  # bounded: until every handler ran
        if len(seen) == pending:
            break
        gevent.sleep(0.01)
    loop.stop(1)
    for client in clients:
        client.close()
    assert len(seen) == pending
    # The first wake-up accepted a whole batch before any handler ran (one accept per
    # wake-up would show 1 here), and no more than a batch: open connections get a turn.
    assert seen[0] == ACCEPT_BATCH
    assert seen[-1] == pending


# --- the stats line and --log-level, through the real tool ------------------------------------

def test_stats_line_replaces_per_connection_lines_at_info(tool, echo_server):
    port = free_port()
    fwd = tool("tcpfwd", "--stats-interval", "1", f"127.0.0.1:{port}",
               f"127.0.0.1:{echo_server.port}")
    fwd.wait_for_log("forwarding")
    for _ in range(3):
        with connect("127.0.0.1", port) as sock:
            echo_roundtrip(sock, 1000)
    fwd.wait_for_log(r"INFO: stats: 0 active, 3 opened, 3 closed \(0 by error, 0 reset\); "
                     r"3 accepted; 3000 bytes up, 3000 down")
    gevent.sleep(2.5)  # idle: nothing changed, so no further stats line
    assert fwd.stop() == 0
    log = fwd.log()
    assert len(re.findall("stats: ", log)) == 1, log  # not repeated at stop either
    assert " conn " not in log


def test_log_level_flag_beats_environment(tool, echo_server):
    port = free_port()
    fwd = tool("tcpfwd", "--log-level", "debug", f"127.0.0.1:{port}",
               f"127.0.0.1:{echo_server.port}", env={"PORTFWD_LOGLEVEL": "30"})
    fwd.wait_for_log("forwarding")
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 100)
    fwd.wait_for_log(r"DEBUG: conn 1 closed: 100 bytes up, 100 down")
    assert fwd.stop() == 0
    quiet = tool("tcpfwd", "--log-level", "warning", f"127.0.0.1:{port}",
                 f"127.0.0.1:{echo_server.port}", env={"PORTFWD_LOGLEVEL": "10"})
    with connect("127.0.0.1", port) as sock:  # bounded by connect()'s timeout and retries
        echo_roundtrip(sock, 100)
    assert quiet.stop() == 0
    assert quiet.log() == ""  # warnings only: no "forwarding", no stats, no conn lines


def test_log_level_key_of_portfwd_run(tool, tmp_path, echo_server):
    port = free_port()
    path = tmp_path / "c.toml"
    path.write_text(f'log_level = "debug"\n\n[[tcp]]\nname = "web"\n'
                    f'listen = "127.0.0.1:{port}"\nto = "127.0.0.1:{echo_server.port}"\n')
    process = tool("portfwd", "run", str(path))
    process.wait_for_log("forwarding")
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 100)
    process.wait_for_log(r"DEBUG: .*conn 1 closed: 100 bytes up, 100 down")
    assert process.stop() == 0


@pytest.fixture(autouse=True)
def _quiet_relay_logs():
    """The in-process relays log at DEBUG; keep pytest's capture out of their way."""
    logger = logging.getLogger("portfwd.tcpfwd.relay")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield
    logger.setLevel(level)


def test_dial_that_does_not_complete_at_once_goes_on_in_a_worker(tool):
    """A destination whose accept queue is full drops the SYN; the kernel retries it about 1 s
    later. Meanwhile the dial waits in a worker (the accept loop goes on: a second client is
    accepted and waits its turn too), and both relays work once the queue has room."""
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(0)
    fillers = []
    for _ in range(3):  # fill the accept queue (listen(0) holds one or two)
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(target.getsockname())
        fillers.append(filler)
    gevent.sleep(0.2)
    port = free_port()
    fwd = tool("tcpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{target.getsockname()[1]}")
    fwd.wait_for_log("forwarding")
    first, second = connect("127.0.0.1", port), connect("127.0.0.1", port)
    first.sendall(b"one")
    second.sendall(b"two")
    gevent.sleep(0.3)
    target.settimeout(10)
    got = {}
    while len(got) < 2:  # bounded by the timeout: the fillers first, then the two dials
        conn, _ = target.accept()
        conn.settimeout(0.5)
        try:
            data = conn.recv(10)
        except TimeoutError:
            data = b""
        if data:
            conn.sendall(data.upper())
            got[data] = conn
        else:
            conn.close()
    assert sorted(got) == [b"one", b"two"]
    assert first.recv(10) == b"ONE" and second.recv(10) == b"TWO"
    for sock in (first, second, target, *got.values(), *fillers):
        sock.close()
    assert fwd.stop() == 0


@pytest.mark.parametrize(("name", "args"), [
    ("tcpfwd", ["127.0.0.1:1", "127.0.0.1:2"]),
    ("udpfwd", ["127.0.0.1:1", "127.0.0.1:2"]),
    ("kcptcp-client", ["-K", "00" * 32, "127.0.0.1:1", "127.0.0.1:2"]),
    ("kcptcp-server", ["-K", "00" * 32, "127.0.0.1:1", "127.0.0.1:2"]),
    ("kcpudp-client", ["-K", "00" * 32, "127.0.0.1:1", "127.0.0.1:2"]),
    ("kcpudp-server", ["-K", "00" * 32, "127.0.0.1:1", "127.0.0.1:2"]),
])
def test_every_tool_takes_log_level_and_rejects_a_bad_one(name, args):
    result = run_cli(name, "--log-level", "loud", *args)
    assert result.returncode == 2
    assert result.stderr == (f"{name}: error: --log-level expects one of error, warning, info, "
                             "debug, got 'loud'\n")
