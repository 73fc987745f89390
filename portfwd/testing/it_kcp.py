"""it_kcp: end-to-end harness for the kcptcp tunnel and its AEAD rekeying (seed "Tests").

Usage:
  it_kcp normal <send_mb>
  it_kcp timeout <send_mb> <pause_ms> <pause_at_mb>
  it_kcp -h | --help

Starts a TCP echo server on 127.0.0.1:2323, kcptcp-server and kcptcp-client on loopback, sends
<send_mb> MB through the tunnel in 64 KiB chunks and verifies the echo byte for byte.

  normal   lowers the rekey threshold so several rekeys happen, and requires the log lines
           "rekey trigger", "recv REKEY_INIT", "recv REKEY_ACK" and "epoch switch".
  timeout  SIGSTOPs kcptcp-server for <pause_ms> ms once <pause_at_mb> MB were sent, and requires
           "rekey timeout, closing" (the client gives up on the stalled rekey); then checks that
           the tunnel serves a fresh connection.

Exit status 0 when every check passed, 1 otherwise. Children are always cleaned up and the whole
run is bounded in time.

Environment:
  IT_PSK         64 hex digits, the tunnel key [default: a fixed test key]
  IT_ECHO_PORT   TCP echo port [default: 2323]
  IT_UDP_PORT    kcptcp-server UDP port [default: 2324]
  IT_TCP_PORT    kcptcp-client TCP port [default: 2325]
  IT_DEADLINE_S  wall-clock limit of the run in seconds [default: 180]
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from portfwd.runtime import environment
from portfwd.runtime import options as cli
from portfwd.testing.echo import EchoServer

PROG = "it_kcp"
DEFAULT_PSK = "0123456789abcdef" * 4
CHUNK = 64 * 1024  # bytes per send (seed: 64 KiB chunks)
MB = 1 << 20
NORMAL_REKEY_THRESHOLD = 2000  # packets: several rekeys in a few MB
TIMEOUT_REKEY_THRESHOLD = 16  # packets: a few retransmissions during the pause start a rekey
TRICKLE_INTERVAL = 0.05  # s between the small messages of the trickle connection
NORMAL_LINES = ("rekey trigger conv=", "recv REKEY_INIT conv=", "recv REKEY_ACK conv=",
                "epoch switch conv=")
# kcptcp-client / kcptcp-server in a child of this interpreter (bin/ may not be on PATH).
TOOL_MAIN = "import sys; from portfwd.kcptcp.cli import %s_main; sys.exit(%s_main())"
TIMEOUT_LINE = "rekey timeout, closing conv="
FIELDS = {"send_mb": "<send_mb>", "pause_ms": "<pause_ms>", "pause_at_mb": "<pause_at_mb>"}


class Harness:
    """The echo server and the two tunnel processes, with their logs in temporary files."""

    def __init__(self, psk: str, ports: tuple[int, int, int], rekey_env: dict[str, str]) -> None:
        self.echo_port, self.udp_port, self.tcp_port = ports
        self.logs: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self._echo = EchoServer("127.0.0.1", self.echo_port)
        # The key goes in the environment, not on a command line every local user can read.
        env = dict(os.environ, **rekey_env)
        env[environment.PSK] = psk
        common = ["--stats-interval", os.environ.get("IT_STATS_INTERVAL", "0")]
        self._spawn("server", f"127.0.0.1:{self.udp_port}", f"127.0.0.1:{self.echo_port}",
                    *common, env=env)
        self._spawn("client", f"127.0.0.1:{self.tcp_port}", f"127.0.0.1:{self.udp_port}",
                    *common, env=env)

    def _spawn(self, name: str, *args: str, env: dict) -> None:
        log = tempfile.NamedTemporaryFile(prefix=f"it_kcp-{name}-", suffix=".log", delete=False)
        self.logs[name] = log.name
        command = [sys.executable, "-c", TOOL_MAIN % (name, name), *args]
        self.procs[name] = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def log_text(self, name: str) -> str:
        with open(self.logs[name], encoding="utf-8", errors="replace") as f:
            return f.read()

    def all_logs(self) -> str:
        return "".join(self.log_text(name) for name in self.logs)

    def wait_ready(self, deadline: float) -> None:
        for name in ("server", "client"):
            while "tunnelling" not in self.log_text(name):
                if self.procs[name].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"kcptcp-{name} did not start:\n{self.log_text(name)}")
                time.sleep(0.05)

    def close(self) -> None:
        self._echo.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for path in self.logs.values():
            os.unlink(path)


def transfer(port: int, total: int, deadline: float, on_progress=None) -> tuple[bool, str]:
    """Send ``total`` random bytes in 64 KiB chunks, read the echo back; (intact, description)."""
    rng = random.Random(total)
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    received = 0
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(max(1.0, deadline - time.monotonic()))

    def reader() -> None:
        nonlocal received
        try:
            while data := sock.recv(1 << 20):
                recv_hash.update(data)
                received += len(data)
        except OSError:
            pass

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    sent = 0
    try:
        while sent < total:
            block = rng.randbytes(min(CHUNK, total - sent))
            sent_hash.update(block)
            sock.sendall(block)
            sent += len(block)
            if on_progress is not None:
                on_progress(sent)
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        thread.join(max(0.0, deadline - time.monotonic()))
        sock.close()
        return False, f"send failed after {sent} bytes: {exc}"
    thread.join(max(0.0, deadline - time.monotonic()))
    sock.close()
    intact = received == total and recv_hash.digest() == sent_hash.digest()
    verdict = "ok" if intact else "MISMATCH"
    return intact, f"sent {sent} bytes, echoed {received} bytes, sha256 {verdict}"


def run_normal(harness: Harness, send_mb: int, deadline: float) -> list[str]:
    failures = []
    intact, text = transfer(harness.tcp_port, send_mb * MB, deadline)
    print(f"{PROG}: {text}")
    if not intact:
        failures.append("echo not intact")
    time.sleep(0.5)
    logs = harness.all_logs()
    for line in NORMAL_LINES:
        count = logs.count(line)
        print(f"{PROG}: {count:4d} x {line!r}")
        if not count:
            failures.append(f"missing log line {line!r}")
    return failures


def trickle(port: int, stop: threading.Event) -> None:
    """A second conversation that always has a little data in flight.

    The bulk transfer's window may be closed when the pause hits (flow control), and then its
    client sends nothing that could start a rekey; this one keeps sending, so the client's
    retransmissions during the pause start a rekey that can only time out.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.settimeout(0.01)
            while not stop.wait(TRICKLE_INTERVAL):
                sock.sendall(b"t" * 100)
                try:
                    while sock.recv(65536):
                        pass
                except (TimeoutError, BlockingIOError):
                    pass
    except OSError:
        pass  # closed by the rekey timeout: expected


def run_timeout(harness: Harness, send_mb: int, pause_ms: int, pause_at_mb: int,
                deadline: float) -> list[str]:
    server = harness.procs["server"]
    paused = threading.Event()
    stop_trickle = threading.Event()
    threading.Thread(target=trickle, args=(harness.tcp_port, stop_trickle), daemon=True).start()

    def progress(sent: int) -> None:
        if not paused.is_set() and sent >= pause_at_mb * MB:
            paused.set()
            server.send_signal(signal.SIGSTOP)
            print(f"{PROG}: server stopped at {sent} bytes for {pause_ms} ms")
            threading.Timer(pause_ms / 1000, server.send_signal, (signal.SIGCONT,)).start()

    intact, text = transfer(harness.tcp_port, send_mb * MB, deadline, progress)
    print(f"{PROG}: {text}")
    stop_trickle.set()
    failures = []
    if not paused.is_set():
        failures.append("the transfer ended before the pause point")
    # The client gives up on its stalled rekey within the pause; allow the pause plus a margin.
    wait_until = min(deadline, time.monotonic() + pause_ms / 1000 + 5)
    while time.monotonic() < wait_until and TIMEOUT_LINE not in harness.all_logs():
        time.sleep(0.1)
    count = harness.all_logs().count(TIMEOUT_LINE)
    print(f"{PROG}: {count:4d} x {TIMEOUT_LINE!r}")
    if not count:
        failures.append(f"missing log line {TIMEOUT_LINE!r}")
    time.sleep(min(pause_ms / 1000, max(0.0, deadline - time.monotonic() - 10)))
    # the server runs again: the tunnel must serve a new connection
    intact, text = transfer(harness.tcp_port, MB, deadline)
    print(f"{PROG}: after the pause: {text}")
    if not intact:
        failures.append("the tunnel did not recover after the pause")
    return failures


def _give_up(harness: Harness) -> None:
    """The run overstayed its deadline: kill the children and exit 1, whatever is stuck."""
    print(f"{PROG}: FAIL: deadline exceeded", flush=True)
    for proc in harness.procs.values():
        proc.kill()
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    return cli.run_tool(PROG, lambda: run(cli.parse_args(PROG, __doc__, argv)))


def run(args: dict) -> int:
    options = cli.Options.from_docopt(args, FIELDS)
    send_mb = options.integer("send_mb", 1, 100000)
    psk = os.environ.get("IT_PSK", DEFAULT_PSK)
    cli.Options({"psk": psk}, {"psk": "-K"}).psk("psk")  # validate: the tools' own message
    ports = tuple(int(os.environ.get(name, default)) for name, default in
                  (("IT_ECHO_PORT", 2323), ("IT_UDP_PORT", 2324), ("IT_TCP_PORT", 2325)))
    deadline = time.monotonic() + float(os.environ.get("IT_DEADLINE_S", 180))
    if args["timeout"]:
        pause_ms = options.integer("pause_ms", 1, 600000)
        pause_at_mb = options.integer("pause_at_mb", 0, send_mb)
        env = {"PORTFWD_REKEY_SEQ_THRESHOLD": str(TIMEOUT_REKEY_THRESHOLD),
               "PORTFWD_REKEY_TIMEOUT_MS": str(max(200, pause_ms // 2))}
    else:
        env = {"PORTFWD_REKEY_SEQ_THRESHOLD": str(NORMAL_REKEY_THRESHOLD)}
    try:
        harness = Harness(psk, ports, env)  # type: ignore[arg-type]
    except OSError as exc:
        raise cli.StartupError(f"cannot start the echo server: {exc}") from None
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()) + 5, _give_up, (harness,))
    watchdog.daemon = True
    watchdog.start()
    try:
        harness.wait_ready(deadline)
        if args["timeout"]:
            failures = run_timeout(harness, send_mb, pause_ms, pause_at_mb, deadline)
        else:
            failures = run_normal(harness, send_mb, deadline)
    except (OSError, RuntimeError) as exc:
        failures = [str(exc)]
    finally:
        logs = harness.all_logs()
        harness.close()
        watchdog.cancel()
    if failures:
        sys.stderr.write(logs[-int(os.environ.get("IT_LOG_TAIL", 4000)):])
        for failure in failures:
            print(f"{PROG}: FAIL: {failure}")
        return 1
    print(f"{PROG}: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
