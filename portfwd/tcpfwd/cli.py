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
  --metrics <addr:port>  serve Prometheus metrics at http://addr:port/metrics (off by default)
  --log-format <format>  text (default) or json: one JSON object per log line
  -h --help          show help

Environment:
  PORTFWD_NO_SPLICE=1  relay through userspace copies instead of Linux splice()
"""

from __future__ import annotations

import socket
import sys

from portfwd.runtime import daemon
from portfwd.tcpfwd.config import tcpfwd_config
from portfwd.tcpfwd.forwarder import TcpForwarder
from portfwd.tcpfwd.metrics import KIND

PROG = "tcpfwd"
# field -> docopt key (also the label in error messages)
FIELDS = {"listen": "<local_addr:local_port>", "dest": "<dest_addr:dest_port>",
          "daemonize": "-d", "pidfile": "-p", "base_addr": "-b", "reuseaddr": "-r",
          "reuseport": "-R", "v6only": "--v6only", "connect_timeout": "--connect-timeout",
          "metrics": "--metrics", "log_format": "--log-format"}


def main(argv: list[str] | None = None) -> int:
    return daemon.one_rule_main(PROG, __doc__, argv, FIELDS, tcpfwd_config, socket.SOCK_STREAM,
                                TcpForwarder, KIND)


if __name__ == "__main__":
    sys.exit(main())
