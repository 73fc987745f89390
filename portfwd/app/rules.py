"""The rule kinds of a config file: each is one of the tools, reached through its own config
function and service class, so a config key and a command-line flag share one validation path.

A new kind is one more :class:`Kind` in :data:`KINDS`. How a
kind's live service takes a changed rule on a reload is ``reuse``: ``handover`` (a TCP
listener: the old service stops accepting and hands its socket to a new service, its open
connections finish on the old settings) or ``reconfigure`` (one UDP socket serves every
session: the service takes the new settings for the sessions that start from now on).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from portfwd.app.configfile import KindKeys
from portfwd.kcptcp import cli as kcptcp_cli
from portfwd.kcptcp import metrics as kcptcp_metrics
from portfwd.kcptcp.client import TunnelClient
from portfwd.kcptcp.config import client_config, server_config
from portfwd.kcptcp.server import TunnelServer
from portfwd.kcpudp import cli as kcpudp_cli
from portfwd.kcpudp import config as kcpudp_config
from portfwd.kcpudp import metrics as kcpudp_metrics
from portfwd.kcpudp.client import DatagramClient
from portfwd.kcpudp.server import DatagramServer
from portfwd.runtime import exporter
from portfwd.runtime.config import PROCESS_FIELDS
from portfwd.runtime.daemon import Service
from portfwd.runtime.environment import Environment
from portfwd.runtime.options import Options
from portfwd.tcpfwd import cli as tcpfwd_cli
from portfwd.tcpfwd import metrics as tcpfwd_metrics
from portfwd.tcpfwd.config import tcpfwd_config
from portfwd.tcpfwd.forwarder import TcpForwarder
from portfwd.udpfwd import cli as udpfwd_cli
from portfwd.udpfwd import metrics as udpfwd_metrics
from portfwd.udpfwd.config import udpfwd_config
from portfwd.udpfwd.forwarder import UdpForwarder

HANDOVER, RECONFIGURE = "handover", "reconfigure"
# kcptcp's usage lists the server's limits for both tools; a client rule cannot set them.
SERVER_ONLY = frozenset({"connect_timeout", "max_sessions", "max_pending"})


@dataclass(frozen=True)
class Kind:
    """One tool as a rule kind."""

    name: str  # the table name: [[tcp]]
    make_config: Callable[[Options, Environment], Any]  # the tool's own config function
    socktype: int  # of its listener
    make_service: Callable[[Any, socket.socket], Service]
    dest_field: str  # the field the key ``to`` sets
    keys: frozenset[str]  # the fields its rules may set besides listen and to
    reuse: str  # HANDOVER or RECONFIGURE
    exported: exporter.RuleKind  # how its snapshots are exported (--metrics, SIGUSR1, STATUS=)
    holds_key: Callable[[Any], bool] | None = None  # a tunnel kind: does it carry a PSK?
    steer: Callable[[list[socket.socket]], None] | None = None  # -w: how its group picks

    def plaintext(self, config: Any) -> bool:
        """A tunnel rule without a key: it runs, but unencrypted (``check`` warns)."""
        return self.holds_key is not None and not self.holds_key(config)

    @property
    def parser_keys(self) -> KindKeys:
        return KindKeys(self.dest_field, self.keys)


RULE_WORKERS = "workers"  # a process key that a rule may set too: its worker count


def tool_keys(fields: Mapping[str, str], dest_field: str, *also: str) -> frozenset[str]:
    """A tool's fields (its FIELDS table: every flag) minus the process's and the addresses,
    plus ``workers`` (a rule runs in that many of the process's workers)."""
    return frozenset(fields) - PROCESS_FIELDS - {"listen", dest_field} | {RULE_WORKERS, *also}


def _tunnel_key(config: Any) -> bool:
    return config.conversation.tunnel.psk is not None


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind("tcp", tcpfwd_config, socket.SOCK_STREAM, TcpForwarder, "dest",
         tool_keys(tcpfwd_cli.FIELDS, "dest"), HANDOVER, tcpfwd_metrics.KIND),
    Kind("udp", udpfwd_config, socket.SOCK_DGRAM, UdpForwarder, "dest",
         tool_keys(udpfwd_cli.FIELDS, "dest"), RECONFIGURE, udpfwd_metrics.KIND),
    Kind("kcptcp-client", client_config, socket.SOCK_STREAM, TunnelClient, "remote",
         tool_keys(kcptcp_cli.CLIENT_FIELDS, "remote") - SERVER_ONLY, HANDOVER,
         kcptcp_metrics.CLIENT_KIND, _tunnel_key),
    Kind("kcptcp-server", server_config, socket.SOCK_DGRAM, TunnelServer, "target",
         tool_keys(kcptcp_cli.SERVER_FIELDS, "target"), RECONFIGURE,
         kcptcp_metrics.SERVER_KIND, _tunnel_key, kcptcp_cli.steer_conversations),
    Kind("kcpudp-client", kcpudp_config.client_config, socket.SOCK_DGRAM, DatagramClient,
         "remote", tool_keys(kcpudp_cli.CLIENT_FIELDS, "remote") - {"max_pending"},
         RECONFIGURE, kcpudp_metrics.CLIENT_KIND, _tunnel_key),
    Kind("kcpudp-server", kcpudp_config.server_config, socket.SOCK_DGRAM, DatagramServer,
         "target", tool_keys(kcpudp_cli.SERVER_FIELDS, "target"), RECONFIGURE,
         kcpudp_metrics.SERVER_KIND, _tunnel_key, kcptcp_cli.steer_conversations),
)}
EXPORTED = {name: kind.exported for name, kind in KINDS.items()}  # for daemon.run(kinds=)
PARSER_KINDS = {name: kind.parser_keys for name, kind in KINDS.items()}
