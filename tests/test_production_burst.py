"""Bursts: udpfwd answers every one of 1,000 new clients that each send one datagram at once
(no pacing), at its default settings (the listener's receive buffer holds the burst while the
sessions open)."""

from __future__ import annotations

import select
import socket
import threading
import time

from conftest import free_port

from portfwd.runtime.sockets import set_buffers

CLIENTS = 1000
ECHO_BUFFER = 8 << 20  # bytes: the test's own echo must not be what drops
ANSWER_WAIT = 20.0  # s: bounded wait for the answers


class UdpEcho:
    """The upstream: echoes every datagram to its sender (each udpfwd session is one)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        set_buffers(self.sock, ECHO_BUFFER, force=True)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            if not select.select([self.sock], [], [], 0.2)[0]:
                continue
            try:
                data, addr = self.sock.recvfrom(65535)
                self.sock.sendto(data, addr)
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def burst(port: int, count: int = CLIENTS) -> int:
    """``count`` fresh sockets each send one datagram at once; how many got their echo."""
    clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for client in clients:
            client.bind(("127.0.0.1", 0))
            client.setblocking(False)
        for i, client in enumerate(clients):
            client.sendto(b"client %06d " % i + bytes(64), ("127.0.0.1", port))
        answered: set[int] = set()
        waiting = {client.fileno(): i for i, client in enumerate(clients)}
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + ANSWER_WAIT
        while len(answered) < count and time.monotonic() < deadline:
            for fd, _ in poller.poll(200):
                i = waiting[fd]
                data = clients[i].recv(4096)
                assert data.startswith(b"client %06d " % i)
                answered.add(i)
                poller.unregister(fd)
        return len(answered)
    finally:
        for client in clients:
            client.close()


def test_udpfwd_answers_a_burst_of_1000_new_clients(tool):
    echo = UdpEcho()
    port = free_port(socktype=socket.SOCK_DGRAM)
    fwd = tool("udpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}")
    try:
        fwd.wait_for_log("forwarding")
        answered = burst(port)
        print(f"answered {answered}/{CLIENTS}")
        assert answered == CLIENTS
        assert fwd.stop() == 0
    finally:
        echo.close()
