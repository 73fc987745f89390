"""One ``portfwd run`` with N tcp rules vs N ``tcpfwd`` processes, same run, as ratios.

    python bench/bench_multi.py [--rules 100] [--seconds 3] [--rounds 3] [--reloads 10]
                                [--out bench/results/<date>-multi.md]

Measures (loopback only, every load bounded in time):
- memory of N idle forwarders: the one process's RSS vs the sum over N tcpfwd processes
  (RSS, and PSS, which shares the pages the processes have in common fairly);
- throughput (iperf3, 1 stream) of one busy rule while the other N-1 rules each hold an idle
  connection, vs a lone tcpfwd to the same iperf3 server, interleaved rounds, medians;
- reload time with N rules: SIGHUP with one rule changed and one added, as the daemon logs it
  ("reload of ... in N ms"), and the wall time from the signal to that line.
Never run as a timed test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
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
    wait_port,
)

ECHO_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "echo_server.py")


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError("no Pss")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports (held until all are chosen, so none repeats)."""
    held = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        held.append(s)
    ports = [s.getsockname()[1] for s in held]
    for s in held:
        s.close()
    return ports


def config_text(ports: list[int], dests: list[int], extra: str = "") -> str:
    rules = "".join(f'[[tcp]]\nname = "r{i}"\nlisten = "127.0.0.1:{port}"\n'
                    f'to = "127.0.0.1:{dest}"\n\n' for i, (port, dest) in
                    enumerate(zip(ports, dests, strict=True)))
    return rules + extra


@contextlib.contextmanager
def portfwd_run(path: str, log_path: str):
    """``portfwd run path`` logging to ``log_path``, once it runs every rule."""
    with process(tool("portfwd", "run", path), log=log_path) as proc:
        deadline = time.monotonic() + 120
        while "running " not in open(log_path).read():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"portfwd run did not start:\n{open(log_path).read()}")
            time.sleep(0.05)
        yield proc


def settle(pid: int) -> int:
    """RSS once it stops growing (a Python process imports lazily for a moment)."""
    last, value = -1, rss_kib(pid)
    for _ in range(20):
        if value == last:
            break
        time.sleep(0.2)
        last, value = value, rss_kib(pid)
    return value


def memory(rules: int, workdir: str, echo_port: int) -> Table:
    ports = free_ports(rules)
    path = os.path.join(workdir, "mem.toml")
    with open(path, "w") as f:
        f.write(config_text(ports, [echo_port] * rules))
    with portfwd_run(path, os.path.join(workdir, "mem.log")) as proc:
        one_rss, one_pss = settle(proc.pid), pss_kib(proc.pid)
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(process(tool("tcpfwd", f"127.0.0.1:{port}",
                                                  f"127.0.0.1:{echo_port}")))
                 for port in ports]
        for port, proc in zip(ports, procs, strict=True):
            wait_port(port, timeout=120, proc=proc)
        many_rss = sum(settle(p.pid) for p in procs)
        many_pss = sum(pss_kib(p.pid) for p in procs)
    return Table(
        f"Memory of {rules} idle tcp rules (MiB)",
        ["setup", "RSS", "× tcpfwd processes", "PSS", "× tcpfwd processes"],
        [[f"one portfwd run, {rules} rules", f"{one_rss / 1024:.1f}",
          ratio(one_rss, many_rss), f"{one_pss / 1024:.1f}", ratio(one_pss, many_pss)],
         [f"{rules} tcpfwd processes", f"{many_rss / 1024:.1f}", "1.00×",
          f"{many_pss / 1024:.1f}", "1.00×"]],
        "RSS once it stopped growing, summed over the processes; PSS (smaps_rollup) divides "
        "the pages processes share (the interpreter, gevent) between them, the fairer sum.",
        {"one_rss": one_rss, "many_rss": many_rss, "one_pss": one_pss, "many_pss": many_pss})


def throughput(rules: int, workdir: str, echo_port: int, seconds: float, rounds: int) -> Table:
    iperf_port, lone_port = free_port(), free_port()
    ports = free_ports(rules)
    path = os.path.join(workdir, "busy.toml")
    with open(path, "w") as f:
        f.write(config_text(ports, [iperf_port] + [echo_port] * (rules - 1)))
    busy, lone = [], []
    with contextlib.ExitStack() as stack:
        iperf = stack.enter_context(process(["iperf3", "-s", "-p", str(iperf_port)]))
        wait_port(iperf_port, proc=iperf)
        run = stack.enter_context(portfwd_run(path, os.path.join(workdir, "busy.log")))
        idle = [stack.enter_context(socket.create_connection(("127.0.0.1", port)))
                for port in ports[1:]]
        for sock in idle:  # each idle connection has carried a byte: a real relay, not a SYN
            sock.sendall(b"x")
            sock.recv(1)
        single = stack.enter_context(process(tool("tcpfwd", f"127.0.0.1:{lone_port}",
                                                  f"127.0.0.1:{iperf_port}")))
        wait_port(lone_port, proc=single)
        for _ in range(rounds):
            busy.append(iperf3(ports[0], seconds)["end"]["sum_received"]["bits_per_second"])
            lone.append(iperf3(lone_port, seconds)["end"]["sum_received"]["bits_per_second"])
        assert run.poll() is None
    busy_g, lone_g = statistics.median(busy) / 1e9, statistics.median(lone) / 1e9
    return Table(
        f"One busy rule among {rules} (iperf3, 1 stream, Gbit/s)",
        ["setup", "median", "min–max", "× lone tcpfwd"],
        [[f"portfwd run: rule 1 of {rules}, {rules - 1} idle connections", f"{busy_g:.2f}",
          f"{min(busy) / 1e9:.2f}–{max(busy) / 1e9:.2f}", ratio(busy_g, lone_g)],
         ["lone tcpfwd", f"{lone_g:.2f}", f"{min(lone) / 1e9:.2f}–{max(lone) / 1e9:.2f}",
          "1.00×"]],
        f"iperf3 -t {seconds:g}, {rounds} interleaved rounds; each of the other rules holds "
        f"one open connection to an echo server.",
        {"busy": busy, "lone": lone})


def reload_time(rules: int, workdir: str, echo_port: int, reloads: int) -> Table:
    ports = free_ports(rules + reloads)
    path = os.path.join(workdir, "reload.toml")
    log_path = os.path.join(workdir, "reload.log")
    with open(path, "w") as f:
        f.write(config_text(ports[:rules], [echo_port] * rules))
    logged, wall = [], []
    with portfwd_run(path, log_path) as proc:
        for i in range(reloads):
            # one rule's option changed, one rule added: a handover and a bind per reload
            extra = (f'[[tcp]]\nlisten = "127.0.0.1:{ports[rules + i]}"\n'
                     f'to = "127.0.0.1:{echo_port}"\nconnect_timeout = {2 + i}\n')
            with open(path, "w") as f:
                f.write(config_text(ports[:rules], [echo_port] * rules).replace(
                    'name = "r0"', f'name = "r0"\nconnect_timeout = {2 + i}') + extra)
            before = open(log_path).read().count("reload of")
            started = time.monotonic()
            proc.send_signal(signal.SIGHUP)
            while open(log_path).read().count("reload of") == before:
                if time.monotonic() - started > 30:
                    raise RuntimeError(open(log_path).read()[-2000:])
                time.sleep(0.002)
            wall.append((time.monotonic() - started) * 1000)
            logged.append(int(re.findall(r"reload of .* in (\d+) ms", open(log_path).read())[-1]))
    return Table(
        f"Reload with {rules} rules (ms)",
        ["figure", "median", "min–max"],
        [["logged by the daemon (read, validate, diff, bind, apply)",
          f"{statistics.median(logged):.0f}", f"{min(logged)}–{max(logged)}"],
         ["SIGHUP to the log line (seen by polling the log)", f"{statistics.median(wall):.0f}",
          f"{min(wall):.0f}–{max(wall):.0f}"]],
        f"{reloads} reloads, each changing one rule's connect_timeout (listener handed over) "
        f"and adding one rule (a new bind).",
        {"logged_ms": logged, "wall_ms": wall})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--out", help="write the tables as markdown to this file")
    opts = parser.parse_args()
    raise_fd_limit()
    if not have("iperf3"):
        sys.exit("bench_multi: iperf3 is not installed")
    echo_port = free_port()
    tables = []
    with tempfile.TemporaryDirectory() as workdir, \
            process([sys.executable, ECHO_SERVER, str(echo_port)]) as echo:
        wait_port(echo_port, proc=echo)
        tables.append(memory(opts.rules, workdir, echo_port))
        tables.append(throughput(opts.rules, workdir, echo_port, opts.seconds, opts.rounds))
        tables.append(reload_time(opts.rules, workdir, echo_port, opts.reloads))
    print_tables(tables)
    if opts.out:
        command = "python bench/bench_multi.py " + " ".join(sys.argv[1:])
        commit = subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)),
                                 "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        with open(opts.out, "w") as f:
            f.write(f"# portfwd run: many rules in one process\n\nReproduce: `{command}`\n\n"
                    f"- commit `{commit}`, Python {platform.python_version()}, "
                    f"{os.cpu_count()} CPUs, host loopback; the machine was shared with other "
                    f"test runs (loaded): only the ratios of one run mean something.\n\n")
            f.write("\n".join(table.markdown() for table in tables))


if __name__ == "__main__":
    main()
