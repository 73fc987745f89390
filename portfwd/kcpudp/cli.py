"""The command lines of kcpudp-client and kcpudp-server: usage texts and entry points.

The options are kcptcp's (its OPTIONS text, less --connect-timeout: nothing is dialled), with
--max-sessions capping the client's table of client addresses too, plus udpfwd's -t and
--mode.
"""

from __future__ import annotations

import re
import socket

from portfwd.kcptcp import cli as kcptcp_cli
from portfwd.kcpudp.client import DatagramClient
from portfwd.kcpudp.config import client_config, server_config
from portfwd.kcpudp.metrics import CLIENT_KIND, SERVER_KIND
from portfwd.kcpudp.server import DatagramServer
from portfwd.runtime import daemon

KCPUDP_OPTIONS = """\
  -t <seconds>          close a conversation after this many seconds without a
                        datagram either way, 0 = never [default: 60]
  --mode <mode>         reliable: each datagram one KCP message (retransmitted, in
                        order); datagram: each sent once, outside the ARQ; must match
                        on both ends [default: reliable]
  --max-sessions <n>    conversations at once (client: client addresses; the least
                        recently active is closed for a new one; server: kcptcp's cap,
                        idle ones evicted after 2 s) [default: 4096]
"""


# kcpudp-server's own (in its usage text only: the client rejects it)
KCPUDP_SERVER_OPTIONS = """\
  --proxy-protocol <v>  v2: start every datagram to the target with a PROXY protocol v2
                        header (DGRAM) naming the client address the kcpudp-client saw
                        (carried in its authenticated HELLO)
"""


# kcptcp options kcpudp does not offer (yet; the timeouts are of a TCP side: kcpudp has -t)
UNUSED = ("--max-conns", "--idle-timeout", "--half-close-timeout", "--pacing")


def _entries(text: str) -> list[str]:
    """The options of a docopt options text, each with its continuation lines."""
    return re.split(r"\n(?=  -)", text.rstrip("\n"))


def _options(own: str = "") -> str:
    """kcptcp's shared options less UNUSED, kcptcp-server's --max-pending, kcpudp's own (and
    ``own``, one tool's), -h last (docopt reads the defaults after an option as its own),
    kcptcp's environment."""
    kept = [e.replace("client: TCP peers", "client: UDP peers")  # kcptcp's words
            for e in _entries(kcptcp_cli.OPTIONS) if not e.lstrip().startswith(UNUSED)]
    kept += [e for e in _entries(kcptcp_cli.SERVER_OPTIONS)
             if e.lstrip().startswith("--max-pending")]
    return ("\n".join(kept) + "\n" + KCPUDP_OPTIONS + own + kcptcp_cli.HELP
            + kcptcp_cli.ENVIRONMENT)


OPTIONS = _options()
FIELDS = {**{k: v for k, v in kcptcp_cli.FIELDS.items() if v not in UNUSED},
          "max_pending": "--max-pending", "max_sessions": "--max-sessions",
          "timeout": "-t", "mode": "--mode"}
CLIENT_FIELDS = {**FIELDS, "listen": "<local_udp_addr:port>", "remote": "<remote_udp_addr:port>"}
SERVER_FIELDS = {**FIELDS, "listen": "<local_udp_addr:port>", "target": "<target_udp_addr:port>",
                 "proxy_protocol": "--proxy-protocol"}

CLIENT_USAGE = """kcpudp-client: UDP over the encrypted KCP/UDP tunnel, client.

Usage:
  kcpudp-client [options] [--allow <cidr>]... [--deny <cidr>]...
                <local_udp_addr:port> <remote_udp_addr:port>
  kcpudp-client -h | --help

Listens on a local UDP address and carries each client address's datagrams as one tunnel
conversation to a kcpudp-server, datagram boundaries kept (0 to 65,507 bytes). AEAD
encryption is enabled only when -K is given on both client and server.

{{OPTIONS}}""".replace("{{OPTIONS}}", OPTIONS)

SERVER_USAGE = """kcpudp-server: the encrypted KCP/UDP tunnel to a UDP service, server.

Usage:
  kcpudp-server [options] [--allow <cidr>]... [--deny <cidr>]...
                <local_udp_addr:port> <target_udp_addr:port>
  kcpudp-server -h | --help

Listens on a UDP address, accepts tunnel conversations from kcpudp-client and bridges each to
the target UDP service over a socket of its own. AEAD requires the same -K PSK as the client
for handshakes to succeed; a kcptcp-client or a client in the other --mode is refused.

{{OPTIONS}}""".replace("{{OPTIONS}}", _options(KCPUDP_SERVER_OPTIONS))
CLIENT_PROG = "kcpudp-client"
SERVER_PROG = "kcpudp-server"


def client_main(argv: list[str] | None = None) -> int:
    return daemon.one_rule_main(CLIENT_PROG, CLIENT_USAGE, argv, CLIENT_FIELDS, client_config,
                                socket.SOCK_DGRAM, kcptcp_cli.guarded(DatagramClient), CLIENT_KIND)


def server_main(argv: list[str] | None = None) -> int:
    return daemon.one_rule_main(SERVER_PROG, SERVER_USAGE, argv, SERVER_FIELDS, server_config,
                                socket.SOCK_DGRAM, kcptcp_cli.guarded(DatagramServer), SERVER_KIND,
                                steer=kcptcp_cli.steer_conversations)
