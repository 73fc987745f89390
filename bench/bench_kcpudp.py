"""kcpudp: WireGuard over kcpudp (each mode) vs WireGuard over the bare lossy leg, and kcpudp's
datagram rate and CPU against udpfwd, ratios in one run.

    python bench/bench_kcpudp.py [--quick] [--seconds N] [--loss 0,1,5,10] [--rounds N]
                                 [--wan RTT_MS] [--rate MBIT] [--cc NAME] [--fec SPEC]
                                 [--no-clean | --clean-only] [--compare REV ...]

* WireGuard (root, wireguard-go): two network namespaces joined by a veth pair, WireGuard in
  each (tests/test_kcpudp_peers.py builds them). The "WAN" leg is the veth: nftables drops N %
  of the UDP packets of that leg (each direction independently, on the input hook of the
  receiving namespace), either WireGuard's own port (bare) or kcpudp-server's (tunnelled).
  Per path and loss: iperf3 TCP throughput inside WireGuard, and ping p50/p99/loss (100 pings
  10 ms apart). There is no added delay: the leg's RTT is a veth's (~0.05 ms), so TCP inside
  WireGuard recovers from loss about as fast as KCP does and the bare leg may win; the 50 ms
  RTT goal of the issue needs ``--wan``.
* ``--wan RTT_MS``: the same WireGuard comparison across the WAN emulator (bench/wan.py: two
  namespaces joined by TUN devices and a userspace relay) instead of the veth: RTT/2 of delay
  each way, a ``--rate`` Mbit/s bottleneck, and the loss in each direction on the relay, which
  carries nothing but the leg (WireGuard's UDP, or kcpudp's). The WireGuard handshake of each
  path runs before the loss is set.
* Clean leg (loopback): iperf3 -u, 1200 B datagrams paced at 10k pps and unpaced, through
  udpfwd, kcpudp --mode reliable and kcpudp --mode datagram (-K); delivered pps and CPU µs per
  delivered datagram of the forwarder (udpfwd) or of both tunnel ends together. iperf3's
  control channel crosses a tcpfwd on the same port number.
Never run as a timed test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import wan  # noqa: E402
from bench_udp import free_udp_tcp_port, udp_run, wait_udp_port  # noqa: E402
from common import (  # noqa: E402
    Table,
    have,
    print_tables,
    process,
    ratio,
    tool,
    tree_cpu_seconds,
    wait_port,
)
from test_kcpudp_peers import (  # noqa: E402
    CLIENT_PORT,
    PSK,
    SERVER_PORT,
    WG_PORT,
    Background,
    kcpudp,
    namespaces,
    run,
    start_wireguard,
    wait_log,
)
from wan_model import Direction  # noqa: E402

PATHS = ("bare WireGuard", "kcpudp reliable", "kcpudp datagram")
PACED_PPS = 10_000
NFT = "kcpudpbench"


def set_loss(a: str, b: str, percent: int, port: int) -> None:
    """Drop ``percent`` % of the leg's UDP packets to ``port`` (in B) and from it (in A)."""
    for ns, match in ((b, "dport"), (a, "sport")):
        rules = [f"table inet {NFT} {{", " chain input { type filter hook input priority 0; "
                 "policy accept; }", "}", f"flush chain inet {NFT} input"]
        if percent:
            rules.append(f"add rule inet {NFT} input udp {match} {port} "
                         f"numgen random mod 100 < {percent} drop")
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"],
                       input="\n".join(rules) + "\n", text=True, check=True)


def ping(ns: str, count: int) -> tuple[float, float, float]:
    """p50 and p99 ms of the replies, and the loss in %."""
    out = run("ping", "-c", str(count), "-i", "0.01", "-W", "1", "10.78.0.2", ns=ns,
              check=False, timeout=count + 30).stdout
    times = sorted(float(t) for t in re.findall(r"time=([\d.]+) ms", out))
    lost = 100.0 * (count - len(times)) / count
    if not times:
        return float("nan"), float("nan"), lost
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    return statistics.median(times), p99, lost


def iperf_tcp(ns: str, seconds: float, cc: str | None) -> float:
    """Mbit/s of one iperf3 TCP run from A to B's WireGuard address (``cc``: the sender's
    congestion control, None = the kernel's default)."""
    extra = ["-C", cc] if cc else []
    out = run("iperf3", "-c", "10.78.0.2", "-t", str(seconds), "-J", *extra, ns=ns,
              check=False, timeout=seconds + 40).stdout
    match = re.search(r'"sum_received":\s*{[^}]*"bits_per_second":\s*([\d.e+]+)', out)
    return float(match.group(1)) / 1e6 if match else 0.0


@dataclass
class Leg:
    """The path WireGuard's UDP (or kcpudp's) crosses: namespace A (WireGuard's client, the
    kcpudp-client) to B (its peer, the kcpudp-server at ``server_ip``); ``set_loss(percent,
    port)`` makes it drop that share of the leg's packets (``port``: the UDP port on B)."""

    a: str
    b: str
    server_ip: str
    set_loss: Callable[[int, int], None]
    describe: str


@contextlib.contextmanager
def veth_leg() -> Iterator[Leg]:
    with namespaces() as (a, b):
        yield Leg(a, b, "10.77.0.2", lambda loss, port: set_loss(a, b, loss, port),
                  "the veth leg (no added delay)")


@contextlib.contextmanager
def wan_leg(rtt_ms: float, rate_mbit: float) -> Iterator[Leg]:
    def path(loss: int) -> Direction:
        return Direction(delay_ms=rtt_ms / 2, loss=loss / 100, rate_mbit=rate_mbit)

    with wan.wan(path(0)) as link:
        yield Leg(link.client_ns, link.server_ns, wan.SERVER_IP,
                  lambda loss, port: link.set(path(loss)),
                  f"the WAN emulator ({rtt_ms:g} ms RTT, {rate_mbit:g} Mbit/s bottleneck, "
                  "loss each way)")


def wireguard_matrix(leg_factory: Callable[[], contextlib.AbstractContextManager[Leg]],
                     seconds: float, losses: list[int], pings: int, rounds: int,
                     cc: str | None = None, fec: str | None = None) -> Table:
    keys = [run("wg", "genkey").stdout.strip() for _ in range(2)]
    pubs = [run("wg", "pubkey", input=k).stdout.strip() for k in keys]
    results: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    started: list[Background] = []
    with leg_factory() as leg:
        a, b = leg.a, leg.b
        try:
            start_wireguard(b, started, "10.78.0.2", keys[1], pubs[0], "10.78.0.1", None)
            start_wireguard(a, started, "10.78.0.1", keys[0], pubs[1], "10.78.0.2",
                            f"{leg.server_ip}:{WG_PORT}")
            iperf = Background(["iperf3", "-s", "-B", "10.78.0.2"], ns=b)
            started.append(iperf)
            dev = f"wg{a}"[:15]
            paths = [*PATHS, *([f"kcpudp datagram --fec {fec}"] if fec else [])]
            for _ in range(rounds):
                for path in paths:
                    tunnel: list[Background] = []
                    if path == "bare WireGuard":
                        endpoint, port = f"{leg.server_ip}:{WG_PORT}", WG_PORT
                    else:
                        mode, *extra = path.split()[1:]
                        flags = ["-K", PSK, "--mode", mode, "--stats-interval", "0", *extra]
                        tunnel = [kcpudp("kcpudp-server", f"{leg.server_ip}:{SERVER_PORT}",
                                         f"127.0.0.1:{WG_PORT}", *flags, ns=b),
                                  kcpudp("kcpudp-client", f"127.0.0.1:{CLIENT_PORT}",
                                         f"{leg.server_ip}:{SERVER_PORT}", *flags, ns=a)]
                        for proc in tunnel:
                            wait_log(proc, "tunnelling")
                        endpoint, port = f"127.0.0.1:{CLIENT_PORT}", SERVER_PORT
                    run("wg", "set", dev, "peer", pubs[1], "endpoint", endpoint, ns=a)
                    try:
                        for loss in losses:
                            leg.set_loss(0, port)
                            ping(a, 5)  # the WireGuard handshake on this path, lossless
                            leg.set_loss(loss, port)
                            p50, p99, lost = ping(a, pings)
                            results.setdefault((path, loss), []).append(
                                (iperf_tcp(a, seconds, cc), p50, p99, lost))
                    finally:
                        leg.set_loss(0, port)
                        for proc in tunnel:
                            proc.close()
        finally:
            for proc in reversed(started):
                proc.close()
    rows = []
    for loss in losses:
        for path in paths:
            runs = results[path, loss]
            mbit, p50, p99, lost = (statistics.median(r[i] for r in runs) for i in range(4))
            bare = results["bare WireGuard", loss]
            each = " / ".join(ratio(r[0], anchor[0]) for r, anchor in zip(runs, bare, strict=True))
            added = p50 - statistics.median(r[1] for r in bare)
            rows.append([f"{loss} %", path, f"{mbit:.1f}", each, f"{p50:.2f}", f"{added:+.2f}",
                         f"{p99:.2f}", f"{lost:.0f} %"])
    sender = cc or run("sysctl", "-n", "net.ipv4.tcp_congestion_control").stdout.strip()
    return Table(f"WireGuard inside: iperf3 TCP {sender} ({seconds:g} s) and ping ({pings} × "
                 f"10 ms) at N % loss on {leg.describe}; median of {rounds} round(s)",
                 ["loss", "path", "TCP Mbit/s", "× bare (each round)", "ping p50 ms",
                  "p50 − bare ms", "ping p99 ms", "ping lost"],
                 rows, "WireGuard MTU 1280; kcpudp -K, -M 1350, defaults otherwise. On the "
                 "veth leg (no added delay) TCP's own recovery is fast and the bare leg may "
                 "win.")


def clean_leg(seconds: float, others: dict[str, str] | None = None) -> Table:
    """``others``: name -> path of another checkout whose kcpudp rows are measured beside
    this one's (--compare), each row right after the same row of this checkout."""
    server = free_udp_tcp_port()
    rows = []
    paths = [("udpfwd", "udpfwd", None)]
    for mode in ("reliable", "datagram"):
        paths.append((f"kcpudp {mode}", mode, None))
        paths += [(f"kcpudp {mode} @{rev}", mode, path) for rev, path in (others or {}).items()]
    with process(["iperf3", "-s", "-p", str(server)]):
        wait_port(server)
        anchors: dict[int | None, float] = {}
        for name, mode, checkout in paths:
            listen = free_udp_tcp_port()
            env = None if checkout is None else {"PYTHONPATH": checkout}
            run = tool if checkout is None else (
                lambda prog, *args, c=checkout: [sys.executable, os.path.join(c, "bin", prog),
                                                 *args])
            if name == "udpfwd":
                argvs = [tool("udpfwd", f"127.0.0.1:{listen}", f"127.0.0.1:{server}")]
            else:
                leg = free_udp_tcp_port()
                argvs = [run("kcpudp-server", f"127.0.0.1:{leg}", f"127.0.0.1:{server}",
                             "-K", PSK, "--mode", mode, "--stats-interval", "0"),
                         run("kcpudp-client", f"127.0.0.1:{listen}", f"127.0.0.1:{leg}",
                             "-K", PSK, "--mode", mode, "--stats-interval", "0")]
            with process(tool("tcpfwd", f"127.0.0.1:{listen}", f"127.0.0.1:{server}")) as ctl, \
                    process(argvs[0], env) as first, process(argvs[-1], env) as last:
                wait_port(listen, proc=ctl)
                wait_udp_port(listen, last)
                time.sleep(0.5)
                pids = {first.pid, last.pid}
                for pps in (PACED_PPS, None):
                    cpu0 = sum(tree_cpu_seconds(p) for p in pids)
                    result = udp_run(listen, seconds, pps)
                    used = sum(tree_cpu_seconds(p) for p in pids) - cpu0
                    delivered = result["delivered"]
                    if name == "udpfwd":
                        anchors[pps] = delivered
                    per = 1e6 * used / max(delivered * seconds, 1)
                    loss = result["lost"] / max(result["lost"] + delivered * seconds, 1)
                    rows.append(["unpaced" if pps is None else f"{pps // 1000}k pps", name,
                                 f"{delivered:.0f}", ratio(delivered, anchors[pps]),
                                 f"{100 * loss:.1f} %", f"{per:.1f}"])
                    time.sleep(0.3)
    rows.sort(key=lambda row: row[0] == "unpaced")  # paced rows first, then unpaced
    return Table(f"Clean loopback leg: 1200 B datagrams (iperf3 -u, {seconds:g} s per row)",
                 ["offered", "path", "delivered pps", "× udpfwd", "lost",
                  "CPU µs / datagram"], rows,
                 "CPU: udpfwd's process, or kcpudp-client + kcpudp-server together, over the "
                 "datagrams delivered.")


def worktree(stack: contextlib.ExitStack, rev: str) -> str:
    """A detached git worktree of ``rev`` (removed when ``stack`` closes)."""
    path = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(prefix="pf-cmp-")), "t")
    subprocess.run(["git", "-C", os.path.dirname(HERE), "worktree", "add", "--detach", path,
                    rev], check=True, capture_output=True)
    stack.callback(subprocess.run, ["git", "-C", os.path.dirname(HERE), "worktree", "remove",
                                    "--force", path], capture_output=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script")
    parser.add_argument("--seconds", type=float, default=4.0, help="per throughput run")
    parser.add_argument("--loss", default="0,1,5,10", help="loss rates in %%, comma-separated")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of the WireGuard matrix")
    parser.add_argument("--wan", type=float, metavar="RTT_MS",
                        help="run the WireGuard matrix across the WAN emulator at this RTT")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="the WAN emulator's bottleneck in Mbit/s (with --wan)")
    parser.add_argument("--cc", help="iperf3's congestion control (-C), e.g. cubic; "
                        "default: the kernel's")
    parser.add_argument("--fec", metavar="SPEC",
                        help="one more path: kcpudp --mode datagram --fec SPEC (both ends)")
    parser.add_argument("--no-clean", action="store_true", help="skip the clean-leg table")
    parser.add_argument("--clean-only", action="store_true",
                        help="only the clean-leg table (no WireGuard matrix)")
    parser.add_argument("--compare", action="append", metavar="REV",
                        help="clean leg: kcpudp of this git revision too (a worktree), "
                        "rows beside ours (repeatable)")
    opts = parser.parse_args()
    seconds = 1.0 if opts.quick else opts.seconds
    losses = [0] if opts.quick else [int(x) for x in opts.loss.split(",")]
    with contextlib.ExitStack() as stack:
        others = {rev: worktree(stack, rev) for rev in opts.compare or []}
        tables = [] if opts.no_clean else [clean_leg(seconds, others)]
    why = wan.available() if opts.wan is not None else None
    if opts.clean_only:
        pass
    elif why:
        print(f"WireGuard matrix skipped: the WAN emulator cannot run here: {why}")
    elif os.geteuid() == 0 and all(have(b) for b in ("wireguard-go", "wg", "ping", "iperf3")):
        legs = veth_leg if opts.wan is None else (lambda: wan_leg(opts.wan, opts.rate))
        tables.insert(0, wireguard_matrix(legs, seconds, losses, 20 if opts.quick else 100,
                                          opts.rounds, opts.cc, opts.fec))
    else:
        print("WireGuard matrix skipped: needs root, wireguard-go, wg, ping and iperf3")
    print_tables(tables)


if __name__ == "__main__":
    main()
