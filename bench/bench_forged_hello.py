#!/usr/bin/env python3
"""CPU per forged HELLO in kcptcp-server's receive loop, in-process: no flood generator shares
the machine's cores, so the figure is the server's own.

    python bench/bench_forged_hello.py [--count 3000] [--rounds 15] [--compare REV ...]

A TunnelServer (-K) on loopback; ``--count`` HELLO-shaped datagrams (right size, type and
version, a current timestamp, a random key share and MAC: what an attacker without the PSK can
send) from 16 loopback sources are queued in its socket before it reads them, then the CPU time
(``time.process_time``) until it has rejected them all is divided by their number. ``--pending
N``: N sessions wait for their client's confirmation meanwhile, as under a real flood with
legitimate clients. ``--compare REV`` runs the same in a git worktree of REV; every figure is
the median over rounds, and the minimum is printed beside it.

``--live PPS``: the forgeries arrive while the server runs, as a flood does, paced to PPS by a
sender process on another CPU (the server on CPU 0, the sender on CPU 1), and each round is a
second of it. The figure then includes what a server that keeps up with a flood pays per wake-up
(epoll, the hub, the read call), which the queued rounds spread over 64 datagrams a read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import REPO, Table, print_tables, ratio  # noqa: E402

SENDERS = 16  # source addresses 127.0.<i>.<i + 2>


LIVE_SENDER = """
import os, socket, sys, time
os.sched_setaffinity(0, {1})
port, pps, seconds, template = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
forged = bytearray(bytes.fromhex(template))
socks = []
for i in range(16):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((f"127.0.{i}.{i + 2}", 0))
    socks.append(sock)
dest, sent = ("127.0.0.1", port), 0
start = time.monotonic()
while (now := time.monotonic()) < start + seconds:
    if sent > (now - start) * pps:
        time.sleep(0.0002)
        continue
    for sock in socks:
        forged[20:24] = (sent % (1 << 32)).to_bytes(4, "big")  # another key share each time
        sent += 1
        try:
            sock.sendto(forged, dest)
        except OSError:
            pass
"""


def measure(count: int, rounds: int, pending: int, live: int = 0) -> list[float]:
    """us of CPU per forged HELLO, one figure per round (runs the checkout on sys.path);
    ``live``: forgeries per second sent while the server runs (see --live)."""
    import socket
    import time

    import gevent

    from portfwd.kcptcp.config import ServerConfig, ServerLimits
    from portfwd.kcptcp.driver import now_ms, wall_ms
    from portfwd.kcptcp.server import TunnelServer
    from portfwd.runtime.addr import Resolved
    from portfwd.runtime.sockets import ListenOptions, bind_socket, set_buffers
    from portfwd.tunnel import wire
    from portfwd.tunnel.config import TunnelConfig
    from portfwd.tunnel.session import TunnelSession
    from portfwd.tunnel.stream import ConversationConfig

    def loopback(port: int) -> Resolved:
        return Resolved(socket.AF_INET, ("127.0.0.1", port))

    tunnel = TunnelConfig(psk=bytes(range(32)))
    udp = bind_socket(loopback(0), socket.SOCK_DGRAM, ListenOptions())
    set_buffers(udp, 64 << 20, force=True)
    server = TunnelServer(ServerConfig(
        listen=loopback(udp.getsockname()[1]), target=loopback(9), stats_interval=0,
        conversation=ConversationConfig(tunnel=tunnel),
        limits=ServerLimits(max_pending=max(256, pending * 4))), udp)
    server.start()
    gevent.sleep(0.01)
    dest = udp.getsockname()
    senders = []
    for i in range(SENDERS):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((f"127.0.{i}.{i + 2}", 0))
        senders.append(sock)
    for conv in range(pending):  # sessions that never confirm, each from its own prefix
        session = TunnelSession.client(tunnel, 1000 + conv, dest, now_ms(), wall_ms())
        senders[conv % SENDERS].sendto(session.datagrams_to_send(now_ms())[0], dest)
    while server.metrics().handshakes < pending:
        gevent.sleep(0.001)
    forged = bytearray(wire.pack_hello(1, wall_ms(), os.urandom(32)) + os.urandom(16))
    if live:
        return measure_live(server, forged, live, rounds)
    per = []
    for _ in range(rounds):
        before = server.handshakes.dropped_auth
        for k in range(count):
            forged[20:24] = k.to_bytes(4, "big")  # another key share each time
            senders[k % SENDERS].sendto(forged, dest)
        start = time.process_time()
        while server.handshakes.dropped_auth - before < count:
            gevent.sleep(0.001)
        per.append((time.process_time() - start) / count * 1e6)
    server.stop(1)
    return per


def measure_live(server: object, forged: bytearray, pps: int, rounds: int) -> list[float]:
    """us of CPU (user + system) per forged HELLO over ``rounds`` seconds of a flood at
    ``pps`` sent from CPU 1, the server on CPU 0."""
    import subprocess

    import gevent

    os.sched_setaffinity(0, {0})
    sender = subprocess.Popen([sys.executable, "-c", LIVE_SENDER,
                               str(server.udp.sock.getsockname()[1]), str(pps),
                               str(rounds + 1.5), forged.hex()])
    gevent.sleep(1.0)  # under way
    per = []
    for _ in range(rounds):
        before, cpu = server.handshakes.dropped_auth, os.times()
        gevent.sleep(1.0)
        after = os.times()
        rejected = server.handshakes.dropped_auth - before
        per.append((after.user + after.system - cpu.user - cpu.system) / max(rejected, 1) * 1e6)
    sender.wait()
    server.stop(1)
    return per


def run_checkout(path: str, opts: argparse.Namespace) -> list[float]:
    code = (f"import sys, json; sys.path.insert(0, {HERE!r}); import bench_forged_hello as b; "
            f"print(json.dumps(b.measure({opts.count}, {opts.rounds}, {opts.pending}, "
            f"{opts.live})))")
    # cwd: ``-c`` puts the working directory first on sys.path, ahead of PYTHONPATH
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=path, env=dict(os.environ, PYTHONPATH=path,
                                                        PORTFWD_LOGLEVEL="40"))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="forged HELLOs per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pending", type=int, default=0,
                        help="sessions waiting for their client meanwhile")
    parser.add_argument("--live", type=int, default=0, metavar="PPS",
                        help="forgeries a second sent while the server runs (CPU 1 -> CPU 0)")
    parser.add_argument("--compare", action="append", default=[], metavar="REV")
    opts = parser.parse_args()
    rows, first = [], None
    with contextlib.ExitStack() as stack:
        checkouts = {"this checkout": REPO}
        for rev in opts.compare:
            tree = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "t")
            subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", tree, rev],
                           check=True, capture_output=True)
            stack.callback(subprocess.run, ["git", "-C", REPO, "worktree", "remove", "--force",
                                            tree], capture_output=True)
            checkouts[rev] = tree
        for name, path in checkouts.items():
            per = run_checkout(path, opts)
            median = statistics.median(per)
            first = first if first is not None else median
            rows.append([name, f"{median:.2f}", f"{min(per):.2f}", ratio(median, first)])
    print_tables([Table(
        "CPU per forged HELLO in kcptcp-server's receive loop (in-process)",
        ["checkout", "µs per forged HELLO (median)", "min", "× this checkout"], rows,
        (f"{opts.rounds} rounds of 1 s of a flood at {opts.live} forged HELLOs a second from "
         f"{SENDERS} sources (sender on CPU 1, server on CPU 0)" if opts.live else
         f"{opts.rounds} rounds of {opts.count} forged HELLOs from {SENDERS} sources")
        + f", {opts.pending} sessions pending; CPU time of the server's process over the "
        "datagrams it rejected.")])


if __name__ == "__main__":
    main()
