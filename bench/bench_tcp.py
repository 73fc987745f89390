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


def _short_conn_worker(port: int, seconds: float, queue, expect: int = 100) -> None:
    count, payload = 0, b"x" * 100
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(payload)
            got = 0
            while got < expect:  # the echo, and whatever the forwarder put before it
                data = sock.recv(expect)
                if not data:
                    raise RuntimeError(f"closed after {got} of {expect} bytes")
                got += len(data)
        count += 1
    queue.put(count)


def short_connections(port: int, seconds: float, workers: int = 2, expect: int = 100) -> float:
    """Connections per second: connect, send 100 bytes, read ``expect`` bytes back, close."""
    queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_short_conn_worker,
                                     args=(port, seconds, queue, expect))
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


ROUNDS = 3  # interleaved rounds of the throughput runs; medians are reported
SHORT_ROUNDS = 7  # interleaved rounds of the short-connection test
SHORT_SECONDS = 2.0  # per path per round


def interleaved(paths: list[str], rounds: int, run) -> dict[str, list]:
    """``run(path)`` for every path, ``rounds`` times over, each round visiting every path.

    One figure per path swung by +/-20 % on this shared box as the host's load drifted (a
    direct 1-stream run once came out below tcpfwd's); interleaving spreads that drift over
    every path alike, and the median drops outliers.
    """
    results: dict[str, list] = {path: [] for path in paths}
    for _ in range(rounds):
        for path in paths:
            results[path].append(run(path))
    return results


def measure(seconds: float, idle_count: int, rounds: int = ROUNDS,
            short_rounds: int = SHORT_ROUNDS, short_seconds: float = SHORT_SECONDS) -> list[Table]:
    """Run every TCP measurement; the tables, each figure also as a ratio to direct loopback.

    Every forwarder runs for the whole measurement (idle ones cost nothing), one instance
    towards iperf3 and one towards the echo server, so that rounds can interleave the paths.
    """
    raise_fd_limit()
    iperf_port, echo_port = free_port(), free_port()
    with process(["iperf3", "-s", "-p", str(iperf_port)]), \
            process([sys.executable, os.path.join(os.path.dirname(__file__), "echo_server.py"),
                     str(echo_port)]), contextlib.ExitStack() as running:
        wait_port(iperf_port)
        wait_port(echo_port)
        bulk_ports, short_ports = {"direct": iperf_port}, {"direct": echo_port}
        bulk_procs, short_procs = {}, {}
        for name, (argv, env) in peers(iperf_port).items():
            for ports, procs, dest, args in (
                    (bulk_ports, bulk_procs, iperf_port, argv),
                    (short_ports, short_procs, echo_port,
                     argv[:-1] + [argv[-1].replace(str(iperf_port), str(echo_port))])):
                listen = free_port()
                procs[name] = running.enter_context(start_peer(name, args, env, listen, dest))
                wait_port(listen, proc=procs[name])
                ports[name] = listen
        time.sleep(0.2)

        cpu: dict[str, float] = dict.fromkeys(bulk_procs, 0.0)

        def one_stream(path: str) -> float:
            proc = bulk_procs.get(path)
            cpu0 = tree_cpu_seconds(proc.pid) if proc else 0.0
            gbits = throughput(bulk_ports[path], seconds, 1)
            if proc:
                cpu[path] += tree_cpu_seconds(proc.pid) - cpu0
            return gbits

        t1 = interleaved(list(bulk_ports), rounds, one_stream)
        t4 = interleaved(list(bulk_ports), rounds,
                         lambda path: throughput(bulk_ports[path], seconds, 4))
        rates = interleaved(list(short_ports), short_rounds,
                            lambda path: short_connections(short_ports[path], short_seconds))
        rss_rows = []
        for name, proc in short_procs.items():
            if name.startswith("tcpfwd") or name == "haproxy":
                per = idle_rss_per_connection(proc.pid, short_ports[name], idle_count)
                rss_rows.append([name, idle_count, f"{per / 1024:.1f}"])

    median = {path: (statistics.median(t1[path]), statistics.median(t4[path])) for path in t1}
    rows = []
    for path, (one, four) in median.items():
        used = cpu.get(path)
        gigabytes = sum(t1[path]) * seconds / 8
        rows.append([path, f"{one:.2f}", ratio(one, median["direct"][0]), f"{four:.2f}",
                     ratio(four, median["direct"][1]),
                     "-" if used is None else f"{100 * used / (rounds * seconds):.0f} %",
                     "-" if used is None or not gigabytes else f"{used / gigabytes:.2f}"])
    conn_rows = []
    for path, values in rates.items():
        # Paired: each round's rate over direct's rate in the same round, then the median, so
        # that the host's drift between rounds cancels out instead of adding to the spread.
        paired = sorted(v / d for v, d in zip(values, rates["direct"], strict=True) if d)
        conn_rows.append([path, f"{statistics.median(values):.0f}",
                          f"{min(values):.0f}–{max(values):.0f}",
                          f"{statistics.median(paired):.2f}×" if paired else "-",
                          f"{paired[0]:.2f}–{paired[-1]:.2f}" if paired else "-"])
    anchor = min((float(r[2]) for r in rss_rows if r[0] == "haproxy"), default=None)
    for row in rss_rows:
        row.append(ratio(float(row[2]), anchor))
    return [
        Table("TCP throughput (iperf3, Gbit/s)",
              ["path", "1 stream", "× direct", "4 streams", "× direct", "fwd CPU (1 stream)",
               "fwd CPU s/GB"], rows,
              f"iperf3 -t {seconds:g} on 127.0.0.1, {rounds} interleaved rounds per path, "
              "medians; the forwarder's CPU is user+sys of its process during the 1-stream runs "
              "(with its reaped children: socat forks one per connection); s/GB = those CPU "
              "seconds per GB carried.", {"throughput": median}),
        Table("Short connections (connect, 100 B echo, close)",
              ["path", "conn/s (median)", "min–max", "× direct (median)", "× direct min–max"],
              conn_rows,
              f"2 client processes, {short_rounds} interleaved rounds of {short_seconds:g} s per "
              "path (direct, then each forwarder, then again); × direct is the median over "
              "rounds of the path's rate divided by direct's rate in the same round."),
        Table("RSS per idle connection", ["forwarder", "connections", "kB each", "× haproxy"],
              rss_rows, "RSS growth of the forwarder after opening the connections (one 1-byte "
              "echo each, then idle 1 s), divided by their count. socat forks a process per "
              "connection, so it has no per-connection figure here."),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    opts = parser.parse_args()
    if opts.quick:
        print_tables(measure(1.0, 50, 1, 1, 0.5))
    else:
        print_tables(measure(opts.seconds, 2000))


if __name__ == "__main__":
    main()
