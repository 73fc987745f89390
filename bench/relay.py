"""A userspace UDP delay relay for the lossy lab: ``relay.py LISTEN DEST DELAY_MS JITTER_MS SEED``.

Every datagram, in both directions, is held for ``DELAY_MS ± JITTER_MS`` (uniform, seeded)
before it is sent on, so a round trip through the relay costs about ``2 × DELAY_MS`` and jitter
larger than the packet spacing reorders datagrams, as a WAN path can. Each client address gets
its own upstream socket (a session), so the destination sees one peer per client, as through
NAT. Loss is not done here: the lab drops with nftables on the input hook. 127.0.0.1 only; the
relay runs until SIGTERM.
"""

from __future__ import annotations

import heapq
import random
import select
import signal
import socket
import sys
import time


def serve(listen: int, dest: int, delay_ms: float, jitter_ms: float, seed: int) -> None:
    rng = random.Random(seed)
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    front.bind(("127.0.0.1", listen))
    upstream: dict[tuple, socket.socket] = {}  # client address -> socket towards dest
    client_of: dict[socket.socket, tuple] = {}
    queue: list[tuple[float, int, socket.socket, bytes, tuple]] = []  # (due, n, via, data, to)
    count = 0
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 1.0
        readable, _, _ = select.select([front, *client_of], [], [], timeout)
        now = time.monotonic()
        for sock in readable:
            while True:
                try:
                    data, addr = sock.recvfrom(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                if sock is front:
                    via = upstream.get(addr)
                    if via is None:
                        via = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        via.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                        via.bind(("127.0.0.1", 0))
                        upstream[addr], client_of[via] = via, addr
                    to = ("127.0.0.1", dest)
                else:
                    via, to = front, client_of[sock]
                due = now + (delay_ms + rng.uniform(-jitter_ms, jitter_ms)) / 1000
                count += 1
                heapq.heappush(queue, (due, count, via, data, to))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, via, data, to = heapq.heappop(queue)
            try:
                via.sendto(data, to)
            except OSError:
                pass  # a full buffer drops the datagram, as a router would


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]),
          int(sys.argv[5]))
