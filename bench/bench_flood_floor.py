#!/usr/bin/env python3
"""The kernel's share of a HELLO flood in bench_handshake's ``--sites`` set-up: what a flood
costs the server's CPU before the server does any work of its own.

    sudo bench/bench_flood_floor.py [--seconds 4] [--pps 150000,50000] [--sources 100000]

The same two sites as ``bench_handshake.py --sites`` (veth, receive packet steering, server
site on CPU 1, generator on CPU 0), but the server site runs a sink instead of kcptcp-server:
one recvmmsg loop (runtime/recvmmsg.py) that throws every datagram away. Per flood rate it
prints each CPU's busy and irq+softirq shares (/proc/stat) and what the sink took: the floor
under what kcptcp-server can be charged per forged datagram on this machine's veth.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_handshake as handshake  # noqa: E402
from common import REPO, cpu_seconds  # noqa: E402

SINK = """
import select, socket, sys
from portfwd.runtime.recvmmsg import BatchReceiver
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
sock.bind((sys.argv[1], int(sys.argv[2])))
sock.setblocking(False)
reader, poll = BatchReceiver(sock, 64), select.poll()
poll.register(sock, select.POLLIN)
while True:
    if reader.drained:
        poll.poll()
    reader.receive(lambda datagram: True)
"""


def inside(opts: argparse.Namespace) -> None:
    with contextlib.ExitStack() as stack:
        site = handshake.server_site(stack)
        port = 40000
        sink = subprocess.Popen([*site, sys.executable, "-c", SINK, handshake.SERVER_IP,
                                 str(port)], env=dict(os.environ, PYTHONPATH=REPO))
        stack.callback(sink.kill)
        time.sleep(1.0)
        template = handshake.hello_template(REPO)
        print("| flood pps (sent) | CPU 0 busy / irq | CPU 1 busy / irq | sink CPU |")
        print("|---|---|---|---|")
        for pps in opts.pps:
            queue: multiprocessing.Queue = multiprocessing.Queue()
            flooder = multiprocessing.Process(target=handshake.flood, args=(
                port, template, pps, opts.sources, opts.seconds, queue, 0))
            flooder.start()
            queue.get(timeout=60)  # its packets are built
            before, sink0, start = handshake.per_cpu(), cpu_seconds(sink.pid), time.monotonic()
            sent = queue.get(timeout=opts.seconds + 60)
            elapsed = time.monotonic() - start
            after, sink1 = handshake.per_cpu(), cpu_seconds(sink.pid)
            flooder.join()
            shares = [f"{(a[0] - b[0]) / elapsed * 100:.0f} / {(a[1] - b[1]) / elapsed * 100:.0f} %"
                      for a, b in zip(after, before, strict=True)]
            print(f"| {sent:.0f} | {shares[0]} | {shares[1]} | "
                  f"{(sink1 - sink0) / elapsed * 100:.0f} % |", flush=True)
            time.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--pps", default="150000,50000",
                        type=lambda text: [int(x) for x in text.split(",")])
    parser.add_argument("--sources", type=int, default=100000)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.inside:
        inside(opts)
        return
    if os.geteuid() != 0:
        sys.exit("bench_flood_floor: needs root (network namespaces and a raw socket)")
    if not {0, 1} <= os.sched_getaffinity(0):
        sys.exit("bench_flood_floor: needs CPUs 0 and 1")
    from lab import netns

    with netns("pfhs") as name:
        subprocess.run(["ip", "netns", "exec", name, sys.executable, os.path.abspath(__file__),
                        "--inside", "--seconds", str(opts.seconds),
                        "--pps", ",".join(map(str, opts.pps)), "--sources", str(opts.sources)],
                       check=True, timeout=600)


if __name__ == "__main__":
    main()
