"""kcpudp-server --proxy-protocol v2 vs without, same run: the server's CPU per datagram.

    python bench/bench_kcpudp_proxy.py [--seconds S] [--rounds N] [--pps P] [--quick]

kcpudp-client and kcpudp-server on loopback (-K, both modes) in front of one UDP target process
that answers each datagram with its payload (tests/proxy_udp_target.py: it parses the header
on every datagram with policy/proxy.py when there is one). A sender paces 1200-byte datagrams
at P per second for S seconds from 8 client addresses and counts the answers. Rounds
interleave the two paths; each "on" figure is divided by the "off" figure of its own round.
Loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_udp import free_udp_tcp_port, wait_udp_port  # noqa: E402
from common import Table, print_tables, process, tool, tree_cpu_seconds  # noqa: E402

PSK = "0123456789abcdef" * 4
TARGET = os.path.join(os.path.dirname(HERE), "tests", "proxy_udp_target.py")
SIZE = 1200
CLIENTS = 8


def blast(port: int, seconds: float, pps: int) -> tuple[int, int]:
    """Send paced datagrams from CLIENTS sockets for ``seconds``; (sent, answered)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(CLIENTS)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.setblocking(False)
    payload = b"x" * SIZE
    sent = answered = 0
    start = time.monotonic()
    end = start + seconds
    try:
        while (now := time.monotonic()) < end:
            due = int((now - start) * pps)
            while sent < due:
                socks[sent % CLIENTS].sendto(payload, ("127.0.0.1", port))
                sent += 1
            answered += drain(socks)
            time.sleep(0.001)
        settle = time.monotonic() + 1.0
        while time.monotonic() < settle:
            answered += drain(socks)
            time.sleep(0.01)
    finally:
        for sock in socks:
            sock.close()
    return sent, answered


def drain(socks: list[socket.socket]) -> int:
    got = 0
    for sock in socks:
        while True:
            try:
                sock.recv(65536)
            except BlockingIOError:
                break
            got += 1
    return got


def one_run(mode: str, proxy: bool, seconds: float, pps: int) -> tuple[float, float]:
    """(server CPU µs per answered datagram, answered / sent) for one path."""
    target, leg, listen = (free_udp_tcp_port() for _ in range(3))
    server_argv = tool("kcpudp-server", f"127.0.0.1:{leg}", f"127.0.0.1:{target}", "-K", PSK,
                       "--mode", mode, "--stats-interval", "0",
                       *(("--proxy-protocol", "v2") if proxy else ()))
    client_argv = tool("kcpudp-client", f"127.0.0.1:{listen}", f"127.0.0.1:{leg}", "-K", PSK,
                       "--mode", mode, "--stats-interval", "0")
    env = {"PYTHONPATH": os.path.dirname(HERE)}
    with process([sys.executable, TARGET, "127.0.0.1", str(target)], env=env), \
            process(server_argv) as server, process(client_argv) as client:
        wait_udp_port(leg, server)
        wait_udp_port(listen, client)
        blast(listen, 0.5, 2000)  # the conversations open (handshakes) before measuring
        cpu0 = tree_cpu_seconds(server.pid)
        sent, answered = blast(listen, seconds, pps)
        used = tree_cpu_seconds(server.pid) - cpu0
    return 1e6 * used / max(answered, 1), answered / max(sent, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pps", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.pps = 0.5, 1, 1000
    rows = []
    for mode in ("reliable", "datagram"):
        ratios, offs, ons, delivered = [], [], [], []
        for _ in range(args.rounds):
            off, off_share = one_run(mode, False, args.seconds, args.pps)
            on, on_share = one_run(mode, True, args.seconds, args.pps)
            offs.append(off)
            ons.append(on)
            ratios.append(on / off)
            delivered.append((off_share, on_share))
        rows.append([mode, f"{statistics.median(offs):.1f}", f"{statistics.median(ons):.1f}",
                     " / ".join(f"{r:.3f}" for r in ratios),
                     " / ".join(f"{a:.3f}, {b:.3f}" for a, b in delivered)])
    print_tables([Table(
        f"kcpudp-server CPU per datagram, --proxy-protocol v2 vs off ({args.pps} pps of "
        f"{SIZE} B from {CLIENTS} clients, {args.seconds:g} s, {args.rounds} round(s))",
        ["mode", "off µs/dgram", "v2 µs/dgram", "v2 × off (each round)",
         "answered share off, v2 (each round)"], rows,
        "Server process only (both directions: up with the header, the answers down). "
        "Loopback; the target parses the header in both paths' rounds when present.")])


if __name__ == "__main__":
    main()
