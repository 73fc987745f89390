"""Helpers shared by the bench scripts: processes, ports, iperf3, RSS. Loopback only."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, "bin")
# Every tool started from here (bin/ scripts, daemons, `ip netns exec` children) runs this
# checkout's code, not whatever portfwd was pip-installed last.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (REPO, os.environ.get("PYTHONPATH"))))


def free_port(socktype: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, socktype) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of ``pid`` in KiB from /proc: VmRSS (now) or VmHWM (peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User+system CPU seconds of a process, plus its reaped children's (socat forks per peer)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = sum(int(v) for v in fields[11:15 if children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process, its live descendants and its reaped children (socat forks)."""
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += cpu_seconds(current)
            with open(f"/proc/{current}/task/{current}/children") as f:
                todo.extend(int(child) for child in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited between the listing and the read
    return total


def cpu_split(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def wait_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1",
              proc: subprocess.Popen | None = None, socktype: int = socket.SOCK_STREAM) -> None:
    """Wait until something is bound to the port, without connecting or sending (iperf3 -s
    dislikes probes): our own bind fails once it is taken. ``proc`` dying ends the wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socktype) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                return  # taken: the listener is up
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {host}:{port}")


@contextlib.contextmanager
def process(argv: list[str], env: dict | None = None,
            log: str | None = None) -> Iterator[subprocess.Popen]:
    """A background process, always terminated (then killed) on exit; its output goes to the
    file ``log`` if given."""
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
                            env=dict(os.environ, **(env or {})))
    if log:
        out.close()  # the child holds its own copy
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def tool(name: str, *args: str) -> list[str]:
    return [sys.executable, os.path.join(BIN, name), *args]


IPERF3_RETRIES = 10  # an iperf3 server takes a moment after one test to accept the next
IPERF3_RETRY_WAIT = 0.5  # s between those tries


def iperf3_not_ready(error: str) -> bool:
    """An error that means the server is between tests, not that the test failed: busy with
    the last one, or its listener closed and not yet reopened (iperf3 -s listens anew for
    each test, so a connection in that gap is refused or reset)."""
    return "busy" in error or error.startswith("unable to connect to server")


def iperf3(port: int, seconds: float, *extra: str, host: str = "127.0.0.1",
           prefix: tuple[str, ...] = ()) -> dict:
    """Run an iperf3 client against host:port (its argv after ``prefix``, e.g. an
    ``ip netns exec NS``); the parsed JSON result."""
    for _ in range(IPERF3_RETRIES):
        out = subprocess.run([*prefix, "iperf3", "-c", host, "-p", str(port), "-t",
                              str(seconds), "-J", *extra], capture_output=True, text=True,
                             timeout=seconds + 30)
        result = json.loads(out.stdout)
        if not iperf3_not_ready(result.get("error", "")):
            break
        time.sleep(IPERF3_RETRY_WAIT)
    if "error" in result:
        raise RuntimeError(result["error"])
    return result


def have(binary: str) -> bool:
    return shutil.which(binary) is not None


@dataclass
class Table:
    """One result table: what a bench module measures and bench/run writes into the report."""

    title: str
    header: list[str]
    rows: list[list[object]]
    note: str = ""  # one paragraph printed under the table (method, anchor, caveats)
    data: dict = field(default_factory=dict)  # raw figures for plots, never printed

    def markdown(self, level: int = 3) -> str:
        lines = [f"{'#' * level} {self.title}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "---|" * len(self.header))
        lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in self.rows)
        if self.note:
            lines += ["", self.note]
        return "\n".join(lines) + "\n"


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    print()
    print(Table(title, header, rows).markdown(2))


def print_tables(tables: list[Table]) -> None:
    for table in tables:
        print()
        print(table.markdown(2))


def ratio(value: float | None, anchor: float | None) -> str:
    """``value / anchor`` as ``0.52×``; ``-`` when either is missing or the anchor is 0."""
    if value is None or not anchor:
        return "-"
    return f"{value / anchor:.2f}×"
