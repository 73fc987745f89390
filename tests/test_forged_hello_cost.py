"""kcptcp-server's receive loop: a forged HELLO costs one MAC and nothing else (#19, finding 5).

In-process (a TunnelServer on loopback): the counters and the MAC calls are what is checked,
never a time.
"""

from __future__ import annotations

import os
import socket
import time

import gevent
import gevent.socket
from test_metrics import wait_until  # lets the hub run

from portfwd.kcptcp.config import ServerConfig, ServerLimits
from portfwd.kcptcp.driver import now_ms, wall_ms
from portfwd.kcptcp.server import TunnelServer
from portfwd.runtime.addr import Resolved
from portfwd.runtime.sockets import ListenOptions, bind_socket
from portfwd.tunnel.config import TunnelConfig
from portfwd.tunnel.session import TunnelSession
from portfwd.tunnel.stream import ConversationConfig
from portfwd.tunnel.wire import pack_hello

PSK = bytes(range(32))


def loopback(port: int) -> Resolved:
    return Resolved(socket.AF_INET, ("127.0.0.1", port))


def sender(host: str) -> gevent.socket.socket:
    sock = gevent.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    return sock


def valid_hello(tunnel: TunnelConfig, conv: int) -> bytes:
    session = TunnelSession.client(tunnel, conv, ("127.0.0.1", 1), now_ms(), wall_ms())
    return session.datagrams_to_send(now_ms())[0]


def test_forged_hellos_cost_one_mac_and_never_reach_the_caps():
    tunnel = TunnelConfig(psk=PSK)
    udp = bind_socket(loopback(0), socket.SOCK_DGRAM, ListenOptions())
    server = TunnelServer(ServerConfig(
        listen=loopback(udp.getsockname()[1]), target=loopback(9), stats_interval=0,
        conversation=ConversationConfig(tunnel=tunnel), limits=ServerLimits(max_pending=1)),
        udp)
    macs = []
    checked = server.handshakes._hello_mac
    server.handshakes._hello_mac = lambda body: macs.append(1) or checked(body)
    server.start()
    dest = udp.getsockname()
    try:
        time.sleep(0.002)  # HELLOs stamped before the server started are refused
        pending, forger, late = sender("127.0.0.2"), sender("127.0.0.3"), sender("127.0.0.4")
        pending.sendto(valid_hello(tunnel, 7), dest)  # fills --max-pending 1 (never confirms)
        wait_until(lambda: server.metrics().handshakes == 1)
        forged = bytearray(pack_hello(8, wall_ms(), os.urandom(32)) + os.urandom(16))
        for n in range(50):
            forged[20] = n  # another key share each time
            forger.sendto(forged, dest)
        wait_until(lambda: server.metrics().rejected_auth == 50)
        m = server.metrics()
        # one MAC per forgery, but for the first one, whose "handshake rejected" line is logged
        # with its source (two: the receive screen's, the loop's); the valid HELLO had one (the
        # screen vouches for it to the loop's check and the acceptor's own)
        assert (m.refused_pending, m.handshakes, len(macs)) == (0, 1, 1 + 50 + 1)
        # the cap still holds for authentic HELLOs: checked after their MAC
        late.sendto(valid_hello(tunnel, 9), dest)
        wait_until(lambda: server.metrics().refused_pending == 1)
        assert server.metrics().handshakes == 1 and len(macs) == 1 + 50 + 1 + 1
    finally:
        server.stop(1)
