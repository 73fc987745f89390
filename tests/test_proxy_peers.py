"""The PROXY protocol end to end with real peers: tcpfwd --proxy-protocol in front of nginx
(``listen ... proxy_protocol``, ``$proxy_protocol_addr`` logged), HAProxy send-proxy /
send-proxy-v2 in front of tcpfwd --accept-proxy, and hand-made headers byte by byte,
truncated, late and from an untrusted sender."""

from __future__ import annotations

import socket
import time

import pytest
from conftest import EchoServer, connect, free_port
from proxy_peers import haproxy, http_get, needs_haproxy, needs_nginx, nginx, wait_for

from portfwd.policy.proxy import TlvType, pack_v1, pack_v2


def start_tcpfwd(tool, *args: str):
    process = tool("tcpfwd", *args)
    process.wait_for_log(r"forwarding ")
    return process


@needs_nginx
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nginx_behind_tcpfwd_sees_the_client_address(tool, tmp_path, version):
    with nginx(str(tmp_path)) as web:
        port = free_port()
        start_tcpfwd(tool, "--proxy-protocol", version, f"127.0.0.1:{port}",
                     f"127.0.0.1:{web.port}")
        connect("127.0.0.1", port).close()  # wait for the listener (nginx logs nothing)
        response, client_port = http_get(port, source="127.0.0.2")
        assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"hello\n")
        seen = wait_for(web.seen)
        # nginx was told the real client (127.0.0.2) though tcpfwd connected from 127.0.0.1
        assert ("127.0.0.2", str(client_port), "127.0.0.1") in seen, (seen, web.error_log())


@needs_nginx
def test_nginx_without_a_header_refuses(tool, tmp_path):
    """The control: without --proxy-protocol nginx's proxy_protocol listener rejects us."""
    with nginx(str(tmp_path)) as web:
        port = free_port()
        start_tcpfwd(tool, f"127.0.0.1:{port}", f"127.0.0.1:{web.port}")
        connect("127.0.0.1", port).close()
        response, _ = http_get(port, source="127.0.0.2")
        assert not response.startswith(b"HTTP/1.1 200")
        assert wait_for(lambda: "broken header" in web.error_log())


@needs_nginx
@needs_haproxy
@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2",
                                  "send-proxy-v2 proxy-v2-options crc32c,unique-id"])
def test_haproxy_tcpfwd_nginx_chain_keeps_the_client(tool, tmp_path, send):
    """client 127.0.0.3 -> HAProxy (send-proxy*) -> tcpfwd --accept-proxy --proxy-protocol v2
    -> nginx: the address HAProxy reported is the one tcpfwd passes on."""
    with nginx(str(tmp_path)) as web:
        port = free_port()
        fwd = start_tcpfwd(tool, "--log-level", "debug", "--accept-proxy", "--proxy-from",
                           "127.0.0.1/32",
                           "--proxy-protocol", "v2", f"127.0.0.1:{port}",
                           f"127.0.0.1:{web.port}")
        with haproxy(str(tmp_path), f"127.0.0.1:{port}", send) as front:
            response, client_port = http_get(front.port, source="127.0.0.3")
        assert response.startswith(b"HTTP/1.1 200"), fwd.log()
        seen = wait_for(web.seen)
        assert ("127.0.0.3", str(client_port), "127.0.0.1") in seen, (seen, fwd.log())
        assert f"127.0.0.3:{client_port} (via 127.0.0.1:" in fwd.log()


@needs_haproxy
@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front_of_accept_proxy_relays_bytes_intact(tool, tmp_path, send):
    echo = EchoServer()
    port = free_port()
    fwd = start_tcpfwd(tool, "--log-level", "debug", "--accept-proxy", f"127.0.0.1:{port}",
                       f"127.0.0.1:{echo.port}")  # debug: the "conn 1 open" line names the client
    with haproxy(str(tmp_path), f"127.0.0.1:{port}", send) as front:
        with socket.socket() as sock:
            sock.settimeout(10)
            sock.bind(("127.0.0.4", 0))
            sock.connect(("127.0.0.1", front.port))
            payload = bytes(range(256)) * 400
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            got = b""
            while data := sock.recv(65536):
                got += data
    echo.close()
    assert got == payload
    assert "127.0.0.4:" in fwd.log() and "PROXY header" not in fwd.log()


def accept_proxy_forwarder(tool, *flags: str):
    echo = EchoServer()
    port = free_port()
    fwd = start_tcpfwd(tool, "--log-level", "debug", "--accept-proxy", *flags,
                       f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}")  # debug: "conn N open"
    return fwd, port, echo


def exchange(port: int, chunks: list[bytes], pause: float = 0.0) -> bytes:
    """Send ``chunks`` (pausing between them), half-close, read everything back."""
    with connect("127.0.0.1", port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for chunk in chunks:
            sock.sendall(chunk)
            if pause:
                time.sleep(pause)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while data := sock.recv(65536):
                got += data
        except ConnectionResetError:
            pass
    return got


@pytest.mark.parametrize("header", [
    pack_v1(("203.0.113.9", 4242), ("127.0.0.1", 80)),
    pack_v2(("2001:db8::9", 4242), ("2001:db8::1", 80), crc=True,
            tlvs=((TlvType.ALPN, b"h2"), (TlvType.AUTHORITY, b"example.com"))),
], ids=["v1", "v2-tlvs"])
def test_header_byte_at_a_time_then_data_in_the_same_segment(tool, header):
    fwd, port, echo = accept_proxy_forwarder(tool)
    data = b"first bytes after the header"
    # the header one byte per segment, and its last byte together with stream data
    got = exchange(port, [header[i:i + 1] for i in range(len(header) - 1)]
                   + [header[-1:] + data], pause=0.002)
    assert got == data
    assert ("203.0.113.9:4242" in fwd.log() or "[2001:db8::9]:4242" in fwd.log()), fwd.log()
    echo.close()


def test_truncated_header_never_reaches_the_target(tool):
    fwd, port, echo = accept_proxy_forwarder(tool)
    header = pack_v2(("203.0.113.9", 4242), ("127.0.0.1", 80))
    assert exchange(port, [header[:20]]) == b""
    fwd.wait_for_log(r"PROXY header: connection closed inside the PROXY header")
    assert echo.accepted == 0
    echo.close()


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.0\r\n\r\n", b"PROXY TCP4 1.2.3.4\r\n",
                                     b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n"])
def test_malformed_header_closes_and_keeps_serving(tool, garbage):
    fwd, port, echo = accept_proxy_forwarder(tool)
    assert exchange(port, [garbage]) == b""
    fwd.wait_for_log(r"PROXY header")
    assert echo.accepted == 0
    assert exchange(port, [pack_v1(None, None) + b"ok"]) == b"ok"  # UNKNOWN: still served
    echo.close()


def test_header_timeout(tool):
    fwd, port, echo = accept_proxy_forwarder(tool)
    with connect("127.0.0.1", port) as sock:
        sock.settimeout(15)
        sock.sendall(b"PROXY TCP4 ")
        assert sock.recv(10) == b""  # closed by tcpfwd after its 5 s header timeout
    fwd.wait_for_log(r"no complete PROXY header in 5 s")
    assert echo.accepted == 0
    echo.close()


def test_untrusted_sender_is_refused(tool):
    fwd, port, echo = accept_proxy_forwarder(tool, "--proxy-from", "127.0.0.2/32")
    header = pack_v1(("203.0.113.9", 4242), ("127.0.0.1", 80))
    assert exchange(port, [header + b"x"]) == b""  # we connect from 127.0.0.1
    fwd.wait_for_log(r"127.0.0.1:\d+ closed: PROXY header: not in --proxy-from")
    assert echo.accepted == 0
    with socket.socket() as sock:  # the trusted one is served
        sock.settimeout(10)
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(header + b"x")
        assert sock.recv(10) == b"x"
    assert fwd.stop() == 0
    echo.close()


def test_acl_applies_to_the_address_in_the_header(tool):
    fwd, port, echo = accept_proxy_forwarder(tool, "--deny", "203.0.113.0/24")
    assert exchange(port, [pack_v1(("203.0.113.9", 1), ("127.0.0.1", 80)) + b"x"]) == b""
    fwd.wait_for_log(r"203.0.113.9:1 denied")
    assert echo.accepted == 0
    assert exchange(port, [pack_v1(("198.51.100.1", 1), ("127.0.0.1", 80)) + b"y"]) == b"y"
    echo.close()
