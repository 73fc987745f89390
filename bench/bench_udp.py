"""udpfwd vs direct loopback, same run, printed as ratios.

    python bench/bench_udp.py [--quick] [--seconds N] [--sockbuf BYTES] [--sessions N]

Measures (127.0.0.1 only, every load bounded in time):
* iperf3 ``-u`` at 1200 B and 64 B, unpaced (``-b 0``) and paced: delivered datagrams/s and
  loss direct, through udpfwd (with and without GSO) and through socat, and the ratios.
  iperf3 runs its control channel over TCP on the same port number, so a tcpfwd carries that.
* the lossless rate at 1200 B: the highest of a ladder of paced rates that loses nothing.
* RSS of udpfwd with N live sessions (N client sockets, one datagram each).
* batching: Python has no recvmmsg(); the closest is calling libc's through ctypes. We time
  draining a queue of 1200 B datagrams with ``recvfrom_into`` against ctypes ``recvmmsg``
  (batch 16) so the decision not to batch stays checkable.
Never run as a timed test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    Table,
    free_port,
    have,
    iperf3,
    print_tables,
    process,
    raise_fd_limit,
    ratio,
    rss_kib,
    tool,
    tree_cpu_seconds,
    wait_port,
)

DGRAM = 1200  # bytes per iperf3 datagram (-l)
LADDER = (20_000, 40_000, 60_000, 80_000, 100_000, 120_000, 150_000)  # paced rates, pps
BATCH = 16  # recvmmsg batch (seed UDP_PROXY_BATCH_SZ)
MSG_DONTWAIT = 0x40  # linux/socket.h


def free_udp_tcp_port() -> int:
    """A port free for both TCP and UDP (iperf3 -u uses the same number for both)."""
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def wait_udp_port(port: int, proc, timeout: float = 10.0) -> None:
    """Wait until the port is bound (UDP), without sending anything to it."""
    wait_port(port, timeout, proc=proc, socktype=socket.SOCK_DGRAM)


def udp_run(port: int, seconds: float, pps: int | None, *extra: str, size: int = DGRAM) -> dict:
    """One iperf3 -u run; sent and delivered datagrams per second, lost count."""
    rate = "0" if pps is None else str(pps * size * 8)
    total = iperf3(port, seconds, "-u", "-l", str(size), "-b", rate, *extra)["end"]["sum"]
    delivered = total["packets"] - total["lost_packets"]
    return {"sent": total["packets"] / total["seconds"],
            "delivered": delivered / total["seconds"], "lost": total["lost_packets"]}


def lossless_rate(port: int, seconds: float) -> tuple[int, str]:
    """Highest ladder rate with 0 lost datagrams; stops after the second lossy step.

    iperf3 gets ``-w 4M`` (its own socket buffers, both ends) so that the iperf3 receiver is
    not what loses datagrams: the point is the forwarder's lossless rate.
    """
    best, lossy, notes = 0, 0, []
    for pps in LADDER:
        time.sleep(0.3)  # let the iperf3 server finish the previous test
        run = udp_run(port, seconds, pps, "-w", "4M")
        notes.append(f"{pps // 1000}k:{run['lost']}")
        if run["lost"] == 0 and run["sent"] >= 0.9 * pps:
            best = pps
        else:
            lossy += 1
            if lossy == 2:
                break
    return best, " ".join(notes)


def session_rss(sockbuf: int, sessions: int) -> tuple[int, int]:
    """RSS (KiB) of a fresh udpfwd before and with ``sessions`` live sessions."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # never read: the kernel drops
    sink.bind(("127.0.0.1", 0))
    port = free_udp_tcp_port()
    argv = tool("udpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{sink.getsockname()[1]}",
                "-t", "600", "--max-sessions", str(sessions + 100), "--sockbuf", str(sockbuf))
    clients: list[socket.socket] = []
    try:
        with process(argv) as proc:
            wait_udp_port(port, proc)
            base = rss_kib(proc.pid)
            fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
            deadline = time.monotonic() + 60
            while len(clients) < sessions:  # in windows: a burst would overflow the listener
                for _ in range(min(200, sessions - len(clients))):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sock.sendto(b"!", ("127.0.0.1", port))
                    clients.append(sock)
                while len(os.listdir(f"/proc/{proc.pid}/fd")) < fds + len(clients):
                    if time.monotonic() > deadline:
                        raise RuntimeError("sessions did not all open")
                    time.sleep(0.005)
            time.sleep(0.5)
            return base, rss_kib(proc.pid)
    finally:
        for sock in clients:
            sock.close()
        sink.close()


def batching(count: int = 3000) -> tuple[float, float]:
    """µs per datagram: recvfrom_into loop vs ctypes recvmmsg(BATCH), same queue contents."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    payload = b"x" * DGRAM

    def drain(read) -> float:
        for _ in range(count):
            tx.send(payload)
        start, got = time.perf_counter(), 0
        while (n := read()) > 0:
            got += n
        return (time.perf_counter() - start) / max(got, 1) * 1e6

    buf = bytearray(65536)

    def plain() -> int:
        try:
            rx.recvfrom_into(buf)
        except BlockingIOError:
            return 0
        return 1

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

    class Iovec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    class Msghdr(ctypes.Structure):
        _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                    ("iov", ctypes.POINTER(Iovec)), ("iovlen", ctypes.c_size_t),
                    ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                    ("flags", ctypes.c_int)]

    class Mmsghdr(ctypes.Structure):
        _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]

    bufs = [ctypes.create_string_buffer(65536) for _ in range(BATCH)]
    names = [ctypes.create_string_buffer(28) for _ in range(BATCH)]
    iovs = [Iovec(ctypes.addressof(b), 65536) for b in bufs]
    msgs = (Mmsghdr * BATCH)()
    for i in range(BATCH):
        msgs[i].hdr.name = ctypes.addressof(names[i])
        msgs[i].hdr.iov = ctypes.pointer(iovs[i])
        msgs[i].hdr.iovlen = 1
    addrs = [ctypes.addressof(b) for b in bufs]
    fd = rx.fileno()

    def batched() -> int:
        for i in range(BATCH):
            msgs[i].hdr.namelen = 28
        k = libc.recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, None)
        for i in range(max(k, 0)):  # what a forwarder needs per datagram: bytes + address
            ctypes.string_at(addrs[i], msgs[i].len)
            ctypes.string_at(ctypes.addressof(names[i]), 16)
        return k

    try:
        return drain(plain), drain(batched)
    finally:
        rx.close()
        tx.close()


PACED_PPS = 50_000  # datagrams/s offered in the paced rows (below every path's ceiling)


def udp_peers(listen: int, dest: int) -> dict[str, tuple[list[str], dict]]:
    """name -> (argv, env) of a UDP forwarder 127.0.0.1:listen -> 127.0.0.1:dest."""
    fwd = tool("udpfwd", f"127.0.0.1:{listen}", f"127.0.0.1:{dest}")
    found = {"udpfwd": (fwd, {}), "udpfwd (PORTFWD_NO_GSO=1)": (fwd, {"PORTFWD_NO_GSO": "1"})}
    if have("socat"):
        found["socat"] = (["socat", "-T", "10", f"UDP4-LISTEN:{listen},bind=127.0.0.1,fork,"
                           "reuseaddr", f"UDP4:127.0.0.1:{dest}"], {})
    return found


def matrix(server: int, seconds: float, sizes: tuple[int, ...]) -> Table:
    """Delivered pps and loss for each (size, pacing) through direct and every peer."""
    cases = [(size, pps) for size in sizes for pps in (None, PACED_PPS)]
    results: dict[str, dict] = {"direct": {}}
    cpu: dict[str, dict] = {"direct": {}}
    for size, pps in cases:
        results["direct"][size, pps] = udp_run(server, seconds, pps, size=size)
        time.sleep(0.3)
    for name in udp_peers(0, server):
        listen = free_udp_tcp_port()
        argv, env = udp_peers(listen, server)[name]
        with process(tool("tcpfwd", f"127.0.0.1:{listen}", f"127.0.0.1:{server}")) as ctl, \
                process(argv, env) as fwd:
            wait_port(listen, proc=ctl)
            wait_udp_port(listen, fwd)
            time.sleep(0.3)
            results[name], cpu[name] = {}, {}
            for case in cases:
                cpu0 = tree_cpu_seconds(fwd.pid)
                results[name][case] = udp_run(listen, seconds, case[1], size=case[0])
                time.sleep(0.3)
                cpu[name][case] = tree_cpu_seconds(fwd.pid) - cpu0
    rows = []
    for size, pps in cases:
        anchor = results["direct"][size, pps]["delivered"]
        for name, runs in results.items():
            run = runs[size, pps]
            loss = run["lost"] / max(run["lost"] + run["delivered"] * seconds, 1)
            used = cpu[name].get((size, pps))
            rows.append([f"{size} B", "unpaced" if pps is None else f"{pps // 1000}k pps", name,
                         f"{run['sent']:.0f}", f"{run['delivered']:.0f}", ratio(
                             run["delivered"], anchor), f"{100 * loss:.1f} %",
                         "-" if used is None else f"{100 * used / seconds:.0f} %"])
    return Table(f"UDP delivered pps and loss (iperf3 -u, {seconds:g} s per row)",
                 ["size", "offered", "path", "sent pps", "delivered pps", "× direct", "lost",
                  "fwd CPU"], rows,
                 "iperf3 -u -l SIZE -b 0 (unpaced: as fast as the sender can) or paced at "
                 f"{PACED_PPS} pps; iperf3's control channel crosses a tcpfwd on the same port "
                 "number. fwd CPU counts the forwarder's process tree (socat forks a child per "
                 "client peer).",
                 {"runs": {n: {f"{k[0]}/{k[1]}": v for k, v in r.items()}
                           for n, r in results.items()}})


def measure(seconds: float, sessions: int, quick: bool = False,
            sockbuf: int | None = None) -> list[Table]:
    """Run every UDP measurement; the tables, each figure as a ratio to direct loopback."""
    raise_fd_limit()
    server = free_udp_tcp_port()
    tables = []
    with process(["iperf3", "-s", "-p", str(server)]):
        wait_port(server)
        tables.append(matrix(server, seconds, (1200,) if quick else (1200, 64)))
        if not quick:
            ladders = {"direct": lossless_rate(server, min(seconds, 2.0))}
            for name, env in (("udpfwd", {}), ("udpfwd (PORTFWD_NO_GSO=1)",
                                               {"PORTFWD_NO_GSO": "1"})):
                listen = free_udp_tcp_port()
                extra = [] if sockbuf is None else ["--sockbuf", str(sockbuf)]
                with process(tool("tcpfwd", f"127.0.0.1:{listen}", f"127.0.0.1:{server}")) as ctl, \
                        process(tool("udpfwd", f"127.0.0.1:{listen}", f"127.0.0.1:{server}",
                                     *extra), env) as fwd:
                    wait_port(listen, proc=ctl)
                    wait_udp_port(listen, fwd)
                    time.sleep(0.3)
                    ladders[name] = lossless_rate(listen, min(seconds, 2.0))
            tables.append(Table("Lossless rate (1200 B, 0 lost, iperf3 -w 4M)",
                                ["path", "pps", "× direct", "ladder (rate:lost)"],
                                [[name, best, ratio(best, ladders["direct"][0]), notes]
                                 for name, (best, notes) in ladders.items()]))
    base, loaded = session_rss(sockbuf or 262144, sessions)
    tables.append(Table("udpfwd RSS", ["live sessions", "RSS MB", "idle RSS MB",
                                       "kB per session"],
                        [[sessions, f"{loaded / 1024:.1f}", f"{base / 1024:.1f}",
                          f"{(loaded - base) / sessions:.2f}"]]))
    plain_us, mmsg_us = batching()
    tables.append(Table("Receive batching (1200 B, drain a full queue)",
                        ["method", "µs per datagram", "× recvfrom_into"],
                        [["recvfrom_into loop", f"{plain_us:.2f}", "1.00×"],
                         [f"ctypes recvmmsg({BATCH})", f"{mmsg_us:.2f}",
                          ratio(mmsg_us, plain_us)]]))
    return tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--seconds", type=float, default=4.0, help="per throughput measurement")
    parser.add_argument("--sockbuf", type=int, default=None, help="udpfwd --sockbuf (bytes)")
    parser.add_argument("--sessions", type=int, default=10_000, help="live sessions for RSS")
    opts = parser.parse_args()
    print_tables(measure(1.0 if opts.quick else opts.seconds, 200 if opts.quick else opts.sessions,
                         opts.quick, opts.sockbuf))


if __name__ == "__main__":
    main()
