#!/usr/bin/env python3
"""New tunnelled connections per second, unloaded and under a spoofed-source HELLO flood.

    sudo bench/bench_handshake.py [--seconds 4] [--rounds 3] [--workers 2]
                                  [--flood-pps 150000] [--sources 100000] [--compare REV ...]
                                  [--flood-cpu N | --sites]

Runs inside a network namespace it creates and deletes (root needed): loopback up, and
10.99.0.1/8 on lo, so every 10.x.y.z address is local and a raw socket can send datagrams from
any of them. kcptcp-server (-K) listens on 10.99.0.1, kcptcp-client on 127.0.0.1, an echo server
is the target. A "connection" is: connect to kcptcp-client, send 100 B, read the echo, close;
``--workers`` client processes loop on that (2: the rate is bound by each connection's latency;
8: by CPU). The flood is HELLO-shaped datagrams (right size, type and version, random key share
and MAC: what an attacker without the PSK can send) from ``--sources`` random source addresses
at up to ``--flood-pps``, each datagram built before the flood starts (sending one is then a
single sendto; "flooder CPU" says what the generator still takes of this machine's two cores,
with the kernel's receive path of every forged datagram, which loopback charges to the sender).
"CPU µs/conn" is user+system CPU of each tunnel process per connection, unloaded.
``--compare REV`` (repeatable) measures another checkout (a git worktree of REV) in the same
run, rounds interleaved, and prints its figures beside ours. Every figure is a median over
rounds; ratios compare figures of this run only.
``--flood-cpu N`` pins the flood generator to CPU N and everything else (tunnel, target,
clients) to the other CPUs, in both conditions: a stand-in for a flood from another host, so
the ratio shows what the server spends on the flood rather than what the generator takes from a
small machine. It flatters the server somewhat: loopback runs the kernel's receive path of each
forged datagram on the sender's CPU.
``--sites`` is the closer stand-in on a two-CPU machine: a "server site" namespace (kcptcp-server
and the target, on CPU 1) joined by a veth pair to the "client site" (kcptcp-client, the client
processes and the flood generator, on CPU 0), with receive packet steering on each veth so the
kernel's receive path of every datagram runs on the receiving site's CPU, as a NIC's interrupt
would on a real host. The server then pays all of a forged datagram's receive cost, and the
generator only its send cost; what it still takes from the client site is shown per CPU. A
veth's steered receive path costs more per packet than a NIC's (an IPI and a backlog queue per
packet, no interrupt coalescing): ``bench_flood_floor.py`` measures that floor with a sink in
place of the server. So ``--flood-cpu`` flatters the server and ``--sites`` overcharges it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
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

sys.path.insert(0, REPO)  # this checkout's portfwd, not the installed one
from portfwd.runtime.recvmmsg import Iovec, Mmsghdr  # noqa: E402

PSK = "5a" * 32
SERVER_IP = "10.99.0.1"
FLOOD_NET = 10 << 24  # spoofed sources: 10.0.0.0/8 minus the server's address
PAYLOAD = b"x" * 100
PEER_IP = "10.255.255.254"  # --sites: the client site's end of the veth (the server's gateway)
SITE_DEVICES = ("pfsite-c", "pfsite-s")  # --sites: the veth's client and server ends


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


def flood_packets(port: int, template: bytes, sources: int) -> list[bytes]:
    """One spoofed HELLO per source (random 10/8 address and port, random key share and MAC),
    built before the flood starts so that sending one costs a single sendto: the generator
    shares this machine's two cores with what it measures, and a real flood comes from the
    network (it costs the server the same, and its sender nothing here)."""
    rng = random.Random(1)
    server = socket.inet_aton(SERVER_IP)
    udp_len = 8 + len(template)
    # IPv4 header (the kernel fills in the total length and the checksum), UDP header, HELLO.
    head = struct.pack("!BBHHHBBH", 0x45, 0, 0, 0, 0, 64, 17, 0)
    share_at = 14  # the key share's offset in the HELLO (wire.pack_hello)
    packets = []
    for _ in range(sources):
        src = FLOOD_NET | rng.randrange(2, 1 << 24)
        hello = template[:share_at] + rng.randbytes(32) + template[share_at + 32:-16] + (
            rng.randbytes(16))
        packets.append(head + struct.pack("!I4sHHHH", src, server, 1024 + (src & 0xEFFF), port,
                                          udp_len, 0) + hello)
    return packets


class BatchSender:
    """The flood's datagrams, ready for sendmmsg(2): a burst of them costs one system call and
    no Python work per datagram, so the generator takes little more than the kernel's send and
    (on loopback) receive path of each -- what a flood from another host costs this machine."""

    def __init__(self, raw: socket.socket, packets: list[bytes]) -> None:
        self._fd = raw.fileno()
        self._raw = raw  # keeps the descriptor open
        count = len(packets)
        self._data = ctypes.create_string_buffer(b"".join(packets))
        self._name = ctypes.create_string_buffer(
            struct.pack("=H2s4s8x", socket.AF_INET, b"\0\0", socket.inet_aton(SERVER_IP)))
        self._iovs = (Iovec * count)()
        self._msgs = (Mmsghdr * count)()
        offset, base = 0, ctypes.addressof(self._data)
        for i, packet in enumerate(packets):
            self._iovs[i].base, self._iovs[i].len = base + offset, len(packet)
            hdr = self._msgs[i].hdr
            hdr.name, hdr.namelen = ctypes.addressof(self._name), 16
            hdr.iov, hdr.iovlen = ctypes.addressof(self._iovs[i]), 1
            offset += len(packet)
        self.count = count
        libc = ctypes.CDLL(None, use_errno=True)
        self._sendmmsg = libc.sendmmsg
        self._sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
        self._at = ctypes.addressof(self._msgs)
        self._size = ctypes.sizeof(Mmsghdr)

    def send(self, first: int, count: int) -> int:
        """Send datagrams ``first`` .. ``first + count - 1``; how many the kernel took (a
        failed one is skipped: a flood does not retry)."""
        done = self._sendmmsg(self._fd, self._at + first * self._size, count, 0)
        return done if done > 0 else 1


def flood(port: int, template: bytes, pps: int, sources: int, seconds: float,
          queue: multiprocessing.Queue, cpu: int | None = None) -> None:
    """Spoofed-source HELLOs through a raw socket, paced to ``pps`` in bursts of 64 (one
    sendmmsg each); says when it starts, then reports what it sent."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sender = BatchSender(raw, flood_packets(port, template, sources))
    queue.put("ready")
    sent, burst = 0, 64
    start = time.monotonic()
    deadline = start + seconds
    while (now := time.monotonic()) < deadline:
        ahead = sent - (now - start) * pps
        if ahead > 0:
            time.sleep(ahead / pps)
            continue
        first = sent % sources
        sent += sender.send(first, min(burst, sources - first))
    queue.put(sent / seconds)


def per_cpu() -> list[tuple[float, float]]:
    """(busy, irq+softirq) CPU seconds so far of each CPU, from /proc/stat."""
    tick, out = os.sysconf("SC_CLK_TCK"), []
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in values[:8]]
                out.append(((sum(v) - v[3] - v[4]) / tick, (v[5] + v[6]) / tick))
    return out


def cpu_busy() -> list[float]:
    """Busy (non-idle) CPU seconds so far of each CPU."""
    return [busy for busy, _ in per_cpu()]


def machine_cpu() -> dict[str, float]:
    """CPU seconds of the whole machine so far, from /proc/stat (every helper's load in it):
    user (with nice), system, irq+softirq (where a kernel that accounts it puts the network
    receive path), idle (with iowait), steal."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    return {"user": (v[0] + v[1]) / tick, "system": v[2] / tick, "irq": (v[5] + v[6]) / tick,
            "idle": (v[3] + v[4]) / tick, "steal": v[7] / tick}


def split_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def udp_drops(port: int, pid: int) -> int:
    """Datagrams the kernel dropped at the UDP socket bound to ``port`` in the namespace of
    ``pid`` (its receive buffer was full): the last column of its /proc/net/udp."""
    with open(f"/proc/{pid}/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port:
                return int(fields[-1])
    return 0


def delta(after: dict[str, float], before: dict[str, float], seconds: float) -> dict[str, float]:
    """Share of the machine's CPUs per kind between two machine_cpu() readings."""
    cpus = os.cpu_count() or 1
    return {k: (after[k] - before[k]) / seconds / cpus for k in after}


class Tunnel:
    """kcptcp-server + kcptcp-client of one checkout, to an echo server."""

    def __init__(self, repo: str, echo_port: int, stack: contextlib.ExitStack,
                 server_site: list[str] | None = None) -> None:
        """``server_site``: the command prefix that runs the server in its own site."""
        self.repo = repo
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.tcp_port = free_port()
        env = {"PYTHONPATH": repo, "PORTFWD_LOGLEVEL": "40"}
        bin_dir = os.path.join(repo, "bin")
        self.server = stack.enter_context(process(
            [*(server_site or []), sys.executable, os.path.join(bin_dir, "kcptcp-server"),
             "-K", PSK, "--stats-interval", "0", f"{SERVER_IP}:{self.udp_port}",
             f"127.0.0.1:{echo_port}"],
            env))
        self.client = stack.enter_context(process(
            [sys.executable, os.path.join(bin_dir, "kcptcp-client"), "-K", PSK,
             "--stats-interval", "0", f"127.0.0.1:{self.tcp_port}",
             f"{SERVER_IP}:{self.udp_port}"], env))
        self.template = hello_template(repo)
        time.sleep(1.0)

    def measure(self, seconds: float, pps: int, sources: int, workers: int,
                flood_cpu: int | None = None) -> dict[str, float]:
        cpu0 = cpu_seconds(self.server.pid), cpu_seconds(self.client.pid)
        machine0, busy0, start = machine_cpu(), cpu_busy(), time.monotonic()
        rate, failures = connection_rate(self.tcp_port, seconds, workers)
        elapsed = time.monotonic() - start
        machine = delta(machine_cpu(), machine0, elapsed)
        busy = [(b - a) / elapsed for a, b in zip(busy0, cpu_busy(), strict=True)]
        server_cpu, client_cpu = (cpu_seconds(self.server.pid) - cpu0[0],
                                  cpu_seconds(self.client.pid) - cpu0[1])
        queue: multiprocessing.Queue = multiprocessing.Queue()
        flooder = multiprocessing.Process(target=flood, args=(
            self.udp_port, self.template, pps, sources, seconds + 1.0, queue, flood_cpu))
        flooder.start()
        queue.get(timeout=60)  # its packets are built
        time.sleep(0.5)  # the flood is under way before the legitimate clients start
        cpu0 = cpu_seconds(self.server.pid), split_cpu(flooder.pid)
        drops0, machine0, start = udp_drops(self.udp_port, self.server.pid), machine_cpu(), (
            time.monotonic())
        busy0 = cpu_busy()
        flooded, flooded_failures = connection_rate(self.tcp_port, seconds, workers)
        elapsed = time.monotonic() - start
        machine_flooded = delta(machine_cpu(), machine0, elapsed)
        busy_flooded = [(b - a) / elapsed for a, b in zip(busy0, cpu_busy(), strict=True)]
        drops = udp_drops(self.udp_port, self.server.pid) - drops0
        cpu_flooded = (cpu_seconds(self.server.pid) - cpu0[0]) / seconds
        flooder_user, flooder_sys = (b - a for a, b in zip(cpu0[1], split_cpu(flooder.pid),
                                                           strict=True))
        achieved = queue.get(timeout=seconds + 60)
        flooder.join()
        time.sleep(1.0)  # let the server drain its socket before the next measurement
        done = max(rate * seconds, 1)
        return {"rate": rate, "failures": failures, "cpu": server_cpu / seconds,
                "server_us": server_cpu / done * 1e6, "client_us": client_cpu / done * 1e6,
                "flooded": flooded, "flooded_failures": flooded_failures,
                "cpu_flooded": cpu_flooded, "cpu_flooder": (flooder_user + flooder_sys) / seconds,
                "flooder_user": flooder_user / seconds, "flooder_sys": flooder_sys / seconds,
                "flood_pps": achieved, "ratio": flooded / rate if rate else 0.0,
                "drops": drops, **{f"machine_{k}": v for k, v in machine.items()},
                **{f"busy{i}": v for i, v in enumerate(busy)},
                **{f"busy_flooded{i}": v for i, v in enumerate(busy_flooded)},
                **{f"flooded_{k}": v for k, v in machine_flooded.items()}}


def server_site(stack: contextlib.ExitStack) -> list[str]:
    """The server site of ``--sites`` (a namespace joined to this one by a veth pair, each
    end's receive path steered to its site's CPU); returns the command prefix that runs a
    process there, on CPU 1. This namespace becomes the client site, on CPU 0."""
    from lab import netns

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True)

    name = stack.enter_context(netns("pfsite"))
    there = ["ip", "netns", "exec", name]
    client_dev, server_dev = SITE_DEVICES
    run("ip", "link", "add", client_dev, "type", "veth", "peer", "name", server_dev,
        "netns", name)
    run("ip", "addr", "add", f"{PEER_IP}/32", "dev", client_dev)
    run("ip", "link", "set", client_dev, "up")
    run("ip", "route", "add", f"{SERVER_IP}/32", "dev", client_dev)
    run(*there, "ip", "addr", "add", f"{SERVER_IP}/32", "dev", server_dev)
    run(*there, "ip", "link", "set", server_dev, "up")
    run(*there, "ip", "route", "add", f"{PEER_IP}/32", "dev", server_dev)
    # Replies to the spoofed 10/8 sources leave towards the client site, which drops them.
    run(*there, "ip", "route", "add", "default", "via", PEER_IP)
    steering = "/sys/class/net/{}/queues/rx-0/rps_cpus"
    with open(steering.format(client_dev), "w") as f:
        f.write("1")  # CPU 0
    run(*there, "sh", "-c", f"echo 2 > {steering.format(server_dev)}")  # CPU 1
    os.sched_setaffinity(0, {0})  # what starts from here on is the client site's
    return [*there, "taskset", "-c", "1"]


def inside(opts: argparse.Namespace) -> None:
    stack = contextlib.ExitStack()
    if opts.sites:
        if not {0, 1} <= os.sched_getaffinity(0):
            sys.exit("bench_handshake: --sites needs CPUs 0 and 1")
        site = server_site(stack)
    else:
        site = []
        subprocess.run(["ip", "addr", "add", f"{SERVER_IP}/8", "dev", "lo"], check=True)
    if opts.flood_cpu is not None:  # every process started from here inherits the rest
        others = os.sched_getaffinity(0) - {opts.flood_cpu}
        if opts.flood_cpu not in os.sched_getaffinity(0) or not others:
            sys.exit(f"bench_handshake: --flood-cpu {opts.flood_cpu}: needs that CPU and another")
        os.sched_setaffinity(0, others)
    echo_port = free_port()
    checkouts = {"this checkout": REPO}
    for rev, path in zip(opts.compare or [], opts.compare_path or [], strict=True):
        checkouts[rev] = path
    with stack:
        stack.enter_context(process([*site, sys.executable,
                                     os.path.join(HERE, "echo_server.py"), str(echo_port)]))
        tunnels = {name: Tunnel(path, echo_port, stack, site)
                   for name, path in checkouts.items()}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in tunnels}
        for _ in range(opts.rounds):
            for name, tunnel in tunnels.items():
                results[name].append(tunnel.measure(opts.seconds, opts.flood_pps, opts.sources,
                                                    opts.workers, opts.flood_cpu))
    first = next(iter(results))
    cpus = len(cpu_busy())
    med = {name: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
           for name, rounds in results.items()}
    rows, split = [], []
    for name, m in med.items():
        ratios = [r["ratio"] for r in results[name]]
        def spread(key: str, rounds: list[dict[str, float]] = results[name]) -> str:
            return f"{min(r[key] for r in rounds):.0f}–{max(r[key] for r in rounds):.0f}"

        rows.append([name, f"{m['rate']:.0f} ({spread('rate')})",
                     ratio(m["rate"], med[first]["rate"]), f"{m['cpu'] * 100:.0f} %",
                     f"{m['server_us']:.0f} / {m['client_us']:.0f} ({spread('server_us')} / "
                     f"{spread('client_us')})",
                     f"{m['flood_pps']:.0f}", f"{m['cpu_flooder'] * 100:.0f} %",
                     f"{m['flooded']:.0f}", f"{m['ratio']:.2f}× ({min(ratios):.2f}–"
                     f"{max(ratios):.2f})", f"{m['cpu_flooded'] * 100:.0f} %",
                     f"{m['failures']:.0f}/{m['flooded_failures']:.0f}"])
        split.append([name, *(" / ".join(f"{m[f'{when}_{k}'] * 100:.0f}" for when in (
            "machine", "flooded")) for k in ("user", "system", "irq", "idle", "steal")),
            f"{m['flooder_user'] * 100:.0f} / {m['flooder_sys'] * 100:.0f} %",
            f"{m['drops']:.0f}",
            *(f"{m[f'busy{i}'] * 100:.0f} / {m[f'busy_flooded{i}'] * 100:.0f}"
              for i in range(cpus))])
    print_tables([Table(
        "New tunnelled connections per second, unloaded and under a spoofed HELLO flood",
        ["checkout", "conn/s", f"× {first}", "server CPU", "CPU µs/conn server / client",
         "flood pps (sent)", "flooder CPU", "conn/s flooded", "× unloaded (range)",
         "server CPU flooded", "failed (unloaded/flooded)"],
        rows,
        f"{opts.rounds} interleaved rounds of {opts.seconds:g} s per checkout and condition, "
        f"medians; \"× unloaded\": the median of each round's flooded/unloaded ratio, its "
        f"range in brackets (and the range of conn/s and CPU µs/conn over rounds); "
        f"{opts.workers} client processes; flood from {opts.sources} random "
        "10/8 sources, bursts of 64 sent with one sendmmsg"
        + (f"; the flood generator alone on CPU {opts.flood_cpu}, everything else "
           "on the others." if opts.flood_cpu is not None else "")
        + ("; two sites (--sites): server and target on CPU 1, kcptcp-client, clients and "
           "flood generator on CPU 0, each site's receive path on its CPU."
           if opts.sites else ".")),
        Table("Where the machine's CPU went, unloaded / flooded",
              ["checkout", "user %", "system %", "irq+softirq %", "idle %", "steal %",
               "flooder user / system", "server socket drops (flooded)",
               *(f"CPU {i} busy %" for i in range(cpus))], split,
              f"Shares of all {cpus} CPUs from /proc/stat over each measurement (everything on "
              "the machine, other work included), medians over rounds; the flooder's user "
              "and system CPU as a share of one CPU; drops: datagrams the kernel discarded at "
              "the server's full UDP receive buffer during the flooded measurement; CPU n "
              "busy: that CPU's non-idle share, unloaded / flooded.")])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--flood-pps", type=int, default=150000)
    parser.add_argument("--sources", type=int, default=100000)
    parser.add_argument("--compare", action="append",
                        help="a git revision to measure beside this checkout (repeatable)")
    parser.add_argument("--flood-cpu", type=int,
                        help="pin the flood generator to this CPU, everything else to the others")
    parser.add_argument("--sites", action="store_true",
                        help="server site on CPU 1, client site and flood on CPU 0 (a veth "
                             "between; each site's receive path on its CPU)")
    parser.add_argument("--compare-path", action="append", help=argparse.SUPPRESS)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.sites and opts.flood_cpu is not None:
        parser.error("--sites and --flood-cpu exclude each other")
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
        if opts.flood_cpu is not None:
            argv += ["--flood-cpu", str(opts.flood_cpu)]
        if opts.sites:
            argv.append("--sites")
        for rev in opts.compare or []:
            path = stack.enter_context(tempfile.TemporaryDirectory(prefix="pf-compare-"))
            worktree = os.path.join(path, "tree")
            subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", worktree,
                            rev], check=True, capture_output=True)
            stack.callback(subprocess.run, ["git", "-C", REPO, "worktree", "remove", "--force",
                                            worktree], capture_output=True)
            argv += ["--compare", rev, "--compare-path", worktree]
        name = stack.enter_context(netns("pfhs"))
        subprocess.run(["ip", "netns", "exec", name, *argv], check=True, timeout=1800)


if __name__ == "__main__":
    main()
