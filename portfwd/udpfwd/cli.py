"""udpfwd: UDP port forwarding with a per-client session table.

Usage:
  udpfwd <local_addr:local_port> <dest_addr:dest_port> [options]
  udpfwd -h | --help

Options:
  -t <seconds>       proxy session timeout (default: 60)
  -d                 run in background (daemonize)
  -o                 for IPv6 listener, set IPV6_V6ONLY
  -r                 set SO_REUSEADDR before binding listener
  -R                 set SO_REUSEPORT before binding listener
  -H <size>          hash table size for UDP connection tracking (default: 4093)
  -p <pidfile>       write PID to file
  -h --help          show help
  --max-sessions <n>       sessions kept; beyond, the least recently active one is evicted
                           (default: 8192)
  --stats-interval <s>     seconds between status lines, 0 = none (default: 60)
  --sockbuf <bytes>        SO_RCVBUF/SO_SNDBUF of every socket (default: 262144)

Sessions: each client address gets its own upstream socket, closed after -t seconds without
a datagram either way (-t 0: never) or when evicted at --max-sessions. -H is the seed's hash
table size; this implementation sizes itself and takes it as a hint only.

Environment:
  PORTFWD_NO_GSO=1   one send per datagram instead of coalescing runs with Linux UDP GSO
"""

from __future__ import annotations

import socket
import sys

from portfwd.runtime import daemon
from portfwd.runtime import options as cli
from portfwd.runtime.sockets import SOCKBUF_CAP, ListenOptions, bind_socket
from portfwd.udpfwd.forwarder import (
    DEFAULT_STATS_INTERVAL,
    DEFAULT_TABLE_HINT,
    UdpConfig,
    UdpForwarder,
    use_gso,
)
from portfwd.udpfwd.table import DEFAULT_MAX_SESSIONS

PROG = "udpfwd"
DEFAULT_TIMEOUT = 60  # s; seed "-t <seconds> proxy session timeout (default: 60)"
MAX_TIMEOUT = 30 * 86400  # s; longer is a typo, not a wish
MAX_SESSIONS = 1 << 20  # sessions; each holds an fd, so the fd limit binds long before this
MIN_SOCKBUF = 4096  # bytes
MAX_SOCKBUF = 1 << 28  # bytes; the kernel clamps to net.core.[rw]mem_max anyway


def main(argv: list[str] | None = None) -> int:
    args = cli.parse_args(PROG, __doc__, argv)
    timeout = cli.int_option(PROG, args, "-t", 0, MAX_TIMEOUT, DEFAULT_TIMEOUT)
    table_hint = cli.int_option(PROG, args, "-H", 1, MAX_SESSIONS, DEFAULT_TABLE_HINT)
    max_sessions = cli.int_option(PROG, args, "--max-sessions", 1, MAX_SESSIONS,
                                  DEFAULT_MAX_SESSIONS)
    stats_interval = cli.int_option(PROG, args, "--stats-interval", 0, None,
                                    int(DEFAULT_STATS_INTERVAL))
    sockbuf = cli.int_option(PROG, args, "--sockbuf", MIN_SOCKBUF, MAX_SOCKBUF, SOCKBUF_CAP)
    listen = cli.address_arg(PROG, args["<local_addr:local_port>"], socket.SOCK_DGRAM,
                             passive=True)
    dest = cli.address_arg(PROG, args["<dest_addr:dest_port>"], socket.SOCK_DGRAM,
                           passive=False)
    options = ListenOptions(reuseaddr=args["-r"], reuseport=args["-R"], v6only=args["-o"],
                            bufsize=sockbuf)
    try:
        listener = bind_socket(listen, socket.SOCK_DGRAM, options)
    except OSError as exc:
        cli.fail(PROG, f"cannot listen on {listen}: {exc.strerror or exc}", cli.EXIT_RUNTIME)
    config = UdpConfig(dest=dest, idle_timeout=float(timeout), max_sessions=max_sessions,
                       stats_interval=float(stats_interval), sockbuf=sockbuf,
                       table_hint=table_hint, gso=use_gso())
    return daemon.run(PROG, UdpForwarder(config, listener), daemonize=args["-d"],
                      pidfile=args["-p"])


if __name__ == "__main__":
    sys.exit(main())
