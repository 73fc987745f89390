"""tcpfwd: TCP port forwarding.

Usage:
  tcpfwd [options] [--allow <cidr>]... [--deny <cidr>]... [--proxy-from <cidr>]...
         <local_addr:local_port> <dest_addr:dest_port>...
  tcpfwd -h | --help

Several destinations are tried in --balance order; one that fails --max-fails times in a row
is skipped for --fail-timeout seconds. A name is re-resolved in the background (at most every
30 s); its addresses are tried with Happy Eyeballs (IPv6 first, the next after 250 ms).

Options:
  -d                 run in background (daemonize)
  -p <pidfile>       write PID to file
  --log-file <path>  append log lines to this file (reopened on SIGUSR2)
  -b                 base-addr mode (Linux TPROXY/original-dst based address math; expert use only)
  -r                 set SO_REUSEADDR on listener socket
  -R                 set SO_REUSEPORT on listener socket
  -6 --v6only        for IPv6 listener, set IPV6_V6ONLY
  --connect-timeout <s>  seconds to wait for the destination to answer [default: 10]
  --balance <mode>       first (the first destination that answers) or roundrobin
                         [default: first]
  --max-fails <n>        failed connects in a row that put a destination down [default: 1]
  --fail-timeout <s>     seconds a down destination is skipped [default: 10]
  --allow <cidr>         only clients in this network (repeatable; IPv4 or IPv6)
  --deny <cidr>          never clients in this network (repeatable; wins over --allow)
  --max-conns <n>        connections at once; beyond, new ones are closed at once, 0 = no
                         limit [default: 0]
  --accept-proxy         every client starts with a PROXY protocol header (v1 or v2, 5 s to
                         send it): its address is the client's
  --proxy-from <cidr>    with --accept-proxy: only these peers may send one (repeatable;
                         default: any)
  --proxy-protocol <v>   send a PROXY protocol header, v1 or v2, to the destination first
  --idle-timeout <s>     close a relay with no byte either way for s seconds, 0 = never
                         [default: 0]
  --half-close-timeout <s>  once one direction has ended, close the relay s seconds later,
                         0 = never [default: 60]
  --stats-interval <s>   seconds between stats lines (INFO; the lines per connection
                         are DEBUG), 0 = off [default: 60]
  --metrics <addr:port>  serve Prometheus metrics at http://addr:port/metrics (off by default)
  --log-format <format>  text (default) or json: one JSON object per log line
  -w <n>                 worker processes, each accepting on its own SO_REUSEPORT socket
                         of the listener, 0 = one per CPU [default: 1]
  --log-level <level>    error, warning, info (default) or debug; wins over
                         PORTFWD_LOGLEVEL
  -h --help          show help

The listener always sets SO_REUSEADDR (a restart never waits for TIME_WAIT); -r is accepted.

Environment:
  PORTFWD_NO_SPLICE=1  relay through userspace copies instead of Linux splice()
  PORTFWD_LOGLEVEL=n   numeric level of the log (10 = DEBUG: a line per connection,
                       30 = warnings only)
  PORTFWD_SHARED_LISTENER=1  -w workers accept from one shared listener instead of a
                       SO_REUSEPORT socket each (to compare them: bench/bench_workers.py)
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
          "balance": "--balance", "max_fails": "--max-fails", "fail_timeout": "--fail-timeout",
          "allow": "--allow", "deny": "--deny", "max_conns": "--max-conns",
          "accept_proxy": "--accept-proxy", "proxy_from": "--proxy-from",
          "proxy_protocol": "--proxy-protocol", "idle_timeout": "--idle-timeout",
          "half_close_timeout": "--half-close-timeout", "stats_interval": "--stats-interval",
          "log_file": "--log-file", "metrics": "--metrics", "log_format": "--log-format",
          "log_level": "--log-level", "workers": "-w"}


def main(argv: list[str] | None = None) -> int:
    return daemon.one_rule_main(PROG, __doc__, argv, FIELDS, tcpfwd_config, socket.SOCK_STREAM,
                                TcpForwarder, KIND)


if __name__ == "__main__":
    sys.exit(main())
