"""tcpfwd's configuration: parsed options (flags today, config-file keys later) to TcpConfig.

Fields read: ``listen``, ``dest``, ``base_addr``, ``reuseaddr``, ``reuseport``, ``v6only``,
``connect_timeout``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from portfwd.runtime.addr import Resolved
from portfwd.runtime.config import listen_options
from portfwd.runtime.environment import Environment
from portfwd.runtime.options import Options
from portfwd.runtime.sockets import CONNECT_TIMEOUT, ListenOptions
from portfwd.tcpfwd.pump import SPLICE_AVAILABLE

MAX_CONNECT_TIMEOUT = 3600  # s


@dataclass(frozen=True)
class TcpConfig:
    """Everything one tcpfwd service needs: where to listen, where to forward, how."""

    listen: Resolved  # the listener's address
    dest: Resolved  # where connections go (the base address with -b)
    listen_options: ListenOptions = field(default_factory=ListenOptions)  # -r, -R, -6
    base_addr: bool = False  # -b: destination address += original port - listener port
    splice: bool = SPLICE_AVAILABLE  # kernel splice() relay; False = userspace copy
    connect_timeout: float = CONNECT_TIMEOUT  # s before an unanswered dial is abandoned


def tcpfwd_config(options: Options, env: Environment) -> TcpConfig:
    """Validate and resolve tcpfwd's settings; raises ConfigError naming the bad one."""
    listen = options.address("listen", socket.SOCK_STREAM, passive=True)
    dest = options.address("dest", socket.SOCK_STREAM, passive=False)
    connect_timeout = options.integer("connect_timeout", 1, MAX_CONNECT_TIMEOUT,
                                      int(CONNECT_TIMEOUT))
    return TcpConfig(listen=listen, dest=dest, listen_options=listen_options(options),
                     base_addr=options.flag("base_addr"),
                     splice=SPLICE_AVAILABLE and not env.no_splice,
                     connect_timeout=float(connect_timeout))
