"""What tcpfwd's plain short-connection path must not run: Python code of the stdlib's socket
and enum modules (the stdlib socket class's __init__ and close, enum.Flag.__or__ on MSG_*
flags) and gevent's get_hub() per relay socket. Together they cost ~1.5 us per connection
(bench/results/2026-12-02-short4.md); this counts those calls made from portfwd's code while
connections are relayed in process, rather than timing anything."""

from __future__ import annotations

import errno
import os
import socket
import sys

import gevent
import greenlet
from gevent import socket as gsocket

import portfwd
from portfwd.runtime import acceptloop, sockets
from portfwd.runtime.acceptloop import AcceptLoop
from portfwd.runtime.addr import Resolved
from portfwd.runtime.sockets import ListenOptions, bind_socket
from portfwd.tcpfwd import pump
from portfwd.tcpfwd.config import TcpConfig
from portfwd.tcpfwd.forwarder import TcpForwarder

PORTFWD = os.path.dirname(portfwd.__file__) + os.sep  # the package, not its tests


def loopback(port: int) -> Resolved:
    return Resolved(socket.AF_INET, ("127.0.0.1", port))


def http_like_server() -> tuple[gsocket.socket, gevent.Greenlet]:
    """Reads a request, answers it and closes, as nginx with keepalive off does."""
    listener = gsocket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 1024)
            conn.close()

    return listener, gevent.spawn(serve)


def test_plain_path_runs_no_stdlib_socket_or_enum_code_and_no_get_hub(monkeypatch):
    server, serving = http_like_server()
    listener = bind_socket(loopback(0), socket.SOCK_STREAM, ListenOptions())
    fwd = TcpForwarder(TcpConfig(listen=loopback(listener.getsockname()[1]),
                                 dest=loopback(server.getsockname()[1])), listener)
    fwd.start()
    bad: list[str] = []  # forbidden calls made by portfwd code, with their caller

    def watched(owner: object, name: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(PORTFWD):
                bad.append(f"{name} from {caller.co_name}")
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    try:
        gevent.sleep(0.05)  # the accept loop waits on its listener
        watched(socket.socket, "__init__")
        watched(socket.socket, "close")
        watched(socket.MsgFlag, "__or__")  # enum.Flag's, copied into each flag class
        watched(socket.MsgFlag, "__ror__")
        watched(pump, "get_hub")
        for _ in range(3):
            client = gsocket.create_connection(fwd.accept_loop.address, timeout=10)
            client.sendall(b"GET /1k HTTP/1.0\r\n\r\n")
            reply = b""
            while data := client.recv(65536):
                reply += data
            client.close()
            assert reply.endswith(b"x" * 1024)
        for _ in range(100):  # bounded: until the relays have closed
            if fwd.counters.closed == 3:
                break
            gevent.sleep(0.01)
        m = fwd.metrics()
        assert (m.connections_closed, m.connections_active, m.bytes_up) == (3, 0, 3 * 20)
        assert not bad, bad
    finally:
        monkeypatch.undo()
        fwd.stop(1)
        serving.kill()
        server.close()


def test_accepting_is_a_hub_callback_with_no_greenlet_of_its_own():
    """A wake-up of the listener costs no switch to a greenlet and back: the inline handler
    runs in the hub, called from the listener's watcher, which stays started."""
    listener = bind_socket(loopback(0), socket.SOCK_STREAM, ListenOptions())
    where: list[bool] = []

    def handler(sock: socket.socket, peer: tuple) -> None:
        where.append(greenlet.getcurrent() is gevent.get_hub())
        sock.close()

    loop = AcceptLoop(listener, handler, inline=True)
    loop.start()
    try:
        for _ in range(3):
            client = gsocket.create_connection(loop.address, timeout=10)
            assert client.recv(1) == b""  # the handler closed it
            client.close()
            assert loop._readable.active  # still started between connections
        assert where == [True, True, True]
    finally:
        loop.stop(1)


def test_an_unforeseen_accept_error_pauses_accepting_instead_of_ending_it(monkeypatch):
    """An accept() error that is neither a skipped one nor a known shortage used to stop the
    watcher for good (a live service with a dead listener); now it pauses and accepts again."""
    monkeypatch.setattr(acceptloop, "BACKOFF_MIN", 0.01)
    listener = bind_socket(loopback(0), socket.SOCK_STREAM, ListenOptions())
    served: list[int] = []

    def handler(sock: socket.socket, peer: tuple) -> None:
        served.append(1)
        sock.close()

    loop = AcceptLoop(listener, handler, inline=True)
    real_accept, failures = loop._raw_accept, [OSError(errno.EIO, "injected")]

    def accept():
        if failures:
            raise failures.pop()
        return real_accept()

    loop._raw_accept = accept
    loop.start()
    try:
        client = gsocket.create_connection(loop.address, timeout=10)
        assert client.recv(1) == b""  # accepted after the pause, then closed by the handler
        client.close()
        assert served == [1] and loop._readable.active
    finally:
        loop.stop(1)


def test_a_connection_nobody_took_is_closed_and_accepting_goes_on(monkeypatch):
    """If handing an accepted connection to a worker fails (a bug), the connection is closed
    rather than leaked, the hub reports the error once, and the next connection is served."""
    listener = bind_socket(loopback(0), socket.SOCK_STREAM, ListenOptions())
    loop = AcceptLoop(listener, lambda sock, peer: sock.close())
    real_spawn, failures = loop.workers.spawn, [RuntimeError("injected")]

    def spawn(*args):
        if failures:
            raise failures.pop()
        return real_spawn(*args)

    monkeypatch.setattr(loop.workers, "spawn", spawn)
    monkeypatch.setattr(gevent.get_hub(), "handle_error", lambda *args: None)
    loop.start()
    try:
        for _ in range(2):  # the first hits the failure; both end closed by this side
            client = gsocket.create_connection(loop.address, timeout=10)
            assert client.recv(1) == b""
            client.close()
        assert failures == [] and loop._readable.active
    finally:
        loop.stop(1)


def test_a_proxy_header_dial_to_loopback_needs_no_wait(monkeypatch):
    """--proxy-protocol dials with the handshake's ACK deferred to the header; on loopback the
    second connect still reports the connection made, so no trip through the event loop."""
    waited: list[int] = []
    monkeypatch.setattr(sockets, "finish_dial", lambda sock, timeout: waited.append(1))
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        dest = Resolved(socket.AF_INET, server.getsockname())
        sock = sockets.dial_tcp(dest, 5, early=True)
        sock.close()
    assert waited == []
