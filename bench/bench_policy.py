"""tcpfwd's per-connection policy vs plain tcpfwd, same run: short connections per second.

    python bench/bench_policy.py [--quick] [--rounds N] [--seconds S] [--sequential N]
    python bench/bench_policy.py --strace N   # syscalls per connection, plain vs PROXY v2

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
import subprocess
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


def measure(rounds: int, seconds: float, serial: int = 0) -> list[Table]:
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
        sequential: dict[str, float] = dict.fromkeys(PATHS, 0.0)  # CPU s, one client

        def one_sequential_round(name: str) -> None:
            before = cpu_seconds(pids[name])
            one_at_a_time(ports[name], PATHS[name][1], serial)
            sequential[name] += cpu_seconds(pids[name]) - before

        if serial:
            rotated(list(PATHS), rounds, one_sequential_round)
    rows = []
    for name, values in rates.items():
        paired = sorted(v / p for v, p in zip(values, rates["tcpfwd"], strict=True) if p)
        per_conn = cpu[name] / made[name] * 1e6 if made[name] else 0.0
        base = cpu["tcpfwd"] / made["tcpfwd"] * 1e6 if made["tcpfwd"] else 0.0
        rows.append([name, f"{statistics.median(values):.0f}",
                     f"{min(values):.0f}–{max(values):.0f}", f"{statistics.median(paired):.3f}×",
                     f"{paired[0]:.3f}–{paired[-1]:.3f}", f"{per_conn:.0f}",
                     f"{per_conn / base:.3f}×" if base else "-"])
    tables = []
    if serial:
        base = sequential["tcpfwd"]
        tables.append(Table(
            "Forwarder CPU per connection, one client at a time",
            ["path", "fwd CPU µs/conn", "× tcpfwd"],
            [[name, f"{cpu_s / (serial * rounds) * 1e6:.1f}",
              f"{cpu_s / base:.3f}×" if base else "-"]
             for name, cpu_s in sequential.items()],
            f"{serial} connections per path per round, {rounds} rotated rounds, one client "
            "process connecting, echoing 100 B and closing in a loop: no two connections "
            "overlap, so the scheduler's noise is smaller than in the two-client run."))
    return [Table("Short connections with policy (connect, 100 B echo, close)",
                  ["path", "conn/s (median)", "min–max", "× tcpfwd (median)", "× tcpfwd min–max",
                   "fwd CPU µs/conn", "× tcpfwd"],
                  rows, f"2 client processes, {rounds} interleaved rounds of {seconds:g} s per "
                  "path, each round starting one path further on; × tcpfwd is the median over "
                  "rounds of the path's rate divided by plain "
                  "tcpfwd's rate in the same round. CPU µs/conn is the forwarder process's "
                  "user+sys CPU over all its rounds divided by the connections it carried: on "
                  "a shared, loaded machine it is steadier than the rates."), *tables]


def one_at_a_time(port: int, expect: int, count: int) -> None:
    """``count`` short connections in a row: connect, send 100 B, read ``expect`` back, close."""
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"x" * PAYLOAD)
            got = 0
            while got < expect and (data := sock.recv(65536)):
                got += len(data)


def syscalls(count: int) -> Table:
    """``strace -c -f`` on a plain tcpfwd and on one with --proxy-protocol v2 for ``count``
    sequential connections each: syscalls per connection (those made at least count/2 times)."""
    counts: dict[str, dict[str, float]] = {}
    echo_port = free_port()
    with process([sys.executable, os.path.join(os.path.dirname(__file__), "echo_server.py"),
                  str(echo_port)]):
        wait_port(echo_port)
        for name in ("tcpfwd", "tcpfwd --proxy-protocol v2"):
            flags, expect = PATHS[name]
            listen, out = free_port(), f"/tmp/bench_policy_strace.{os.getpid()}"
            traced = subprocess.Popen(["strace", "-c", "-f", "-o", out, *tool(
                "tcpfwd", *flags, f"127.0.0.1:{listen}", f"127.0.0.1:{echo_port}")],
                stderr=subprocess.DEVNULL)
            wait_port(listen)
            one_at_a_time(listen, expect, count)
            # strace ignores SIGTERM while it traces: stop the traced tcpfwd, its child
            children = open(f"/proc/{traced.pid}/task/{traced.pid}/children").read().split()
            for child in children:
                os.kill(int(child), 15)
            traced.wait(timeout=30)
            counts[name] = {}
            with open(out) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 5 and parts[3].isdigit() and int(parts[3]) >= count // 2:
                        counts[name][parts[-1]] = int(parts[3]) / count
            os.unlink(out)
    plain, v2 = counts.values()
    rows = [[call, f"{plain.get(call, 0):.2f}", f"{v2.get(call, 0):.2f}"]
            for call in sorted(set(plain) | set(v2), key=lambda c: -v2.get(c, 0))
            if call != "total"]
    rows.append(["total", f"{plain.get('total', 0):.2f}", f"{v2.get('total', 0):.2f}"])
    return Table("Forwarder syscalls per connection (strace -c -f)",
                 ["syscall", "tcpfwd", "tcpfwd --proxy-protocol v2"], rows,
                 f"{count} sequential connections each (connect, 100 B echo, close); calls made "
                 "fewer than count/2 times (start-up, stop) left out.")


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
            "PROXY v2 header (pack: a listener bound to an address)":
                lambda: pack(2, peer, ("127.0.0.1", 4000)),
            "PROXY v2 header (getsockname + pack: a wildcard listener)":
                lambda: pack(2, peer, sock.getsockname()),
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
    parser.add_argument("--sequential", type=int, default=1500, metavar="N",
                        help="then N one-at-a-time connections per path per round (0: none)")
    parser.add_argument("--strace", type=int, metavar="N",
                        help="only count syscalls per connection over N connections")
    opts = parser.parse_args()
    if opts.strace:
        print_tables([syscalls(opts.strace)])
        return
    tables = (measure(1, 0.5, 100) if opts.quick
              else measure(opts.rounds, opts.seconds, opts.sequential))
    print_tables([*tables, in_process(1000 if opts.quick else 20000)])


if __name__ == "__main__":
    main()
