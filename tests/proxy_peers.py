"""Real PROXY-protocol peers for the tests: nginx (a receiver that logs the client address it was
told) and HAProxy (a sender, send-proxy / send-proxy-v2), each run from a generated config in a
temporary directory on a loopback port, in the foreground, killed at the end."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import connect, free_port, listening_socket

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
needs_nginx = pytest.mark.skipif(not os.access(NGINX, os.X_OK), reason="nginx not installed")
needs_haproxy = pytest.mark.skipif(not os.access(HAPROXY, os.X_OK),
                                   reason="haproxy not installed")

NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 256; }}
http {{
    log_format pp '$proxy_protocol_addr $proxy_protocol_port $remote_addr';
    access_log {dir}/access.log pp;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{ return 200 "hello\\n"; }}
    }}
}}
"""

HAPROXY_CONF = """
global
    maxconn 256
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend front
    bind 127.0.0.1:{port}
    unique-id-format %{{+X}}o\\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid
    default_backend back
backend back
    server target {target} {send}
"""


def wait_listening(port: int, proc: subprocess.Popen, log: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"not listening on {port} after {timeout} s: {log}")


def terminate(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Nginx:
    """nginx with ``listen ... proxy_protocol``; :meth:`seen` is its access log as
    (proxy_protocol_addr, proxy_protocol_port, remote_addr) per request."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.port = free_port()
        conf = os.path.join(directory, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(dir=directory, port=self.port))
        self.proc = subprocess.Popen([NGINX, "-c", conf, "-p", directory, "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_listening(self.port, self.proc, "nginx")

    def seen(self) -> list[tuple[str, str, str]]:
        try:
            with open(os.path.join(self.dir, "access.log")) as f:
                return [tuple(line.split()) for line in f if line.strip()]  # type: ignore[misc]
        except FileNotFoundError:
            return []

    def error_log(self) -> str:
        with open(os.path.join(self.dir, "error.log")) as f:
            return f.read()

    def close(self) -> None:
        terminate(self.proc)


class Haproxy:
    """HAProxy in TCP mode on a loopback port, sending a PROXY header to ``target``."""

    def __init__(self, directory: str, target: str, send: str) -> None:
        self.port = free_port()
        conf = os.path.join(directory, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(HAPROXY_CONF.format(port=self.port, target=target, send=send))
        check = subprocess.run([HAPROXY, "-c", "-f", conf], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        time.sleep(0.3)  # connecting to probe would itself be a proxied connection
        assert self.proc.poll() is None, "haproxy exited"

    def close(self) -> None:
        terminate(self.proc)


@contextmanager
def nginx(directory: str) -> Iterator[Nginx]:
    server = Nginx(directory)
    try:
        yield server
    finally:
        server.close()


@contextmanager
def haproxy(directory: str, target: str, send: str) -> Iterator[Haproxy]:
    proxy = Haproxy(directory, target, send)
    try:
        yield proxy
    finally:
        proxy.close()


def http_get(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> tuple[bytes, int]:
    """One HTTP/1.0 GET from ``source`` (a loopback address); returns (response, our port)."""
    with socket.socket() as sock:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        ours = sock.getsockname()[1]
        sock.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks), ours


def roundtrip(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    """Send ``payload`` and read as many bytes back (fewer at EOF)."""
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        data = sock.recv(65536)
        if not data:
            break
        got += data
    return got


def connect_from(source: str, port: int, host: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to ``host:port`` from the loopback address ``source``."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


@contextmanager
def half_closing_target() -> Iterator[int]:
    """A TCP target on loopback (its port yielded) that reads each connection to EOF and never
    closes its side: what a --half-close-timeout must end."""
    target = listening_socket()
    kept: list[socket.socket] = []

    def serve() -> None:
        conn, _ = target.accept()
        kept.append(conn)
        while conn.recv(65536):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield target.getsockname()[1]
    finally:
        thread.join(5)
        for conn in kept:
            conn.close()
        target.close()


def half_close_ends(port: int) -> None:
    """Connect to ``port``, send, shut down our sending side, and see the connection end
    (within 15 s) although the target never closes its side: a --half-close-timeout's work."""
    with connect("127.0.0.1", port) as sock:
        sock.sendall(b"request")
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(15)
        assert sock.recv(10) == b""


def idle_and_busy(port: int, seconds: float, log) -> tuple[socket.socket, socket.socket]:
    """Two connections to ``port``: one makes one exchange and then idles, the other a one-byte
    exchange every 0.1 s for ``seconds``; then the idle one must be closed by an idle timeout
    shorter than ``seconds`` (``log()`` explains a failed exchange). Returns (idle, busy)."""
    idle = connect("127.0.0.1", port)
    busy = connect("127.0.0.1", port)
    assert roundtrip(idle) == b"ping"
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert roundtrip(busy, b"b") == b"b", log()
        time.sleep(0.1)
    idle.settimeout(15)
    assert idle.recv(10) == b""  # closed by the idle timeout
    assert roundtrip(busy, b"alive") == b"alive"
    return idle, busy
