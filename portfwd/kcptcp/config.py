"""kcptcp's configuration: parsed options (flags today, config-file keys later) to the frozen
configs of kcptcp-client (ClientConfig) and kcptcp-server (ServerConfig).

Fields read by both: ``listen``, ``psk``, ``psk_file``, ``mtu``, ``sockbuf``, ``interval``,
``resend``, ``nc``, ``sndwnd``, ``rcvwnd``, ``keepalive``, ``stats_interval``, ``reuseaddr``,
``reuseport``, ``v6only``, ``fec``, ``allow``, ``deny``, ``max_conns``; by the client only:
``remote`` (the server's UDP address) and, through
:func:`portfwd.runtime.admission.admission_config`, ``accept_proxy``, ``proxy_from``; by the
server only: ``target`` (TCP, one or more), ``connect_timeout``, ``max_sessions``,
``max_pending``, ``proxy_protocol`` and, through
:func:`portfwd.runtime.upstream.upstream_config`, ``balance``, ``max_fails``,
``fail_timeout`` (tcpfwd's); by both, through :func:`portfwd.runtime.relay_timeouts.relay_limits`,
``idle_timeout`` and ``half_close_timeout`` (of the TCP side).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from portfwd.policy.cidr import AccessList, CidrSet
from portfwd.runtime.addr import Resolved
from portfwd.runtime.admission import Admission, admission_config
from portfwd.runtime.config import STATS_INTERVAL, listen_options, stats_interval
from portfwd.runtime.environment import PSK, Environment
from portfwd.runtime.keyfile import read_psk_file
from portfwd.runtime.options import ConfigError, Options
from portfwd.runtime.relay_timeouts import RelayLimits, relay_limits
from portfwd.runtime.sockets import CONNECT_TIMEOUT, ListenOptions
from portfwd.runtime.upstream import Balancing, Destination, destinations_config, upstream_config
from portfwd.tunnel.config import (
    REKEY_GRACE_MS,
    REKEY_SEQ_THRESHOLD,
    REKEY_TIMEOUT_MS,
    TunnelConfig,
)
from portfwd.tunnel.fec import FecSettings
from portfwd.tunnel.stream import ConversationConfig

MTU_MIN = 576  # bytes: the IPv4 minimum reassembly size; KCP records need >= ~310
MTU_MAX = 9000  # bytes: jumbo frames; beyond this every datagram fragments
MTU = 1350  # bytes: -M default (seed)
UDP_BUFFER = 4 * 1024 * 1024  # bytes: -S default; small UDP buffers drop bursts of 1024 segments
UDP_BUFFER_MIN = 4096  # bytes
UDP_BUFFER_MAX = 1 << 30  # bytes
INTERVAL = 10  # ms: --interval default
RESEND = 2  # acks: --resend default
NC = 1  # --nc default
WINDOW = 1024  # segments: --sndwnd and --rcvwnd default
KEEPALIVE = 30  # s: --keepalive default
MAX_SESSIONS = 4096  # conversations held at once (each holds a target socket)
MAX_PENDING = 256  # conversations whose client has not yet sent an authenticated packet
REASSEMBLY_BYTES = 256 * 1024 * 1024  # bytes received from peers and not yet written, all sessions
PROXY_VERSIONS = {"v1": 1, "v2": 2}  # --proxy-protocol
LIMIT_MAX = 1 << 20  # conversations: bound of --max-sessions and --max-pending


@dataclass(frozen=True)
class ServerLimits:
    """kcptcp-server's resource limits (--connect-timeout, --max-sessions, --max-pending)."""

    connect_timeout: float = CONNECT_TIMEOUT  # s before a dial to the target is abandoned
    max_sessions: int = MAX_SESSIONS  # conversations in all
    max_pending: int = MAX_PENDING  # conversations not yet confirmed by the client
    reassembly_bytes: int = REASSEMBLY_BYTES  # KCP receive memory shared by all conversations


@dataclass(frozen=True)
class ClientConfig:
    """Everything one kcptcp-client service needs."""

    listen: Resolved  # local TCP address
    remote: Resolved  # the kcptcp-server's UDP address
    conversation: ConversationConfig = field(default_factory=ConversationConfig)
    listen_options: ListenOptions = field(default_factory=ListenOptions)  # -r, -R, -6
    udp_buffer: int = UDP_BUFFER  # bytes of SO_RCVBUF/SO_SNDBUF of each conversation's socket
    stats_interval: float = STATS_INTERVAL  # s between stats lines, 0 = off
    fec: FecSettings | None = None  # --fec: parity on what this end sends; None = off
    admission: Admission = field(default_factory=Admission)  # --allow, --max-conns, ...
    relay: RelayLimits = field(default_factory=RelayLimits)  # --idle-timeout, ... (TCP side)


@dataclass(frozen=True)
class ServerConfig:
    """Everything one kcptcp-server service needs."""

    listen: Resolved  # local UDP address
    target: Resolved  # the (first) TCP service each conversation is bridged to
    conversation: ConversationConfig = field(default_factory=ConversationConfig)
    listen_options: ListenOptions = field(default_factory=ListenOptions)  # -r, -R, -6, -S
    udp_buffer: int = UDP_BUFFER  # bytes of SO_RCVBUF/SO_SNDBUF of the UDP socket
    stats_interval: float = STATS_INTERVAL  # s between stats lines, 0 = off
    fec: FecSettings | None = None  # --fec: parity on what this end sends; None = off
    limits: ServerLimits = field(default_factory=ServerLimits)
    access: AccessList = field(default_factory=AccessList)  # --allow/--deny on UDP sources
    proxy_protocol: int = 0  # --proxy-protocol: PROXY header version sent to the target, 0 = none
    max_conns: int = 0  # --max-conns: conversations at once, 0 = no cap (beside --max-sessions)
    destinations: tuple[Destination, ...] = ()  # every target; () = just ``target``
    balancing: Balancing = field(default_factory=Balancing)  # --balance, --max-fails, ...
    relay: RelayLimits = field(default_factory=RelayLimits)  # --idle-timeout, ... (TCP side)


def conversation_config(options: Options, env: Environment,
                        fec: FecSettings | None = None) -> ConversationConfig:
    """Everything a conversation needs: the tunnel's security settings and KCP tuning (which
    follows ``fec``, what this end sends, and --pacing: ConversationConfig.fastack_conserve)."""
    keepalive_s = options.integer("keepalive", 2, 86400, KEEPALIVE)
    rekey_timeout = REKEY_TIMEOUT_MS if env.rekey_timeout_ms is None else env.rekey_timeout_ms
    tunnel = TunnelConfig(
        psk=tunnel_key(options, env),
        rekey_seq_threshold=(REKEY_SEQ_THRESHOLD if env.rekey_seq_threshold is None
                             else env.rekey_seq_threshold),
        rekey_timeout_ms=rekey_timeout,
        # A longer rekey timeout (PORTFWD_REKEY_TIMEOUT_MS) stretches the old key's grace with it.
        rekey_grace_ms=max(REKEY_GRACE_MS, rekey_timeout),
        idle_timeout_ms=keepalive_s * 1000,
        keepalive_interval_ms=max(1000, keepalive_s * 1000 // 3),
    )
    return ConversationConfig(
        tunnel=tunnel,
        interval=options.integer("interval", 10, 5000, INTERVAL),
        resend=options.integer("resend", 0, 100, RESEND),
        nc=bool(options.integer("nc", 0, 1, NC)),
        snd_wnd=options.integer("sndwnd", 1, 65535, WINDOW),
        rcv_wnd=options.integer("rcvwnd", 1, 65535, WINDOW),
        mtu=options.integer("mtu", MTU_MIN, MTU_MAX, MTU),
        pacing=options.flag("pacing"),
        fastack_conserve=fec is not None or options.flag("pacing"),
    )


def tunnel_key(options: Options, env: Environment) -> bytes | None:
    """The PSK from exactly one of -K (``psk``), --psk-file (``psk_file``) and PORTFWD_PSK:
    two sources that could disagree are refused."""
    path = options.text("psk_file")
    key = options.psk("psk")
    if path is not None and key is not None:
        raise ConfigError("psk_file", f"{options.label('psk')} and {options.label('psk_file')} "
                          f"both give the key: use one")
    if path is not None:
        key = read_psk_file(path, options.label("psk_file"))
    if key is not None and env.psk is not None:
        label = options.label("psk_file" if path is not None else "psk")
        raise ConfigError("psk", f"{label} and {PSK} both give a key; use one")
    return key if key is not None else env.psk
def fec_settings(options: Options) -> FecSettings | None:
    """--fec: ``<data>:<parity>``, ``auto`` or ``off`` (absent: off)."""
    spec = options.text("fec") or "off"
    try:
        return FecSettings.parse(spec)
    except ValueError as exc:
        raise ConfigError("fec", f"{options.label('fec')}: {exc}") from None


def client_config(options: Options, env: Environment) -> ClientConfig:
    """Validate and resolve kcptcp-client's settings; raises ConfigError naming the bad one."""
    fec = fec_settings(options)
    conversation = conversation_config(options, env, fec)
    udp_buffer = options.integer("sockbuf", UDP_BUFFER_MIN, UDP_BUFFER_MAX, UDP_BUFFER)
    return ClientConfig(
        listen=options.address("listen", socket.SOCK_STREAM, passive=True),
        remote=options.address("remote", socket.SOCK_DGRAM, passive=False),
        conversation=conversation, listen_options=listen_options(options),
        udp_buffer=udp_buffer, stats_interval=stats_interval(options), fec=fec,
        admission=admission_config(options), relay=relay_limits(options))


def server_config(options: Options, env: Environment) -> ServerConfig:
    """Validate and resolve kcptcp-server's settings; raises ConfigError naming the bad one."""
    fec = fec_settings(options)
    conversation = conversation_config(options, env, fec)
    udp_buffer = options.integer("sockbuf", UDP_BUFFER_MIN, UDP_BUFFER_MAX, UDP_BUFFER)
    listen = options.address("listen", socket.SOCK_DGRAM, passive=True)
    destinations = destinations_config(options, "target")
    limits = ServerLimits(
        connect_timeout=options.integer("connect_timeout", 1, 3600, int(CONNECT_TIMEOUT)),
        max_sessions=options.integer("max_sessions", 1, LIMIT_MAX, MAX_SESSIONS),
        max_pending=options.integer("max_pending", 1, LIMIT_MAX, MAX_PENDING),
    )
    return ServerConfig(
        listen=listen, target=destinations[0].addresses[0], conversation=conversation,
        listen_options=listen_options(options, bufsize=udp_buffer),
        udp_buffer=udp_buffer, stats_interval=stats_interval(options), fec=fec, limits=limits,
        access=AccessList(CidrSet(options.cidrs("allow")), CidrSet(options.cidrs("deny"))),
        proxy_protocol=PROXY_VERSIONS.get(
            options.choice("proxy_protocol", tuple(PROXY_VERSIONS), "none"), 0),
        max_conns=options.integer("max_conns", 0, LIMIT_MAX, 0), destinations=destinations,
        balancing=upstream_config(options), relay=relay_limits(options))
