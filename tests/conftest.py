"""Shared test helpers: free ports, real tool processes, echo servers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from portfwd.testing.echo import EchoServer  # noqa: F401  (re-exported for the tests)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, "bin")
# Every tool started from here (bin/ scripts, daemons, `ip netns exec` children) runs this
# checkout's code, not whatever portfwd was pip-installed last.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (REPO, os.environ.get("PYTHONPATH"))))


def free_port(family: int = socket.AF_INET, socktype: int = socket.SOCK_STREAM) -> int:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socktype) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_for(*binds: tuple[str, int]) -> int:
    """A port free for every (host, socket type) of ``binds`` at once, chosen below the
    kernel's ephemeral range, so an outgoing connection (of a test or a load alongside) cannot
    take it meanwhile, nor can a listener another test got from bind(0)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    for port in random.Random().sample(range(10000, max(ephemeral_low, 10001)), 200):
        try:
            with contextlib.ExitStack() as held:
                for host, socktype in binds:
                    family = socket.AF_INET6 if ":" in host else socket.AF_INET
                    sock = held.enter_context(socket.socket(family, socktype))
                    sock.bind((host, port))  # no SO_REUSEADDR: a TIME_WAIT counts as taken
            return port
        except OSError:
            continue
    raise RuntimeError(f"no port free for all of {binds}")


def free_dual_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host``, for a daemon that binds both (dnsmasq,
    dnsdist): a free UDP port says nothing of the TCP one."""
    return free_port_for((host, socket.SOCK_DGRAM), (host, socket.SOCK_STREAM))


def have_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not have_ipv6(), reason="no IPv6 loopback")


class ToolProcess:
    """A real bin/ tool run as a subprocess, its log in a file we can poll (no pipe to fill)."""

    def __init__(self, tool: str, *args: str, env: dict | None = None) -> None:
        self.log_file = tempfile.NamedTemporaryFile(prefix=f"{tool}-", suffix=".log", delete=False)
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(BIN, tool), *args],
            stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=full_env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_file.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log())
            if match:
                return match
            if self.proc.poll() is not None:
                match = re.search(pattern, self.log())
                if match:
                    return match
                raise AssertionError(f"process exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not in log after {timeout} s:\n{self.log()}")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"did not stop on signal {signum}:\n{self.log()}") from None
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log_file.name)


@pytest.fixture
def tool() -> Iterator:
    """``tool("tcpfwd", args...)`` starts a process; all are killed at the end of the test."""
    started: list[ToolProcess] = []

    def start(name: str, *args: str, env: dict | None = None) -> ToolProcess:
        process = ToolProcess(name, *args, env=env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def run_cli(tool: str, *args: str, timeout: float = 20.0,
            env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(BIN, tool), *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def connect(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """Connect, retrying briefly while the tool is still binding."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def echo_roundtrip(sock: socket.socket, total: int, seed: int = 1, chunk: int = 1 << 16,
                   shutdown: bool = True) -> None:
    """Send ``total`` seeded random bytes, read the echo back, compare sha256; ends with EOF
    (``shutdown``) or leaves the connection open once the echo is back."""
    import random

    rng = random.Random(seed)
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    received = 0

    def reader() -> None:
        nonlocal received
        while shutdown or received < total:
            data = sock.recv(1 << 20)
            if not data:
                return
            recv_hash.update(data)
            received += len(data)

    thread = threading.Thread(target=reader)
    thread.start()
    left = total
    while left:
        block = rng.randbytes(min(chunk, left))
        sent_hash.update(block)
        sock.sendall(block)
        left -= len(block)
    if shutdown:
        sock.shutdown(socket.SHUT_WR)
    thread.join(120)
    assert received == total
    assert recv_hash.hexdigest() == sent_hash.hexdigest()


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A bound, listening plain socket standing in for a target the test scripts itself."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen(1)
    return sock


def fill_until_blocked(sock: socket.socket, seconds: float, block: bytes = b"z" * 65536) -> int:
    """Write to a peer that does not read, for ``seconds``; returns the bytes the path took in."""
    sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            sent += sock.send(block)
        except BlockingIOError:
            time.sleep(0.05)
    sock.setblocking(True)
    return sent


def exposition_samples(text: str) -> dict[str, dict[tuple, float]]:
    """Prometheus text as ``name -> {sorted label items: value}``, parsed by prometheus_client's
    own parser (so names and labels must be valid)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def sample_value(samples: dict, name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for k, v in samples.get(name, {}).items() if set(labels.items()) <= set(k)]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]
