"""The command lines of kcptcp-client and kcptcp-server: usage texts and entry points."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from portfwd.kcptcp.client import TunnelClient
from portfwd.kcptcp.config import UDP_BUFFER, client_config, server_config
from portfwd.kcptcp.server import TunnelServer
from portfwd.runtime import daemon
from portfwd.tunnel.config import REKEY_SEQ_THRESHOLD, REKEY_TIMEOUT_MS

# The options both tools share, in each tool's docopt usage text (the seed's list, then ours).
OPTIONS = f"""Options:
  -d                    run in background (daemonize)
  -p <pidfile>          write PID to file
  -r                    set SO_REUSEADDR on listener socket
  -R                    set SO_REUSEPORT on listener socket
  -6 --v6only           for IPv6 listener, set IPV6_V6ONLY
  -S <bytes>            SO_RCVBUF/SO_SNDBUF size [default: {UDP_BUFFER}]
  -M <mtu>              KCP MTU (default 1350; tune to avoid IP fragmentation) [default: 1350]
  -K <hex>              32-byte PSK in hex (ChaCha20-Poly1305); enables encryption
  --interval <ms>       KCP flush interval [default: 10]
  --resend <n>          KCP fast retransmit after n skipping acks, 0 = off [default: 2]
  --nc <0|1>            1 = no KCP congestion control [default: 1]
  --sndwnd <segments>   KCP send window [default: 1024]
  --rcvwnd <segments>   KCP receive window [default: 1024]
  --keepalive <s>       close a conversation after s seconds without a packet [default: 30]
  --stats-interval <s>  seconds between stats lines, 0 = off [default: 60]
  --connect-timeout <s> (server) seconds to wait for the target to answer a dial
                        [default: 10]
  --max-sessions <n>    (server) conversations at once; at the cap the least recently
                        active one idle for 2 s is evicted, else new ones are refused
                        [default: 4096]
  --max-pending <n>     (server) conversations whose client has not yet sent an
                        authenticated packet; beyond, HELLOs are ignored [default: 256]
  --allow <cidr>        only clients (client: TCP peers; server: UDP sources) in this
                        network (repeatable; IPv4 or IPv6)
  --deny <cidr>         never clients in this network (repeatable; wins over --allow)
  --max-conns <n>       client: connections at once, beyond them new ones are closed at
                        once; server: conversations at once, beyond them HELLOs are
                        ignored (nothing evicted); 0 = no limit [default: 0]
  --accept-proxy        (client) every client starts with a PROXY protocol header (v1 or
                        v2, 5 s to send it): its address is the client's
  --proxy-from <cidr>   (client) with --accept-proxy: only these peers may send one
                        (repeatable; default: any)
  --proxy-protocol <v>  (server) send a PROXY protocol header, v1 or v2, with the client's
                        address (carried in the tunnel) to the target first
  -h --help             show help

Environment:
  PORTFWD_REKEY_SEQ_THRESHOLD  send_seq that starts a rekey [default: {REKEY_SEQ_THRESHOLD:#x}]
  PORTFWD_REKEY_TIMEOUT_MS     ms without REKEY_ACK before closing [default: {REKEY_TIMEOUT_MS}]
"""


# field -> docopt key (also the label in error messages), for both tools
FIELDS = {"daemonize": "-d", "pidfile": "-p", "reuseaddr": "-r", "reuseport": "-R",
          "v6only": "--v6only", "sockbuf": "-S", "mtu": "-M", "psk": "-K",
          "interval": "--interval", "resend": "--resend", "nc": "--nc", "sndwnd": "--sndwnd",
          "rcvwnd": "--rcvwnd", "keepalive": "--keepalive", "stats_interval": "--stats-interval",
          "connect_timeout": "--connect-timeout", "max_sessions": "--max-sessions",
          "max_pending": "--max-pending", "allow": "--allow", "deny": "--deny",
          "max_conns": "--max-conns", "accept_proxy": "--accept-proxy",
          "proxy_from": "--proxy-from", "proxy_protocol": "--proxy-protocol"}
CLIENT_FIELDS = {**FIELDS, "listen": "<local_tcp_addr:port>", "remote": "<remote_udp_addr:port>"}
SERVER_FIELDS = {**FIELDS, "listen": "<local_udp_addr:port>", "target": "<target_tcp_addr:port>"}

CLIENT_USAGE = """kcptcp-client: TCP over KCP/UDP client.

Usage:
  kcptcp-client [options] [--allow <cidr>]... [--deny <cidr>]... [--proxy-from <cidr>]...
                <local_tcp_addr:port> <remote_udp_addr:port>
  kcptcp-client -h | --help

Listens on a local TCP address and carries each connection as one KCP conversation over UDP
to a kcptcp-server. AEAD encryption is enabled only when -K is given on both client and server.

{{OPTIONS}}""".replace("{{OPTIONS}}", OPTIONS)

SERVER_USAGE = """kcptcp-server: KCP/UDP to TCP server.

Usage:
  kcptcp-server [options] [--allow <cidr>]... [--deny <cidr>]...
                <local_udp_addr:port> <target_tcp_addr:port>
  kcptcp-server -h | --help

Listens on a UDP address, accepts KCP sessions from kcptcp-client and bridges each to the
target TCP service. AEAD requires the same -K PSK as the client for handshakes to succeed.

{{OPTIONS}}""".replace("{{OPTIONS}}", OPTIONS)
CLIENT_PROG = "kcptcp-client"
SERVER_PROG = "kcptcp-server"


def client_main(argv: list[str] | None = None) -> int:
    return daemon.one_rule_main(CLIENT_PROG, CLIENT_USAGE, argv, CLIENT_FIELDS, client_config,
                                socket.SOCK_STREAM, guarded(TunnelClient))


def server_main(argv: list[str] | None = None) -> int:
    # The UDP socket's buffers are sized at bind time (listen_options.bufsize = -S).
    return daemon.one_rule_main(SERVER_PROG, SERVER_USAGE, argv, SERVER_FIELDS, server_config,
                                socket.SOCK_DGRAM, guarded(TunnelServer))


def guarded(service: Callable[[Any, socket.socket], daemon.Service]
            ) -> Callable[[Any, socket.socket], daemon.Service]:
    """``service``, built only after the process stopped being dumpable if a key is loaded."""
    def build(config: Any, sock: socket.socket) -> daemon.Service:
        if config.conversation.tunnel.psk is not None:
            daemon.disable_core_dumps()
        return service(config, sock)

    return build
