"""What --metrics costs: tcpfwd with and without it in the same run, and scrape time under load.

    python bench/bench_metrics.py [--quick] [--seconds N] [--sessions N]

1. Short connections per second (connect, 100-byte echo, close) and 1-stream iperf3 through
   two tcpfwd processes, one plain and one with ``--metrics`` scraped once a second the whole
   time (harsher than any Prometheus set-up: the default interval is 60 s), in rounds
   whose order alternates; each round's with/without ratio, then the median.
2. udpfwd with N (default 10,000) live sessions: the time of one ``GET /metrics`` (the
   snapshot, the kernel-drop read by sock_diag, the process collector, which lists the 10,000
   fds, and the rendering), median of 20.

Loopback only; every load bounded in time. The machine is shared: read the ratios, not the
absolute figures.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tcp import short_connections, throughput  # noqa: E402
from common import (  # noqa: E402
    Table,
    free_port,
    print_tables,
    process,
    raise_fd_limit,
    tool,
    tree_cpu_seconds,
    wait_port,
)

SCRAPES = 20  # timed scrapes with the sessions open


def scrape(port: int) -> float:
    """Seconds for one full GET /metrics."""
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        reply.read()
    return time.perf_counter() - started


class Scraper:
    """GET /metrics every ``interval`` seconds in a thread until closed."""

    def __init__(self, port: int, interval: float = 1.0) -> None:
        self.port, self.interval = port, interval
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            scrape(self.port)
            self.count += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)


def alternating(paths: list[str], rounds: int, run) -> dict[str, list]:
    """``run(path)`` for each path, ``rounds`` times, the order reversed every other round: with
    two paths a fixed order would give one of them the same place in every round (bench_tcp's
    interleaved() keeps its order; here the pair is what is compared)."""
    results: dict[str, list] = {path: [] for path in paths}
    for i in range(rounds):
        for path in paths if i % 2 == 0 else paths[::-1]:
            results[path].append(run(path))
    return results


def paired(values: list[float], anchors: list[float]) -> tuple[float, float, float]:
    """Median, min and max of the round-by-round ratios values[i] / anchors[i]."""
    ratios = sorted(v / a for v, a in zip(values, anchors, strict=True) if a)
    return statistics.median(ratios), ratios[0], ratios[-1]


def tcp_cost(seconds: float, rounds: int, short_seconds: float, control: bool = False) -> Table:
    """``control``: the second path runs without --metrics too (an A/A run: the noise floor)."""
    iperf_port, echo_port = free_port(), free_port()
    echo = [sys.executable, os.path.join(os.path.dirname(__file__), "echo_server.py"),
            str(echo_port)]
    with process(["iperf3", "-s", "-p", str(iperf_port)]), process(echo):
        wait_port(iperf_port)
        wait_port(echo_port)
        ports: dict[str, dict[str, int]] = {"bulk": {}, "short": {}}
        pids: dict[str, int] = {}
        running = []
        metrics_ports = []
        for path in ("plain", "--metrics"):
            for kind, dest in (("bulk", iperf_port), ("short", echo_port)):
                listen = free_port()
                extra: list[str] = []
                if path == "--metrics" and not control:
                    metrics_ports.append(free_port())
                    extra = ["--metrics", f"127.0.0.1:{metrics_ports[-1]}"]
                ctx = process(tool("tcpfwd", *extra, f"127.0.0.1:{listen}",
                                   f"127.0.0.1:{dest}"))
                running.append(ctx)
                proc = ctx.__enter__()
                wait_port(listen, proc=proc)
                ports[kind][path] = listen
                if kind == "short":
                    pids[path] = proc.pid
        for port in metrics_ports:
            wait_port(port)
        scrapers = [Scraper(port) for port in metrics_ports]
        try:
            paths = ["plain", "--metrics"]
            cpu = dict.fromkeys(paths, 0.0)  # CPU seconds of each short-connection forwarder
            done = dict.fromkeys(paths, 0.0)  # connections it carried meanwhile

            def short(path: str) -> float:
                before = tree_cpu_seconds(pids[path])
                rate = short_connections(ports["short"][path], short_seconds)
                cpu[path] += tree_cpu_seconds(pids[path]) - before
                done[path] += rate * short_seconds
                return rate

            rates = alternating(paths, rounds, short)
            bulk = alternating(paths, rounds, lambda p: throughput(ports["bulk"][p], seconds, 1))
        finally:
            for scraper in scrapers:
                scraper.close()
            for ctx in running:
                ctx.__exit__(None, None, None)
    scraped = sum(s.count for s in scrapers)
    rows = []
    for name, unit, values in (("short connections", "conn/s", rates),
                               ("iperf3 1 stream", "Gbit/s", bulk)):
        mid, lo, hi = paired(values["--metrics"], values["plain"])
        fmt = "{:.0f}" if unit == "conn/s" else "{:.2f}"
        rows.append([f"{name} ({unit})", fmt.format(statistics.median(values["plain"])),
                     fmt.format(statistics.median(values["--metrics"])), f"{mid:.3f}×",
                     f"{lo:.3f}–{hi:.3f}"])
    per = {path: 1e6 * cpu[path] / done[path] for path in cpu if done[path]}
    if len(per) == 2:
        rows.append(["tcpfwd CPU per short connection (µs)", f"{per['plain']:.0f}",
                     f"{per['--metrics']:.0f}", f"{per['--metrics'] / per['plain']:.3f}×",
                     "-"])
    title = "tcpfwd with vs without --metrics (scraped every 1 s)"
    if control:
        title = "control: two plain tcpfwd (the '--metrics' column runs without it)"
    return Table(title,
                 ["measure", "plain (median)", "--metrics (median)", "ratio (median)",
                  "ratio min–max"], rows,
                 f"{rounds} rounds, order alternating (short: {short_seconds:g} s, 2 client "
                 f"processes; iperf3 -t {seconds:g}); ratio = with / without in the same "
                 "round; CPU per connection = the forwarder's user+sys seconds over all "
                 "short rounds / the connections it carried (less swayed by the other load "
                 "on the machine); "
                 f"{scraped} scrapes happened during the runs.")


def udp_scrape_time(sessions: int) -> Table:
    raise_fd_limit()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # never read
    sink.bind(("127.0.0.1", 0))
    port, metrics = free_port(socket.SOCK_DGRAM), free_port()
    argv = tool("udpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{sink.getsockname()[1]}", "-t", "600",
                "--max-sessions", str(sessions + 100), "--metrics", f"127.0.0.1:{metrics}")
    clients: list[socket.socket] = []
    try:
        with process(argv) as proc:
            wait_port(metrics, proc=proc)
            idle = statistics.median(scrape(metrics) for _ in range(SCRAPES))
            deadline = time.monotonic() + 120
            opened = 0
            while opened < sessions and time.monotonic() < deadline:
                for _ in range(min(200, sessions - len(clients))):  # windows: no overflow
                    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    sock.sendto(b"!", ("127.0.0.1", port))
                    clients.append(sock)
                if len(clients) == sessions and opened < sessions:  # a datagram was lost
                    for sock in clients:
                        sock.sendto(b"!", ("127.0.0.1", port))
                        time.sleep(0.0001)
                time.sleep(0.02)
                opened = session_count(metrics)
            loaded = [scrape(metrics) for _ in range(SCRAPES)]
            with open("/proc/net/udp") as f:
                lines = sum(1 for _ in f) - 1
    finally:
        for sock in clients:
            sock.close()
        sink.close()
    return Table(f"udpfwd scrape time with {opened} live sessions",
                 ["sessions", "/proc/net/udp lines", "GET /metrics (median)", "max",
                  "idle (0 sessions)"],
                 [[opened, lines, f"{1000 * statistics.median(loaded):.1f} ms",
                   f"{1000 * max(loaded):.1f} ms", f"{1000 * idle:.1f} ms"]],
                 f"median of {SCRAPES} scrapes from a local client (HTTP included); the "
                 "kernel-drop count comes from sock_diag (an exact lookup), not from "
                 "/proc/net/udp, whose line count (every session's socket) is shown for scale.")


def session_count(metrics: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=30) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("portfwd_sessions_active{"):
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--seconds", type=float, default=3.0, help="per iperf3 run")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (order alternating)")
    parser.add_argument("--sessions", type=int, default=10_000, help="UDP sessions for scraping")
    parser.add_argument("--control", action="store_true",
                        help="also an A/A run of two plain tcpfwd: the noise floor of the ratios")
    opts = parser.parse_args()
    if opts.quick:
        opts.seconds, opts.rounds, opts.sessions = 1.0, 1, 200
    short = 1.0 if opts.quick else 2.0
    tables = [tcp_cost(opts.seconds, opts.rounds, short)]
    if opts.control:
        tables.append(tcp_cost(opts.seconds, opts.rounds, short, control=True))
    tables.append(udp_scrape_time(opts.sessions))
    print_tables(tables)


if __name__ == "__main__":
    main()
