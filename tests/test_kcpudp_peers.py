"""kcpudp carrying real UDP peers: WireGuard (wireguard-go in two network namespaces this test
creates) and DNS (dnsmasq on loopback, local records only). Skipped where a peer is missing.

WireGuard layout (every address lives in the namespaces made here and goes nowhere else)::

    ns A: wg 10.78.0.1 --udp--> kcpudp-client 127.0.0.1:51000 ==veth 10.77.0.1 -> 10.77.0.2==>
    ns B: kcpudp-server 10.77.0.2:5000 --udp--> wg's port 127.0.0.1:51820; wg 10.78.0.2

The WireGuard MTU is 1280, so a WireGuard packet (1,312 bytes of UDP payload) fits one
tunnel datagram of -M 1350 in datagram mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest
from conftest import BIN, REPO, free_dual_port, free_port

PSK = "0123456789abcdef" * 4
MODES = ["reliable", "datagram"]
TRANSFER = 64 << 20  # bytes across the WireGuard interface
WG_PORT = 51820
CLIENT_PORT = 51000
SERVER_PORT = 5000


def run(*argv: str, ns: str | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*prefix, *argv], check=check, capture_output=True, text=True, **kw)


class Background:
    """A process (optionally in a namespace), its output in a file; killed on close."""

    def __init__(self, argv: list[str], ns: str | None = None, env: dict | None = None) -> None:
        self.log_file = tempfile.NamedTemporaryFile(prefix="kcpudp-peer-", delete=False)
        prefix = ["ip", "netns", "exec", ns] if ns else []
        self.proc = subprocess.Popen([*prefix, *argv], stdout=self.log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=dict(os.environ, **(env or {})))

    def log(self) -> str:
        with open(self.log_file.name, errors="replace") as f:
            return f.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log_file.name)


def kcpudp(tool: str, *args: str, ns: str | None = None) -> Background:
    return Background([sys.executable, os.path.join(BIN, tool), *args], ns=ns,
                      env={"PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"})


def wait_log(proc: Background, needle: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while needle not in proc.log():
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not logged:\n{proc.log()}")
        time.sleep(0.05)


def have_wireguard() -> str | None:
    """Why WireGuard tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for binary in ("wireguard-go", "wg", "ip", "socat"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun"
    return None


@contextlib.contextmanager
def namespaces() -> Iterator[tuple[str, str]]:
    """Namespaces A and B joined by a veth pair 10.77.0.1 <-> 10.77.0.2; deleted after."""
    tag = f"{os.getpid() % 10000}{secrets.token_hex(2)}"
    a, b = f"kuA{tag}", f"kuB{tag}"
    made: list[str] = []
    try:
        for ns in (a, b):
            run("ip", "netns", "add", ns)
            made.append(ns)
            run("ip", "link", "set", "lo", "up", ns=ns)
        run("ip", "link", "add", f"va{tag}", "netns", a, "type", "veth", "peer", "name",
            f"vb{tag}", "netns", b)
        for ns, dev, addr in ((a, f"va{tag}", "10.77.0.1/24"), (b, f"vb{tag}", "10.77.0.2/24")):
            run("ip", "addr", "add", addr, "dev", dev, ns=ns)
            run("ip", "link", "set", dev, "up", ns=ns)
        yield a, b
    finally:
        for ns in made:
            pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:  # only what this test started lives there
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            run("ip", "netns", "del", ns, check=False)


def start_wireguard(ns: str, started: list[Background], address: str, key: str, peer: str,
                    peer_ip: str, endpoint: str | None) -> None:
    # wireguard-go's control socket (/var/run/wireguard/<name>.sock) is not per namespace:
    # each interface gets a name of its own.
    dev = f"wg{ns}"[:15]
    wg = Background(["wireguard-go", "-f", dev], ns=ns, env={"LOG_LEVEL": "error"})
    started.append(wg)
    deadline = time.monotonic() + 10
    while run("ip", "link", "show", dev, ns=ns, check=False).returncode != 0:
        if wg.proc.poll() is not None or time.monotonic() > deadline:
            pytest.skip(f"wireguard-go cannot start here: {wg.log().strip()[:200]}")
        time.sleep(0.05)
    with tempfile.NamedTemporaryFile("w", delete=False) as f:
        f.write(key)
    try:
        extra = ["endpoint", endpoint, "persistent-keepalive", "1"] if endpoint else []
        run("wg", "set", dev, "private-key", f.name, "listen-port", str(WG_PORT), "peer",
            peer, "allowed-ips", f"{peer_ip}/32", *extra, ns=ns)
    finally:
        os.unlink(f.name)
    run("ip", "addr", "add", f"{address}/24", "dev", dev, ns=ns)
    run("ip", "link", "set", dev, "mtu", "1280", "up", ns=ns)


@pytest.mark.skipif(have_wireguard() is not None, reason=str(have_wireguard()))
@pytest.mark.parametrize("mode", MODES)
def test_wireguard_over_the_tunnel(mode, tmp_path):
    """ping, then 64 MiB each way with sha256, across WireGuard with its UDP in kcpudp."""
    keys = [run("wg", "genkey").stdout.strip() for _ in range(2)]
    pubs = [run("wg", "pubkey", input=k).stdout.strip() for k in keys]
    data = random.Random(7).randbytes(TRANSFER)
    src = tmp_path / "data"
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    started: list[Background] = []
    with namespaces() as (a, b):
        try:
            server = kcpudp("kcpudp-server", f"10.77.0.2:{SERVER_PORT}",
                            f"127.0.0.1:{WG_PORT}", "-K", PSK, "--mode", mode, ns=b)
            started.append(server)
            client = kcpudp("kcpudp-client", f"127.0.0.1:{CLIENT_PORT}",
                            f"10.77.0.2:{SERVER_PORT}", "-K", PSK, "--mode", mode, ns=a)
            started.append(client)
            wait_log(server, "tunnelling")
            wait_log(client, "tunnelling")
            start_wireguard(b, started, "10.78.0.2", keys[1], pubs[0], "10.78.0.1", None)
            start_wireguard(a, started, "10.78.0.1", keys[0], pubs[1], "10.78.0.2",
                            f"127.0.0.1:{CLIENT_PORT}")
            ping = run("ping", "-c", "5", "-i", "0.2", "-W", "5", "10.78.0.2", ns=a,
                       check=False, timeout=60)
            assert ping.returncode == 0, ping.stdout + server.log() + client.log()
            assert " 0% packet loss" in ping.stdout or "5 received" in ping.stdout
            for sender, receiver, host in ((b, a, "10.78.0.2"), (a, b, "10.78.0.1")):
                port = free_port()
                listen = Background(["socat", "-u", f"FILE:{src}",
                                     f"TCP-LISTEN:{port},bind={host},reuseaddr"], ns=sender)
                started.append(listen)
                time.sleep(0.3)
                got = subprocess.run(["ip", "netns", "exec", receiver, "socat", "-u",
                                      f"TCP:{host}:{port},retry=20,interval=0.2", "STDOUT"],
                                     capture_output=True, timeout=240, check=False)
                assert len(got.stdout) == TRANSFER, (len(got.stdout), got.stderr[-300:])
                assert hashlib.sha256(got.stdout).hexdigest() == digest
            assert "open" in server.log()  # one conversation carried it all
        finally:
            for proc in reversed(started):
                proc.close()


def have_dnsmasq() -> str | None:
    for binary in ("dnsmasq", "dig"):
        if shutil.which(binary) is None:
            return f"{binary} is not installed"
    return None


BIG_TXT = [f"{n:03d}" + "x" * 200 for n in range(10)]  # ~2 KB of TXT: beyond 1,472 bytes


@contextlib.contextmanager
def dnsmasq() -> Iterator[int]:
    port = free_dual_port()
    txt = ",".join(f'"{s}"' for s in BIG_TXT)
    proc = Background(["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts",
                       "--conf-file=/dev/null", "--bind-interfaces",
                       "--listen-address=127.0.0.1", f"--port={port}", "--pid-file=",
                       "--edns-packet-max=4096", "--address=/test.example/127.0.0.5",
                       f"--txt-record=big.example,{txt}", "--log-facility=-"])
    try:
        deadline = time.monotonic() + 10
        while run("dig", "@127.0.0.1", "-p", str(port), "+time=1", "+tries=1", "+short",
                  "a.test.example", check=False).stdout.strip() != "127.0.0.5":
            if proc.proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"dnsmasq did not start: {proc.log()[-300:]}")
        yield port
    finally:
        proc.close()


@pytest.mark.skipif(have_dnsmasq() is not None, reason=str(have_dnsmasq()))
@pytest.mark.parametrize("mode", MODES)
def test_dns_through_the_tunnel(tool, mode, tmp_path):
    """1,000 dig queries (each from its own source port: its own conversation) all answered,
    and a TXT answer larger than 1,472 bytes intact."""
    with dnsmasq() as dns_port:
        udp = free_port(socktype=socket.SOCK_DGRAM)
        local = free_port(socktype=socket.SOCK_DGRAM)
        server = tool("kcpudp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{dns_port}", "-K", PSK,
                      "--mode", mode)
        client = tool("kcpudp-client", f"127.0.0.1:{local}", f"127.0.0.1:{udp}", "-K", PSK,
                      "--mode", mode, "-t", "5")
        server.wait_for_log("tunnelling")
        client.wait_for_log("tunnelling")
        big = run("dig", "@127.0.0.1", "-p", str(local), "+bufsize=4096", "+ignore", "+time=5",
                  "+tries=3", "big.example", "TXT")
        assert "flags: qr aa rd" in big.stdout and "tc" not in big.stdout.split("flags:")[1][:12]
        size = int(big.stdout.split("MSG SIZE  rcvd: ")[1].split()[0])
        assert size > 1472, size
        for s in BIG_TXT:
            assert s in big.stdout
        batch = tmp_path / "queries"
        batch.write_text("".join(f"q{n}.test.example A\n" for n in range(1000)))
        result = run("dig", "@127.0.0.1", "-p", str(local), "+time=3", "+tries=3", "+short",
                     "-f", str(batch), timeout=600)
        answers = result.stdout.split()
        assert answers == ["127.0.0.5"] * 1000, result.stdout[-500:]
        for proc in (client, server):
            assert proc.stop() == 0
