"""tcpfwd -w <n>: short connections to nginx through 1, 2, 4, ... workers (the scaling curve).

    python bench/bench_workers.py [--workers 1,2,4] [--listeners reuseport,shared]
        [--seconds 4] [--rounds 3] [--concurrency 50] [--out FILE]

Each request is a new connection (wrk with ``Connection: close``; ab if wrk is missing) for a
1 KiB file from nginx on loopback. Per configuration: the request rate (median and range of
interleaved rounds), its ratio to nginx direct and to -w 1 in the same run, tcpfwd's CPU per
connection (parent and workers, from /proc), and how evenly the workers shared the connections
(the least and the most loaded worker's share of the workers' CPU). ``shared``
runs the workers on one listening socket (PORTFWD_SHARED_LISTENER=1) instead of one
SO_REUSEPORT socket each, to compare how they spread the load.

The default curve is 1, 2, 4, ... up to the CPUs this process may use (and that count
itself), so the script runs unchanged on a many-core machine. The load generator and nginx
share the machine with tcpfwd: on a small box the rate cannot scale, the CPU per connection
still says what a worker costs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    Table,
    cpu_seconds,
    free_port,
    have,
    print_tables,
    process,
    tool,
    tree_cpu_seconds,
    wait_port,
)

NGINX_CONF = """worker_processes {workers};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 0;
    client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};
    uwsgi_temp_path {dir}; scgi_temp_path {dir};
    server {{ listen 127.0.0.1:{port} reuseport backlog=4096; root {dir}/www; }}
}}
"""
FILE_SIZE = 1024  # bytes, the 1 KiB file
STARTED = re.compile(r"w\d+ pid (\d+)")  # the parent's "started n workers: w1 pid N, ..."


def default_curve() -> list[int]:
    cpus = len(os.sched_getaffinity(0))
    curve, n = [], 1
    while n <= cpus:
        curve.append(n)
        n *= 2
    if curve[-1] != cpus:
        curve.append(cpus)
    return curve


@contextlib.contextmanager
def nginx(workers: str) -> Iterator[int]:
    directory = tempfile.mkdtemp(prefix="bench-nginx-")
    os.makedirs(os.path.join(directory, "www"))
    with open(os.path.join(directory, "www", "1k"), "wb") as f:
        f.write(b"x" * FILE_SIZE)
    port = free_port()
    conf = os.path.join(directory, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(workers=workers, dir=directory, port=port))
    try:
        with process(["nginx", "-c", conf, "-p", directory]) as proc:
            wait_port(port, proc=proc)
            yield port
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def load(port: int, seconds: float, concurrency: int) -> int:
    """Requests completed, each on a new connection."""
    url = f"http://127.0.0.1:{port}/1k"
    if have("wrk"):
        threads = max(1, min(concurrency, len(os.sched_getaffinity(0)) // 2))
        out = subprocess.run(["wrk", "-t", str(threads), "-c", str(concurrency), "-d",
                              f"{max(1, round(seconds))}s", "-H", "Connection: close", url],
                             capture_output=True, text=True, timeout=seconds + 60).stdout
        match = re.search(r"(\d+) requests in", out)
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    else:
        out = subprocess.run(["ab", "-q", "-t", str(max(1, round(seconds))), "-n", "10000000", "-c",
                              str(concurrency), url], capture_output=True, text=True,
                             timeout=seconds + 60).stdout
        match = re.search(r"Complete requests:\s+(\d+)", out)
        errors = re.search(r"Non-2xx responses:\s+(\d+)", out)
    if match is None or errors is not None:
        raise RuntimeError(f"load generator failed:\n{out}")
    return int(match.group(1))


def measure(target: int, workers: int | None, listener: str, seconds: float,
            concurrency: int) -> tuple[float, float | None, tuple[float, float] | None]:
    """(req/s, CPU us per connection, (least, most) worker share) of one configuration;
    ``workers`` None = nginx direct."""
    if workers is None:
        start = time.monotonic()
        done = load(target, seconds, concurrency)
        return done / (time.monotonic() - start), None, None
    port = free_port()
    with tempfile.NamedTemporaryFile(prefix="bench-workers-", suffix=".log") as log:
        env = {"PORTFWD_SHARED_LISTENER": "1"} if listener == "shared" else {}
        argv = tool("tcpfwd", "-w", str(workers), "--log-file", log.name,
                    f"127.0.0.1:{port}", f"127.0.0.1:{target}")
        with process(argv, env=env) as proc:
            wait_port(port, proc=proc)
            deadline = time.monotonic() + 20
            while workers > 1 and len(re.findall(r"INFO: forwarding", read(log.name))) < workers:
                if time.monotonic() > deadline:
                    raise RuntimeError(read(log.name))
                time.sleep(0.05)
            pids = [int(pid) for pid in STARTED.findall(read(log.name))]
            before, start = tree_cpu_seconds(proc.pid), time.monotonic()
            each = [cpu_seconds(pid) for pid in pids]
            done = load(port, seconds, concurrency)
            elapsed, cpu = time.monotonic() - start, tree_cpu_seconds(proc.pid) - before
            each = [cpu_seconds(pid) - was for pid, was in zip(pids, each, strict=True)]
    share = None
    if workers > 1:  # each worker's part of the workers' CPU: how evenly the load spread
        total = sum(each) or 1.0
        share = (min(each) / total, max(each) / total)
    return done / elapsed, cpu / done * 1e6, share


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", default=",".join(map(str, default_curve())))
    parser.add_argument("--listeners", default="reuseport,shared")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--nginx-workers", default="auto")
    parser.add_argument("--out", help="also write the table here (markdown)")
    args = parser.parse_args()
    if not have("nginx") or not (have("wrk") or have("ab")):
        print("needs nginx and wrk (or ab)", file=sys.stderr)
        return 1
    curve = [int(n) for n in args.workers.split(",")]
    configs: list[tuple[int | None, str]] = [(None, "-")]
    for listener in args.listeners.split(","):
        configs += [(n, listener) for n in curve if n > 1 or listener == "reuseport"]
    results: dict[tuple, list[tuple]] = {config: [] for config in configs}
    with nginx(args.nginx_workers) as target:
        for _ in range(args.rounds):  # interleaved: drift in the machine's load hits all alike
            for config in configs:
                results[config].append(measure(target, *config, args.seconds,
                                               args.concurrency))
    direct = statistics.median(r[0] for r in results[(None, "-")])
    one = statistics.median(r[0] for r in results[(1, "reuseport")]) \
        if (1, "reuseport") in results else None
    rows = []
    for (workers, listener), runs in results.items():
        rates = [r[0] for r in runs]
        rate = statistics.median(rates)
        cpu = [r[1] for r in runs if r[1] is not None]
        shares = [r[2] for r in runs if r[2] is not None]
        rows.append([
            "nginx direct" if workers is None else "tcpfwd", workers or "-", listener,
            f"{rate:,.0f} ({min(rates):,.0f}-{max(rates):,.0f})", f"{rate / direct:.2f}x",
            f"{rate / one:.2f}x" if one and workers else "-",
            f"{statistics.median(cpu):.0f}" if cpu else "-",
            (f"{min(s[0] for s in shares):.0%} / {max(s[1] for s in shares):.0%}"
             if shares else "-")])
    note = (f"{args.rounds} interleaved rounds of {args.seconds:g} s, -c {args.concurrency}, "
            f"a new connection per request for a {FILE_SIZE}-byte file; "
            f"{len(os.sched_getaffinity(0))} CPUs shared by the load generator, nginx "
            f"(worker_processes {args.nginx_workers}) and tcpfwd. CPU = tcpfwd's parent and "
            "workers per connection (median); share = the least / most loaded worker's part "
            "of the workers' CPU (extremes over all rounds).")
    table = Table("tcpfwd -w: short connections to nginx",
                  ["path", "-w", "listener", "req/s median (range)", "x direct", "x -w 1",
                   "CPU us/conn", "worker share min / max"], rows, note)
    print_tables([table])
    if args.out:
        with open(args.out, "w") as f:
            f.write(table.markdown(2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
