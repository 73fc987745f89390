"""kcpudp end to end: real kcpudp-client and kcpudp-server processes on loopback, threaded peers.

Sizes, many client addresses, expiry, a seeded lossy relay, wrong PSK and refusals. WireGuard
and dnsmasq behind the tunnel are in test_kcpudp_peers.py.
"""

from __future__ import annotations

import random
import resource
import select
import socket
import struct
import threading
import time
import zlib

import pytest
import test_udpfwd
from conftest import free_port, needs_ipv6, run_cli, sample_value  # bad options: test_cli.py
from hardening import fd_count
from test_hardening_tunnel import wait_until
from test_metrics_export_e2e import scrape
from test_portfwd_run import Reloader, key_file, rule, write
from test_udpfwd import MAX_PAYLOAD, udp_socket

PSK = "0123456789abcdef" * 4
OTHER_PSK = "fedcba9876543210" * 4
MODES = ["reliable", "datagram"]
peers = test_udpfwd.peers  # the fixture of threaded UDP peers (echo by default)


def start_tunnel(tool, target_port: int, *extra: str, server_extra: tuple = (),
                 client_extra: tuple = (), server_port: int | None = None,
                 client_server_port: int | None = None):
    """Server then client; returns ((host, port) of the client's listener, server, client).
    ``client_server_port``: where the client sends (a relay in front of the server)."""
    udp = server_port or free_port(socket.AF_INET, socket.SOCK_DGRAM)
    local = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    server = tool("kcpudp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{target_port}", *extra,
                  *server_extra)
    server.wait_for_log("tunnelling")
    client = tool("kcpudp-client", f"127.0.0.1:{local}",
                  f"127.0.0.1:{client_server_port or udp}", *extra, *client_extra)
    client.wait_for_log("tunnelling")
    return ("127.0.0.1", local), server, client


def exchange(sock: socket.socket, addr: tuple, datagram: bytes, timeout: float = 10.0) -> bytes:
    """Send until an answer comes (the first datagrams wait for the handshake: in datagram
    mode nothing is retransmitted), return it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.sendto(datagram, addr)
        if readable([sock], 0.5):
            return sock.recv(65536)
    raise AssertionError("no answer through the tunnel")


def readable(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """The sockets with a datagram waiting (poll: a suite holds fds beyond select's 1024)."""
    poller = select.poll()
    by_fd = {sock.fileno(): sock for sock in socks}
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    return [by_fd[fd] for fd, _ in poller.poll(timeout * 1000)]


@pytest.mark.parametrize("key", [["-K", PSK], []], ids=["encrypted", "plaintext"])
@pytest.mark.parametrize("mode", MODES)
def test_every_size_both_ways(tool, peers, mode, key):
    """0..65,507 bytes pass intact up and down (the echo), fragmented beyond -M."""
    echo = peers()
    addr, server, client = start_tunnel(tool, echo.port, "--mode", mode, *key)
    rng = random.Random(1)
    sizes = [0, 1, 2, 100, 1300, 1318, 1319, 1320, 1350, 1400, 2700, 9000, 32768, 65000,
             MAX_PAYLOAD - 1, MAX_PAYLOAD]
    with udp_socket("127.0.0.1") as sock:
        exchange(sock, addr, b"warm-up")
        for size in sizes:
            data = rng.randbytes(size)
            assert exchange(sock, addr, data) == data, f"{size} bytes"
    assert len(echo.sources) == 1  # one conversation: one stable source at the target
    for proc in (client, server):
        assert proc.stop() == 0


@pytest.mark.parametrize("mode", MODES)
def test_1000_client_addresses_all_answered_then_expire(tool, peers, mode):
    """1,000 concurrent client addresses, each its own conversation and answered; -t expires
    them all and every socket is released on both sides."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2500:
        pytest.skip(f"fd hard limit {hard} is too low for 1,000 client sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    echo = peers()
    addr, server, client = start_tunnel(tool, echo.port, "--mode", mode, "-K", PSK,
                                        client_extra=("-t", "30", "--stats-interval", "1"))
    base_client, base_server = fd_count(client.pid), fd_count(server.pid)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(1000)]
    try:
        pending = dict(enumerate(clients))
        deadline = time.monotonic() + 90
        while pending and time.monotonic() < deadline:  # datagram mode: resend what is lost
            for n, sock in pending.items():
                sock.sendto(b"%d" % n, addr)
            end = time.monotonic() + 2
            while pending and time.monotonic() < end:
                for sock in readable(list(pending.values()), 0.2):
                    n = clients.index(sock)
                    assert sock.recv(100) == b"%d" % n
                    pending.pop(n, None)
        assert not pending, f"{len(pending)} client addresses never answered"
        assert fd_count(client.pid) == base_client + 1000  # one tunnel socket per address
        assert fd_count(server.pid) == base_server + 1000  # one target socket per address
        # (echo.sources may count fewer: under load a conversation whose handshake timed out
        # is replaced, and its target port can be reused by the new one)
        assert len(echo.sources) >= 1000 - client.log().count(" closed (")
        # -t 30: far more than answering all of them takes on a loaded machine
        wait_until(lambda: fd_count(client.pid) == base_client, 90, "client sockets released")
        wait_until(lambda: fd_count(server.pid) == base_server, 30, "server sockets released")
        client.wait_for_log(r"stats total conversations=0 finished=1000 opened=1000 "
                            r"expired=1000", timeout=10)
    finally:
        for sock in clients:
            sock.close()
    assert client.stop() == 0 and server.stop() == 0


class LossyRelay:
    """A seeded lossy UDP link between kcpudp-client and kcpudp-server (one client): each
    datagram either way is dropped, duplicated or held back (reordered) by a seeded draw."""

    def __init__(self, server_port: int, seed: int, loss: float = 0.1, dup: float = 0.05,
                 reorder: float = 0.1) -> None:
        self.rng = random.Random(seed)
        self.loss, self.dup, self.reorder = loss, dup, reorder
        self.server = ("127.0.0.1", server_port)
        self.front = udp_socket("127.0.0.1")
        self.back = udp_socket("127.0.0.1")
        self.port = self.front.getsockname()[1]
        self.client: tuple | None = None
        self.dropped = self.duplicated = self.reordered = 0
        self._held: list[tuple[socket.socket, bytes, tuple]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self.front, self.back], [], [], 0.05)
            if not ready and self._held:  # idle: let what was held back go
                self._flush()
            for sock in ready:
                data, addr = sock.recvfrom(65536)
                if sock is self.front:
                    self.client = addr
                    out, to = self.back, self.server
                elif self.client is not None:
                    out, to = self.front, self.client
                else:
                    continue
                self._forward(out, data, to)

    def _forward(self, out: socket.socket, data: bytes, to: tuple) -> None:
        draw = self.rng.random()
        if draw < self.loss:
            self.dropped += 1
            return
        if draw < self.loss + self.reorder:
            self.reordered += 1
            self._held.append((out, data, to))  # sent after the next one: out of order
            return
        copies = 2 if self.rng.random() < self.dup else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            self._send(out, data, to)
        self._flush()

    def _flush(self) -> None:
        held, self._held = self._held, []
        for out, data, to in held:
            self._send(out, data, to)

    @staticmethod
    def _send(out: socket.socket, data: bytes, to: tuple) -> None:
        try:
            out.sendto(data, to)
        except OSError:
            pass

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.front.close()
        self.back.close()


def numbered(n: int, rng: random.Random) -> bytes:
    """Datagram ``n``: its number, a length and a payload whose checksum proves it intact."""
    body = rng.randbytes(rng.choice([0, 10, 500, 1200, 3000, 5000]))
    return struct.pack(">II", n, zlib_crc(body)) + body


def zlib_crc(data: bytes) -> int:
    return zlib.crc32(data)


def parse(datagram: bytes) -> int:
    n, crc = struct.unpack_from(">II", datagram)
    assert zlib_crc(datagram[8:]) == crc, f"datagram {n} corrupted"
    return n


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [1, 2])
def test_lossy_relay(tool, peers, mode, seed):
    """Through loss, duplication and reordering: reliable delivers every datagram exactly
    once and in order; datagram at most once and never corrupted. Both directions."""
    echo = peers()
    server_port = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    relay = LossyRelay(server_port, seed)
    try:
        addr, server, client = start_tunnel(tool, echo.port, "--mode", mode, "-K", PSK,
                                            server_port=server_port,
                                            client_server_port=relay.port)
        rng = random.Random(seed)
        count = 300
        sent = [numbered(n, rng) for n in range(count)]
        got: list[int] = []
        with udp_socket("127.0.0.1") as sock:
            sock.settimeout(0.2)
            exchange(sock, addr, struct.pack(">II", 0xFFFFFFFF, zlib_crc(b"")), timeout=30)
            for n, datagram in enumerate(sent):
                sock.sendto(datagram, addr)
                if n % 20 == 19:
                    time.sleep(0.02)  # no burst beyond the sockets' buffers
            deadline = time.monotonic() + (60 if mode == "reliable" else 5)
            while time.monotonic() < deadline and len(got) < count:
                try:
                    n = parse(sock.recv(65536))
                except TimeoutError:
                    continue
                if n != 0xFFFFFFFF:  # not a late copy of the warm-up's answer
                    got.append(n)
        assert relay.dropped and relay.duplicated and relay.reordered  # the link was lossy
        if mode == "reliable":
            assert got == list(range(count))  # exactly once, in order (up, then down)
        else:
            assert len(got) == len(set(got)), "a datagram arrived twice"
            assert set(got) <= set(range(count))
            assert got, "nothing crossed the lossy link"
        for proc in (client, server):
            assert proc.stop() == 0, proc.log()[-3000:]
    finally:
        relay.close()


def test_wrong_psk_nothing_reaches_the_target(tool, peers):
    echo = peers()
    addr, server, client = start_tunnel(tool, echo.port, server_extra=("-K", PSK),
                                        client_extra=("-K", OTHER_PSK))
    with udp_socket("127.0.0.1") as sock:
        for _ in range(20):
            sock.sendto(b"secret", addr)
            time.sleep(0.05)
    server.wait_for_log(r"handshake rejected from .*bad MAC", timeout=10)
    time.sleep(0.5)
    assert echo.sources == set()  # not one datagram arrived
    assert "open" not in server.log()
    for proc in (client, server):
        assert proc.stop() == 0


@pytest.mark.parametrize(("client_tool", "client_mode", "server_mode"), [
    ("kcpudp-client", "datagram", "reliable"),
    ("kcpudp-client", "reliable", "datagram"),
    ("kcptcp-client", None, "reliable"),
])
def test_mode_mismatch_refused_on_both_sides(tool, peers, client_tool, client_mode,
                                             server_mode):
    """A client in the other mode (or a kcptcp-client) is refused with a REFUSE: a clear line
    on both sides, nothing reaches or is opened to the target."""
    echo = peers()
    udp = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    server = tool("kcpudp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{echo.port}", "-K", PSK,
                  "--mode", server_mode)
    server.wait_for_log("tunnelling")
    if client_tool == "kcptcp-client":
        local = free_port()
        client = tool(client_tool, f"127.0.0.1:{local}", f"127.0.0.1:{udp}", "-K", PSK)
        client.wait_for_log("tunnelling")
        with socket.create_connection(("127.0.0.1", local), timeout=5) as conn:
            conn.sendall(b"hello")
            conn.settimeout(10)
            try:
                assert conn.recv(100) == b""  # closed, not bridged
            except ConnectionResetError:
                pass  # closed with "hello" unread: a reset, as closed as it gets
        client_carries = r"a TCP stream \(kcptcp\)"
    else:
        local = free_port(socket.AF_INET, socket.SOCK_DGRAM)
        client = tool(client_tool, f"127.0.0.1:{local}", f"127.0.0.1:{udp}", "-K", PSK,
                      "--mode", client_mode)
        client.wait_for_log("tunnelling")
        with udp_socket("127.0.0.1") as sock:
            sock.sendto(b"hello", ("127.0.0.1", local))
        client_carries = rf"--mode {client_mode}"
    server_carries = rf"--mode {server_mode}"
    client.wait_for_log(rf"refused by the server: it carries .*{server_carries}.*, this side "
                        rf".*{client_carries}", timeout=10)
    server.wait_for_log(rf"handshake rejected from .*: conv=\d+: the client carries "
                        rf".*{client_carries}.*, this server .*{server_carries}")
    assert echo.sources == set() and " open " not in server.log()
    for proc in (client, server):
        assert proc.stop() == 0


def test_reverse_mismatch_kcpudp_client_at_kcptcp_server(tool, peers):
    udp = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    server = tool("kcptcp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{free_port()}", "-K", PSK)
    server.wait_for_log("tunnelling")
    local = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    client = tool("kcpudp-client", f"127.0.0.1:{local}", f"127.0.0.1:{udp}", "-K", PSK)
    client.wait_for_log("tunnelling")
    with udp_socket("127.0.0.1") as sock:
        sock.sendto(b"hello", ("127.0.0.1", local))
    client.wait_for_log(r"refused by the server: it carries a TCP stream \(kcptcp\)")
    server.wait_for_log(r"the client carries reliable datagrams .*, this server a TCP stream")
    assert " open " not in server.log()
    for proc in (client, server):
        assert proc.stop() == 0


def test_help_lists_the_options():
    for prog in ("kcpudp-client", "kcpudp-server"):
        out = run_cli(prog, "-h").stdout
        for option in ("-t <seconds>", "--mode <mode>", "-K <hex>", "--keepalive",
                       "--max-sessions", "--max-pending", "--sndwnd"):
            assert option in out
        assert "--connect-timeout" not in out


@pytest.mark.parametrize("mode", MODES)
def test_rekey_with_the_seed_log_lines(tool, peers, mode):
    """The session rekeys under datagram traffic in both modes (DATAGRAM packets count towards
    the threshold like DATA), with the seed's log lines, and traffic goes on in the new epoch."""
    echo = peers()
    env = {"PORTFWD_REKEY_SEQ_THRESHOLD": "400"}
    udp = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    local = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    server = tool("kcpudp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{echo.port}", "-K", PSK,
                  "--mode", mode, env=env)
    server.wait_for_log("tunnelling")
    client = tool("kcpudp-client", f"127.0.0.1:{local}", f"127.0.0.1:{udp}", "-K", PSK,
                  "--mode", mode, env=env)
    client.wait_for_log("tunnelling")
    addr = ("127.0.0.1", local)
    with udp_socket("127.0.0.1") as sock:
        exchange(sock, addr, b"warm-up")
        sock.settimeout(5)
        answered = 0
        for start in range(0, 1200, 40):
            for n in range(start, start + 40):  # one tunnel packet each (KCP would pack
                sock.sendto(b"%d" % n + bytes(1000), addr)  # small ones together)
            for _ in range(40):
                try:
                    sock.recv(2000)
                    answered += 1
                except TimeoutError:
                    break
        if mode == "reliable":
            assert answered == 1200
        for proc in (client, server):  # one side starts it, the other answers; both switch
            proc.wait_for_log(r"rekey trigger conv=\d+ epoch=0->1 send_seq=\d+ deadline=\d+|"
                              r"recv REKEY_INIT conv=\d+ seq=\d+")
            proc.wait_for_log(r"epoch switch conv=\d+ -> epoch=1")
        assert "rekey trigger" in client.log() + server.log()
        assert exchange(sock, addr, b"after the rekey") == b"after the rekey"
    assert "rekey timeout" not in client.log() + server.log()
    for proc in (client, server):
        assert proc.stop() == 0


def test_server_timeout_closes_and_the_client_reopens(tool, peers):
    """The server's -t closes an idle conversation (its target socket released, the client told
    by CLOSE); the client's next datagram opens a new one. Stats lines name the datagrams."""
    echo = peers()
    addr, server, client = start_tunnel(tool, echo.port, "-K", PSK,
                                        server_extra=("-t", "2", "--stats-interval", "1"),
                                        client_extra=("-t", "0"))
    base = fd_count(server.pid)
    with udp_socket("127.0.0.1") as sock:
        assert exchange(sock, addr, b"one") == b"one"
        server.wait_for_log(r"stats conv=\d+: up=1 down=1 up_bytes=3 down_bytes=3 ")
        assert fd_count(server.pid) == base + 1
        server.wait_for_log(r"conv=\d+ closed \(idle\)")
        client.wait_for_log(r"conv=\d+ closed \(closed by peer\): 1 datagrams up, 1 down")
        wait_until(lambda: fd_count(server.pid) == base, 10, "the target socket released")
        assert exchange(sock, addr, b"two") == b"two"
    server.wait_for_log(r"stats total conversations=1 finished=1 .* expired=1")
    assert len(echo.sources) == 2  # a new conversation, a new target socket
    for proc in (client, server):
        assert proc.stop() == 0


@needs_ipv6
@pytest.mark.parametrize("mode", MODES)
def test_ipv6_everywhere(tool, mode):
    """Listener, tunnel leg and target on ::1."""
    echo = test_udpfwd.UdpPeer("::1")
    try:
        udp = free_port(socket.AF_INET6, socket.SOCK_DGRAM)
        local = free_port(socket.AF_INET6, socket.SOCK_DGRAM)
        server = tool("kcpudp-server", f"[::1]:{udp}", f"[::1]:{echo.port}", "-K", PSK,
                      "--mode", mode)
        server.wait_for_log("tunnelling")
        client = tool("kcpudp-client", f"[::1]:{local}", f"[::1]:{udp}", "-K", PSK,
                      "--mode", mode)
        client.wait_for_log("tunnelling")
        with udp_socket("::1") as sock:
            data = random.Random(5).randbytes(40000)
            assert exchange(sock, ("::1", local), data) == data
        for proc in (client, server):
            assert proc.stop() == 0
    finally:
        echo.close()


def test_client_allow_deny_drops_refused_addresses_before_a_conversation(tool, peers):
    """kcpudp-client --deny: a refused client address gets no conversation (nothing is sent
    to the server), its datagrams are counted (stats line, Prometheus); others pass."""
    echo = peers()
    metrics = free_port()
    addr, server, client = start_tunnel(
        tool, echo.port, "-K", PSK, "--stats-interval", "1",
        client_extra=("--allow", "127.0.0.0/8", "--deny", "127.0.0.2/32",
                      "--metrics", f"127.0.0.1:{metrics}"))
    with udp_socket("127.0.0.2") as refused, udp_socket("127.0.0.1") as permitted:
        for _ in range(5):
            refused.sendto(b"refused", addr)
        assert exchange(permitted, addr, b"permitted") == b"permitted"
        assert not readable([refused], 1.0)
    client.wait_for_log(r"datagram from 127\.0\.0\.2:\d+ dropped: denied by --allow/--deny")
    client.wait_for_log(r"stats total conversations=1 .*opened=1 .*denied=5")
    samples = scrape(metrics)
    assert sample_value(samples, "portfwd_datagrams_denied_total", kind="kcpudp-client") == 5
    assert server.log().count(" open ") == 1  # the permitted client's conversation only
    for proc in (client, server):
        assert proc.stop() == 0


def test_server_allow_refuses_the_client_source(tool, peers):
    """kcpudp-server --allow (kcptcp-server's UDP-source check): a client from outside the
    list gets no answer and nothing reaches the target; one inside is carried."""
    echo = peers()
    metrics = free_port()
    addr, server, client = start_tunnel(
        tool, echo.port, "-K", PSK,
        server_extra=("--allow", "127.0.0.2/32", "--metrics", f"127.0.0.1:{metrics}"))
    with udp_socket("127.0.0.1") as sock:
        for _ in range(10):
            sock.sendto(b"secret", addr)
            time.sleep(0.05)
        server.wait_for_log(r"HELLO from 127\.0\.0\.1:\d+ dropped: denied by --allow/--deny")
        assert not readable([sock], 1.0)
    assert echo.sources == set() and " open " not in server.log()
    assert sample_value(scrape(metrics), "portfwd_tunnel_hellos_denied_total",
                        kind="kcpudp-server") > 0
    for proc in (client, server):
        assert proc.stop() == 0
    addr, server, client = start_tunnel(tool, echo.port, "-K", PSK,
                                        server_extra=("--allow", "127.0.0.1/32"))
    with udp_socket("127.0.0.1") as sock:
        assert exchange(sock, addr, b"allowed") == b"allowed"
    for proc in (client, server):
        assert proc.stop() == 0


def delivered_through(tool, echo, seed: int, *extra: str) -> tuple[int, str]:
    """Datagram mode through a seeded 10 %-loss relay (no duplication, no reordering): how
    many of 400 numbered datagrams came back from the echo intact (each crossed the relay
    twice), and the client's log. Asserts at most once, never corrupted."""
    server_port = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    relay = LossyRelay(server_port, seed, loss=0.1, dup=0.0, reorder=0.0)
    try:
        addr, server, client = start_tunnel(tool, echo.port, "--mode", "datagram", "-K", PSK,
                                             "--stats-interval", "1", *extra,
                                             server_port=server_port,
                                             client_server_port=relay.port)
        rng = random.Random(seed)
        count = 400
        got: list[int] = []
        with udp_socket("127.0.0.1") as sock:
            sock.settimeout(0.2)
            exchange(sock, addr, struct.pack(">II", 0xFFFFFFFF, zlib_crc(b"")), timeout=30)
            for n in range(count):
                body = rng.randbytes(rng.choice([0, 10, 300, 1200]))  # one fragment each
                sock.sendto(struct.pack(">II", n, zlib_crc(body)) + body, addr)
                if n % 10 == 9:
                    time.sleep(0.02)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len(got) < count:
                try:
                    n = parse(sock.recv(65536))  # asserts the checksum: never corrupted
                except TimeoutError:
                    continue
                if n != 0xFFFFFFFF:
                    got.append(n)
        assert relay.dropped
        assert len(got) == len(set(got)), "a datagram arrived twice"
        assert set(got) <= set(range(count))
        if extra:
            client.wait_for_log(r"fec_out=[1-9]\d* fec_recovered=[1-9]")  # parity rebuilt some
        log = client.log()
        for proc in (client, server):
            assert proc.stop() == 0
        return len(got), log
    finally:
        relay.close()


@pytest.mark.parametrize("seed", [3])
def test_fec_repairs_loss_in_datagram_mode(tool, peers, seed):
    """--fec 4:2 on both ends: through the same seeded 10 % loss, datagram mode delivers
    measurably more (about 81 % of round trips survive without FEC, nearly all with it)."""
    echo = peers()
    plain, _ = delivered_through(tool, echo, seed)
    repaired, _ = delivered_through(tool, echo, seed, "--fec", "4:2")
    assert repaired >= plain + 40, (plain, repaired)


@pytest.mark.parametrize("mode", MODES)
def test_stop_with_an_idle_conversation(tool, peers, mode):
    """SIGTERM while a conversation has been idle beyond kcptcp-server's STOP_IDLE_MS: the
    server closes it at once and exits 0 (datagram mode has no KCP to look at)."""
    echo = peers()
    addr, server, client = start_tunnel(tool, echo.port, "--mode", mode, "-K", PSK)
    with udp_socket("127.0.0.1") as sock:
        assert exchange(sock, addr, b"once") == b"once"
    time.sleep(1.5)
    assert server.stop() == 0, server.log()[-3000:]
    assert "Traceback" not in server.log()
    assert client.stop() == 0


def test_reload_applies_allow_and_mode_to_new_conversations(tool, peers, tmp_path):
    """portfwd run: a reload that changes kcpudp-server's --allow and both ends' --mode
    applies to the conversations that start after it."""
    echo = peers()
    tunnel = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    local = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    key = key_file(tmp_path)

    def config(allow: str, mode: str) -> str:
        return write(tmp_path / "c.toml",
                     rule("kcpudp-server", f"127.0.0.1:{tunnel}", f"127.0.0.1:{echo.port}",
                          "s", psk_file=key, mode=mode, allow=[allow]),
                     rule("kcpudp-client", f"127.0.0.1:{local}", f"127.0.0.1:{tunnel}", "c",
                          psk_file=key, mode=mode))

    process = tool("portfwd", "run", config("127.0.0.2/32", "reliable"))
    process.wait_for_log(rf"tunnelling udp 127\.0\.0\.1:{local}")
    with udp_socket("127.0.0.1") as sock:
        sock.sendto(b"refused", ("127.0.0.1", local))
        process.wait_for_log(r"HELLO from 127\.0\.0\.1:\d+ dropped: denied by --allow/--deny")
    config("127.0.0.1/32", "datagram")
    assert "changed" in Reloader(process).reload()
    with udp_socket("127.0.0.1") as sock:  # a new client address: a new conversation
        assert exchange(sock, ("127.0.0.1", local), b"allowed now") == b"allowed now"
    assert echo.sources and "Traceback" not in process.log()
    assert process.stop() == 0
