import re
import socket

import pytest

from portfwd.runtime.addr import AddressError, HostPort, any_host, parse_and_resolve, parse_endpoint


@pytest.mark.parametrize("text, host, port", [
    ("1.2.3.4:80", "1.2.3.4", 80),
    ("[::]:80", "::", 80),
    ("[2001:db8::2]:8080", "2001:db8::2", 8080),
    ("localhost:22", "localhost", 22),
    (":80", "", 80),
    ("0.0.0.0:65535", "0.0.0.0", 65535),
    ("host:1", "host", 1),
])
def test_parse_endpoint(text, host, port):
    assert parse_endpoint(text) == HostPort(host, port)


@pytest.mark.parametrize("text, reason", [
    ("1.2.3.4", "expected host:port"),
    ("1.2.3.4:0", "outside 1-65535"),
    ("1.2.3.4:65536", "outside 1-65535"),
    ("1.2.3.4:http", "expected a number"),
    ("1.2.3.4:", "expected a number"),
    ("1.2.3.4:-1", "expected a number"),
    ("::1:80", "write IPv6 addresses as [addr]:port"),
    ("[::1]80", "expected [ipv6]:port"),
    ("[::1", "expected [ipv6]:port"),
    ("[]:80", "empty IPv6 address"),
])
def test_parse_endpoint_rejects(text, reason):
    with pytest.raises(AddressError, match=re.escape(reason)):
        parse_endpoint(text)


def test_resolve_families():
    v4 = parse_and_resolve("127.0.0.1:80", socket.SOCK_STREAM, passive=False)
    assert (v4.family, v4.sockaddr) == (socket.AF_INET, ("127.0.0.1", 80))
    v6 = parse_and_resolve("[::1]:80", socket.SOCK_DGRAM, passive=False)
    assert v6.family == socket.AF_INET6 and v6.host == "::1" and str(v6) == "[::1]:80"


def test_resolve_empty_host():
    # Dual-stack where the system has IPv6 (bind_socket turns IPV6_V6ONLY off), else IPv4.
    assert parse_and_resolve(":80", socket.SOCK_STREAM, passive=True).host in ("::", "0.0.0.0")
    assert parse_and_resolve(":80", socket.SOCK_STREAM, passive=True).host == any_host()
    assert parse_and_resolve(":80", socket.SOCK_STREAM, passive=False).host == "127.0.0.1"


def test_resolve_name_once():
    assert parse_and_resolve("localhost:80", socket.SOCK_STREAM, passive=False).port == 80


def test_resolve_unknown_name():
    with pytest.raises(AddressError, match="cannot resolve"):
        parse_and_resolve("no-such-host.invalid:80", socket.SOCK_STREAM, passive=False)
