"""kcpudp-server --proxy-protocol v2: every datagram to the target starts with a PROXY v2
header (DGRAM) naming the client address that kcpudp-client saw (its HELLO's ORIGIN).

Receivers: dnsdist (a real one: it parses PROXY v2 on each UDP query from a trusted proxy and
answers here with a CNAME spelling the client address it took from the header), and a target
process that parses every datagram with policy/proxy.py's strict parser and echoes it back with
what the header said. Real kcpudp-client / kcpudp-server processes on loopback, both modes,
IPv4 and IPv6 clients, many clients each with its own address; without the option the target
gets the datagrams unchanged. Skipped where dnsdist is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from conftest import REPO, free_dual_port, free_port, needs_ipv6, run_cli
from test_kcpudp import exchange, readable
from test_udpfwd import udp_socket

from portfwd.policy.proxy import Transport, pack_v2

PSK = "0123456789abcdef" * 4
MODES = ["reliable", "datagram"]
TARGET = os.path.join(os.path.dirname(__file__), "proxy_udp_target.py")


def fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def strict_target(host: str = "127.0.0.1") -> Iterator[int]:
    """The parsing target (its own process) on a free port; yields the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    port = free_port(family, socket.SOCK_DGRAM)
    proc = subprocess.Popen([sys.executable, TARGET, host, str(port)], stdout=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        yield port
    finally:
        proc.kill()
        proc.wait()


def tunnel(tool, target: str, client_host: str, *extra: str, proxy: bool = True):
    """kcpudp-server (to ``target``, --proxy-protocol v2 unless not ``proxy``) and a
    kcpudp-client listening on ``client_host``; returns the client's listening address."""
    udp = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    family = socket.AF_INET6 if ":" in client_host else socket.AF_INET
    local = free_port(family, socket.SOCK_DGRAM)
    server = tool("kcpudp-server", f"127.0.0.1:{udp}", target, "-K", PSK, *extra,
                  *(("--proxy-protocol", "v2") if proxy else ()))
    server.wait_for_log("tunnelling")
    client = tool("kcpudp-client", fmt(client_host, local), f"127.0.0.1:{udp}", "-K", PSK,
                  *extra)
    client.wait_for_log("tunnelling")
    return (client_host, local), server, client


def client_sockets(host: str, count: int) -> list[socket.socket]:
    return [udp_socket(host) for _ in range(count)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)],
                         ids=["ipv4", "ipv6"])
def test_strict_target_sees_each_client(tool, mode, host):
    """30 clients, each its own address: every datagram reaches the target with a DGRAM
    header naming exactly that client, the payload after it intact (sizes up to 9000 B,
    fragmented in datagram mode), and the replies come back to each."""
    with strict_target() as port:
        addr, _, _ = tunnel(tool, f"127.0.0.1:{port}", host, "--mode", mode)
        socks = client_sockets(host, 30)
        try:
            for i, sock in enumerate(socks):
                own = sock.getsockname()
                expected = f"PROXY {own[0]} {own[1]} DGRAM|".encode()
                assert exchange(sock, addr, b"hello %d" % i) == expected + b"hello %d" % i
                for size in (0, 1, 1400, 9000):
                    payload = bytes([i % 251]) * size
                    assert exchange(sock, addr, payload) == expected + payload
        finally:
            for sock in socks:
                sock.close()


@pytest.mark.parametrize("mode", MODES)
def test_without_the_option_nothing_changes(tool, mode):
    """No --proxy-protocol: the target gets each datagram as the client sent it."""
    with strict_target() as port:
        addr, _, _ = tunnel(tool, f"127.0.0.1:{port}", "127.0.0.1", "--mode", mode,
                            proxy=False)
        with udp_socket("127.0.0.1") as sock:
            assert exchange(sock, addr, b"plain") == b"NONE - - -|plain"
            payload = os.urandom(5000)
            assert exchange(sock, addr, payload) == b"NONE - - -|" + payload


def test_v1_is_refused():
    result = run_cli("kcpudp-server", "--proxy-protocol", "v1", "127.0.0.1:4000",
                     "127.0.0.1:53")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("--proxy-protocol over UDP is v2 only (v1 has no UDP "
                                          "form), got 'v1'")
    assert run_cli("kcpudp-client", "--proxy-protocol", "v2", "127.0.0.1:4000",
                   "127.0.0.1:53").returncode == 2  # a server option


# --- dnsdist, a real receiver of PROXY v2 over UDP ----------------------------------------------

DNSDIST_CONF = """\
setSecurityPollSuffix("")
setLocal("127.0.0.1:{port}")
setACL({{"127.0.0.0/8", "::1/128"}})
-- only the kcpudp-server (on loopback) may send a PROXY header; every query from it must
setProxyProtocolACL({{"127.0.0.0/8"}})
function answer(dq)
  local who = dq.remoteaddr:toStringWithPort():gsub("[%.:%[%]]", "-")
  return DNSAction.Spoof, "c-" .. who .. ".example."
end
addAction(AllRule(), LuaAction(answer))
"""


@pytest.fixture
def dnsdist() -> Iterator[int]:
    binary = shutil.which("dnsdist")
    if binary is None:
        pytest.skip("dnsdist is not installed")
    port = free_dual_port()
    with tempfile.TemporaryDirectory(prefix="dnsdist-") as tmp:
        conf = os.path.join(tmp, "dnsdist.conf")
        with open(conf, "w") as f:
            f.write(DNSDIST_CONF.format(port=port))
        log = open(os.path.join(tmp, "log"), "w+")
        proc = subprocess.Popen([binary, "--supervised", "--disable-syslog", "-C", conf],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE)
        try:
            ready = pack_v2(("192.0.2.1", 1), ("127.0.0.1", port), transport=Transport.DGRAM)
            with udp_socket("127.0.0.1") as probe:
                for _ in range(100):  # up once it answers a query with a header
                    if proc.poll() is not None:
                        log.seek(0)
                        pytest.fail(f"dnsdist exited: {log.read()}")
                    probe.sendto(ready + query(1, b"probe"), ("127.0.0.1", port))
                    if readable([probe], 0.1):
                        break
                else:
                    pytest.fail("dnsdist did not answer")
            yield port
        finally:
            proc.kill()
            proc.wait()
            log.close()


def query(qid: int, label: bytes) -> bytes:
    return (struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + bytes([len(label)]) + label
            + b"\x07example\x00" + struct.pack("!HH", 1, 1))


def cname_of(answer: bytes) -> str:
    """The CNAME target in a one-question, one-answer response, as dotted text."""
    qdcount, ancount = struct.unpack_from("!HH", answer, 4)
    assert (qdcount, ancount) == (1, 1), answer
    offset = 12
    while answer[offset]:  # the question's name
        offset += answer[offset] + 1
    offset += 1 + 4 + 2 + 8  # root, qtype/qclass, answer's name pointer, type/class/ttl
    (rdlength,) = struct.unpack_from("!H", answer, offset)
    offset += 2
    labels, end = [], offset + rdlength
    while offset < end and answer[offset]:
        labels.append(answer[offset + 1:offset + 1 + answer[offset]].decode())
        offset += answer[offset] + 1
    return ".".join(labels)


def spelled(addr: tuple) -> str:
    text = f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
    for char in ".:[]":
        text = text.replace(char, "-")
    return f"c-{text}.example"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)],
                         ids=["ipv4", "ipv6"])
def test_dnsdist_sees_each_client(tool, dnsdist, mode, host):
    """dnsdist answers each of 20 clients with the address the PROXY header gave it: the
    client's own, not the kcpudp-server's socket."""
    addr, _, _ = tunnel(tool, f"127.0.0.1:{dnsdist}", host, "--mode", mode)
    socks = client_sockets(host, 20)
    try:
        for i, sock in enumerate(socks):
            for n in range(3):
                answer = exchange(sock, addr, query(i * 8 + n, b"q%d" % n))
                assert cname_of(answer) == spelled(sock.getsockname()[:2])
    finally:
        for sock in socks:
            sock.close()


def test_dnsdist_drops_what_has_no_header(tool, dnsdist):
    """The control: dnsdist requires the header from the server's address, so without
    --proxy-protocol nothing is answered (the test above would fail without the headers)."""
    addr, _, _ = tunnel(tool, f"127.0.0.1:{dnsdist}", "127.0.0.1", proxy=False)
    with udp_socket("127.0.0.1") as sock:
        with pytest.raises(AssertionError, match="no answer"):
            exchange(sock, addr, query(7, b"plain"), timeout=3)
