"""The lossy lab: kcptcp (-K) vs kcptun (fast3) vs plain TCP at 0/1/5/10 % random loss.

Everything runs inside a network namespace that ``bench/run`` creates (``netns()``) on its own
loopback. Loss: an nftables table in that namespace drops ``numgen random mod 100 < N`` of
the packets on the **input** hook (on output a dropped UDP send returns EPERM to the sender,
which is not what a lossy network does) on the leg that crosses the "WAN" only:

* tunnels (kcptcp, kcptun): UDP to and from the tunnel server's port; the client's and the
  server's TCP legs stay clean, as in a deployment;
* plain TCP: TCP to and from the target's own port (a separate echo / iperf3 server, so the
  tunnels' targets stay clean).

Each direction is dropped independently with probability N %. There is no added delay in the
loss matrix (``tc netem`` is not available here): the loopback RTT is ~0.05 ms, so the rows
show recovery mechanics (RTO floors, fast retransmit, ack timing), not WAN physics. A second,
smaller table puts ``relay.py`` (a userspace UDP delay/jitter relay) on the tunnels' UDP leg;
plain TCP gets no delay there (nothing here can delay TCP segments).

Measured per tool and loss rate: a request/response probe (1 KiB request, 1 KiB echo reply,
sequential on one connection, p50/p99/max), iperf3 throughput, CPU seconds of both tunnel ends
per GB carried, peak RSS of each end under load; then the idle CPU of each tunnel holding one
open idle connection. Every load is bounded in time. Nothing here asserts timings.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    Table,
    cpu_seconds,
    free_port,
    iperf3,
    process,
    ratio,
    rss_kib,
    tool,
    wait_port,
)

HERE = os.path.dirname(os.path.abspath(__file__))
NFT_TABLE = "pfbench"  # inet table in the lab namespace; removed with the namespace anyway
REQUEST = 1024  # bytes per probe request (and reply)
KCPTUN_FLAGS = ["--mode", "fast3", "--sndwnd", "1024", "--rcvwnd", "1024", "--ds", "0",
                "--ps", "0", "--nocomp", "--crypt", "aes", "--quiet"]
TOOLS = ("plain TCP", "kcptcp -K", "kcptun fast3")


@contextlib.contextmanager
def netns(prefix: str = "pfbench") -> Iterator[str]:
    """A fresh network namespace with loopback up; its processes are ended and it is deleted."""
    name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        yield name
    finally:
        # Anything still alive in the namespace was started by this bench (it is ours alone).
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)
        subprocess.run(["ip", "netns", "del", name], check=False)


def nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)


@contextlib.contextmanager
def loss_table() -> Iterator[None]:
    """The lab's nftables table (input hook), always deleted on exit."""
    nft(f"table inet {NFT_TABLE} {{\n  chain input {{ type filter hook input priority 0; "
        "policy accept; }\n}\n")
    try:
        yield
    finally:
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], check=False)


def set_loss(percent: int, udp_ports: list[int], tcp_ports: list[int]) -> None:
    """Drop ``percent`` % of the packets to and from each port, each direction independently."""
    lines = [f"flush chain inet {NFT_TABLE} input"]
    if percent:
        for proto, ports in (("udp", udp_ports), ("tcp", tcp_ports)):
            for port in ports:
                for side in ("dport", "sport"):
                    lines.append(f"add rule inet {NFT_TABLE} input {proto} {side} {port} "
                                 f"numgen random mod 100 < {percent} drop")
    nft("\n".join(lines) + "\n")


def wait_udp(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    wait_port(port, timeout, proc=proc, socktype=socket.SOCK_DGRAM)


def free_udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


@dataclass
class Path:
    """One way to reach a target: its entry port and the processes that carry it."""

    port: int  # TCP port the client connects to
    pids: list[int] = field(default_factory=list)  # tunnel ends (client, server); none if plain
    udp_port: int = 0  # the tunnel server's UDP port (the lossy leg)


@contextlib.contextmanager
def tunnel(kind: str, target: int, relay: tuple[float, float] | None = None) -> Iterator[Path]:
    """A kcptcp or kcptun client+server pair to 127.0.0.1:target (optionally via relay.py)."""
    udp, local = free_udp_port(), free_port()
    remote = udp
    with contextlib.ExitStack() as stack:
        if kind == "kcptcp -K":
            psk = secrets.token_hex(32)
            server = stack.enter_context(process(tool(
                "kcptcp-server", "-K", psk, "--stats-interval", "0", f"127.0.0.1:{udp}",
                f"127.0.0.1:{target}")))
        else:
            key = secrets.token_hex(16)
            server = stack.enter_context(process(["kcptun-server", "-l", f"127.0.0.1:{udp}",
                                                  "-t", f"127.0.0.1:{target}", "--key", key,
                                                  *KCPTUN_FLAGS]))
        wait_udp(udp, server)
        if relay is not None:
            remote = free_udp_port()
            relay_proc = stack.enter_context(process(
                [sys.executable, os.path.join(HERE, "relay.py"), str(remote), str(udp),
                 str(relay[0]), str(relay[1]), "1"]))
            wait_udp(remote, relay_proc)
        if kind == "kcptcp -K":
            client = stack.enter_context(process(tool(
                "kcptcp-client", "-K", psk, "--stats-interval", "0", f"127.0.0.1:{local}",
                f"127.0.0.1:{remote}")))
        else:
            client = stack.enter_context(process(["kcptun-client", "-l", f"127.0.0.1:{local}",
                                                  "-r", f"127.0.0.1:{remote}", "--key", key,
                                                  *KCPTUN_FLAGS]))
        wait_port(local, proc=client)
        yield Path(local, [client.pid, server.pid], udp)


def probe(port: int, count: int, budget: float, warmup: int = 5) -> list[float]:
    """Sequential 1 KiB request / 1 KiB reply on one connection; the round trips in ms.

    Stops after ``count`` samples or ``budget`` seconds (connection setup and ``warmup``
    exchanges, which open the tunnel session, are not counted).
    """
    request = secrets.token_bytes(REQUEST)
    samples: list[float] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = None
        for i in range(count + warmup):
            if i == warmup:
                deadline = time.monotonic() + budget
            start = time.perf_counter()
            sock.sendall(request)
            got = 0
            while got < REQUEST:
                chunk = sock.recv(REQUEST - got)
                if not chunk:
                    raise RuntimeError("echo closed the connection")
                got += len(chunk)
            if i >= warmup:
                samples.append((time.perf_counter() - start) * 1000)
                if time.monotonic() > deadline:
                    break
    return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def peak_rss_kib(pid: int) -> int:
    return rss_kib(pid, "VmHWM")


@dataclass
class Settings:
    losses: tuple[int, ...] = (0, 1, 5, 10)  # % random drop per direction
    seconds: int = 5  # iperf3 -t per run (integer: iperf3 reads -t with atoi)
    probes: int = 1000  # request/response samples per row, at most
    probe_budget: float = 15.0  # s per probe row, at most
    idle_seconds: float = 10.0  # s of idle CPU measurement
    delay: tuple[float, float] = (10.0, 2.0)  # relay one-way delay, jitter (ms)
    delay_losses: tuple[int, ...] = (0, 5)


def measure(cfg: Settings) -> list[Table]:
    """Run the lossy lab (must already be inside the lab namespace, as root)."""
    echo_argv = [sys.executable, os.path.join(HERE, "echo_server.py")]
    plain_echo, plain_iperf, echo, iperf = (free_port() for _ in range(4))
    lat: dict[str, dict[int, list[float]]] = {t: {} for t in TOOLS}
    thr: dict[str, dict[int, float | None]] = {t: {} for t in TOOLS}
    cost: dict[str, dict[int, float | None]] = {t: {} for t in TOOLS}
    rss: dict[str, tuple[int, int]] = {}
    idle: dict[str, float] = {}
    delayed: dict[str, dict[int, list[float]]] = {}
    errors: list[str] = []
    with contextlib.ExitStack() as stack:
        for port in (plain_echo, echo):
            stack.enter_context(process([*echo_argv, str(port)]))
        for port in (plain_iperf, iperf):
            stack.enter_context(process(["iperf3", "-s", "-p", str(port)]))
        for port in (plain_echo, echo, plain_iperf, iperf):
            wait_port(port)
        stack.enter_context(loss_table())
        paths: dict[str, tuple[Path, Path]] = {"plain TCP": (Path(plain_echo), Path(plain_iperf))}
        for kind in TOOLS[1:]:
            paths[kind] = (stack.enter_context(tunnel(kind, echo)),
                           stack.enter_context(tunnel(kind, iperf)))
        udp_ports = [p.udp_port for pair in paths.values() for p in pair if p.udp_port]
        for loss in cfg.losses:
            set_loss(loss, udp_ports, [plain_echo, plain_iperf])
            for kind, (echo_path, iperf_path) in paths.items():
                try:
                    lat[kind][loss] = probe(echo_path.port, cfg.probes, cfg.probe_budget)
                except (OSError, RuntimeError) as exc:
                    errors.append(f"probe {kind} at {loss} %: {exc}")
                cpu0 = sum(cpu_seconds(pid) for pid in iperf_path.pids)
                try:
                    result = iperf3(iperf_path.port, cfg.seconds)
                    bits = result["end"]["sum_received"]["bits_per_second"]
                    carried = result["end"]["sum_received"]["bytes"]
                except (OSError, RuntimeError, ValueError, KeyError,
                        subprocess.TimeoutExpired) as exc:
                    errors.append(f"iperf3 {kind} at {loss} %: {exc}")
                    bits, carried = None, 0
                thr[kind][loss] = None if bits is None else bits / 1e6
                used = sum(cpu_seconds(pid) for pid in iperf_path.pids) - cpu0
                cost[kind][loss] = used / (carried / 1e9) if iperf_path.pids and carried else None
                time.sleep(0.5)  # let iperf3 -s reset before the next client
        set_loss(0, udp_ports, [])
        for kind in TOOLS[1:]:
            client, server = paths[kind][1].pids
            rss[kind] = (peak_rss_kib(client), peak_rss_kib(server))
            idle[kind] = idle_cpu(paths[kind][0], cfg.idle_seconds)
    if cfg.delay_losses:
        delayed = delay_table(cfg, echo_argv)
    return tables(cfg, lat, thr, cost, rss, idle, delayed, errors)


def idle_cpu(path: Path, seconds: float) -> float:
    """CPU % of both tunnel ends while one connection through them is open and idle."""
    with socket.create_connection(("127.0.0.1", path.port), timeout=10) as sock:
        sock.sendall(b"!")
        sock.recv(1)
        time.sleep(1)
        cpu0 = sum(cpu_seconds(pid) for pid in path.pids)
        time.sleep(seconds)
        return 100 * (sum(cpu_seconds(pid) for pid in path.pids) - cpu0) / seconds


def delay_table(cfg: Settings, echo_argv: list[str]) -> dict[str, dict[int, list[float]]]:
    """Latency probes through each tunnel with relay.py (delay + jitter) on the UDP leg."""
    out: dict[str, dict[int, list[float]]] = {}
    echo = free_port()
    with process([*echo_argv, str(echo)]), loss_table():
        wait_port(echo)
        for kind in TOOLS[1:]:
            out[kind] = {}
            with tunnel(kind, echo, cfg.delay) as path:
                for loss in cfg.delay_losses:
                    set_loss(loss, [path.udp_port], [])
                    out[kind][loss] = probe(path.port, cfg.probes // 2, cfg.probe_budget / 2)
    return out


def tables(cfg: Settings, lat, thr, cost, rss, idle, delayed, errors) -> list[Table]:
    rows = []
    for loss in cfg.losses:
        for kind in TOOLS:
            samples = lat[kind].get(loss)
            if not samples:
                rows.append([f"{loss} %", kind, "-", "-", "-", "-", "-", "-"])
                continue
            p99 = percentile(samples, 0.99)
            anchor_tcp = lat["plain TCP"].get(loss)
            anchor_kcptun = lat["kcptun fast3"].get(loss)
            rows.append([f"{loss} %", kind, len(samples), f"{statistics.median(samples):.2f}",
                         f"{p99:.1f}", f"{max(samples):.1f}",
                         ratio(p99, percentile(anchor_tcp, 0.99) if anchor_tcp else None),
                         ratio(p99, percentile(anchor_kcptun, 0.99) if anchor_kcptun else None)])
    latency = Table(
        "Request/response latency under loss (1 KiB request, 1 KiB reply, ms)",
        ["loss", "path", "n", "p50", "p99", "max", "p99 × plain TCP", "p99 × kcptun"], rows,
        f"Sequential exchanges on one open connection (TCP_NODELAY), at most {cfg.probes} or "
        f"{cfg.probe_budget:g} s per row; loss is random drop of N % of the packets in each "
        "direction on the WAN leg only (see Lab). No added delay: loopback RTT.",
        {"samples": {k: {str(loss): v for loss, v in d.items()} for k, d in lat.items()}})
    rows = []
    for loss in cfg.losses:
        for kind in TOOLS:
            mbit = thr[kind].get(loss)
            own = thr[kind].get(cfg.losses[0])
            rows.append([f"{loss} %", kind, "-" if mbit is None else f"{mbit:.0f}",
                         ratio(mbit, own), ratio(mbit, thr["kcptun fast3"].get(loss)),
                         ratio(mbit, thr["plain TCP"].get(loss)),
                         "-" if cost[kind].get(loss) is None else f"{cost[kind][loss]:.1f}"])
    throughput = Table(
        f"Throughput under loss (iperf3 -t {cfg.seconds}, 1 stream, Mbit/s)",
        ["loss", "path", "Mbit/s", f"× own {cfg.losses[0]} %", "× kcptun", "× plain TCP",
         "CPU s/GB (both ends)"], rows,
        "CPU s/GB: user+system seconds of the tunnel client and server together during the "
        "run, per GB received by iperf3 (plain TCP: kernel only, not measured).",
        {"mbit": {k: {str(loss): v for loss, v in d.items()} for k, d in thr.items()}})
    anchor = rss.get("kcptun fast3")
    rows = [[kind, f"{c / 1024:.1f}", f"{s / 1024:.1f}",
             ratio(c + s, sum(anchor) if anchor else None), f"{idle[kind]:.2f} %"]
            for kind, (c, s) in rss.items()]
    resources = Table(
        "Tunnel ends: peak RSS under load, idle CPU",
        ["tunnel", "client peak RSS MB", "server peak RSS MB", "× kcptun (sum)",
         "idle CPU (both ends)"], rows,
        f"Peak RSS = VmHWM after all the loss rows (iperf3 load included). Idle CPU: one open "
        f"connection through the tunnel, idle, measured over {cfg.idle_seconds:g} s, as a "
        "percentage of one core.")
    out = [latency, throughput, resources]
    if delayed:
        rows = []
        for loss in cfg.delay_losses:
            for kind in delayed:
                samples = delayed[kind].get(loss) or []
                if not samples:
                    continue
                other = delayed.get("kcptun fast3", {}).get(loss)
                rows.append([f"{loss} %", kind, len(samples), f"{statistics.median(samples):.1f}",
                             f"{percentile(samples, 0.99):.1f}", f"{max(samples):.1f}",
                             ratio(percentile(samples, 0.99),
                                   percentile(other, 0.99) if other else None)])
        out.append(Table(
            f"Latency with delay on the tunnels' leg ({cfg.delay[0]:g} ± {cfg.delay[1]:g} ms "
            "each way, relay.py)", ["loss", "path", "n", "p50", "p99", "max", "p99 × kcptun"],
            rows, "relay.py holds every UDP datagram for delay ± jitter (uniform, seeded; "
            "jitter reorders) between the tunnel client and server. Plain TCP is not in this "
            "table: the lab cannot delay TCP segments (no netem, no TUN link)."))
    if errors:
        out.append(Table("Lab errors", ["what"], [[e] for e in errors]))
    return out
