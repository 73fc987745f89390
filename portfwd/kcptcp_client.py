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

from portfwd import cli, daemon, tunnelcli
from portfwd.sockets import bind_socket
from portfwd.tunnel_client import TunnelClient

__doc__ = __doc__.replace("{{OPTIONS}}", tunnelcli.OPTIONS)
PROG = "kcptcp-client"


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(PROG, __doc__, argv)
    config = tunnelcli.conversation_config(PROG, args)
    udp_buffer = tunnelcli.udp_buffer_size(PROG, args)
    stats = cli.int_option(PROG, args, "--stats-interval", 0, 86400)
    listen = cli.address_arg(PROG, args["<local_tcp_addr:port>"], socket.SOCK_STREAM,
                             passive=True)
    remote = cli.address_arg(PROG, args["<remote_udp_addr:port>"], socket.SOCK_DGRAM,
                             passive=False)
    try:
        listener = bind_socket(listen, socket.SOCK_STREAM, tunnelcli.listen_options(args))
    except OSError as exc:
        cli.fail(PROG, f"cannot listen on {listen}: {exc.strerror or exc}", cli.EXIT_RUNTIME)
    client = TunnelClient(config, listener, remote, udp_buffer, stats)
    return daemon.run(PROG, client, daemonize=args["-d"], pidfile=args["-p"])


if __name__ == "__main__":
    sys.exit(main())
