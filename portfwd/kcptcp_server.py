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

from portfwd import cli, daemon, tunnelcli
from portfwd.sockets import bind_socket
from portfwd.tunnel_server import TunnelServer

__doc__ = __doc__.replace("{{OPTIONS}}", tunnelcli.OPTIONS)
PROG = "kcptcp-server"


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(PROG, __doc__, argv)
    config = tunnelcli.conversation_config(PROG, args)
    udp_buffer = tunnelcli.udp_buffer_size(PROG, args)
    stats = cli.int_option(PROG, args, "--stats-interval", 0, 86400)
    listen = cli.address_arg(PROG, args["<local_udp_addr:port>"], socket.SOCK_DGRAM,
                             passive=True)
    target = cli.address_arg(PROG, args["<target_tcp_addr:port>"], socket.SOCK_STREAM,
                             passive=False)
    try:
        udp = bind_socket(listen, socket.SOCK_DGRAM, tunnelcli.listen_options(args, udp_buffer))
    except OSError as exc:
        cli.fail(PROG, f"cannot listen on {listen}: {exc.strerror or exc}", cli.EXIT_RUNTIME)
    server = TunnelServer(config, udp, target, stats)
    return daemon.run(PROG, server, daemonize=args["-d"], pidfile=args["-p"])


if __name__ == "__main__":
    sys.exit(main())
