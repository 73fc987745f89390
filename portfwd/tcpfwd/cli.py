"""tcpfwd: TCP port forwarding.

Usage:
  tcpfwd [options] <local_addr:local_port> <dest_addr:dest_port>
  tcpfwd -h | --help

Options:
  -d                 run in background (daemonize)
  -p <pidfile>       write PID to file
  -b                 base-addr mode (Linux TPROXY/original-dst based address math; expert use only)
  -r                 set SO_REUSEADDR on listener socket
  -R                 set SO_REUSEPORT on listener socket
  -6 --v6only        for IPv6 listener, set IPV6_V6ONLY
  --connect-timeout <s>  seconds to wait for the destination to answer [default: 10]
  -h --help          show help

Environment:
  PORTFWD_NO_SPLICE=1  relay through userspace copies instead of Linux splice()
"""

from __future__ import annotations

import socket
import sys

from portfwd.runtime import daemon
from portfwd.runtime import options as cli
from portfwd.runtime.sockets import ListenOptions, bind_socket
from portfwd.tcpfwd.forwarder import TcpConfig, TcpForwarder
from portfwd.tcpfwd.pump import use_splice

PROG = "tcpfwd"


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(PROG, __doc__, argv)
    listen = cli.address_arg(PROG, args["<local_addr:local_port>"], socket.SOCK_STREAM,
                             passive=True)
    dest = cli.address_arg(PROG, args["<dest_addr:dest_port>"], socket.SOCK_STREAM,
                           passive=False)
    connect_timeout = cli.int_option(PROG, args, "--connect-timeout", 1, 3600)
    options = ListenOptions(reuseaddr=args["-r"], reuseport=args["-R"], v6only=args["--v6only"])
    try:
        listener = bind_socket(listen, socket.SOCK_STREAM, options)
    except OSError as exc:
        cli.fail(PROG, f"cannot listen on {listen}: {exc.strerror or exc}", cli.EXIT_RUNTIME)
    config = TcpConfig(dest=dest, listen_port=listener.getsockname()[1], base_addr=args["-b"],
                       splice=use_splice(), connect_timeout=connect_timeout)
    return daemon.run(PROG, TcpForwarder(config, listener), daemonize=args["-d"],
                      pidfile=args["-p"])


if __name__ == "__main__":
    sys.exit(main())
