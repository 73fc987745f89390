"""tcpfwd: TCP port forwarding.

Usage:
  tcpfwd [options] <local_addr:local_port> <dest_addr:dest_port>
  tcpfwd -h | --help

Options:
  -d                 run in background (daemonize)
  -p <pidfile>       write PID to file
  --log-file <path>  append log lines to this file (reopened on SIGUSR2)
  -b                 base-addr mode (Linux TPROXY/original-dst based address math; expert use only)
  -r                 set SO_REUSEADDR on listener socket
  -R                 set SO_REUSEPORT on listener socket
  -6 --v6only        for IPv6 listener, set IPV6_V6ONLY
  --connect-timeout <s>  seconds to wait for the destination to answer [default: 10]
  -h --help          show help

The listener always sets SO_REUSEADDR (a restart never waits for TIME_WAIT); -r is accepted.

Environment:
  PORTFWD_NO_SPLICE=1  relay through userspace copies instead of Linux splice()
  PORTFWD_LOGLEVEL=n   numeric level of the log (10 = DEBUG, 30 = warnings only)
"""

from __future__ import annotations

import socket
import sys

from portfwd.runtime import daemon
from portfwd.tcpfwd.config import tcpfwd_config
from portfwd.tcpfwd.forwarder import TcpForwarder

PROG = "tcpfwd"
# field -> docopt key (also the label in error messages)
FIELDS = {"listen": "<local_addr:local_port>", "dest": "<dest_addr:dest_port>",
          "daemonize": "-d", "pidfile": "-p", "base_addr": "-b", "reuseaddr": "-r",
          "reuseport": "-R", "v6only": "--v6only", "connect_timeout": "--connect-timeout",
          "log_file": "--log-file"}


def main(argv: list[str] | None = None) -> int:
    return daemon.one_rule_main(PROG, __doc__, argv, FIELDS, tcpfwd_config, socket.SOCK_STREAM,
                                TcpForwarder)


if __name__ == "__main__":
    sys.exit(main())
