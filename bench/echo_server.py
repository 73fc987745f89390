"""A gevent TCP echo server for the benchmarks: ``echo_server.py PORT [HOST [nodelay]]``.

``nodelay`` sets TCP_NODELAY on every accepted connection, as an interactive server (sshd)
does: without it Nagle holds a small echo until the previous one is acknowledged, a whole
round trip on a WAN.
"""

import socket
import sys

from gevent.server import StreamServer

NODELAY = sys.argv[3:4] == ["nodelay"]


def echo(sock, _addr) -> None:
    if NODELAY:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := sock.recv(65536):
        sock.sendall(data)


if __name__ == "__main__":
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    StreamServer((host, int(sys.argv[1])), echo, backlog=4096).serve_forever()
