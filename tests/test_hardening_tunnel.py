"""Hostile input at kcptcp-server: fuzz, replay, amplification, HELLO floods, caps.

The attackers bind other loopback addresses (127.0.0.2, 127.0.0.3) so the per-source HELLO
rate limit, which keys on the host, does not also throttle the legitimate client on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import socket
import subprocess
import sys
import threading
import time

from conftest import REPO, connect, echo_roundtrip, free_port
from hardening import Relay, Streamer, save_datagrams

from portfwd.tunnel import crypto, wire
from portfwd.tunnel.wire import WELCOME_SIZE, pack_hello

PSK = "0123456789abcdef" * 4
FUZZ_COUNT = 1_000_000  # datagrams; the time budget below bounds the test anyway
FUZZ_SECONDS = 25.0  # s
HARDENING = os.path.join(REPO, "tests", "hardening.py")


def start_server(tool, target_port: int, *extra: str):
    udp = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    server = tool("kcptcp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{target_port}", "-K", PSK,
                  *extra)
    server.wait_for_log("tunnelling")
    return udp, server


def start_client(tool, udp_port: int, *extra: str):
    tcp = free_port()
    client = tool("kcptcp-client", f"127.0.0.1:{tcp}", f"127.0.0.1:{udp_port}", "-K", PSK,
                  *extra)
    client.wait_for_log("tunnelling")
    return tcp, client


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def bound_udp(host: str, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def bytes_waiting(sock: socket.socket) -> int:
    """Bytes of every datagram queued on ``sock`` (drained)."""
    total = 0
    while True:
        try:
            total += len(sock.recv(65536))
        except BlockingIOError:
            return total
        except OSError:
            continue


def assert_clean(*processes) -> None:
    for process in processes:
        assert process.proc.poll() is None, process.log()[-3000:]
        assert "Traceback" not in process.log(), process.log()[-3000:]


class SinkServer:
    """TCP target that counts connections and bytes and never answers (replay test)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.received = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    self.received += len(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def assert_only_cookies_back(result: dict) -> None:
    """What a fuzzing source got back: COOKIE replies only, at most one per HELLO-shaped
    datagram it sent, so fewer bytes than it sent."""
    assert result["bytes_received"] == result["received"] * wire.COOKIE_REPLY_SIZE, result
    assert result["received"] <= result["kinds"].get("hello", 0) + result["kinds"].get(
        "replay", 0), result
    assert result["bytes_received"] < result["bytes_sent"] / 3, result


def test_fuzz_while_transferring(tool, echo_server):
    udp, server = start_server(tool, echo_server.port, "--stats-interval", "2")
    relay = Relay(("127.0.0.1", udp))
    port, client = start_client(tool, relay.port)
    try:
        sock = connect("127.0.0.1", port)
        streamer = Streamer(sock, seed=3)
        wait_until(lambda: len(relay.up) >= 50, 10, "captured datagrams")
        captured = list(relay.up)
        path = os.path.join(os.path.dirname(client.log_file.name), f"cap-{os.getpid()}.bin")
        save_datagrams(path, captured)
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, HARDENING, "fuzz", "--target", f"127.0.0.1:{udp}", "--source",
             "127.0.0.3", "--count", str(FUZZ_COUNT), "--seconds", str(FUZZ_SECONDS),
             "--captured", path, "--seed", "11"],
            capture_output=True, text=True, timeout=FUZZ_SECONDS + 30)
        os.unlink(path)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        fuzz_seconds = time.monotonic() - started
        streamer.finish()
        sock.close()
        print(f"\nfuzz: {result['sent']} datagrams ({result['bytes_sent']} B) in "
              f"{fuzz_seconds:.1f} s, kinds {result['kinds']}; valid transfer "
              f"{streamer.sent} B each way intact")
        # No amplification: nothing back but, past the server's HELLO budget, COOKIEs for
        # HELLO-shaped datagrams, each smaller than what it answers.
        assert_only_cookies_back(result)
        assert result["sent"] >= min(FUZZ_COUNT, 200_000), result
        assert streamer.sent > 0
        assert echo_server.accepted == 1  # the fuzz never made the server dial
        server_log = server.log()
        assert "peer address changed" not in server_log  # nothing moved to 127.0.0.3
        assert len(re.findall(r"\bopen 127\.0\.0\.1", server_log)) == 1
        assert_clean(server, client)
        # Still serving afterwards.
        with connect("127.0.0.1", port) as sock2:
            echo_roundtrip(sock2, 100_000, seed=4)
        totals = re.findall(r"stats total .*", server.log())
        if totals:
            print(totals[-1])
    finally:
        relay.close()
    assert client.stop() == 0 and server.stop() == 0


def test_replayed_handshake_and_data(tool):
    sink = SinkServer()
    udp, server = start_server(tool, sink.port)
    relay = Relay(("127.0.0.1", udp))
    port, client = start_client(tool, relay.port, "--keepalive", "3")
    other = bound_udp("127.0.0.2")
    payload = os.urandom(100_000)
    try:
        sock = connect("127.0.0.1", port)
        sock.sendall(payload)
        wait_until(lambda: sink.received == len(payload), 10, "the payload at the target")
        time.sleep(0.3)  # acks settle
        captured = list(relay.up)
        assert captured[0][0] == 1  # the HELLO is in the capture
        assert len(captured) > 10
        # Phase A, the session is alive: replay everything from another address and from
        # the client's own (the relay's) address.
        for data in captured:
            other.sendto(data, ("127.0.0.1", udp))
            relay.back.sendto(data, ("127.0.0.1", udp))
        time.sleep(1.0)
        assert sink.received == len(payload)  # nothing delivered twice
        assert sink.accepted == 1  # no second target connection
        assert bytes_waiting(other) == 0  # nothing to the replaying source
        assert "peer address changed" not in server.log()
        # The session still works, at its own address.
        sock.sendall(b"more")
        wait_until(lambda: sink.received == len(payload) + 4, 10, "data after the replay")
        sock.close()
        server.wait_for_log(r"closed \(", timeout=15)
        # Phase B, the conversation is over: replay again from both addresses. The relay
        # is closed first and its address re-bound, so anything the server sent there would
        # be seen here.
        relay_addr = relay.back_addr
        relay.close()
        same = bound_udp(*relay_addr)
        for data in captured:
            other.sendto(data, ("127.0.0.1", udp))
            same.sendto(data, ("127.0.0.1", udp))
        time.sleep(1.0)
        assert bytes_waiting(other) == 0 and bytes_waiting(same) == 0
        same.close()
        assert sink.accepted == 1
        assert sink.received == len(payload) + 4
        assert len(re.findall(r"\bopen 127\.0\.0\.1", server.log())) == 1
        assert_clean(server, client)
    finally:
        relay.close()
        other.close()
        sink.close()
    assert client.stop() == 0 and server.stop() == 0


def forged_hellos(rng: random.Random, good_mac: bool, skew_ms: int) -> bytes:
    """A well-formed HELLO: a random MAC, or the right MAC over a stale timestamp."""
    body = pack_hello(rng.getrandbits(32) or 1, int(time.time() * 1000) + skew_ms,
                      rng.randbytes(32))
    if good_mac:
        key = crypto.handshake_mac_key(bytes.fromhex(PSK))
        return body + crypto.HandshakeMac(key)(crypto.HELLO_LABEL, body)
    return body + rng.randbytes(16)


def drain_datagrams(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


def test_hello_flood_does_not_stop_legitimate_clients(tool, echo_server):
    udp, server = start_server(tool, echo_server.port)
    port, client = start_client(tool, udp)
    flooder = bound_udp("127.0.0.2")
    flooder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    stop = threading.Event()
    sent = [0, 0]  # bytes, datagrams

    def flood() -> None:
        rng = random.Random(5)
        # Pre-built (HMAC in Python is the slow part); each is sent many times anyway.
        pool = [forged_hellos(rng, i % 2 == 0, rng.choice([-600_000, 600_000]))
                for i in range(2000)]
        while not stop.is_set():
            for data in pool:
                try:
                    flooder.sendto(data, ("127.0.0.1", udp))
                except BlockingIOError:
                    time.sleep(0.001)
                    continue
                sent[0] += len(data)
                sent[1] += 1

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        for i in range(5):  # legitimate connections during the flood
            with connect("127.0.0.1", port) as sock:
                echo_roundtrip(sock, 200_000, seed=i)
        time.sleep(max(0.0, 3 - (time.monotonic() - started)))
    finally:
        stop.set()
        thread.join(5)
    time.sleep(0.5)
    elapsed = time.monotonic() - started
    print(f"\nflood: {sent[1]} forged HELLOs ({sent[0]} B) in {elapsed:.1f} s; "
          f"5 legitimate connections transferred")
    assert sent[1] > 10_000
    # No amplification: past the HELLO budget the server answers with COOKIEs, each smaller
    # than the HELLO, at most one per HELLO and within its reply budget.
    replies = drain_datagrams(flooder)
    assert all(len(reply) == wire.COOKIE_REPLY_SIZE for reply in replies)
    assert len(replies) <= sent[1] and sum(map(len, replies)) < sent[0] / 3
    flooder.close()
    assert echo_server.accepted == 5  # only the legitimate ones reached the target
    rejected = re.findall(r"handshake rejected from .*", server.log())
    assert rejected, server.log()[-2000:]
    assert len(rejected) <= elapsed / 10 + 2  # rate-limited: one line per 10 s
    assert_clean(server, client)
    assert client.stop() == 0 and server.stop() == 0


def test_pending_cap_then_recovery(tool, echo_server):
    """Authenticated HELLOs that never continue fill --max-pending, one source prefix at most
    its share of it; a legitimate client gets in once they expire (the unconfirmed ones at the
    idle timeout, --keepalive), the target never sees them, and the refusals are logged once."""
    udp, server = start_server(tool, echo_server.port, "--max-pending", "4", "--keepalive", "3")
    port, client = start_client(tool, udp)
    # Four sources in four /24s (a prefix may hold a quarter of the cap), none in the client's.
    holders = [bound_udp(f"127.0.{i}.2") for i in range(1, 5)]
    rng = random.Random(9)
    first = holders[0]
    first.sendto(forged_hellos(rng, True, 0), ("127.0.0.1", udp))
    first.sendto(forged_hellos(rng, True, 0), ("127.0.0.1", udp))  # over its prefix's share
    server.wait_for_log(r"pending sessions from 127\.0\.1\.2:\d+'s prefix at their share")
    for holder in holders[1:]:
        holder.sendto(forged_hellos(rng, True, 0), ("127.0.0.1", udp))
    for _ in range(3):
        first.sendto(forged_hellos(rng, True, 0), ("127.0.0.1", udp))
    server.wait_for_log(r"pending session cap \(--max-pending 4\) reached")
    # The 4 pending sessions answered with one WELCOME each and dialled nothing: the target is
    # reached only after the client's first sealed packet, which a HELLO alone never gives.
    for holder in holders:
        wait_until(lambda h=holder: bytes_waiting(h) == WELCOME_SIZE, 5, "one WELCOME each")
    started = time.monotonic()
    with connect("127.0.0.1", port) as sock:  # waits for the pending ones to expire
        echo_roundtrip(sock, 100_000)
    assert time.monotonic() - started < 12
    assert echo_server.accepted == 1
    for holder in holders:
        assert bytes_waiting(holder) == 0  # nothing more for the HELLOs' sources
        holder.close()
    assert len(re.findall("pending session cap", server.log())) == 1
    assert_clean(server, client)
    assert client.stop() == 0 and server.stop() == 0


def test_session_cap_evicts_least_recently_active_idle(tool, echo_server):
    udp, server = start_server(tool, echo_server.port, "--max-sessions", "2")
    port, client = start_client(tool, udp)
    first = connect("127.0.0.1", port)
    echo_roundtrip_open(first, b"first")
    time.sleep(0.3)
    second = connect("127.0.0.1", port)
    echo_roundtrip_open(second, b"second")
    time.sleep(2.2)  # both idle beyond the 2 s eviction floor; first is the LRU
    echo_roundtrip_open(second, b"second again")  # second is active again
    with connect("127.0.0.1", port) as third:
        echo_roundtrip(third, 50_000)
    server.wait_for_log(r"session cap \(--max-sessions 2\) reached: evicting conv=\d+")
    first.settimeout(5)
    assert first.recv(10) == b""  # the evicted one was closed
    echo_roundtrip_open(second, b"second survives")
    first.close()
    second.close()
    assert_clean(server, client)
    assert client.stop() == 0 and server.stop() == 0


def echo_roundtrip_open(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    got = b""
    sock.settimeout(10)
    while len(got) < len(data):
        chunk = sock.recv(100)
        assert chunk, "closed"
        got += chunk
    assert got == data


class ScriptedRelay:
    """UDP relay between one client and the server that can lose the server's first datagrams
    and move its server-facing socket to a new port mid-conversation (a NAT rebinding)."""

    def __init__(self, server: tuple[str, int], drop_down: int = 0) -> None:
        self.server = server
        self.front = bound_udp("127.0.0.1")
        self.front.setblocking(True)
        self.port: int = self.front.getsockname()[1]
        self.back = bound_udp("127.0.0.1")
        self.drop_down = drop_down  # server datagrams to lose before forwarding any
        self.dropped: list[bytes] = []
        self.client: tuple[str, int] | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rebind(self) -> tuple[str, int]:
        """From now on the client's datagrams reach the server from a new port."""
        old, self.back = self.back, bound_udp("127.0.0.1")
        time.sleep(0.3)  # the relay loop stops selecting on the old socket
        old.close()
        return self.back.getsockname()

    def _run(self) -> None:
        while not self._stop:
            back = self.back
            try:
                ready, _, _ = select.select([self.front, back], [], [], 0.1)
            except (OSError, ValueError):
                continue
            for sock in ready:
                try:
                    data, addr = sock.recvfrom(65536)
                except OSError:
                    continue
                if sock is self.front:
                    self.client = addr
                    self.back.sendto(data, self.server)
                elif len(self.dropped) < self.drop_down:
                    self.dropped.append(data)
                elif self.client is not None:
                    self.front.sendto(data, self.client)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.front.close()
        self.back.close()


def test_lost_welcomes_fresh_hellos_then_one_dial(tool, echo_server):
    """The first two WELCOMEs are lost: each client retry is a fresh HELLO that replaces the
    unconfirmed session, and the target is dialled once, after the client's first sealed packet."""
    udp, server = start_server(tool, echo_server.port)
    relay = ScriptedRelay(("127.0.0.1", udp), drop_down=2)
    port, client = start_client(tool, relay.port)
    try:
        with connect("127.0.0.1", port) as sock:
            echo_roundtrip(sock, 200_000)
        assert [len(d) for d in relay.dropped] == [WELCOME_SIZE, WELCOME_SIZE]
        assert echo_server.accepted == 1
        assert len(re.findall(r"\bopen 127\.0\.0\.1", server.log())) == 1
        assert_clean(server, client)
    finally:
        relay.close()
    assert client.stop() == 0 and server.stop() == 0


def test_client_address_change_is_validated_then_followed(tool, echo_server):
    """A NAT rebinding mid-stream: the server challenges the new address, moves there once it
    answered, and the stream carries on intact over the one target connection."""
    udp, server = start_server(tool, echo_server.port)
    relay = ScriptedRelay(("127.0.0.1", udp))
    port, client = start_client(tool, relay.port)
    try:
        with connect("127.0.0.1", port) as sock:
            echo_roundtrip_open(sock, b"before the rebinding")
            new = relay.rebind()
            echo_roundtrip_open(sock, os.urandom(100_000))
        server.wait_for_log(rf"peer address changed .* -> .*{new[1]}", timeout=10)
        assert echo_server.accepted == 1
        assert_clean(server, client)
    finally:
        relay.close()
    assert client.stop() == 0 and server.stop() == 0
