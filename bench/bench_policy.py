"""tcpfwd's per-connection policy vs plain tcpfwd, same run: short connections per second.

    python bench/bench_policy.py [--quick] [--rounds N] [--seconds S]

Paths (each a tcpfwd in front of the same echo server): plain; ``--proxy-protocol v2`` (the
client reads the 28-byte header back with its echo); a 100-entry ``--allow`` list whose
matching entry is the last one given. Rounds interleave the paths and each path's rate is
divided by plain tcpfwd's rate in the same round (bench_tcp.py's method). Loopback only,
bounded in time; never a timed test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tcp import short_connections  # noqa: E402
from common import (  # noqa: E402
    Table,
    cpu_seconds,
    free_port,
    print_tables,
    process,
    raise_fd_limit,
    tool,
    wait_port,
)

PAYLOAD = 100  # bytes echoed per connection
PROXY_V2_IPV4 = 28  # bytes: the v2 header of a TCP-over-IPv4 connection, echoed back too
ALLOW_100 = [f"10.{i // 256}.{i % 256}.0/24" for i in range(99)] + ["127.0.0.0/8"]

PATHS = {  # name -> (extra tcpfwd flags, bytes the client reads back)
    "tcpfwd": ([], PAYLOAD),
    "tcpfwd (a second one: the noise floor)": ([], PAYLOAD),
    "tcpfwd --proxy-protocol v2": (["--proxy-protocol", "v2"], PAYLOAD + PROXY_V2_IPV4),
    "tcpfwd 100-entry --allow": ([a for cidr in ALLOW_100 for a in ("--allow", cidr)], PAYLOAD),
}


def rotated(paths: list[str], rounds: int, run) -> dict[str, list]:
    """bench_tcp.interleaved, but each round starts one path further on. A fixed order gave the
    last path a handicap: every round leaves ~25,000 sockets in TIME_WAIT, and connect()'s search
    for a free ephemeral port (client and forwarder both) gets dearer as a round goes on."""
    results: dict[str, list] = {path: [] for path in paths}
    for round_ in range(rounds):
        for i in range(len(paths)):
            path = paths[(round_ + i) % len(paths)]
            results[path].append(run(path))
    return results


def measure(rounds: int, seconds: float) -> list[Table]:
    raise_fd_limit()
    echo_port = free_port()
    ports: dict[str, int] = {}
    pids: dict[str, int] = {}
    cpu: dict[str, float] = dict.fromkeys(PATHS, 0.0)  # forwarder CPU s during the rounds
    made: dict[str, float] = dict.fromkeys(PATHS, 0.0)  # connections made in the rounds
    with process([sys.executable, os.path.join(os.path.dirname(__file__), "echo_server.py"),
                  str(echo_port)]), contextlib.ExitStack() as running:
        wait_port(echo_port)
        for name, (flags, _) in PATHS.items():
            listen = free_port()
            proc = running.enter_context(process(tool(
                "tcpfwd", *flags, f"127.0.0.1:{listen}", f"127.0.0.1:{echo_port}")))
            wait_port(listen, proc=proc)
            ports[name] = listen
            pids[name] = proc.pid
        time.sleep(0.2)

        def one_round(name: str) -> float:
            before = cpu_seconds(pids[name])
            rate = short_connections(ports[name], seconds, expect=PATHS[name][1])
            cpu[name] += cpu_seconds(pids[name]) - before
            made[name] += rate * seconds
            return rate

        rates = rotated(list(PATHS), rounds, one_round)
    rows = []
    for name, values in rates.items():
        paired = sorted(v / p for v, p in zip(values, rates["tcpfwd"], strict=True) if p)
        per_conn = cpu[name] / made[name] * 1e6 if made[name] else 0.0
        base = cpu["tcpfwd"] / made["tcpfwd"] * 1e6 if made["tcpfwd"] else 0.0
        rows.append([name, f"{statistics.median(values):.0f}",
                     f"{min(values):.0f}–{max(values):.0f}", f"{statistics.median(paired):.3f}×",
                     f"{paired[0]:.3f}–{paired[-1]:.3f}", f"{per_conn:.0f}",
                     f"{per_conn / base:.3f}×" if base else "-"])
    return [Table("Short connections with policy (connect, 100 B echo, close)",
                  ["path", "conn/s (median)", "min–max", "× tcpfwd (median)", "× tcpfwd min–max",
                   "fwd CPU µs/conn", "× tcpfwd"],
                  rows, f"2 client processes, {rounds} interleaved rounds of {seconds:g} s per "
                  "path, each round starting one path further on; × tcpfwd is the median over "
                  "rounds of the path's rate divided by plain "
                  "tcpfwd's rate in the same round. CPU µs/conn is the forwarder process's "
                  "user+sys CPU over all its rounds divided by the connections it carried: on "
                  "a shared, loaded machine it is steadier than the rates.")]


def in_process(count: int = 20000) -> Table:
    """The Python work each policy adds per connection, timed in this process (steady even on
    a loaded machine: no kernel, no scheduler between the calls)."""
    from portfwd.policy.proxy import pack
    from portfwd.runtime.admission import Admission, Gate, admission_config
    from portfwd.runtime.options import Options

    gate = Gate(admission_config(Options({"allow": ALLOW_100})))
    plain = Gate(Admission())
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        peer = ("127.0.0.1", 45678)

        def per_call(fn) -> float:
            start = time.perf_counter()
            for _ in range(count):
                fn()
            return (time.perf_counter() - start) / count * 1e6

        steps = {
            "gate with no policy (kcptcp-client's path)": lambda: plain.admit(sock, peer, 0),
            "gate with a 100-entry --allow": lambda: gate.admit(sock, peer, 0),
            "PROXY v2 header (getsockname + pack)": lambda: pack(2, peer, sock.getsockname()),
        }
        rows = [[name, f"{per_call(fn):.2f}"] for name, fn in steps.items()]
    return Table("Policy work per connection, in process", ["step", "µs per connection"], rows,
                 f"{count} calls each, on this machine; compare with tcpfwd's CPU per short "
                 "connection in the table above.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=2.0, help="per path per round")
    opts = parser.parse_args()
    tables = measure(1, 0.5) if opts.quick else measure(opts.rounds, opts.seconds)
    print_tables([*tables, in_process(1000 if opts.quick else 20000)])


if __name__ == "__main__":
    main()
