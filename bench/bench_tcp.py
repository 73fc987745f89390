"""tcpfwd vs direct loopback (and socat / haproxy when installed), same run, printed as ratios.

    python bench/bench_tcp.py [--quick] [--seconds N]

Measures: 1-stream and 4-stream iperf3 throughput, short connections per second (connect,
100-byte echo, close), and RSS per idle connection with 2,000 idle connections. Loopback only;
every load is bounded in time. Never run as a timed test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
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

HAPROXY_CFG = """global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
listen fwd
    bind 127.0.0.1:{listen}
    server s1 127.0.0.1:{dest}
"""


def peers(dest: int) -> dict[str, tuple[list[str], dict]]:
    """name -> (argv for a forwarder 127.0.0.1:<listen> -> dest, env). {listen} is filled later."""
    found = {
        "tcpfwd (splice)": (tool("tcpfwd", "127.0.0.1:{listen}", f"127.0.0.1:{dest}"), {}),
        "tcpfwd (copy)": (tool("tcpfwd", "127.0.0.1:{listen}", f"127.0.0.1:{dest}"),
                          {"PORTFWD_NO_SPLICE": "1"}),
    }
    if have("socat"):
        found["socat"] = (["socat", "TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr",
                           f"TCP:127.0.0.1:{dest}"], {})
    if have("haproxy"):
        found["haproxy"] = (["haproxy", "-f", "{cfg}"], {})
    return found


def start_peer(name: str, argv: list[str], env: dict, listen: int, dest: int):
    cfg = None
    if "{cfg}" in argv:
        cfg = tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False)
        cfg.write(HAPROXY_CFG.format(listen=listen, dest=dest))
        cfg.close()
    argv = [a.replace("{listen}", str(listen)).replace("{cfg}", cfg.name if cfg else "")
            for a in argv]
    return process(argv, env)


def throughput(port: int, seconds: float, streams: int) -> float:
    result = iperf3(port, seconds, "-P", str(streams))
    return result["end"]["sum_received"]["bits_per_second"] / 1e9


def _short_conn_worker(port: int, seconds: float, queue) -> None:
    count, payload = 0, b"x" * 100
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(payload)
            got = 0
            while got < 100:
                got += len(sock.recv(100))
        count += 1
    queue.put(count)


def short_connections(port: int, seconds: float, workers: int = 2) -> float:
    queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_short_conn_worker, args=(port, seconds, queue))
             for _ in range(workers)]
    for p in procs:
        p.start()
    total = sum(queue.get(timeout=seconds + 30) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def idle_rss_per_connection(pid: int, port: int, count: int) -> float:
    base = rss_kib(pid)
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"!")  # one exchange so both pumps are set up, then idle
        sock.recv(1)
        socks.append(sock)
    time.sleep(1)
    per_conn = (rss_kib(pid) - base) * 1024 / count
    for sock in socks:
        sock.close()
    return per_conn


SHORT_ROUNDS = 5  # interleaved rounds of the short-connection test; the median is reported
SHORT_SECONDS = 2.0  # per path per round


def short_connection_rounds(ports: dict[str, int], rounds: int, seconds: float
                            ) -> dict[str, list[float]]:
    """conn/s per path, ``rounds`` times over, each round visiting every path in turn.

    One 5 s figure per path swung by +/-20 % on this shared box as the host's load drifted;
    interleaving spreads that drift over every path alike, and the median drops outliers.
    """
    rates: dict[str, list[float]] = {name: [] for name in ports}
    for _ in range(rounds):
        for name, port in ports.items():
            rates[name].append(short_connections(port, seconds))
    return rates


def measure(seconds: float, idle_count: int, rounds: int = SHORT_ROUNDS,
            short_seconds: float = SHORT_SECONDS) -> list[Table]:
    """Run every TCP measurement; the tables, each figure also as a ratio to direct loopback."""
    raise_fd_limit()
    iperf_port, echo_port = free_port(), free_port()
    rows, conn_rows, rss_rows = [], [], []
    plot: dict[str, tuple[float, float]] = {}
    with process(["iperf3", "-s", "-p", str(iperf_port)]), \
            process([sys.executable, os.path.join(os.path.dirname(__file__), "echo_server.py"),
                     str(echo_port)]):
        wait_port(iperf_port)
        wait_port(echo_port)
        direct = {s: throughput(iperf_port, seconds, s) for s in (1, 4)}
        plot["direct"] = (direct[1], direct[4])
        rows.append(["direct", f"{direct[1]:.2f}", "1.00×", f"{direct[4]:.2f}", "1.00×", "-", "-"])
        found = peers(iperf_port)
        for name, (argv, env) in found.items():
            listen = free_port()
            with start_peer(name, argv, env, listen, iperf_port) as proc:
                wait_port(listen, proc=proc)
                time.sleep(0.2)
                cpu0 = tree_cpu_seconds(proc.pid)
                t1 = throughput(listen, seconds, 1)
                cpu = tree_cpu_seconds(proc.pid) - cpu0
                t4 = throughput(listen, seconds, 4)
                gigabytes = t1 * seconds / 8
                plot[name] = (t1, t4)
                rows.append([name, f"{t1:.2f}", ratio(t1, direct[1]), f"{t4:.2f}",
                             ratio(t4, direct[4]), f"{100 * cpu / seconds:.0f} %",
                             f"{cpu / gigabytes:.2f}" if gigabytes else "-"])
        # Short connections: every forwarder runs at once (idle ones cost nothing) so that the
        # rounds can interleave the paths.
        with contextlib.ExitStack() as running:
            ports, procs = {"direct": echo_port}, {}
            for name, (argv, env) in found.items():
                listen = free_port()
                echo_argv = argv[:-1] + [argv[-1].replace(str(iperf_port), str(echo_port))]
                procs[name] = running.enter_context(
                    start_peer(name, echo_argv, env, listen, echo_port))
                wait_port(listen, proc=procs[name])
                ports[name] = listen
            rates = short_connection_rounds(ports, rounds, short_seconds)
            direct_conn = statistics.median(rates["direct"])
            for name, values in rates.items():
                rate = statistics.median(values)
                conn_rows.append([name, f"{rate:.0f}", f"{min(values):.0f}–{max(values):.0f}",
                                  ratio(rate, direct_conn)])
            for name, proc in procs.items():
                if name.startswith("tcpfwd") or name == "haproxy":
                    per = idle_rss_per_connection(proc.pid, ports[name], idle_count)
                    rss_rows.append([name, idle_count, f"{per / 1024:.1f}"])
    anchor = min((float(r[2]) for r in rss_rows if r[0] == "haproxy"), default=None)
    for row in rss_rows:
        row.append(ratio(float(row[2]), anchor))
    return [
        Table("TCP throughput (iperf3, Gbit/s)",
              ["path", "1 stream", "× direct", "4 streams", "× direct", "fwd CPU (1 stream)",
               "fwd CPU s/GB"], rows,
              f"iperf3 -t {seconds:g} on 127.0.0.1; the forwarder's CPU is user+sys of its "
              "process during the 1-stream run (with its reaped children: socat forks one per "
              "connection); s/GB = those CPU seconds per GB carried.", {"throughput": plot}),
        Table("Short connections (connect, 100 B echo, close)",
              ["path", "conn/s (median)", "min–max", "× direct"], conn_rows,
              f"2 client processes, {rounds} interleaved rounds of {short_seconds:g} s per path "
              "(direct, then each forwarder, then again); the median of the rounds, its ratio "
              "to direct's median."),
        Table("RSS per idle connection", ["forwarder", "connections", "kB each", "× haproxy"],
              rss_rows, "RSS growth of the forwarder after opening the connections (one 1-byte "
              "echo each, then idle 1 s), divided by their count. socat forks a process per "
              "connection, so it has no per-connection figure here."),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput measurement")
    opts = parser.parse_args()
    print_tables(measure(1.0 if opts.quick else opts.seconds, 50 if opts.quick else 2000,
                         1 if opts.quick else SHORT_ROUNDS, 0.5 if opts.quick else SHORT_SECONDS))


if __name__ == "__main__":
    main()
