"""The command lines of kcptcp-client and kcptcp-server: usage texts and entry points."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from typing import Any

from portfwd.kcptcp.client import TunnelClient
from portfwd.kcptcp.config import UDP_BUFFER, client_config, server_config
from portfwd.kcptcp.metrics import CLIENT_KIND, SERVER_KIND
from portfwd.kcptcp.server import TunnelServer
from portfwd.runtime import daemon, prefork
from portfwd.runtime.options import EXIT_USAGE, report
from portfwd.tunnel.config import REKEY_SEQ_THRESHOLD, REKEY_TIMEOUT_MS
from portfwd.tunnel.wire import PREFIX_SIZE

# The options both tools share, in each tool's docopt usage text (the seed's list, then ours).
OPTIONS = f"""Options:
  -d                    run in background (daemonize)
  -p <pidfile>          write PID to file
  --log-file <path>     append log lines to this file (reopened on SIGUSR2)
  -r                    set SO_REUSEADDR on listener socket
  -R                    set SO_REUSEPORT on listener socket
  -6 --v6only           for IPv6 listener, set IPV6_V6ONLY
  -S <bytes>            SO_RCVBUF/SO_SNDBUF size [default: {UDP_BUFFER}]
  -M <mtu>              KCP MTU (default 1350; tune to avoid IP fragmentation)
  -K <hex>              32-byte PSK in hex (ChaCha20-Poly1305); enables encryption
  --psk-file <path>     read the PSK (64 hex digits) from a file that only its owner
                        may read (mode 0600); instead of -K
  --interval <ms>       KCP flush interval [default: 10]
  --resend <n>          KCP fast retransmit after n skipping acks, 0 = off [default: 2]
  --nc <0|1>            1 = no KCP congestion control [default: 1]
  --fec <spec>          forward error correction on what this end sends: <data>:<parity>
                        (Reed-Solomon parity shards per group of datagrams, e.g. 10:3),
                        auto (parity follows the loss the peer reports, none on a clean
                        link), or off; either end decodes whatever it receives [default: off]
  --pacing              send at the rate the path delivers (measured from the peer's
                        acks, as BBR) with at most twice its bandwidth x delay in flight,
                        so a large --sndwnd neither overruns a router's queue nor stalls
  --sndwnd <segments>   KCP send window [default: 1024]
  --rcvwnd <segments>   KCP receive window [default: 1024]
  --keepalive <s>       close a conversation after s seconds without a packet [default: 30]
  --stats-interval <s>  seconds between stats lines, 0 = off [default: 60]
  --metrics <addr:port> serve Prometheus metrics at http://addr:port/metrics (off by default)
  --log-format <format> text (default) or json: one JSON object per log line
  --log-level <level>   error, warning, info (default) or debug; wins over
                        PORTFWD_LOGLEVEL
  --allow <cidr>        only clients (client: TCP peers; server: UDP sources) in this
                        network (repeatable; IPv4 or IPv6)
  --deny <cidr>         never clients in this network (repeatable; wins over --allow)
  --max-conns <n>       client: connections at once, beyond them new ones are closed at
                        once; server: conversations at once, beyond them HELLOs are
                        refused (nothing evicted; the client resets its connection at
                        once); 0 = no limit [default: 0]
  --idle-timeout <s>    close a connection (and its conversation) with no byte either way
                        for s seconds, 0 = never [default: 0]
  --half-close-timeout <s>
                        once one direction has ended, close the connection s seconds
                        later, 0 = never [default: 60]
  -w <n>                worker processes, each on its own SO_REUSEPORT socket of the
                        listener (servers: a conversation stays in one worker), 0 = one
                        per CPU [default: 1]
"""
# Last in every options list: docopt gives an option the "[default: ...]" of the lines after
# it, up to the next option, so the environment's defaults must follow a flag without a value.
HELP = """  -h --help             show help
"""

# kcptcp-server's own options, after the shared ones in its usage text only (the client
# rejects them: docopt knows only the options its usage text lists).
SERVER_OPTIONS = """  --connect-timeout <s>
                        seconds to wait for the target to answer a dial [default: 10]
  --max-sessions <n>    conversations at once; at the cap the least recently active one
                        idle for 2 s is evicted, else new ones are refused [default: 4096]
  --max-pending <n>     conversations whose client has not yet sent an authenticated
                        packet; beyond, HELLOs are ignored [default: 256]
  --proxy-protocol <v>  send a PROXY protocol header, v1 or v2, with the client's address
                        (carried in the tunnel) to the target first
  --balance <mode>      several targets: first (the first that answers) or roundrobin
                        [default: first]
  --max-fails <n>       failed connects in a row that put a target down [default: 1]
  --fail-timeout <s>    seconds a down target is skipped [default: 10]
"""

# kcptcp-client's own options, likewise.
CLIENT_OPTIONS = """\
  --accept-proxy        every client starts with a PROXY protocol header (v1 or v2, 5 s to
                        send it): its address is the client's
  --proxy-from <cidr>   with --accept-proxy: only these peers may send one (repeatable;
                        default: any)
"""

ENVIRONMENT = f"""
Environment:
  PORTFWD_PSK                  the key as 64 hex digits, instead of -K (not shown by ps)
  PORTFWD_LOGLEVEL             numeric level of the log (10 = DEBUG, 30 = warnings only)
  PORTFWD_REKEY_SEQ_THRESHOLD  send_seq that starts a rekey [default: {REKEY_SEQ_THRESHOLD:#x}]
  PORTFWD_REKEY_TIMEOUT_MS     ms without REKEY_ACK before closing [default: {REKEY_TIMEOUT_MS}]
"""


# field -> docopt key (also the label in error messages), for both tools
FIELDS = {"daemonize": "-d", "pidfile": "-p", "reuseaddr": "-r", "reuseport": "-R",
          "v6only": "--v6only", "sockbuf": "-S", "mtu": "-M", "psk": "-K",
          "psk_file": "--psk-file",
          "interval": "--interval", "resend": "--resend", "nc": "--nc", "fec": "--fec",
          "pacing": "--pacing",
          "sndwnd": "--sndwnd", "rcvwnd": "--rcvwnd", "keepalive": "--keepalive",
          "stats_interval": "--stats-interval",
          "log_file": "--log-file", "metrics": "--metrics", "log_format": "--log-format",
          "log_level": "--log-level",
          "allow": "--allow", "deny": "--deny", "max_conns": "--max-conns",
          "idle_timeout": "--idle-timeout", "half_close_timeout": "--half-close-timeout",
          "workers": "-w"}
CLIENT_FIELDS = {**FIELDS, "listen": "<local_tcp_addr:port>", "remote": "<remote_udp_addr:port>",
                 "accept_proxy": "--accept-proxy", "proxy_from": "--proxy-from"}
SERVER_FIELDS = {**FIELDS, "listen": "<local_udp_addr:port>", "target": "<target_tcp_addr:port>",
                 "connect_timeout": "--connect-timeout", "max_sessions": "--max-sessions",
                 "max_pending": "--max-pending", "proxy_protocol": "--proxy-protocol",
                 "balance": "--balance", "max_fails": "--max-fails",
                 "fail_timeout": "--fail-timeout"}

CLIENT_USAGE = """kcptcp-client: TCP over KCP/UDP client.

Usage:
  kcptcp-client [options] [--allow <cidr>]... [--deny <cidr>]... [--proxy-from <cidr>]...
                <local_tcp_addr:port> <remote_udp_addr:port>
  kcptcp-client -h | --help

Listens on a local TCP address and carries each connection as one KCP conversation over UDP
to a kcptcp-server. AEAD encryption is enabled only when -K is given on both client and server.
The TCP listener always sets SO_REUSEADDR; -r is accepted.

{{OPTIONS}}""".replace("{{OPTIONS}}", OPTIONS + CLIENT_OPTIONS + HELP + ENVIRONMENT)

SERVER_USAGE = """kcptcp-server: KCP/UDP to TCP server.

Usage:
  kcptcp-server [options] [--allow <cidr>]... [--deny <cidr>]...
                <local_udp_addr:port> <target_tcp_addr:port>...
  kcptcp-server -h | --help

Listens on a UDP address, accepts KCP sessions from kcptcp-client and bridges each to the
target TCP service. AEAD requires the same -K PSK as the client for handshakes to succeed.
Several targets are tried in --balance order; one that fails --max-fails times in a row is
skipped for --fail-timeout seconds (tcpfwd's rules, names re-resolved and Happy Eyeballs too).

{{OPTIONS}}""".replace("{{OPTIONS}}", OPTIONS + SERVER_OPTIONS + HELP + ENVIRONMENT)
CLIENT_PROG = "kcptcp-client"
SERVER_ONLY = [key for key in SERVER_FIELDS.values()
               if key.startswith("-") and key not in FIELDS.values()]
SERVER_PROG = "kcptcp-server"


def client_main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    misplaced = [arg.split("=")[0] for arg in args if arg.split("=")[0] in SERVER_ONLY]
    if misplaced:
        report(CLIENT_PROG, f"{misplaced[0]} is a kcptcp-server option")
        return EXIT_USAGE
    return daemon.one_rule_main(CLIENT_PROG, CLIENT_USAGE, argv, CLIENT_FIELDS, client_config,
                                socket.SOCK_STREAM, guarded(TunnelClient), CLIENT_KIND)


def server_main(argv: list[str] | None = None) -> int:
    # The UDP socket's buffers are sized at bind time (listen_options.bufsize = -S).
    return daemon.one_rule_main(SERVER_PROG, SERVER_USAGE, argv, SERVER_FIELDS, server_config,
                                socket.SOCK_DGRAM, guarded(TunnelServer), SERVER_KIND,
                                steer=steer_conversations)


def steer_conversations(sockets: list[socket.socket]) -> None:
    """-w: a tunnel server's workers are chosen by conversation id, not by the client's
    address (runtime/prefork.steer_by_u32): the conv follows the type byte of every packet."""
    prefork.steer_by_u32(sockets, PREFIX_SIZE - 4)


def guarded(service: Callable[[Any, socket.socket], daemon.Service]
            ) -> Callable[[Any, socket.socket], daemon.Service]:
    """``service``, built only after the process stopped being dumpable if a key is loaded."""
    def guard(config: Any) -> None:
        if config.conversation.tunnel.psk is not None:
            daemon.disable_core_dumps()

    def build(config: Any, sock: socket.socket) -> daemon.Service:
        guard(config)
        return service(config, sock)

    build.guard = guard  # type: ignore[attr-defined]  (one_rule_main's -w parent calls it)
    return build
