"""kcptcp-server: KCP/UDP to TCP server.

Usage:
  kcptcp-server [options] <local_udp_addr:port> <target_tcp_addr:port>
  kcptcp-server -h | --help

Listens on a UDP address, accepts KCP sessions from kcptcp-client and bridges each to the
target TCP service. AEAD requires the same -K PSK as the client for handshakes to succeed.

{{OPTIONS}}"""

from __future__ import annotations

import socket
import sys

from portfwd import cli, tunnelcli
from portfwd.addr import Resolved
from portfwd.conversation import ConversationConfig
from portfwd.tunnel_server import ServerLimits, TunnelServer

__doc__ = __doc__.replace("{{OPTIONS}}", tunnelcli.OPTIONS)
PROG = "kcptcp-server"


def main(argv: list[str] | None = None) -> int:
    return tunnelcli.tunnel_main(PROG, __doc__, argv, ("<local_udp_addr:port>", socket.SOCK_DGRAM),
                                 ("<target_tcp_addr:port>", socket.SOCK_STREAM),
                                 build)


def build(config: ConversationConfig, udp_sock: socket.socket, target: Resolved,
          udp_buffer: int, stats_interval: int, args: dict) -> TunnelServer:
    """The UDP socket's buffers were sized at bind time; the rest goes to the service."""
    limits = ServerLimits(
        connect_timeout=cli.int_option(PROG, args, "--connect-timeout", 1, 3600),
        max_sessions=cli.int_option(PROG, args, "--max-sessions", 1, 1 << 20),
        max_pending=cli.int_option(PROG, args, "--max-pending", 1, 1 << 20),
    )
    return TunnelServer(config, udp_sock, target, stats_interval, limits)


if __name__ == "__main__":
    sys.exit(main())
