"""udpfwd end to end: the real process on loopback, real sockets, threaded peers."""

from __future__ import annotations

import os
import random
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
from conftest import free_port, needs_ipv6, run_cli

MAX_PAYLOAD = 65507  # bytes; the largest IPv4 UDP payload (65535 - 20 - 8)
WINDOW_COUNT = 16  # datagrams in flight in the echo tests
WINDOW_BYTES = 96 * 1024  # bytes in flight: well under the forwarder's 256 KiB buffers
PEER_BUF = 4 << 20  # bytes of SO_RCVBUF/SO_SNDBUF for the test's own sockets


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def udp_socket(host: str, bind_port: int = 0) -> socket.socket:
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, PEER_BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PEER_BUF)
    sock.bind((host, bind_port))
    return sock


class UdpPeer:
    """A threaded UDP server: ``reply(datagram) -> bytes | None`` (default: echo)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, reply=None, key=None) -> None:
        self.sock = udp_socket(host, port)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.reply = reply or (lambda data: data)
        self.sources: set[tuple] = set()
        self.key = key  # key(datagram) -> its sender's name: by_key records its sources
        self.by_key: dict[object, set[tuple]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.sources.add(peer)
            if self.key is not None:
                self.by_key.setdefault(self.key(data), set()).add(peer)
            answer = self.reply(data)
            if answer is not None:
                self.sock.sendto(answer, peer)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def peers():
    started: list[UdpPeer] = []

    def start(host: str = "127.0.0.1", port: int = 0, reply=None) -> UdpPeer:
        peer = UdpPeer(host, port, reply)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.close()


# The two send paths (portfwd.udpfwd.forwarder docstring, "Batching").
PATHS = {"gso": {}, "plain": {"PORTFWD_NO_GSO": "1"}}


def start_udpfwd(tool, listen_host: str, dest: str, *flags: str, env: dict | None = None):
    port = free_port(family_of(listen_host), socket.SOCK_DGRAM)
    process = tool("udpfwd", fmt(listen_host, port), dest, *flags, env=env)
    process.wait_for_log(r"forwarding ")
    return process, (listen_host, port)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def payload_sizes(count: int, seed: int) -> list[int]:
    """Edges first (empty, 1, MTU-ish, 8 KiB around DatagramServer's cap, max), then
    log-uniform sizes so every order of magnitude up to 65,507 is covered without moving
    hundreds of megabytes."""
    rng = random.Random(seed)
    edges = [0, 1, 1472, 1473, 8191, 8192, 8193, 65506, MAX_PAYLOAD]
    rest = [min(MAX_PAYLOAD, int(2 ** rng.uniform(0, 16))) for _ in range(count - len(edges))]
    return edges + rest


def windowed_echo(client: socket.socket, dest: tuple, sizes: list[int], seed: int) -> None:
    """Send datagrams with a bounded window; every echo must come back intact and in order."""
    rng = random.Random(seed)
    pending: list[bytes] = []
    in_flight = 0
    client.settimeout(5)
    i = 0
    while i < len(sizes) or pending:
        while i < len(sizes) and len(pending) < WINDOW_COUNT and (
                not pending or in_flight + sizes[i] <= WINDOW_BYTES):
            data = rng.randbytes(sizes[i])
            client.sendto(data, dest)
            pending.append(data)
            in_flight += len(data)
            i += 1
        got, _ = client.recvfrom(65536)
        expected = pending.pop(0)
        assert len(got) == len(expected), f"datagram {i - len(pending) - 1}: size mismatch"
        assert got == expected
        in_flight -= len(expected)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_echo_10000_datagrams_0_to_65507_bytes(tool, peers, path):
    echo = peers()
    fwd, addr = start_udpfwd(tool, "127.0.0.1", f"127.0.0.1:{echo.port}", env=PATHS[path])
    assert ("no gso" in fwd.log()) == (path == "plain")
    with udp_socket("127.0.0.1") as client:
        windowed_echo(client, addr, payload_sizes(10_000, seed=3), seed=3)
    assert fwd.stop() == 0
    log = fwd.log()
    assert "up 10000 datagrams" in log and "down 10000 datagrams" in log  # the final status
    assert "dropped 0 up 0 down" in log


@pytest.mark.parametrize("path", sorted(PATHS))
def test_equal_size_runs_keep_datagram_boundaries(tool, peers, path):
    """Runs of equal sizes are what GSO coalesces: each must still arrive as its own datagram,
    both ways, including runs broken by a size change, an empty datagram or a large one."""
    echo = peers()
    fwd, addr = start_udpfwd(tool, "127.0.0.1", f"127.0.0.1:{echo.port}", env=PATHS[path])
    sizes = [1200] * 3000 + [1] * 500 + [5, 5, 5, 7, 7, 0, 0, 1200, 1201, 1200, 1199] * 50
    with udp_socket("127.0.0.1") as client:
        windowed_echo(client, addr, sizes, seed=6)
    assert fwd.stop() == 0
    assert "dropped 0 up 0 down" in fwd.log()
    gso_sends = int(re.findall(r"(\d+) GSO sends", fwd.log())[-1])
    assert (gso_sends > 0) == (path == "gso")


@pytest.mark.parametrize("listen_host, echo_host", [
    pytest.param("::1", "::1", marks=needs_ipv6),
    pytest.param("127.0.0.1", "::1", marks=needs_ipv6),  # v4 -> v6 transforming
    pytest.param("::1", "127.0.0.1", marks=needs_ipv6),  # v6 -> v4
])
def test_echo_ipv6_and_transforming(tool, peers, listen_host, echo_host):
    echo = peers(echo_host)
    fwd, addr = start_udpfwd(tool, listen_host, fmt(echo_host, echo.port))
    with udp_socket(listen_host) as client:
        windowed_echo(client, addr, payload_sizes(300, seed=7), seed=7)
    assert fwd.stop() == 0


def test_dual_stack_listener_takes_ipv4_clients(tool, peers):
    if not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("no IPv6")
    echo = peers()
    fwd, (_, port) = start_udpfwd(tool, "::", f"127.0.0.1:{echo.port}")
    with udp_socket("127.0.0.1") as client:
        windowed_echo(client, ("127.0.0.1", port), [0, 5, MAX_PAYLOAD], seed=1)
    assert fwd.stop() == 0


def test_one_stable_upstream_port_per_client(tool, peers):
    echo = peers()
    fwd, addr = start_udpfwd(tool, "127.0.0.1", f"127.0.0.1:{echo.port}")
    clients = [udp_socket("127.0.0.1") for _ in range(3)]
    for _ in range(3):
        for client in clients:
            windowed_echo(client, addr, [10], seed=0)
    assert len(echo.sources) == 3
    for client in clients:
        client.close()
    assert fwd.stop() == 0


def test_2000_sessions_expire_and_release_fds(tool, peers):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2500:
        pytest.skip(f"fd hard limit {hard} is too low for 2,000 client sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    echo = peers()
    fwd, addr = start_udpfwd(tool, "127.0.0.1", f"127.0.0.1:{echo.port}", "-t", "1",
                             "--stats-interval", "1")
    baseline = fd_count(fwd.pid)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2000)]
    try:
        for start in range(0, len(clients), 100):  # in windows: no queue overflows
            batch = clients[start:start + 100]
            for n, client in enumerate(batch):
                client.sendto(b"%d" % (start + n), addr)
            for n, client in enumerate(batch):
                client.settimeout(5)
                assert client.recvfrom(100)[0] == b"%d" % (start + n)
        assert fd_count(fwd.pid) == baseline + 2000  # one upstream socket per client
        wait_until(lambda: fd_count(fwd.pid) == baseline, timeout=5, what="sessions to expire")
        fwd.wait_for_log(r"status: 0 sessions \(2000 opened, 2000 expired, 0 evicted\)")
    finally:
        for client in clients:
            client.close()
    assert fwd.stop() == 0


def test_cap_evicts_least_recently_active_session(tool, peers):
    echo = peers()
    fwd, addr = start_udpfwd(tool, "127.0.0.1", f"127.0.0.1:{echo.port}", "--max-sessions", "3")
    baseline = fd_count(fwd.pid)
    clients = [udp_socket("127.0.0.1") for _ in range(5)]
    for client in clients:
        windowed_echo(client, addr, [3], seed=0)
    fwd.wait_for_log(r"session table full \(3 sessions\): evicted the least recently active "
                     r"session, client 127\.0\.0\.1:\d+")
    assert fd_count(fwd.pid) == baseline + 3
    windowed_echo(clients[0], addr, [4], seed=0)  # an evicted client simply gets a new session
    assert fd_count(fwd.pid) == baseline + 3
    for client in clients:
        client.close()
    assert fwd.stop() == 0
    assert "3 evicted" in fwd.log()


def test_target_down_then_up(tool, peers):
    dead = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    fwd, addr = start_udpfwd(tool, "127.0.0.1", f"127.0.0.1:{dead}")
    with udp_socket("127.0.0.1") as client:
        client.settimeout(0.1)
        for _ in range(5):
            client.sendto(b"anyone?", addr)
            with pytest.raises(TimeoutError):
                client.recvfrom(100)
        fwd.wait_for_log(r"destination 127\.0\.0\.1:\d+: Connection refused \(datagram lost, "
                         r"session kept\)")
        assert fwd.log().count("Connection refused") == 1  # rate-limited
        peers("127.0.0.1", dead)  # the target comes up: the same session recovers
        windowed_echo(client, addr, [100, 0, MAX_PAYLOAD], seed=2)
    assert fwd.proc.poll() is None
    assert fwd.stop() == 0
    assert "status: 0 sessions (1 opened" in fwd.log()


def dns_answer(query: bytes) -> bytes:
    """A one-record DNS responder (RFC 1035 4.1): every A question gets 192.0.2.53."""
    qid, _, qdcount = struct.unpack_from("!HHH", query)
    end = 12
    while query[end]:
        end += 1 + query[end]
    end += 5  # root label + QTYPE + QCLASS
    header = struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0)
    answer = struct.pack("!HHHIH4s", 0xC00C, 1, 1, 60, 4, socket.inet_aton("192.0.2.53"))
    return header + query[12:end] + answer


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig not installed")
def test_dig_through_forwarder(tool, peers):
    dns = peers(reply=dns_answer)
    fwd, (_, port) = start_udpfwd(tool, "127.0.0.1", f"127.0.0.1:{dns.port}")
    out = subprocess.run(["dig", "+short", "+tries=1", "+time=3", "@127.0.0.1", "-p", str(port),
                          "example.com", "A"], capture_output=True, text=True, timeout=20)
    assert out.stdout.strip() == "192.0.2.53", out
    assert fwd.stop() == 0


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")
def test_socat_client_through_forwarder(tool, peers):
    echo = peers(reply=lambda data: data.upper())
    fwd, (_, port) = start_udpfwd(tool, "127.0.0.1", f"127.0.0.1:{echo.port}")
    out = subprocess.run(["socat", "-t", "0.5", "-", f"UDP4:127.0.0.1:{port}"],
                         input=b"hello through udpfwd\n", capture_output=True, timeout=20)
    assert out.stdout == b"HELLO THROUGH UDPFWD\n", out
    assert fwd.stop() == 0


def test_status_line_and_signals(tool, peers):
    echo = peers()
    fwd, addr = start_udpfwd(tool, "127.0.0.1", f"127.0.0.1:{echo.port}",
                             "--stats-interval", "1")
    with udp_socket("127.0.0.1") as client:
        windowed_echo(client, addr, [1000, 2000], seed=4)
    fwd.wait_for_log(r"status: 1 sessions \(1 opened, 0 expired, 0 evicted\); up 2 datagrams "
                     r"3000 bytes; down 2 datagrams 3000 bytes")
    assert fwd.stop(signal.SIGINT) == 0
    assert "stopped" in fwd.log()
    assert "Traceback" not in fwd.log()


def test_daemon_with_pidfile(tmp_path, peers):
    echo = peers()
    port = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    pidfile = tmp_path / "udpfwd.pid"
    done = run_cli("udpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}", "-d", "-p",
                   str(pidfile))
    assert done.returncode == 0, done.stderr
    pid = int(pidfile.read_text())
    try:
        with udp_socket("127.0.0.1") as client:
            windowed_echo(client, ("127.0.0.1", port), [7], seed=5)
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pidfile.exists(), what="pidfile removal")


@pytest.mark.parametrize("args, message", [
    (["127.0.0.1:x", "127.0.0.1:53"], "bad port"),
    (["127.0.0.1:5300", "[::1:53"], "bad address"),
    (["127.0.0.1:5300", "127.0.0.1:53", "-t", "soon"], "-t expects a whole number"),
    (["127.0.0.1:5300", "127.0.0.1:53", "-t", "-1"], "-t must be"),
    (["127.0.0.1:5300", "127.0.0.1:53", "-H", "0"], "-H must be"),
    (["127.0.0.1:5300", "127.0.0.1:53", "--max-sessions", "0"], "--max-sessions must be"),
    (["127.0.0.1:5300", "127.0.0.1:53", "--stats-interval", "x"], "--stats-interval expects"),
    (["127.0.0.1:5300"], "invalid arguments"),
    (["127.0.0.1:5300", "127.0.0.1:53", "-x"], "invalid arguments"),
])
def test_bad_cli_input_exits_2_with_one_line(args, message):
    done = run_cli("udpfwd", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("udpfwd: error: ") and message in lines[0], \
        done.stderr


def test_help_shows_seed_options():
    done = run_cli("udpfwd", "-h")
    assert done.returncode == 0
    for flag in ("-t <seconds>", "-d ", "-o ", "-r ", "-R ", "-H <size>", "-p <pidfile>",
                 "-h --help"):
        assert flag in done.stdout
    assert re.search(r"udpfwd <local_addr:local_port> <dest_addr:dest_port> \[options\]",
                     done.stdout)
