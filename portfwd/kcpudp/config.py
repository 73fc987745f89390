"""kcpudp's configuration: parsed options (flags today, config-file keys later) to the frozen
configs of kcpudp-client (ClientConfig) and kcpudp-server (ServerConfig).

The fields are kcptcp's (``kcptcp.config``, read by the same functions) plus ``mode``
(``reliable`` or ``datagram``) and ``timeout`` (``-t``, seconds a client address's conversation
lives without a datagram either way, 0 = until the tunnel's keepalive gives up). ``fec`` and
the access list (``--allow``/``--deny``: the client's ``admission.access`` on client
addresses, the server's ``access`` on UDP sources) are kcptcp's. ``max_sessions``
caps the client's table of client addresses as well as the server's conversations;
the server's ``proxy_protocol`` (``--proxy-protocol``) is kcptcp's, v2 only;
``connect_timeout`` is not read (nothing is dialled: the server's target socket is UDP).
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass
from typing import Any

from portfwd.kcptcp import config as kcptcp_config
from portfwd.kcptcp.config import LIMIT_MAX, MAX_SESSIONS
from portfwd.runtime.admission import Admission
from portfwd.runtime.config import listen_options
from portfwd.runtime.environment import Environment
from portfwd.runtime.options import ConfigError, Options
from portfwd.runtime.session_table import DEFAULT_IDLE_TIMEOUT
from portfwd.tunnel.stream import ConversationConfig
from portfwd.tunnel.wire import Carries

MODES = {"reliable": Carries.RELIABLE_DATAGRAMS, "datagram": Carries.DATAGRAMS}
MODE = "reliable"  # --mode default
TIMEOUT_MAX = 86400  # s: bound of -t


@dataclass(frozen=True)
class ClientConfig(kcptcp_config.ClientConfig):
    """Everything one kcpudp-client service needs (kcptcp-client's, listen being UDP)."""

    mode: str = MODE  # --mode: reliable or datagram
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # -t: s a client address's conversation idles
    max_sessions: int = MAX_SESSIONS  # --max-sessions: client addresses held at once


@dataclass(frozen=True)
class ServerConfig(kcptcp_config.ServerConfig):
    """Everything one kcpudp-server service needs (kcptcp-server's, target being UDP)."""

    mode: str = MODE
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # -t: s a conversation idles before it closes


def mode(options: Options) -> str:
    raw = options.raw("mode")
    value = MODE if raw is None else raw
    if value not in MODES:
        raise ConfigError("mode", f"{options.label('mode')} must be reliable or datagram, "
                                  f"got {raw!r}")
    return value


def carrying(conversation: ConversationConfig, options: Options) -> ConversationConfig:
    """kcptcp's conversation settings, with the HELLO saying what the mode carries."""
    tunnel = dataclasses.replace(conversation.tunnel, carries=MODES[mode(options)])
    return dataclasses.replace(conversation, tunnel=tunnel)


def extended(cls: type, base: object, **changes: object) -> Any:
    """``base`` (a kcptcp config) as a ``cls`` (its kcpudp subclass) with ``changes``: every
    field kcptcp has reaches kcpudp without a line here, so none is dropped unnoticed."""
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    return cls(**{**fields, **changes})


def client_config(options: Options, env: Environment) -> ClientConfig:
    """Validate and resolve kcpudp-client's settings; raises ConfigError naming the bad one."""
    base = kcptcp_config.client_config(options, env)  # resolves listen for TCP: same host:port
    return extended(
        ClientConfig, base,
        listen=options.address("listen", socket.SOCK_DGRAM, passive=True),
        conversation=carrying(base.conversation, options),
        listen_options=listen_options(options, bufsize=base.udp_buffer), mode=mode(options),
        idle_timeout=idle_timeout(options),
        admission=Admission(access=base.admission.access),  # --allow/--deny on client addresses
        max_sessions=options.integer("max_sessions", 1, LIMIT_MAX, MAX_SESSIONS))


def server_config(options: Options, env: Environment) -> ServerConfig:
    """Validate and resolve kcpudp-server's settings; raises ConfigError naming the bad one."""
    base = kcptcp_config.server_config(options, env)  # resolves target for TCP: same host:port
    if base.proxy_protocol not in (0, 2):  # v1 is text for TCP: it has no UDP form
        raise ConfigError("proxy_protocol", f"{options.label('proxy_protocol')} over UDP is "
                                            f"v2 only (v1 has no UDP form), got "
                                            f"{options.raw('proxy_protocol')!r}")
    return extended(
        ServerConfig, base,
        target=options.address("target", socket.SOCK_DGRAM, passive=False),
        conversation=carrying(base.conversation, options),
        limits=dataclasses.replace(base.limits, connect_timeout=0.0), mode=mode(options),
        idle_timeout=idle_timeout(options))


def idle_timeout(options: Options) -> float:
    """-t: seconds, 0 = no idle expiry."""
    return float(options.integer("timeout", 0, TIMEOUT_MAX, int(DEFAULT_IDLE_TIMEOUT)))
