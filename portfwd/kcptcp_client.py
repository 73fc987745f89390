"""kcptcp-client: TCP over KCP/UDP client.

Usage:
  kcptcp-client [options] <local_tcp_addr:port> <remote_udp_addr:port>
  kcptcp-client -h | --help

Listens on a local TCP address and carries each connection as one KCP conversation over UDP
to a kcptcp-server. AEAD encryption is enabled only when -K is given on both client and server.

{{OPTIONS}}"""

from __future__ import annotations

import socket
import sys

from portfwd import tunnelcli
from portfwd.addr import Resolved
from portfwd.conversation import ConversationConfig
from portfwd.tunnel_client import TunnelClient

__doc__ = __doc__.replace("{{OPTIONS}}", tunnelcli.OPTIONS)
PROG = "kcptcp-client"


def main(argv: list[str] | None = None) -> int:
    return tunnelcli.tunnel_main(PROG, __doc__, argv, ("<local_tcp_addr:port>", socket.SOCK_STREAM),
                                 ("<remote_udp_addr:port>", socket.SOCK_DGRAM),
                                 build)


def build(config: ConversationConfig, listener: socket.socket, remote: Resolved,
          udp_buffer: int, stats_interval: int, args: dict) -> TunnelClient:
    return TunnelClient(config, listener, remote, udp_buffer, stats_interval)


if __name__ == "__main__":
    sys.exit(main())
