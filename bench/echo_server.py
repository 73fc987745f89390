"""A gevent TCP echo server for the short-connection benchmark: ``echo_server.py PORT [HOST]``."""

import sys

from gevent.server import StreamServer


def echo(sock, _addr) -> None:
    while data := sock.recv(65536):
        sock.sendall(data)


if __name__ == "__main__":
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    StreamServer((host, int(sys.argv[1])), echo, backlog=4096).serve_forever()
