"""tcpfwd's configuration: parsed options (flags today, config-file keys later) to TcpConfig.

Fields read: ``listen``, ``dest`` (one or more), ``base_addr``, ``reuseaddr``, ``reuseport``,
``v6only``, ``connect_timeout``, ``proxy_protocol``, ``idle_timeout``, ``half_close_timeout``,
``stats_interval``;
those of :func:`portfwd.runtime.admission.admission_config` (``allow``, ``deny``,
``max_conns``, ``accept_proxy``, ``proxy_from``) and of
:func:`portfwd.runtime.upstream.upstream_config` (``balance``, ``max_fails``, ``fail_timeout``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from portfwd.runtime.addr import Resolved
from portfwd.runtime.admission import Admission, admission_config
from portfwd.runtime.config import STATS_INTERVAL, listen_options, stats_interval
from portfwd.runtime.environment import Environment
from portfwd.runtime.options import ConfigError, Options
from portfwd.runtime.relay_timeouts import RelayLimits, relay_limits
from portfwd.runtime.sockets import CONNECT_TIMEOUT, ListenOptions
from portfwd.runtime.upstream import Balancing, Destination, destinations_config, upstream_config
from portfwd.tcpfwd.pump import SPLICE_AVAILABLE

MAX_CONNECT_TIMEOUT = 3600  # s
PROXY_VERSIONS = {"v1": 1, "v2": 2}  # --proxy-protocol


@dataclass(frozen=True)
class TcpConfig:
    """Everything one tcpfwd service needs: where to listen, where to forward, how."""

    listen: Resolved  # the listener's address
    dest: Resolved  # the first destination's first address (the base address with -b)
    listen_options: ListenOptions = field(default_factory=ListenOptions)  # -r, -R, -6
    base_addr: bool = False  # -b: destination address += original port - listener port
    splice: bool = SPLICE_AVAILABLE  # kernel splice() relay; False = userspace copy
    connect_timeout: float = CONNECT_TIMEOUT  # s before an unanswered dial is abandoned
    destinations: tuple[Destination, ...] = ()  # every destination; () = just ``dest``
    balancing: Balancing = field(default_factory=Balancing)  # --balance, --max-fails, ...
    admission: Admission = field(default_factory=Admission)  # --allow, --max-conns, ...
    proxy_protocol: int = 0  # --proxy-protocol: PROXY header version sent first, 0 = none
    relay: RelayLimits = field(default_factory=RelayLimits)  # --idle-timeout, ...
    stats_interval: float = STATS_INTERVAL  # s between stats lines at INFO; 0 = none


def tcpfwd_config(options: Options, env: Environment) -> TcpConfig:
    """Validate and resolve tcpfwd's settings; raises ConfigError naming the bad one."""
    listen = options.address("listen", socket.SOCK_STREAM, passive=True)
    destinations = destinations_config(options, "dest")
    base_addr = options.flag("base_addr")
    if base_addr and len(destinations) > 1:
        raise ConfigError("dest", f"{options.label('base_addr')} takes one destination")
    connect_timeout = options.integer("connect_timeout", 1, MAX_CONNECT_TIMEOUT,
                                      int(CONNECT_TIMEOUT))
    proxy = options.choice("proxy_protocol", tuple(PROXY_VERSIONS), "none")
    relay = relay_limits(options)
    return TcpConfig(listen=listen, dest=destinations[0].addresses[0],
                     listen_options=listen_options(options), base_addr=base_addr,
                     splice=SPLICE_AVAILABLE and not env.no_splice,
                     connect_timeout=float(connect_timeout), destinations=destinations,
                     balancing=upstream_config(options), admission=admission_config(options),
                     proxy_protocol=PROXY_VERSIONS.get(proxy, 0), relay=relay,
                     stats_interval=stats_interval(options))
