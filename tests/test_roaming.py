"""Roaming: a client whose source port changes mid-transfer (NAT rebinding) keeps its
conversation, and an unauthenticated packet from a new address changes nothing.

The relay stands for the NAT: kcptcp-client -> relay -> kcptcp-server, and at each switch it
sends on from a new source port and closes the old one (the old mapping is gone), so the
transfer can only finish if the server follows the client's authenticated packets to the new
address (PATH_CHALLENGE / PATH_RESPONSE, docs/PROTOCOL.md 6.1).
"""

from __future__ import annotations

import random
import re
import select
import socket
import struct
import threading
import time

from conftest import connect, echo_roundtrip, free_port
from hardening import Streamer

PSK = "0a" * 32
TOTAL = 64 * 1024 * 1024  # bytes each way
SWITCH_EVERY = 16 * 1024 * 1024  # bytes relayed upstream between two source-port changes
MAX_UDP = 65507


class RebindingRelay:
    """A UDP relay that changes the source port it uses towards the server every
    ``switch_every`` bytes relayed upstream, closing the old socket."""

    def __init__(self, server: tuple[str, int], switch_every: int) -> None:
        self.server = server
        self.switch_every = switch_every
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.front.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.port = self.front.getsockname()[1]
        self.back = self._new_back()
        self.ports = [self.back.getsockname()[1]]  # every source port used, in order
        self.client: tuple[str, int] | None = None
        self.captured: list[bytes] = []  # a few upstream datagrams, for the replay attack
        self._relayed = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _new_back() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        return sock

    def _run(self) -> None:
        while not self._stop:
            ready, _, _ = select.select([self.front, self.back], [], [], 0.2)
            for sock in ready:
                try:
                    data, addr = sock.recvfrom(MAX_UDP)
                    if sock is self.front:
                        self.client = addr
                        if len(self.captured) < 256:
                            self.captured.append(data)
                        self.back.sendto(data, self.server)
                        self._relayed += len(data)
                        if self._relayed >= self.switch_every * len(self.ports):
                            old, self.back = self.back, self._new_back()
                            self.ports.append(self.back.getsockname()[1])
                            old.close()  # the NAT forgot the old mapping
                    elif self.client is not None:
                        self.front.sendto(data, self.client)
                except OSError:
                    pass  # a full buffer, or ICMP from the closed port: a lossy link

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.front.close()
        self.back.close()


def start(tool, echo_port: int, relay_port_for):
    udp = free_port(socktype=socket.SOCK_DGRAM)
    server = tool("kcptcp-server", f"127.0.0.1:{udp}", f"127.0.0.1:{echo_port}", "-K", PSK,
                  "--stats-interval", "0")
    server.wait_for_log("tunnelling")
    relay = relay_port_for(("127.0.0.1", udp))
    tcp = free_port()
    client = tool("kcptcp-client", f"127.0.0.1:{tcp}", f"127.0.0.1:{relay.port}", "-K", PSK,
                  "--stats-interval", "0")
    client.wait_for_log("tunnelling")
    return server, client, relay, tcp, udp


def test_source_port_changes_mid_transfer_64_mib_intact(tool, echo_server):
    server, client, relay, tcp, _ = start(
        tool, echo_server.port, lambda addr: RebindingRelay(addr, SWITCH_EVERY))
    try:
        with connect("127.0.0.1", tcp, timeout=120) as sock:
            sock.settimeout(120)
            echo_roundtrip(sock, TOTAL)
        assert len(relay.ports) >= 4  # three rebinds happened during the transfer
        # The server followed: its (rate-limited) line names the first move, to the new port.
        assert re.search(rf"peer address changed \S+:{relay.ports[0]}\S* -> \S+:{relay.ports[1]}",
                         server.log().replace("('127.0.0.1', ", "127.0.0.1:")), server.log()
    finally:
        relay.close()


def test_unauthenticated_packets_from_a_new_address_change_nothing(tool, echo_server):
    server, client, relay, tcp, udp = start(
        tool, echo_server.port, lambda addr: RebindingRelay(addr, 1 << 62))  # never rebinds
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind(("127.0.0.1", 0))
    attacker.setblocking(False)
    rng = random.Random(5)
    try:
        with connect("127.0.0.1", tcp, timeout=60) as sock:
            sock.settimeout(60)
            stream = Streamer(sock)  # a live conversation, its packets captured by the relay
            while len(relay.captured) < 256:
                time.sleep(0.05)
            conv = relay.captured[-1][1:5]
            sent = 0
            deadline = time.monotonic() + 10
            for data in relay.captured * 4:  # replays of real packets, from a new address
                attacker.sendto(data, ("127.0.0.1", udp))
                forged = bytearray(data)
                forged[9:] = rng.randbytes(len(forged) - 9)  # a valid header, a forged body
                attacker.sendto(bytes(forged), ("127.0.0.1", udp))
                # ... and a sealed-looking DATA packet far ahead in sequence
                head = struct.pack(">B4sI", 3, conv, 1 << 30)
                attacker.sendto(head + rng.randbytes(64), ("127.0.0.1", udp))
                sent += 3
                assert time.monotonic() < deadline
            time.sleep(0.5)
            stream.finish()  # the conversation went on, on its own path, intact
            assert stream.received > 0
        time.sleep(0.5)  # anything the server would send back has arrived by now
        back = 0
        while select.select([attacker], [], [], 0)[0]:
            back += len(attacker.recv(MAX_UDP))
        assert sent > 0 and back == 0
        attacker_port = attacker.getsockname()[1]
        assert f"{attacker_port}" not in server.log()  # no move (or challenge) towards it
        assert "peer address changed" not in server.log()
    finally:
        attacker.close()
        relay.close()
