"""The WAN matrix: plain TCP (cubic, bbr), kcptcp -K and kcptun fast3 over the emulated WAN.

    sudo python bench/bench_wan.py [--rtt 20,100,200] [--loss 0,1,5,10] [--burst]
         [--rate 100] [--seconds 30] [--probes 2000] [--interactive 20] [--tools ...]
         [--out bench/results]

Every path crosses the same emulated link (``wan.py``: two namespaces joined by TUN devices
and a userspace relay): the client site holds the tunnel clients and the load generators, the
server site the tunnel servers, an echo server and iperf3 -s. Each direction gets RTT/2 of
delay, the cell's random loss (or the burst-loss model), and a bottleneck of ``--rate`` Mbit/s
with a drop-tail queue. Measured per cell and path:

* **throughput**: iperf3, one stream, client -> server site, ``--seconds`` long;
* **request/response**: 1 KiB request, 1 KiB echo, sequential on each of ``--conns`` open
  connections at once (so 2,000 samples at 100 ms RTT take 20 s, not 200 s), p50/p99/max;
* **interactive**: one 64-byte "keystroke" every 50 ms on one connection, echoed, p99 (after
  one unmeasured echo: the connection's set-up, a tunnel's handshake included, is not a keystroke).

Both ends of every probe connection set TCP_NODELAY (the echo server too), as interactive
software does.

Plain TCP picks its congestion control per socket on the client site (iperf3 -C, and
TCP_CONGESTION on the probes' sockets); the server site's replies use the kernel default (bbr).
kcptun's FEC row uses its default 10:3 (--ds 10 --ps 3). Nothing is asserted; every
ratio compares figures of this run.

Per row, "queue drops" are the packets the bottleneck's drop-tail queue dropped client ->
server during that row's iperf3 run (the relay's counter before and after), and "FEC %" is what
the kcptcp client's FEC packets added to the bytes it carried in that run (``fec_bytes`` over
``up`` of its ``stats`` lines, one a second: sealed FEC packets, IP/UDP headers not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import secrets
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import wan  # noqa: E402
from common import Table, process, ratio, tool  # noqa: E402
from lab import KCPTUN_FLAGS, percentile  # noqa: E402
from wan_model import Direction  # noqa: E402

ECHO_PORT = 7000  # in the server site (its own namespace: fixed ports cannot collide)
IPERF_PORT = 5201
REQUEST = 1024  # bytes per request (and reply)
KEYSTROKE = 64  # bytes per interactive message
KEYSTROKE_INTERVAL = 0.05  # s between keystrokes
BURST = dict(burst_p=0.01, burst_r=0.2, burst_loss=1.0)  # GE: 4.8 % mean loss, bursts of 5
TCP_TOOLS = {"TCP cubic": "cubic", "TCP bbr": "bbr"}
TUNNEL_TOOLS = {  # name -> (kind, extra flags on both ends)
    "kcptcp -K": ("kcptcp", []),
    "kcptcp -K --fec 10:3": ("kcptcp", ["--fec", "10:3"]),
    "kcptcp -K --fec auto": ("kcptcp", ["--fec", "auto"]),
    "kcptcp -K --pacing": ("kcptcp", ["--pacing"]),
    "kcptcp -K --pacing --fec 10:3": ("kcptcp", ["--pacing", "--fec", "10:3"]),
    "kcptcp -K --pacing --fec auto": ("kcptcp", ["--pacing", "--fec", "auto"]),
    "kcptun fast3": ("kcptun", ["--ds", "0", "--ps", "0"]),
    "kcptun fast3 FEC 10:3": ("kcptun", ["--ds", "10", "--ps", "3"]),
}
# "w4096": both windows 4,096 segments (--sndwnd 4096 --rcvwnd 4096 on both ends), what a user
# sets for a path whose bandwidth x delay exceeds the default 1,024 (--pacing keeps in flight
# what the path holds); kcptun's rows with the same windows show what the window alone gives.
WIDE = ["--sndwnd", "4096", "--rcvwnd", "4096"]
TUNNEL_TOOLS.update({
    "kcptcp -K --pacing w4096": ("kcptcp", ["--pacing", *WIDE]),
    "kcptcp -K --pacing --fec 10:3 w4096": ("kcptcp", ["--pacing", "--fec", "10:3", *WIDE]),
    "kcptcp -K --pacing --fec auto w4096": ("kcptcp", ["--pacing", "--fec", "auto", *WIDE]),
    "kcptun fast3 w4096": ("kcptun", ["--ds", "0", "--ps", "0", *WIDE]),
    "kcptun fast3 FEC 10:3 w4096": ("kcptun", ["--ds", "10", "--ps", "3", *WIDE]),
})
DEFAULT_TOOLS = ("TCP cubic", "TCP bbr", "kcptcp -K", "kcptcp -K --fec 10:3",
                 "kcptcp -K --fec auto", "kcptcp -K --pacing w4096",
                 "kcptcp -K --pacing --fec 10:3 w4096", "kcptcp -K --pacing --fec auto w4096",
                 "kcptun fast3", "kcptun fast3 FEC 10:3")


@dataclass
class Settings:
    rtts: tuple[int, ...] = (20, 100, 200)  # ms round trip (RTT/2 each way)
    losses: tuple[float, ...] = (0, 1, 5, 10)  # % random loss per direction
    burst: bool = True  # one more row per RTT with Gilbert–Elliott loss (BURST)
    rate_mbit: float = 100.0  # bottleneck, both directions
    queue: int = 1000  # packets, drop-tail at the bottleneck
    seconds: int = 30  # iperf3 -t (integer: iperf3 reads it with atoi)
    probes: int = 2000  # request/response samples per path and cell, at most
    conns: int = 10  # connections probing at once
    probe_budget: float = 60.0  # s per path and cell, at most
    interactive: float = 20.0  # s of keystrokes per path and cell
    tools: tuple[str, ...] = DEFAULT_TOOLS

    def cells(self) -> list[tuple[int, str]]:
        labels = [f"{loss:g} %" for loss in self.losses] + (["burst"] if self.burst else [])
        return [(rtt, label) for rtt in self.rtts for label in labels]

    def direction(self, rtt: int, label: str) -> Direction:
        loss = dict(BURST) if label == "burst" else {"loss": float(label.split()[0]) / 100}
        return Direction(delay_ms=rtt / 2, rate_mbit=self.rate_mbit, queue=self.queue, **loss)


@dataclass
class Entry:
    """A path through the WAN: the port to connect to in the client site."""

    host: str
    port: int
    log: str | None = None  # the tunnel client's output (its stats lines), if kept


@contextlib.contextmanager
def tunnel(link: wan.Wan, name: str, target: int, index: int) -> Iterator[Entry]:
    """A tunnel client (client site) and server (server site) to the server site's target."""
    kind, extra = TUNNEL_TOOLS[name]
    udp, local = 9000 + index, 8000 + index
    with contextlib.ExitStack() as stack:
        log = None
        if kind == "kcptcp":
            psk = secrets.token_hex(32)
            common = ["-K", psk, "--stats-interval", "1", *extra]
            log = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "client.log")
            server_argv = tool("kcptcp-server", *common, f"{wan.SERVER_IP}:{udp}",
                               f"127.0.0.1:{target}")
            client_argv = tool("kcptcp-client", *common, f"127.0.0.1:{local}",
                               f"{wan.SERVER_IP}:{udp}")
        else:
            key = secrets.token_hex(16)
            flags = [*KCPTUN_FLAGS, *extra]  # the later --ds/--ps win
            server_argv = ["kcptun-server", "-l", f"{wan.SERVER_IP}:{udp}", "-t",
                           f"127.0.0.1:{target}", "--key", key, *flags]
            client_argv = ["kcptun-client", "-l", f"127.0.0.1:{local}", "-r",
                           f"{wan.SERVER_IP}:{udp}", "--key", key, *flags]
        server = stack.enter_context(process(link.argv("server", server_argv)))
        wan.wait_bound(link, "server", udp, socket.SOCK_DGRAM, server)
        client = stack.enter_context(process(link.argv("client", client_argv), log=log))
        wan.wait_bound(link, "client", local, socket.SOCK_STREAM, client)
        yield Entry("127.0.0.1", local, log)


def fec_share(log: str | None, offset: int) -> float | None:
    """FEC bytes over stream bytes sent, from the stats lines written after ``offset`` (the
    last line of each conversation: its totals); None without a log or without FEC."""
    if log is None:
        return None
    with open(log, errors="replace") as f:
        f.seek(offset)
        last: dict[str, tuple[int, int]] = {}
        for line in f:
            m = re.search(r"stats conv=(\d+): up=(\d+) .*fec_bytes=(\d+)", line)
            if m:
                last[m[1]] = (int(m[2]), int(m[3]))
    up = sum(u for u, _ in last.values())
    return sum(b for _, b in last.values()) / up if last and up else None


def log_size(log: str | None) -> int:
    return os.path.getsize(log) if log and os.path.exists(log) else 0


def connect(link: wan.Wan, entry: Entry, cc: str) -> socket.socket:
    sock = link.socket("client", socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    sock.settimeout(30)
    sock.connect((entry.host, entry.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise RuntimeError("echo closed the connection")
        data += chunk
    return data


def request_response(link: wan.Wan, entry: Entry, cc: str, cfg: Settings) -> list[float]:
    """1 KiB request / 1 KiB reply, sequential on each of ``cfg.conns`` connections at once;
    the round trips in ms (the first exchange of each connection is a warm-up)."""
    samples: list[float] = []
    errors: list[BaseException] = []
    socks = [connect(link, entry, cc) for _ in range(cfg.conns)]
    deadline = time.monotonic() + cfg.probe_budget
    request = secrets.token_bytes(REQUEST)

    def run(sock: socket.socket) -> None:
        try:
            sock.sendall(request)
            recv_exactly(sock, REQUEST)
            while len(samples) < cfg.probes and time.monotonic() < deadline:
                start = time.perf_counter()
                sock.sendall(request)
                recv_exactly(sock, REQUEST)
                samples.append((time.perf_counter() - start) * 1000)
        except (OSError, RuntimeError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in socks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sock in socks:
        sock.close()
    if errors and not samples:
        raise RuntimeError(f"request/response failed: {errors[0]}")
    return samples[:cfg.probes]


def interactive(link: wan.Wan, entry: Entry, cc: str, seconds: float) -> list[float]:
    """One 64-byte keystroke every 50 ms, echoed; each keystroke's round trip in ms."""
    sent: dict[int, float] = {}
    rtts: list[float] = []
    count = max(1, int(seconds / KEYSTROKE_INTERVAL))
    with connect(link, entry, cc) as sock:
        # One echo first, as the request/response probe has: a tunnel's first byte waits for
        # its handshake, which is connection set-up, not the latency of a keystroke.
        sock.sendall(bytes(KEYSTROKE))
        recv_exactly(sock, KEYSTROKE)

        def reader() -> None:
            with contextlib.suppress(OSError, RuntimeError):
                for _ in range(count):
                    n = int.from_bytes(recv_exactly(sock, KEYSTROKE)[:4], "big")
                    rtts.append((time.perf_counter() - sent[n]) * 1000)

        thread = threading.Thread(target=reader)
        thread.start()
        start = time.perf_counter()
        for n in range(count):
            time.sleep(max(0.0, start + n * KEYSTROKE_INTERVAL - time.perf_counter()))
            sent[n] = time.perf_counter()
            sock.sendall(n.to_bytes(4, "big") + bytes(KEYSTROKE - 4))
        thread.join(30)
    return rtts


@dataclass
class Result:
    mbit: float | None = None
    rr: tuple[float, ...] = ()  # request/response round trips, ms
    keys: tuple[float, ...] = ()  # interactive round trips, ms
    queue_drops: int | None = None  # bottleneck drops client -> server during iperf3
    fec_share: float | None = None  # FEC bytes / stream bytes the tunnel client sent


def measure(cfg: Settings) -> tuple[list[Table], dict]:
    """Run the matrix (as root); the report tables and the raw figures for plots."""
    ceiling = wan.ceiling()
    results: dict[tuple[int, str, str], Result] = {}
    errors: list[str] = []
    cells = cfg.cells()
    first = cfg.direction(*cells[0])
    with contextlib.ExitStack() as stack:
        link = stack.enter_context(wan.wan(first))
        echo_argv = [sys.executable, os.path.join(HERE, "echo_server.py"), str(ECHO_PORT),
                     "0.0.0.0", "nodelay"]
        stack.enter_context(process(link.argv("server", echo_argv)))
        wan.wait_bound(link, "server", ECHO_PORT)
        stack.enter_context(wan.iperf3_server(link, IPERF_PORT))
        entries: dict[str, tuple[Entry, Entry]] = {}
        for i, name in enumerate(cfg.tools):
            if name in TCP_TOOLS:
                entries[name] = (Entry(wan.SERVER_IP, ECHO_PORT), Entry(wan.SERVER_IP, IPERF_PORT))
            else:
                entries[name] = (stack.enter_context(tunnel(link, name, ECHO_PORT, 2 * i)),
                                 stack.enter_context(tunnel(link, name, IPERF_PORT, 2 * i + 1)))
        for rtt, label in cells:
            link.set(cfg.direction(rtt, label))
            print(f"bench_wan: {rtt} ms, {label}", file=sys.stderr, flush=True)
            for name, (echo, iperf) in entries.items():
                result = results[rtt, label, name] = Result()
                cc = TCP_TOOLS.get(name, "cubic")  # tunnels: only their local TCP leg
                time.sleep(1)  # drain what the previous path left in the queue
                before, offset = link.stats()["forward"]["lost_queue"], log_size(iperf.log)
                try:
                    out = wan.iperf3_through(link, iperf.port, cfg.seconds, "-C", cc,
                                             host=iperf.host)
                    result.mbit = out["end"]["sum_received"]["bits_per_second"] / 1e6
                    if iperf.log:
                        time.sleep(1.2)  # the tunnel client's last stats line of the run
                    result.queue_drops = link.stats()["forward"]["lost_queue"] - before
                    result.fec_share = fec_share(iperf.log, offset)
                except (OSError, RuntimeError, ValueError, KeyError,
                        subprocess.TimeoutExpired) as exc:
                    errors.append(f"iperf3 {name} at {rtt} ms / {label}: {exc}")
                try:
                    result.rr = tuple(request_response(link, echo, cc, cfg))
                    result.keys = tuple(interactive(link, echo, cc, cfg.interactive))
                except (OSError, RuntimeError) as exc:
                    errors.append(f"probe {name} at {rtt} ms / {label}: {exc}")
        stats = link.stats()
    return tables(cfg, ceiling, results, errors, stats), raw(results)


def raw(results: dict[tuple[int, str, str], Result]) -> dict:
    return {f"{rtt}|{label}|{name}": {"mbit": r.mbit, "rr": list(r.rr), "keys": list(r.keys),
                                      "queue_drops": r.queue_drops, "fec_share": r.fec_share}
            for (rtt, label, name), r in results.items()}


def _p99(samples: tuple[float, ...]) -> float | None:
    return percentile(list(samples), 0.99) if samples else None


def tables(cfg: Settings, ceiling: wan.Ceiling, results: dict, errors: list[str],
           stats: dict) -> list[Table]:
    rows = []
    kcptun = [n for n in cfg.tools if n.startswith("kcptun")]
    for rtt, label in cfg.cells():
        cell = {name: results.get((rtt, label, name)) for name in cfg.tools}
        cubic = cell.get("TCP cubic")
        bbr = cell.get("TCP bbr")
        best_thr = max((cell[n].mbit for n in kcptun if cell[n] and cell[n].mbit), default=None)
        best_p99 = min((_p99(cell[n].rr) for n in kcptun if cell[n] and cell[n].rr),
                       default=None)
        for name, r in cell.items():
            if r is None:
                continue
            p99 = _p99(r.rr)
            rows.append([
                f"{rtt} ms", label, name,
                "-" if r.mbit is None else f"{r.mbit:.1f}",
                ratio(r.mbit, cubic.mbit if cubic else None), ratio(r.mbit, best_thr),
                len(r.rr), f"{statistics.median(r.rr):.0f}" if r.rr else "-",
                "-" if p99 is None else f"{p99:.0f}", f"{max(r.rr):.0f}" if r.rr else "-",
                ratio(p99, _p99(bbr.rr) if bbr else None), ratio(p99, best_p99),
                "-" if not r.keys else f"{_p99(r.keys):.0f}",
                "-" if r.queue_drops is None else r.queue_drops,
                "-" if r.fec_share is None else f"{100 * r.fec_share:.1f} %"])
    matrix = Table(
        f"WAN matrix ({cfg.rate_mbit:g} Mbit/s bottleneck, queue {cfg.queue} packets)",
        ["RTT", "loss", "path", "Mbit/s", "× TCP cubic", "× best kcptun", "rr n", "rr p50 ms",
         "rr p99 ms", "rr max ms", "rr p99 × TCP bbr", "rr p99 × best kcptun",
         "keys p99 ms", "queue drops", "FEC %"], rows,
        f"Mbit/s: iperf3 -t {cfg.seconds}, 1 stream. rr: 1 KiB request / 1 KiB reply, "
        f"sequential on each of {cfg.conns} connections at once, at most {cfg.probes} samples "
        f"or {cfg.probe_budget:g} s. keys: one 64-byte keystroke every 50 ms for "
        f"{cfg.interactive:g} s, echoed (p99 of the round trips). Loss is per direction; "
        f"burst = Gilbert–Elliott p={BURST['burst_p']}, r={BURST['burst_r']} (4.8 % mean, "
        "bursts of 5). Best kcptun = the better of kcptun's rows in that cell.")
    link_rows = [[d, *(stats[d][k] for k in ("offered", "lost_random", "lost_burst",
                                             "lost_queue", "delivered"))]
                 for d in ("forward", "back")]
    out = [Table("Emulator", ["direction", "offered", "lost random", "lost burst",
                              "lost queue", "delivered"], link_rows,
                 ceiling.describe() + ". Counters: the relay's, over the whole run.")]
    out.append(matrix)
    if errors:
        out.append(Table("Errors", ["what"], [[e] for e in errors]))
    return out


def plots(out_dir: str, stem: str, data: dict) -> list[str]:
    """Throughput vs loss per RTT; request/response latency CDF at 100 ms / 5 %."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    by: dict[int, dict[str, list[tuple[str, float]]]] = {}
    for key, r in data.items():
        rtt, label, name = key.split("|")
        if r["mbit"] is not None:
            by.setdefault(int(rtt), {}).setdefault(name, []).append((label, r["mbit"]))
    written = []
    if by:
        fig, axes = plt.subplots(1, len(by), figsize=(5 * len(by), 3.8), squeeze=False)
        for ax, rtt in zip(axes[0], sorted(by), strict=True):
            for name, points in by[rtt].items():
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            ax.set_yscale("log")
            ax.set_title(f"RTT {rtt} ms")
            ax.set_xlabel("loss per direction")
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel("Mbit/s (iperf3, log)")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        written.append(f"{stem}-throughput.png")
        fig.savefig(os.path.join(out_dir, written[-1]), dpi=90)
        plt.close(fig)
    cdf = {k.split("|")[2]: sorted(r["rr"]) for k, r in data.items()
           if k.startswith("100|5 %|") and r["rr"]}
    if cdf:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, samples in cdf.items():
            ax.plot(samples, [(i + 1) / len(samples) for i in range(len(samples))], label=name)
        ax.set_xscale("log")
        ax.set_xlabel("1 KiB request/response round trip, ms (log)")
        ax.set_ylabel("fraction")
        ax.set_title("Latency CDF at 100 ms RTT, 5 % loss")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(f"{stem}-latency-cdf.png")
        fig.savefig(os.path.join(out_dir, written[-1]), dpi=90)
        plt.close(fig)
    return written


def parse(argv: list[str] | None = None) -> tuple[Settings, str, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Settings()
    parser.add_argument("--rtt", default=",".join(map(str, d.rtts)), help="ms, comma-separated")
    parser.add_argument("--loss", default=",".join(f"{x:g}" for x in d.losses),
                        help="%% per direction, comma-separated")
    parser.add_argument("--burst", action="store_true", help="add the burst-loss row")
    parser.add_argument("--rate", type=float, default=d.rate_mbit, help="Mbit/s bottleneck")
    parser.add_argument("--queue", type=int, default=d.queue, help="packets")
    parser.add_argument("--seconds", type=int, default=d.seconds, help="iperf3 -t")
    parser.add_argument("--probes", type=int, default=d.probes)
    parser.add_argument("--conns", type=int, default=d.conns)
    parser.add_argument("--probe-budget", type=float, default=d.probe_budget)
    parser.add_argument("--interactive", type=float, default=d.interactive, help="s")
    parser.add_argument("--tools", default=",".join(d.tools),
                        help=f"comma-separated, of: {', '.join([*TCP_TOOLS, *TUNNEL_TOOLS])}")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--note", default="", help="a line for the report (e.g. machine load)")
    opts = parser.parse_args(argv)
    tools = tuple(t.strip() for t in opts.tools.split(",") if t.strip())
    unknown = [t for t in tools if t not in TCP_TOOLS and t not in TUNNEL_TOOLS]
    if unknown:
        parser.error(f"unknown tool(s): {', '.join(unknown)}")
    cfg = Settings(tuple(int(x) for x in opts.rtt.split(",")),
                   tuple(float(x) for x in opts.loss.split(",")), opts.burst, opts.rate,
                   opts.queue, opts.seconds, opts.probes, opts.conns, opts.probe_budget,
                   opts.interactive, tools)
    return cfg, opts.out, opts.note


def main(argv: list[str] | None = None) -> int:
    cfg, out_dir, note = parse(argv)
    if why := wan.available():
        print(f"bench_wan: {why}", file=sys.stderr)
        return 2
    tables_, data = measure(cfg)
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-wan"
    commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "?"
    parts = [f"# WAN matrix, {datetime.date.today().isoformat()}", "",
             f"Reproduce: `sudo python bench/bench_wan.py {shlex.join(sys.argv[1:])}` "
             f"(commit `{commit}`, {os.cpu_count()} CPUs).", ""]
    if note:
        parts += [note, ""]
    parts.append("## Method\n\n" + __doc__.split("\n\n", 2)[2].strip() + "\n")
    parts.extend(t.markdown(2) for t in tables_)
    parts.extend(f"![{name}]({name})\n" for name in plots(out_dir, stem, data))
    with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
        json.dump(data, f)
    path = os.path.join(out_dir, f"{stem}.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
