#!/usr/bin/env python3
"""New tunnelled connections per second, unloaded and under a spoofed-source HELLO flood.

    sudo bench/bench_handshake.py [--seconds 4] [--rounds 3] [--workers 2]
                                  [--flood-pps 150000] [--sources 100000] [--compare REV]

Runs inside a network namespace it creates and deletes (root needed): loopback up, and
10.99.0.1/8 on lo, so every 10.x.y.z address is local and a raw socket can send datagrams from
any of them. kcptcp-server (-K) listens on 10.99.0.1, kcptcp-client on 127.0.0.1, an echo server
is the target. A "connection" is: connect to kcptcp-client, send 100 B, read the echo, close;
``--workers`` client processes loop on that (2: the rate is bound by each connection's latency;
8: by CPU). The flood is HELLO-shaped datagrams (right size, type and version, random key share
and MAC: what an attacker without the PSK can send) from ``--sources`` random source addresses
at up to ``--flood-pps``; generating it takes about one of this machine's two cores.
``--compare REV`` measures a second checkout (a git worktree of REV) in the same run, rounds
interleaved, and prints its figures beside ours. Every figure is a median over rounds; ratios
compare figures of this run only.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import REPO, Table, cpu_seconds, free_port, print_tables, process, ratio  # noqa: E402

PSK = "5a" * 32
SERVER_IP = "10.99.0.1"
FLOOD_NET = 10 << 24  # spoofed sources: 10.0.0.0/8 minus the server's address
PAYLOAD = b"x" * 100


def connection_worker(port: int, seconds: float, queue: multiprocessing.Queue) -> None:
    count = failures = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(PAYLOAD)
                got = 0
                while got < len(PAYLOAD):
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed before the echo")
                    got += len(chunk)
            count += 1
        except OSError:
            failures += 1
    queue.put((count, failures))


def connection_rate(port: int, seconds: float, workers: int = 2) -> tuple[float, int]:
    queue: multiprocessing.Queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=connection_worker, args=(port, seconds, queue))
             for _ in range(workers)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=seconds + 60) for _ in procs]
    for proc in procs:
        proc.join()
    return sum(r[0] for r in results) / seconds, sum(r[1] for r in results)


def hello_template(repo: str) -> bytes:
    """A HELLO-shaped datagram for the protocol of the checkout at ``repo``."""
    code = ("import sys, os; from portfwd.tunnel import wire; "
            "sys.stdout.buffer.write(wire.pack_hello(1, 0, os.urandom(32)) + os.urandom(16))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True,
                         env=dict(os.environ, PYTHONPATH=repo))
    return out.stdout


def flood(port: int, template: bytes, pps: int, sources: int, seconds: float,
          queue: multiprocessing.Queue) -> None:
    """Spoofed-source HELLOs through a raw socket, paced to ``pps``; reports what it sent."""
    rng = random.Random(1)
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    server = socket.inet_aton(SERVER_IP)
    udp_len = 8 + len(template)
    # IPv4 header (the kernel fills in the total length and the checksum), UDP header, HELLO.
    packet = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, 17, 0, bytes(4), server)
                       + struct.pack("!HHHH", 0, port, udp_len, 0) + template)
    addrs = [FLOOD_NET | rng.randrange(2, 1 << 24) for _ in range(sources)]
    sent, burst = 0, 64
    start = time.monotonic()
    deadline = start + seconds
    sendto, pack_into = raw.sendto, struct.pack_into
    while (now := time.monotonic()) < deadline:
        ahead = sent - (now - start) * pps
        if ahead > 0:
            time.sleep(ahead / pps)
            continue
        for _ in range(burst):
            src = addrs[sent % sources]
            pack_into("!I", packet, 12, src)  # source address
            pack_into("!H", packet, 20, 1024 + (src & 0xEFFF))  # source port
            pack_into("!4s", packet, 28 + 14 + 32, rng.randbytes(4))  # vary the key share
            with contextlib.suppress(OSError):
                sendto(packet, (SERVER_IP, 0))
            sent += 1
    queue.put(sent / seconds)


class Tunnel:
    """kcptcp-server + kcptcp-client of one checkout, to an echo server."""

    def __init__(self, repo: str, echo_port: int, stack: contextlib.ExitStack) -> None:
        self.repo = repo
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.tcp_port = free_port()
        env = {"PYTHONPATH": repo, "PORTFWD_LOGLEVEL": "40"}
        bin_dir = os.path.join(repo, "bin")
        self.server = stack.enter_context(process(
            [sys.executable, os.path.join(bin_dir, "kcptcp-server"), "-K", PSK,
             "--stats-interval", "0", f"{SERVER_IP}:{self.udp_port}", f"127.0.0.1:{echo_port}"],
            env))
        self.client = stack.enter_context(process(
            [sys.executable, os.path.join(bin_dir, "kcptcp-client"), "-K", PSK,
             "--stats-interval", "0", f"127.0.0.1:{self.tcp_port}",
             f"{SERVER_IP}:{self.udp_port}"], env))
        self.template = hello_template(repo)
        time.sleep(1.0)

    def measure(self, seconds: float, pps: int, sources: int, workers: int) -> dict[str, float]:
        cpu0 = cpu_seconds(self.server.pid)
        rate, failures = connection_rate(self.tcp_port, seconds, workers)
        cpu_unloaded = (cpu_seconds(self.server.pid) - cpu0) / seconds
        queue: multiprocessing.Queue = multiprocessing.Queue()
        flooder = multiprocessing.Process(target=flood, args=(
            self.udp_port, self.template, pps, sources, seconds + 1.0, queue))
        flooder.start()
        time.sleep(1.0)  # the flood is under way before the legitimate clients start
        cpu0 = cpu_seconds(self.server.pid)
        flooded, flooded_failures = connection_rate(self.tcp_port, seconds, workers)
        cpu_flooded = (cpu_seconds(self.server.pid) - cpu0) / seconds
        achieved = queue.get(timeout=seconds + 60)
        flooder.join()
        time.sleep(1.0)  # let the server drain its socket before the next measurement
        return {"rate": rate, "failures": failures, "cpu": cpu_unloaded,
                "flooded": flooded, "flooded_failures": flooded_failures,
                "cpu_flooded": cpu_flooded, "flood_pps": achieved}


def inside(opts: argparse.Namespace) -> None:
    subprocess.run(["ip", "addr", "add", f"{SERVER_IP}/8", "dev", "lo"], check=True)
    echo_port = free_port()
    checkouts = {"this checkout": REPO}
    if opts.compare_path:
        checkouts[opts.compare] = opts.compare_path
    with contextlib.ExitStack() as stack:
        stack.enter_context(process([sys.executable, os.path.join(HERE, "echo_server.py"),
                                     str(echo_port)]))
        tunnels = {name: Tunnel(path, echo_port, stack) for name, path in checkouts.items()}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in tunnels}
        for _ in range(opts.rounds):
            for name, tunnel in tunnels.items():
                results[name].append(tunnel.measure(opts.seconds, opts.flood_pps, opts.sources,
                                                    opts.workers))
    first = next(iter(results))
    med = {name: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
           for name, rounds in results.items()}
    rows = []
    for name, m in med.items():
        rows.append([name, f"{m['rate']:.0f}", ratio(m["rate"], med[first]["rate"]),
                     f"{m['cpu'] * 100:.0f} %", f"{m['flood_pps']:.0f}", f"{m['flooded']:.0f}",
                     ratio(m["flooded"], m["rate"]), f"{m['cpu_flooded'] * 100:.0f} %",
                     f"{m['failures']:.0f}/{m['flooded_failures']:.0f}"])
    print_tables([Table(
        "New tunnelled connections per second, unloaded and under a spoofed HELLO flood",
        ["checkout", "conn/s", f"× {first}", "server CPU", "flood pps (sent)",
         "conn/s flooded", "× unloaded", "server CPU flooded", "failed (unloaded/flooded)"],
        rows,
        f"{opts.rounds} interleaved rounds of {opts.seconds:g} s per checkout and condition, "
        f"medians; {opts.workers} client processes; flood from {opts.sources} random 10/8 "
        "sources.")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--flood-pps", type=int, default=150000)
    parser.add_argument("--sources", type=int, default=100000)
    parser.add_argument("--compare", help="a git revision to measure beside this checkout")
    parser.add_argument("--compare-path", help=argparse.SUPPRESS)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.inside:
        inside(opts)
        return
    if os.geteuid() != 0:
        sys.exit("bench_handshake: needs root (a network namespace and a raw socket)")
    sys.path.insert(0, HERE)
    from lab import netns

    with contextlib.ExitStack() as stack:
        argv = [sys.executable, os.path.abspath(__file__), "--inside",
                "--seconds", str(opts.seconds), "--rounds", str(opts.rounds),
                "--workers", str(opts.workers),
                "--flood-pps", str(opts.flood_pps), "--sources", str(opts.sources)]
        if opts.compare:
            path = stack.enter_context(tempfile.TemporaryDirectory(prefix="pf-compare-"))
            worktree = os.path.join(path, "tree")
            subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", worktree,
                            opts.compare], check=True, capture_output=True)
            stack.callback(subprocess.run, ["git", "-C", REPO, "worktree", "remove", "--force",
                                            worktree], capture_output=True)
            argv += ["--compare", opts.compare, "--compare-path", worktree]
        name = stack.enter_context(netns("pfhs"))
        subprocess.run(["ip", "netns", "exec", name, *argv], check=True, timeout=1800)


if __name__ == "__main__":
    main()
