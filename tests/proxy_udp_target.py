"""A UDP target that parses a PROXY v2 header on every datagram with portfwd's strict parser
(policy/proxy.py), for kcpudp-server --proxy-protocol tests (run as its own process).

``python proxy_udp_target.py <host> <port>``; prints ``ready`` once bound. Each datagram is
answered, to the address it came from, with ``<kind> <client host> <client port>
<transport>|<payload>`` where kind is PROXY (a header with an address), LOCAL (a header
without one), NONE (no header: the payload is the whole datagram) or BAD (a header that does
not parse, or one cut short by the datagram's end: the reason follows).
"""

from __future__ import annotations

import socket
import sys

from portfwd.policy.proxy import V2_SIGNATURE, MalformedHeader, ProxyParser


def describe(datagram: bytes) -> bytes:
    if not datagram.startswith(V2_SIGNATURE):
        return b"NONE - - -|" + datagram
    try:
        parsed = ProxyParser(allow_v1=False).feed(datagram)
    except MalformedHeader as exc:
        return b"BAD " + str(exc).encode() + b"|"
    if parsed is None:  # a datagram is the whole message: a partial header never completes
        return b"BAD truncated|"
    header = parsed.header
    if not header.has_address:
        return f"LOCAL - - {header.transport.name}|".encode() + parsed.rest
    host, port = header.source
    return f"PROXY {host} {port} {header.transport.name}|".encode() + parsed.rest


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, port))
    print("ready", flush=True)
    while True:
        datagram, addr = sock.recvfrom(65535)
        try:
            sock.sendto(describe(datagram), addr)
        except OSError:  # a reply too long for a datagram: say so instead
            sock.sendto(b"BAD reply too long|", addr)


if __name__ == "__main__":
    main()
