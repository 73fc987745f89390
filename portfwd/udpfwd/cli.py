"""udpfwd: UDP port forwarding with a per-client session table.

Usage:
  udpfwd <local_addr:local_port> <dest_addr:dest_port> [options]
         [--allow <cidr>]... [--deny <cidr>]...
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
  --sockbuf <bytes>        SO_RCVBUF/SO_SNDBUF of every socket (default: 262144, the
                           listener 4194304, beyond net.core.rmem_max when root)
  --log-file <path>        append log lines to this file (reopened on SIGUSR2)
  --metrics <addr:port>    serve Prometheus metrics at http://addr:port/metrics (off by default)
  --log-format <format>    text (default) or json: one JSON object per log line
  --log-level <level>      error, warning, info (default) or debug; wins over
                           PORTFWD_LOGLEVEL
  --allow <cidr>           only clients in this network (repeatable; IPv4 or IPv6)
  --deny <cidr>            never clients in this network (repeatable; wins over --allow);
                           a refused client's datagrams are dropped before a session exists
  -w <n>                   worker processes, 0 = one per CPU (default: 1); a client's
                           datagrams always reach the same worker (SO_REUSEPORT)

Sessions: each client address gets its own upstream socket, closed after -t seconds without
a datagram either way (-t 0: never) or when evicted at --max-sessions. -H is the seed's hash
table size; this implementation sizes itself and takes it as a hint only.

Environment:
  PORTFWD_NO_GSO=1   one send per datagram instead of coalescing runs with Linux UDP GSO
  PORTFWD_LOGLEVEL=n numeric level of the log (10 = DEBUG, 30 = warnings only)
"""

from __future__ import annotations

import socket
import sys

from portfwd.runtime import daemon
from portfwd.udpfwd.config import udpfwd_config
from portfwd.udpfwd.forwarder import UdpForwarder
from portfwd.udpfwd.metrics import KIND

PROG = "udpfwd"
# field -> docopt key (also the label in error messages)
FIELDS = {"listen": "<local_addr:local_port>", "dest": "<dest_addr:dest_port>",
          "timeout": "-t", "daemonize": "-d", "v6only": "-o", "reuseaddr": "-r",
          "reuseport": "-R", "table_hint": "-H", "pidfile": "-p",
          "max_sessions": "--max-sessions", "stats_interval": "--stats-interval",
          "sockbuf": "--sockbuf", "log_file": "--log-file", "metrics": "--metrics",
          "log_format": "--log-format",
          "log_level": "--log-level", "allow": "--allow", "deny": "--deny",
          "workers": "-w"}


def main(argv: list[str] | None = None) -> int:
    return daemon.one_rule_main(PROG, __doc__, argv, FIELDS, udpfwd_config, socket.SOCK_DGRAM,
                                UdpForwarder, KIND)


if __name__ == "__main__":
    sys.exit(main())
