"""tcpfwd -b (base-address mode) in a private network namespace with an nftables REDIRECT.

Connections to ports 8100-8199 inside the namespace are redirected to the listener on 8080;
tcpfwd reads the original port (SO_ORIGINAL_DST) and sends the connection to
base address + (original port - 8080): port 8102 goes to 127.0.0.22.
Needs root, iproute2 and nftables; skipped otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest
from conftest import BIN

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"),
    reason="needs root, ip and nft",
)

NFT_RULES = """
table ip pfwdtest {
    chain out {
        type nat hook output priority -100; policy accept;
        tcp dport 8100-8199 redirect to :8080
    }
}
"""

# Runs inside the namespace: echo servers that answer with their own address, then a client.
PROBE = textwrap.dedent("""
    import socket, sys, threading
    def serve(host):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 9000)); s.listen(8)
        while True:
            c, _ = s.accept(); c.sendall(host.encode()); c.close()
    for host in ("127.0.0.22", "127.0.0.25"):
        threading.Thread(target=serve, args=(host,), daemon=True).start()
    import time; time.sleep(0.3)
    for port in sys.argv[1:]:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as c:
            c.settimeout(5)
            print(port, c.recv(100).decode() or "closed")
""")


@pytest.fixture
def netns():
    name = f"pfwd-{uuid.uuid4().hex[:8]}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode:
        pytest.skip("cannot create a network namespace here")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=NFT_RULES.encode(),
                       check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def run_in(ns: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=30, **kw)


def start_in(ns: str, *argv: str) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_listening(ns: str, port: int) -> None:
    for _ in range(200):
        if f":{port} " in run_in(ns, "ss", "-ltnH").stdout:
            return
        subprocess.run(["sleep", "0.05"])
    raise AssertionError("listener did not come up")


def test_base_addr_offsets(netns):
    fwd = start_in(netns, sys.executable, os.path.join(BIN, "tcpfwd"), "--log-level", "debug",
                   "-b", "127.0.0.1:8080", "127.0.0.0:9000")  # debug: the "conn N open" lines
    try:
        wait_listening(netns, 8080)
        out = run_in(netns, sys.executable, "-c", PROBE, "8102", "8105")
        assert out.stdout.split("\n")[:2] == ["8102 127.0.0.22", "8105 127.0.0.25"], out
    finally:
        fwd.terminate()
        log = fwd.communicate(timeout=10)[0]
    assert fwd.returncode == 0
    assert "-> 127.0.0.22:9000" in log and "-> 127.0.0.25:9000" in log


def test_base_addr_overflow_closes_connection(netns):
    fwd = start_in(netns, sys.executable, os.path.join(BIN, "tcpfwd"), "-b", "127.0.0.1:8080",
                   "255.255.255.250:9000")
    try:
        wait_listening(netns, 8080)
        out = run_in(netns, sys.executable, "-c", PROBE, "8199")
        assert out.stdout.startswith("8199 closed"), out
    finally:
        fwd.terminate()
        log = fwd.communicate(timeout=10)[0]
    assert "leaves IPv4 address space" in log
    assert fwd.returncode == 0
