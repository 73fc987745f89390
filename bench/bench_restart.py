"""Restart, crash and burst figures of issue 16, for this checkout and another one (before/after).

    python bench/bench_restart.py [--before /path/to/other/checkout]

For each checkout, on loopback:
  tcpfwd restart   -- 2,000 short connections (the destination closes first), then
                      portfwd-control.sh restart: its exit status and seconds;
  kcptcp stop      -- 3 open idle conversations; SIGTERM to kcptcp-server: seconds until it
                      exited and until every application saw EOF, then whether a new server
                      binds the same port at once;
  kcptcp crash     -- SIGKILL kcptcp-server, start a new one on the port, the application
                      sends: seconds until its connection is reset (or how it ended);
  udpfwd burst     -- 1,000 (then 2,000) new client sockets each send one datagram at once:
                      answers, in 4 rounds of a fresh udpfwd each.
Ratios are not meaningful here; the figures are latencies and counts on a shared 2-core box.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PSK = "5eed" * 16


def free_port(socktype: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, socktype) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Checkout:
    """Runs the bin/ tools of one source tree."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.env = dict(os.environ, PYTHONPATH=root, PYTHONUNBUFFERED="1")
        self.procs: list[subprocess.Popen] = []

    def start(self, tool: str, *args: str) -> subprocess.Popen:
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen([sys.executable, os.path.join(self.root, "bin", tool), *args],
                                env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.procs = []


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=timeout)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def wait_udp_bound(port: int, timeout: float = 10.0) -> None:
    """Until something is bound to UDP ``port`` (our bind fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing bound udp {port}")


def echo_server() -> int:
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return sock.getsockname()[1]


def close_first_server() -> int:
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)

    def accept() -> None:
        while True:
            conn, _ = sock.accept()
            with conn:
                conn.sendall(b"x")

    threading.Thread(target=accept, daemon=True).start()
    return sock.getsockname()[1]


def fetch(port: int) -> bytes:
    with connect(port) as sock:
        data = b""
        while chunk := sock.recv(16):
            data += chunk
        return data


def tcpfwd_restart(co: Checkout) -> str:
    dest, port = close_first_server(), free_port()
    pidfile = tempfile.mktemp(suffix=".pid")
    env = dict(co.env, BIN=os.path.join(co.root, "bin", "tcpfwd"), PIDFILE=pidfile,
               ARGS=f"127.0.0.1:{port} 127.0.0.1:{dest}")
    control = [os.path.join(co.root, "contrib", "portfwd-control.sh")]
    subprocess.run(["sh", *control, "start"], env=env, check=True, capture_output=True)
    try:
        for _ in range(2000):
            fetch(port)
        started = time.monotonic()
        result = subprocess.run(["sh", *control, "restart"], env=env, capture_output=True)
        took = time.monotonic() - started
        serves = result.returncode == 0 and fetch(port) == b"x"
        return f"restart rc={result.returncode} in {took:.2f} s, serves: {serves}"
    finally:
        subprocess.run(["sh", *control, "stop"], env=env, capture_output=True)


def tunnel(co: Checkout, echo: int) -> tuple[int, int, subprocess.Popen]:
    udp, tcp = free_port(socket.SOCK_DGRAM), free_port()
    server = co.start("kcptcp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{echo}", "-K", PSK,
                      "--stats-interval", "0")
    wait_udp_bound(udp)
    co.start("kcptcp-client", f"127.0.0.1:{tcp}", f"127.0.0.1:{udp}", "-K", PSK,
             "--stats-interval", "0")
    return udp, tcp, server


def opened(tcp: int) -> socket.socket:
    sock = connect(tcp)
    sock.sendall(b"ping")
    assert sock.recv(16) == b"ping"
    return sock


def kcptcp_stop(co: Checkout, echo: int) -> str:
    udp, tcp, server = tunnel(co, echo)
    apps = [opened(tcp) for _ in range(3)]
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    server.wait(30)
    exited = time.monotonic() - started
    for app in apps:
        app.settimeout(60)
        app.recv(16)
    eof = time.monotonic() - started
    co.start("kcptcp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{echo}", "-K", PSK)
    with opened(tcp):
        served = time.monotonic() - started
    return (f"SIGTERM -> exit {exited:.2f} s, -> all 3 apps EOF {eof:.2f} s, "
            f"-> restarted server served {served:.2f} s")


def kcptcp_crash(co: Checkout, echo: int, idle: bool) -> str:
    udp, tcp, server = tunnel(co, echo)
    app = opened(tcp)
    server.kill()
    server.wait()
    co.start("kcptcp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{echo}", "-K", PSK)
    wait_udp_bound(udp)
    started = time.monotonic()
    if not idle:
        app.sendall(b"after the restart")
    app.settimeout(60)
    try:
        data = app.recv(16)
        how = "EOF" if not data else f"data {data!r}"
    except ConnectionResetError:
        how = "RST"
    except TimeoutError:
        how = "nothing (gave up waiting)"
    return f"{'idle' if idle else 'sending'} app: {how} after {time.monotonic() - started:.2f} s"


def udp_burst(co: Checkout, clients: int = 1000) -> str:
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)  # SO_RCVBUFFORCE (we run as root)
    echo.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                data, addr = echo.recvfrom(65535)
                echo.sendto(data, addr)
            except OSError:  # closed: this round is over
                return

    threading.Thread(target=serve, daemon=True).start()
    port = free_port(socket.SOCK_DGRAM)
    co.start("udpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{echo.getsockname()[1]}")
    wait_udp_bound(port)
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(clients)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    for i, sock in enumerate(socks):
        sock.sendto(b"%06d" % i + bytes(64), ("127.0.0.1", port))
    poller = select.poll()
    for sock in socks:
        poller.register(sock.fileno(), select.POLLIN)
    answered, deadline = 0, time.monotonic() + 10
    while answered < clients and time.monotonic() < deadline:
        for fd, _ in poller.poll(200):
            poller.unregister(fd)
            answered += 1
    for sock in socks:
        sock.close()
    echo.close()
    return f"{answered}/{clients}"


def udp_bursts(co: Checkout, rounds: int = 4) -> str:
    """Answers to bursts of 1,000 and 2,000 new clients, ``rounds`` fresh udpfwd each."""
    parts = []
    for clients in (1000, 2000):
        results = []
        for _ in range(rounds):
            results.append(udp_burst(co, clients))
            co.cleanup()
        parts.append(f"{clients} clients: {' '.join(results)}")
    return "; ".join(parts)


def measure(root: str) -> list[str]:
    co = Checkout(root)
    echo = echo_server()
    try:
        return [f"tcpfwd: {tcpfwd_restart(co)}", f"kcptcp stop: {kcptcp_stop(co, echo)}",
                f"kcptcp crash: {kcptcp_crash(co, echo, idle=False)}",
                f"kcptcp crash: {kcptcp_crash(co, echo, idle=True)}",
                f"udpfwd burst answers: {udp_bursts(co)}"]
    finally:
        co.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", help="another checkout, measured first")
    args = parser.parse_args()
    for name, root in (("before", args.before), ("after", HERE)):
        if root:
            print(f"## {name}: {root}")
            for line in measure(os.path.abspath(root)):
                print(f"- {line}")


if __name__ == "__main__":
    main()
