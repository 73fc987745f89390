"""Concurrent short connections: nginx (1 KiB file) behind each forwarder, driven by ab.

    python bench/bench_short.py [--rounds 3] [--requests 5000] [--concurrency 1,10,50,200]
                                [--before DIR] [--throughput SECONDS]

Paths: direct (ab -> nginx), tcpfwd (default logging), tcpfwd at warning level, tcpfwd
with its per-connection lines (``--log-level debug``; what INFO wrote before #18), HAProxy
(``nbthread 1``), rinetd, socat (forks per connection); those not installed are skipped.
``--before DIR`` adds the tcpfwd of another checkout (a ``git worktree`` of main) as
``tcpfwd@before``, so that a change and its base are measured in the same run.

``ab`` without ``-k`` opens a new connection per request (HTTP/1.0, nginx closes). nginx runs
``worker_processes auto`` (one per CPU: what nginx recommends, and direct then measures what
the host can do rather than one nginx worker), ``access_log off``, ``sendfile on``. Each round
visits every concurrency and, within it, every path (interleaved); the tables give medians,
min–max over rounds, and × direct as the median of per-round ratios to direct at the same
concurrency. The forwarder's CPU per connection is the utime+stime delta of its process tree
(/proc, reaped children included: socat forks) over the requests ab completed.

``--throughput S`` also measures 1-stream iperf3 throughput through each tcpfwd (S seconds,
interleaved), so a per-connection change is checked against bulk transfer in the same run.
Loopback only; every load is bounded by the request count and a subprocess timeout.
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
from collections.abc import Iterator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tcp import HAPROXY_CFG  # noqa: E402
from common import (  # noqa: E402
    Table,
    free_port,
    have,
    iperf3,
    print_tables,
    process,
    raise_fd_limit,
    tool,
    tree_cpu_seconds,
    wait_port,
)

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
FILE_SIZE = 1024  # bytes served per request
CONCURRENCY = (1, 10, 50, 200)
ROUNDS = 3
REQUESTS = 5000
AB_TIMEOUT = 120  # s: bound on one ab run
WARNING = 30  # PORTFWD_LOGLEVEL of the quiet tcpfwd row

NGINX_CONF = """
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    keepalive_timeout 0;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {dir}/www;
    }}
}}
"""

# bench_tcp's HAProxy, on one thread: the single-core peer the issue names
HAPROXY_CONF = HAPROXY_CFG.replace("global\n", "global\n    nbthread 1\n", 1)

RINETD_CONF = "127.0.0.1 {listen} 127.0.0.1 {dest}\n"


@contextlib.contextmanager
def nginx(directory: str, workers: str) -> Iterator[int]:
    """nginx on a free loopback port serving ``/1k`` (FILE_SIZE bytes); yields the port."""
    port = free_port()
    os.makedirs(os.path.join(directory, "www"))
    with open(os.path.join(directory, "www", "1k"), "wb") as f:
        f.write(b"x" * FILE_SIZE)
    conf = os.path.join(directory, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(workers=workers, dir=directory, port=port))
    with process([NGINX, "-e", os.path.join(directory, "error.log"), "-c", conf,
                  "-g", "daemon off;"]) as proc:
        wait_port(port, proc=proc)
        yield port


def forwarders(directory: str, dest: int, before: str | None) -> dict[str, tuple[list, dict]]:
    """path name -> (argv listening on ``{listen}``, extra env); the ones installed here."""
    target = f"127.0.0.1:{dest}"
    found: dict[str, tuple[list, dict]] = {
        "tcpfwd": (tool("tcpfwd", "127.0.0.1:{listen}", target), {}),
        f"tcpfwd LOGLEVEL={WARNING}": (tool("tcpfwd", "127.0.0.1:{listen}", target),
                                       {"PORTFWD_LOGLEVEL": str(WARNING)}),
        "tcpfwd --log-level debug": (tool("tcpfwd", "--log-level", "debug",
                                          "127.0.0.1:{listen}", target), {}),
    }
    if before:
        argv = [sys.executable, os.path.join(before, "bin", "tcpfwd"), "127.0.0.1:{listen}",
                target]
        found["tcpfwd@before"] = (argv, {"PYTHONPATH": before})
        found[f"tcpfwd@before LOGLEVEL={WARNING}"] = (
            argv, {"PYTHONPATH": before, "PORTFWD_LOGLEVEL": str(WARNING)})
    if have("haproxy"):
        found["haproxy nbthread 1"] = (["haproxy", "-db", "-f", "{conf:haproxy}"], {})
    if have("rinetd"):
        found["rinetd"] = (["rinetd", "-f", "-c", "{conf:rinetd}"], {})
    if have("socat"):
        found["socat"] = (["socat", "TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr,"
                           "backlog=4096", f"TCP:{target}"], {})
    return found


def start(directory: str, name: str, argv: list, env: dict, listen: int, dest: int):
    """Fill in the port and config-file placeholders of ``argv``; the running process."""
    confs = {"haproxy": HAPROXY_CONF, "rinetd": RINETD_CONF}
    out = []
    for arg in argv:
        match = re.fullmatch(r"\{conf:(\w+)\}", arg)
        if match:
            path = os.path.join(directory, f"{name.replace(' ', '_')}.conf")
            with open(path, "w") as f:
                f.write(confs[match.group(1)].format(listen=listen, dest=dest))
            arg = path
        out.append(arg.replace("{listen}", str(listen)))
    return process(out, env, log=os.path.join(directory, f"{name.replace(' ', '_')}.log"))


AB_FIELDS = {"rate": r"Requests per second:\s+([\d.]+)", "done": r"Complete requests:\s+(\d+)",
             "failed": r"Failed requests:\s+(\d+)"}


def ab(port: int, requests: int, concurrency: int) -> dict[str, float]:
    """One ab run (a connection per request); its rate, completed and failed requests."""
    out = subprocess.run(["ab", "-q", "-r", "-s", "10", "-n", str(requests),
                          "-c", str(concurrency), f"http://127.0.0.1:{port}/1k"],
                         capture_output=True, text=True, timeout=AB_TIMEOUT)
    found = {key: re.search(pattern, out.stdout) for key, pattern in AB_FIELDS.items()}
    if not all(found.values()):
        raise RuntimeError(f"ab failed ({out.returncode}): {(out.stderr or out.stdout)[-500:]}")
    return {key: float(match.group(1)) for key, match in found.items()}


def measure(rounds: int = ROUNDS, requests: int = REQUESTS,
            concurrency: tuple[int, ...] = CONCURRENCY, before: str | None = None,
            throughput: float = 0.0, nginx_workers: str = "auto") -> list[Table]:
    raise_fd_limit()
    paths = ["direct"]
    rates: dict[tuple[str, int], list[float]] = {}
    cpu_us: dict[tuple[str, int], list[float]] = {}
    failed: dict[str, int] = {}
    bulk: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-short-") as directory, \
            nginx(os.path.join(directory, "nginx"), nginx_workers) as web, \
            contextlib.ExitStack() as running:
        ports, procs = {"direct": web}, {}
        for name, (argv, env) in forwarders(directory, web, before).items():
            listen = free_port()
            procs[name] = running.enter_context(start(directory, name, argv, env, listen, web))
            wait_port(listen, proc=procs[name])
            ports[name] = listen
            paths.append(name)
        for name in paths:  # warm-up: first connections pay imports, page faults, pools
            ab(ports[name], min(requests, 200), min(10, requests))
        for _ in range(rounds):
            for conc in concurrency:
                for name in paths:
                    proc = procs.get(name)
                    cpu0 = tree_cpu_seconds(proc.pid) if proc else 0.0
                    result = ab(ports[name], max(requests, conc), conc)
                    rates.setdefault((name, conc), []).append(result["rate"])
                    failed[name] = failed.get(name, 0) + int(result["failed"])
                    if proc and result["done"]:
                        used = tree_cpu_seconds(proc.pid) - cpu0
                        cpu_us.setdefault((name, conc), []).append(1e6 * used / result["done"])
        if throughput:
            bulk = bulk_throughput(running, directory, throughput, rounds, before)
    return tables(paths, concurrency, rates, cpu_us, failed, bulk, rounds, requests,
                  nginx_workers, throughput)


def bulk_throughput(running: contextlib.ExitStack, directory: str, seconds: float, rounds: int,
                    before: str | None) -> dict[str, list[float]]:
    """1-stream iperf3 Gbit/s through each tcpfwd, interleaved with direct."""
    server = free_port()
    running.enter_context(process(["iperf3", "-s", "-p", str(server)]))
    wait_port(server)
    ports = {"direct": server}
    for name, (argv, env) in forwarders(directory, server, before).items():
        if name.startswith("tcpfwd"):
            listen = free_port()
            proc = running.enter_context(start(directory, f"bulk {name}", argv, env, listen,
                                               server))
            wait_port(listen, proc=proc)
            ports[name] = listen
    out: dict[str, list[float]] = {name: [] for name in ports}
    for _ in range(rounds):
        for name, port in ports.items():
            result = iperf3(port, seconds)
            out[name].append(result["end"]["sum_received"]["bits_per_second"] / 1e9)
    return out


def _paired(values: list[float], anchor: list[float]) -> list[float]:
    return sorted(v / d for v, d in zip(values, anchor, strict=True) if d)


def tables(paths: list[str], concurrency: tuple[int, ...], rates: dict, cpu_us: dict,
           failed: dict, bulk: dict, rounds: int, requests: int, nginx_workers: str,
           throughput: float) -> list[Table]:
    rows = []
    for name in paths:
        row: list[object] = [name]
        for conc in concurrency:
            values = rates[(name, conc)]
            paired = _paired(values, rates[("direct", conc)])
            cell = f"{statistics.median(values):,.0f} ({min(values):,.0f}–{max(values):,.0f})"
            if name != "direct":
                cell += (f" **{statistics.median(paired):.2f}×** "
                         f"({paired[0]:.2f}–{paired[-1]:.2f})")
            row.append(cell)
        rows.append(row)
    cpu_rows = []
    for name in paths[1:]:
        cpu_rows.append([name, *(f"{statistics.median(cpu_us[(name, c)]):.0f}"
                                 if cpu_us.get((name, c)) else "-" for c in concurrency),
                         failed.get(name, 0)])
    result = [
        Table("Concurrent short connections (ab → nginx 1 KiB, req/s)",
              ["path", *(f"-c {c}" for c in concurrency)], rows,
              f"`ab -n {requests} -c C` (a new connection per request), {rounds} interleaved "
              f"rounds; median (min–max) req/s, then × direct: the median (min–max) of each "
              f"round's ratio to direct at the same concurrency. nginx worker_processes "
              f"{nginx_workers}, access_log off.", {"rates": {f"{k[0]}|{k[1]}": v
                                                             for k, v in rates.items()}}),
        Table("Forwarder CPU per connection (µs, utime+stime / completed requests)",
              ["path", *(f"-c {c}" for c in concurrency), "failed requests"], cpu_rows,
              "Median over rounds of the forwarder process tree's CPU delta during one ab run "
              "divided by the requests it completed.",
              {"cpu_us": {f"{k[0]}|{k[1]}": v for k, v in cpu_us.items()}}),
    ]
    if bulk:
        bulk_rows = []
        for name, values in bulk.items():
            paired = _paired(values, bulk["direct"])
            bulk_rows.append([name, f"{statistics.median(values):.2f}",
                              f"{min(values):.2f}–{max(values):.2f}",
                              "-" if name == "direct" else f"{statistics.median(paired):.2f}×"])
        result.append(Table("1-stream throughput (iperf3, Gbit/s)",
                            ["path", "median", "min–max", "× direct"], bulk_rows,
                            f"iperf3 -t {throughput:g}, {rounds} interleaved rounds."))
    return result


def missing() -> str | None:
    """Why this bench cannot run here (ab or nginx not installed), or None."""
    absent = [name for name in ("ab", NGINX) if not have(name)]
    return f"{', '.join(absent)} not installed" if absent else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--requests", type=int, default=REQUESTS, help="per ab run")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)),
                        help="comma-separated ab -c values")
    parser.add_argument("--before", help="another checkout whose tcpfwd is measured too")
    parser.add_argument("--throughput", type=float, default=0.0,
                        help="seconds of 1-stream iperf3 per tcpfwd and round (0 = skip)")
    parser.add_argument("--nginx-workers", default="auto", help="nginx worker_processes")
    opts = parser.parse_args()
    why = missing()
    if why:
        parser.exit(1, f"bench_short: {why}\n")
    if not 1 <= opts.rounds <= 50 or not 1 <= opts.requests <= 1_000_000:
        parser.error("--rounds 1-50, --requests 1-1000000")
    conc = tuple(int(c) for c in opts.concurrency.split(",") if c)
    print_tables(measure(opts.rounds, opts.requests, conc, opts.before and
                         os.path.abspath(opts.before), opts.throughput, opts.nginx_workers))


if __name__ == "__main__":
    main()
