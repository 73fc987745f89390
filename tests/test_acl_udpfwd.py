"""udpfwd --allow/--deny end to end: a refused client's datagrams are dropped before a session
exists (the target never sees them); others are forwarded as before."""

from __future__ import annotations

import socket
import threading

from conftest import free_port


class UdpEcho:
    """A threaded UDP echo target that counts the datagrams it got."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except OSError:
                return
            self.received += 1
            self.sock.sendto(data, addr)

    def close(self) -> None:
        self.sock.close()


def ask(source: str, port: int, timeout: float) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.sendto(b"hello", ("127.0.0.1", port))
        try:
            return sock.recv(100)
        except TimeoutError:
            return None


def test_denied_source_never_reaches_the_target(tool):
    echo = UdpEcho()
    port = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    fwd = tool("udpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{echo.port}", "--allow",
               "127.0.0.0/8", "--deny", "127.0.0.2/32", "--stats-interval", "0")
    fwd.wait_for_log("forwarding")
    for _ in range(50):  # the allowed client, retried while udpfwd starts
        if ask("127.0.0.1", port, 0.2) == b"hello":
            break
    else:
        raise AssertionError(fwd.log())
    before = echo.received
    for _ in range(3):
        assert ask("127.0.0.2", port, 0.5) is None
    fwd.wait_for_log(r"datagram from 127.0.0.2:\d+ dropped: denied by --allow/--deny")
    assert echo.received == before
    assert fwd.log().count("denied by --allow/--deny") == 1  # rate-limited
    assert ask("127.0.0.3", port, 5) == b"hello"
    assert fwd.stop() == 0
    echo.close()


def test_a_reload_applies_the_new_lists_and_keeps_the_count():
    """udpfwd's reconfigure (a `portfwd run` reload) takes the new --allow/--deny at once; the
    denied count goes on from where it was (an exported counter never goes down)."""
    from portfwd.runtime.environment import Environment
    from portfwd.runtime.options import Options
    from portfwd.udpfwd.config import udpfwd_config
    from portfwd.udpfwd.forwarder import UdpForwarder

    def config(**lists):
        return udpfwd_config(Options({"listen": "127.0.0.1:1", "dest": "127.0.0.1:2", **lists}),
                             Environment())

    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    forwarder = UdpForwarder(config(deny=["127.0.0.0/8"]), listener)
    forwarder.start()
    try:
        assert not forwarder.sources.permits(("127.0.0.1", 5000))
        forwarder.reconfigure(config(allow=["127.0.0.0/8"]))
        assert forwarder.sources.permits(("127.0.0.1", 5000))
        assert not forwarder.sources.permits(("10.0.0.1", 5000))
        assert forwarder.metrics().denied == 2
    finally:
        forwarder.stop(0)
