"""udpfwd's configuration: parsed options (flags today, config-file keys later) to UdpConfig.

Fields read: ``listen``, ``dest``, ``timeout``, ``table_hint``, ``max_sessions``,
``stats_interval``, ``sockbuf``, ``reuseaddr``, ``reuseport``, ``v6only``, ``allow``, ``deny``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from portfwd.policy.cidr import AccessList, CidrSet
from portfwd.runtime.addr import Resolved
from portfwd.runtime.config import STATS_INTERVAL, listen_options, stats_interval
from portfwd.runtime.environment import Environment
from portfwd.runtime.options import Options
from portfwd.runtime.session_table import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_SESSIONS
from portfwd.runtime.sockets import SOCKBUF_CAP, ListenOptions

DEFAULT_TABLE_HINT = 4093  # seed -H default: the C hash table size (a sizing hint here)
MAX_TIMEOUT = 30 * 86400  # s; longer is a typo, not a wish
MAX_SESSIONS = 1 << 20  # sessions; each holds an fd, so the fd limit binds long before this
MIN_SOCKBUF = 4096  # bytes
MAX_SOCKBUF = 1 << 28  # bytes; the kernel clamps to net.core.[rw]mem_max anyway
# bytes: the listener's buffers without --sockbuf. A burst of new clients queues there while
# their sessions open: at 256 KiB, 1,000 clients at once lost a fifth of their datagrams.
LISTEN_SOCKBUF = 4 * 1024 * 1024
GSO_AVAILABLE = hasattr(socket.socket, "sendmsg") and os.uname().sysname == "Linux"


@dataclass(frozen=True)
class UdpConfig:
    """Everything one udpfwd service needs: where to listen, where to forward, how."""

    listen: Resolved  # the listening socket's address
    dest: Resolved  # where datagrams go
    listen_options: ListenOptions = field(default_factory=ListenOptions)  # -r, -R, -o, buffers
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # s of inactivity before a session closes; 0 never
    max_sessions: int = DEFAULT_MAX_SESSIONS  # sessions; the LRU one is evicted beyond this
    stats_interval: float = STATS_INTERVAL  # s between status lines; 0 = none
    sockbuf: int = SOCKBUF_CAP  # bytes of SO_RCVBUF/SO_SNDBUF on every socket
    table_hint: int = DEFAULT_TABLE_HINT  # -H: expected number of clients (sizing hint only)
    gso: bool = GSO_AVAILABLE  # coalesce equal-size runs into UDP GSO sends (Linux)
    access: AccessList = field(default_factory=AccessList)  # --allow / --deny


def udpfwd_config(options: Options, env: Environment) -> UdpConfig:
    """Validate and resolve udpfwd's settings; raises ConfigError naming the bad one."""
    timeout = options.integer("timeout", 0, MAX_TIMEOUT, int(DEFAULT_IDLE_TIMEOUT))
    table_hint = options.integer("table_hint", 1, MAX_SESSIONS, DEFAULT_TABLE_HINT)
    max_sessions = options.integer("max_sessions", 1, MAX_SESSIONS, DEFAULT_MAX_SESSIONS)
    sockbuf = options.integer("sockbuf", MIN_SOCKBUF, MAX_SOCKBUF, SOCKBUF_CAP)
    # --sockbuf given: every socket; otherwise sessions the seed's 256 KiB, the listener more.
    listen_sockbuf = sockbuf if options.raw("sockbuf") is not None else LISTEN_SOCKBUF
    return UdpConfig(
        listen=options.address("listen", socket.SOCK_DGRAM, passive=True),
        dest=options.address("dest", socket.SOCK_DGRAM, passive=False),
        listen_options=listen_options(options, bufsize=listen_sockbuf),
        idle_timeout=float(timeout), max_sessions=max_sessions,
        stats_interval=stats_interval(options), sockbuf=sockbuf, table_hint=table_hint,
        gso=GSO_AVAILABLE and not env.no_gso,
        access=AccessList(CidrSet(options.cidrs("allow")), CidrSet(options.cidrs("deny"))))
