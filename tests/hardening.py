"""Helpers of the hardening tests, shared with bench/fuzz_tunnel.py and bench/soak.py.

* :class:`Relay` -- a UDP relay between kcptcp-client and kcptcp-server that records what passes,
  so tests can replay and mutate real datagrams.
* :func:`mutations` -- seeded hostile datagrams: random, truncated, oversized, bit-flipped,
  replayed and header-valid-but-forged ones.
* :func:`fuzz` -- sends them from one source socket for a count or a time budget and counts
  every byte that comes back to that socket (there must be none).
* :class:`Streamer` -- a continuous echo transfer over one TCP connection, checked by sha256.
* ``/proc`` probes: :func:`fd_count`, :func:`rss_kb`, :func:`cpu_ticks`.

Run as a script (``python tests/hardening.py fuzz ...``) the fuzzer is a process of its own, so
it does not share a GIL with the relay and the transfer it attacks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator

MAX_UDP = 65507  # bytes, the largest UDP payload over IPv4
CAPTURE_LIMIT = 4096  # datagrams a Relay records per direction (bounded)


class Relay:
    """UDP relay ``127.0.0.1:port`` (the client talks to it) <-> ``server`` (one client).

    Records up to CAPTURE_LIMIT datagrams each way in ``up`` (client -> server) and ``down``.
    With ``loss``, drops that fraction of the datagrams each way (seeded), counted in ``lost``.
    """

    def __init__(self, server: tuple[str, int], loss: float = 0.0, seed: int = 0) -> None:
        self.server = server
        self.loss = loss
        self.lost = 0
        self._rng = random.Random(seed)
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.bind(("127.0.0.1", 0))
        for s in (self.front, self.back):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.port: int = self.front.getsockname()[1]
        self.back_addr: tuple[str, int] = self.back.getsockname()
        self.client: tuple[str, int] | None = None
        self.up: list[bytes] = []
        self.down: list[bytes] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        front, back = self.front, self.back
        while not self._stop:
            ready, _, _ = select.select([front, back], [], [], 0.2)
            for sock in ready:
                try:
                    data, addr = sock.recvfrom(MAX_UDP)
                except OSError:
                    continue
                if self.loss and self._rng.random() < self.loss:
                    self.lost += 1
                    continue
                try:
                    if sock is front:
                        self.client = addr
                        if len(self.up) < CAPTURE_LIMIT:
                            self.up.append(data)
                        back.sendto(data, self.server)
                    elif self.client is not None:
                        if len(self.down) < CAPTURE_LIMIT:
                            self.down.append(data)
                        front.sendto(data, self.client)
                except OSError:
                    pass  # a full buffer: the relay is a lossy link like any other

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.front.close()
        self.back.close()


def mutations(rng: random.Random, captured: list[bytes]) -> Iterator[tuple[str, bytes]]:
    """An endless seeded stream of ``(kind, datagram)`` built to hit every parser branch."""
    kinds = ["random", "truncated", "bitflip", "bitflip", "replay", "header", "hello", "tiny"]
    weights = [20, 15, 20, 10, 5, 15, 10, 5]
    if not captured:
        captured = [bytes(64)]
    randbytes, choice, randrange = rng.randbytes, rng.choice, rng.randrange
    while True:
        for kind in rng.choices(kinds, weights, k=256):
            if kind == "random":
                yield kind, randbytes(randrange(0, 1500))
            elif kind == "tiny":  # shorter than the prefix / header
                yield kind, randbytes(randrange(0, 10))
            elif kind == "truncated":
                data = choice(captured)
                yield kind, data[: randrange(0, max(1, len(data)))]
            elif kind == "bitflip":
                data = bytearray(choice(captured))
                for _ in range(rng.randint(1, 3)):
                    if data:
                        data[randrange(len(data))] ^= 1 << randrange(8)
                yield kind, bytes(data)
            elif kind == "replay":
                yield kind, choice(captured)
            elif kind == "header":  # a live header (conv, seq) with any type and a forged body
                data = choice(captured)
                type_byte = randrange(256)
                yield kind, bytes([type_byte]) + data[1:9] + randbytes(randrange(0, 1400))
            elif kind == "hello":  # HELLO-shaped, for a live or a random conv, forged MAC
                conv = choice(captured)[1:5] if rng.random() < 0.5 else randbytes(4)
                size = 128 if rng.random() < 0.8 else randrange(5, 300)
                yield kind, b"\x01" + conv + randbytes(max(0, size - 5))


def oversized(rng: random.Random) -> bytes:
    return rng.randbytes(rng.randrange(1500, MAX_UDP + 1))


def fuzz(target: tuple[str, int], source_host: str, count: int, seconds: float, seed: int,
         captured: list[bytes], oversized_every: int = 1000) -> dict:
    """Send up to ``count`` hostile datagrams to ``target`` within ``seconds``; count replies.

    Every ``oversized_every``-th datagram is 1500..65507 bytes. Returns the numbers as a dict:
    ``sent``, ``bytes_sent``, ``kinds``, ``received`` and ``bytes_received`` (what came back).
    """
    rng = random.Random(seed)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source_host, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setblocking(False)
    received = bytes_received = sent = bytes_sent = 0
    kinds: dict[str, int] = {}
    stream = mutations(rng, captured)
    sendto = sock.sendto
    deadline = time.monotonic() + seconds

    def drain() -> None:
        nonlocal received, bytes_received
        while True:
            try:
                data = sock.recv(MAX_UDP)
            except BlockingIOError:
                return
            except OSError:  # an ICMP error queued on the socket is not a reply
                continue
            received += 1
            bytes_received += len(data)

    while sent < count:
        if sent % 1024 == 0:
            if time.monotonic() > deadline:
                break
            drain()
        if oversized_every and sent % oversized_every == oversized_every - 1:
            kind, data = "oversized", oversized(rng)
        else:
            kind, data = next(stream)
        while True:
            try:
                sendto(data, target)
                break
            except BlockingIOError:
                select.select([], [sock], [], 0.01)
            except ConnectionRefusedError:  # an ICMP for an earlier datagram
                continue
        sent += 1
        bytes_sent += len(data)
        kinds[kind] = kinds.get(kind, 0) + 1
    time.sleep(0.5)  # anything the server might still answer arrives now
    drain()
    sock.close()
    return {"sent": sent, "bytes_sent": bytes_sent, "kinds": kinds, "received": received,
            "bytes_received": bytes_received, "source": source_host}


def save_datagrams(path: str, datagrams: list[bytes]) -> None:
    with open(path, "wb") as f:
        for d in datagrams:
            f.write(struct.pack(">I", len(d)) + d)


def load_datagrams(path: str) -> list[bytes]:
    out = []
    with open(path, "rb") as f:
        raw = f.read()
    i = 0
    while i < len(raw):
        (n,) = struct.unpack_from(">I", raw, i)
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


class Streamer:
    """Echo traffic over ``sock`` until :meth:`finish`: seeded bytes out, sha256 of both ways."""

    def __init__(self, sock: socket.socket, seed: int = 1, chunk: int = 16384) -> None:
        self.sock = sock
        self.rng = random.Random(seed)
        self.chunk = chunk
        self.sent = self.received = 0
        self.sent_hash, self.recv_hash = hashlib.sha256(), hashlib.sha256()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer.start()
        self._reader.start()

    def _write(self) -> None:
        try:
            while not self._stop.is_set():
                block = self.rng.randbytes(self.chunk)
                self.sent_hash.update(block)
                self.sock.sendall(block)
                self.sent += len(block)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = exc

    def _read(self) -> None:
        try:
            while data := self.sock.recv(1 << 20):
                self.recv_hash.update(data)
                self.received += len(data)
        except OSError as exc:
            self.error = exc

    def finish(self, timeout: float = 60) -> None:
        """Stop sending, wait for the whole echo, assert it is intact."""
        self._stop.set()
        self._writer.join(timeout)
        self._reader.join(timeout)
        assert self.error is None, self.error
        assert not self._reader.is_alive(), f"echo incomplete: {self.received}/{self.sent}"
        assert self.received == self.sent
        assert self.recv_hash.digest() == self.sent_hash.digest()


class EpollEcho:
    """A one-thread epoll echo server for many thousands of connections (no thread per conn)."""

    def __init__(self, backlog: int = 4096) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(backlog)
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self.open = 0
        self._conns: dict[int, socket.socket] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ep = select.epoll()
        ep.register(self.sock.fileno(), select.EPOLLIN)
        conns = self._conns
        while not self._stop:
            for fd, _ in ep.poll(0.2, 1024):
                if fd == self.sock.fileno():
                    while True:
                        try:
                            conn, _ = self.sock.accept()
                        except (BlockingIOError, OSError):
                            break
                        conn.setblocking(False)
                        conns[conn.fileno()] = conn
                        ep.register(conn.fileno(), select.EPOLLIN)
                        self.accepted += 1
                        self.open += 1
                    continue
                conn = conns[fd]
                try:
                    data = conn.recv(65536)
                    if data:
                        conn.send(data)  # small test payloads: one send is enough
                        continue
                except OSError:
                    pass
                ep.unregister(fd)
                del conns[fd]
                conn.close()
                self.open -= 1
        ep.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        for conn in list(self._conns.values()):
            conn.close()
        self.sock.close()


def open_many(port: int, count: int, batch: int = 500, timeout: float = 60) -> list[socket.socket]:
    """``count`` connections to 127.0.0.1:port, each checked with a 1-byte echo, all kept open."""
    socks: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    for start in range(0, count, batch):
        group = []
        for _ in range(min(batch, count - start)):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            group.append(s)
        waiting = {s.fileno(): s for s in group}
        ep = select.epoll()
        for fd in waiting:
            ep.register(fd, select.EPOLLOUT)
        sent: set[int] = set()
        while waiting:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(socks) + len(group) - len(waiting)}/{count} open")
            for fd, ev in ep.poll(0.5):
                s = waiting[fd]
                if fd not in sent:
                    if ev & (select.EPOLLERR | select.EPOLLHUP):
                        raise ConnectionError(f"connection {len(socks)} failed")
                    s.send(b"x")
                    sent.add(fd)
                    ep.modify(fd, select.EPOLLIN)
                elif s.recv(1) == b"x":
                    ep.unregister(fd)
                    del waiting[fd]
                else:
                    raise ConnectionError("closed instead of echoing")
        ep.close()
        socks += group
    return socks


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks (1/100 s)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hardening.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fuzz", help="send hostile datagrams, print a JSON summary")
    f.add_argument("--target", required=True, help="host:port")
    f.add_argument("--source", default="127.0.0.3", help="source host to bind")
    f.add_argument("--count", type=int, default=1_000_000)
    f.add_argument("--seconds", type=float, default=3600)
    f.add_argument("--seed", type=int, default=7)
    f.add_argument("--captured", help="file of length-prefixed datagrams to mutate")
    sub.add_parser("echo", help="EpollEcho in this process: print its port, serve until EOF "
                   "on stdin")
    args = parser.parse_args(argv)
    if args.cmd == "echo":
        server = EpollEcho()
        print(server.port, flush=True)
        sys.stdin.read()
        server.close()
        return 0
    host, port = args.target.rsplit(":", 1)
    captured = load_datagrams(args.captured) if args.captured else []
    started = time.monotonic()
    result = fuzz((host, int(port)), args.source, args.count, args.seconds, args.seed, captured)
    result["seconds"] = round(time.monotonic() - started, 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
