"""The command lines of kcptcp-client and kcptcp-server: usage texts, options, their config."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from portfwd.kcptcp.client import TunnelClient
from portfwd.kcptcp.server import ServerLimits, TunnelServer
from portfwd.runtime import daemon
from portfwd.runtime import options as cli
from portfwd.runtime.addr import Resolved
from portfwd.runtime.sockets import ListenOptions, bind_socket
from portfwd.tunnel.session import REKEY_SEQ_THRESHOLD, REKEY_TIMEOUT_MS, TunnelConfig
from portfwd.tunnel.stream import ConversationConfig, tunnel_kcp_config

MTU_MIN = 576  # bytes: the IPv4 minimum reassembly size; KCP records need >= ~310
MTU_MAX = 9000  # bytes: jumbo frames; beyond this every datagram fragments
UDP_BUFFER = 4 * 1024 * 1024  # bytes: -S default; small UDP buffers drop bursts of 1024 segments

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
  -h --help             show help

Environment:
  PORTFWD_REKEY_SEQ_THRESHOLD  send_seq that starts a rekey [default: {REKEY_SEQ_THRESHOLD:#x}]
  PORTFWD_REKEY_TIMEOUT_MS     ms without REKEY_ACK before closing [default: {REKEY_TIMEOUT_MS}]
"""


def env_int(prog: str, name: str, default: int, lo: int, hi: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw, 0)
    except ValueError:
        cli.fail(prog, f"{name} expects a number, got {raw!r}")
    if not lo <= value <= hi:
        cli.fail(prog, f"{name} must be {lo}-{hi}, got {value}")
    return value


def listen_options(args: dict, bufsize: int | None = None) -> ListenOptions:
    return ListenOptions(reuseaddr=args["-r"], reuseport=args["-R"], v6only=args["--v6only"],
                         bufsize=bufsize)


def conversation_config(prog: str, args: dict) -> ConversationConfig:
    """Everything a conversation needs, from the parsed command line and the environment."""
    keepalive_s = cli.int_option(prog, args, "--keepalive", 2, 86400)
    tunnel = TunnelConfig(
        psk=cli.psk_arg(prog, args["-K"]),
        rekey_seq_threshold=env_int(prog, "PORTFWD_REKEY_SEQ_THRESHOLD", REKEY_SEQ_THRESHOLD,
                                    1, 0xFFFFFFFF),
        rekey_timeout_ms=env_int(prog, "PORTFWD_REKEY_TIMEOUT_MS", REKEY_TIMEOUT_MS, 1, 3600_000),
        idle_timeout_ms=keepalive_s * 1000,
        keepalive_interval_ms=max(1000, keepalive_s * 1000 // 3),
    )
    kcp = tunnel_kcp_config(
        interval=cli.int_option(prog, args, "--interval", 10, 5000),
        resend=cli.int_option(prog, args, "--resend", 0, 100),
        nc=bool(cli.int_option(prog, args, "--nc", 0, 1)),
        snd_wnd=cli.int_option(prog, args, "--sndwnd", 1, 65535),
        rcv_wnd=cli.int_option(prog, args, "--rcvwnd", 1, 65535),
    )
    return ConversationConfig(tunnel=tunnel, kcp=kcp,
                              udp_mtu=cli.int_option(prog, args, "-M", MTU_MIN, MTU_MAX))


def udp_buffer_size(prog: str, args: dict) -> int:
    return cli.int_option(prog, args, "-S", 4096, 1 << 30)


# build(config, listener, remote, udp_buffer, stats_interval, parsed args) -> the service
Build = Callable[[ConversationConfig, socket.socket, Resolved, int, int, dict], daemon.Service]


def tunnel_main(prog: str, usage: str, argv: list[str] | None,
                listen: tuple[str, int], remote: tuple[str, int], build: Build) -> int:
    """The whole main() of kcptcp-client and kcptcp-server, which differ only in socket types.

    ``listen`` and ``remote`` are (usage-text argument name, socket type). Parses and validates
    everything, binds the listener in the foreground (so errors reach the terminal), then hands
    ``build(config, listener, remote, udp_buffer, stats_interval, args)`` to
    :func:`daemon.run`.
    """
    args = cli.parse_args(prog, usage, argv)
    config = conversation_config(prog, args)
    udp_buffer = udp_buffer_size(prog, args)
    stats = cli.int_option(prog, args, "--stats-interval", 0, 86400)
    (listen_name, listen_type), (remote_name, remote_type) = listen, remote
    local = cli.address_arg(prog, args[listen_name], listen_type, passive=True)
    peer = cli.address_arg(prog, args[remote_name], remote_type, passive=False)
    bufsize = udp_buffer if listen_type == socket.SOCK_DGRAM else None
    try:
        listener = bind_socket(local, listen_type, listen_options(args, bufsize))
    except OSError as exc:
        cli.fail(prog, f"cannot listen on {local}: {exc.strerror or exc}", cli.EXIT_RUNTIME)
    service = build(config, listener, peer, udp_buffer, stats, args)
    return daemon.run(prog, service, daemonize=args["-d"], pidfile=args["-p"])


CLIENT_USAGE = """kcptcp-client: TCP over KCP/UDP client.

Usage:
  kcptcp-client [options] <local_tcp_addr:port> <remote_udp_addr:port>
  kcptcp-client -h | --help

Listens on a local TCP address and carries each connection as one KCP conversation over UDP
to a kcptcp-server. AEAD encryption is enabled only when -K is given on both client and server.

{{OPTIONS}}""".replace("{{OPTIONS}}", OPTIONS)

SERVER_USAGE = """kcptcp-server: KCP/UDP to TCP server.

Usage:
  kcptcp-server [options] <local_udp_addr:port> <target_tcp_addr:port>
  kcptcp-server -h | --help

Listens on a UDP address, accepts KCP sessions from kcptcp-client and bridges each to the
target TCP service. AEAD requires the same -K PSK as the client for handshakes to succeed.

{{OPTIONS}}""".replace("{{OPTIONS}}", OPTIONS)
CLIENT_PROG = "kcptcp-client"
SERVER_PROG = "kcptcp-server"


# client_main/build_client and server_main/build_server are alike by design: one entry point and
# one builder per tool, with what they share in tunnel_main.
def client_main(argv: list[str] | None = None) -> int:
    return tunnel_main(CLIENT_PROG, CLIENT_USAGE, argv,
                       ("<local_tcp_addr:port>", socket.SOCK_STREAM),
                       ("<remote_udp_addr:port>", socket.SOCK_DGRAM), build_client)


def build_client(config: ConversationConfig, listener: socket.socket, remote: Resolved,
                 udp_buffer: int, stats_interval: int, args: dict) -> TunnelClient:
    return TunnelClient(config, listener, remote, udp_buffer, stats_interval)


def server_main(argv: list[str] | None = None) -> int:
    return tunnel_main(SERVER_PROG, SERVER_USAGE, argv,
                       ("<local_udp_addr:port>", socket.SOCK_DGRAM),
                       ("<target_tcp_addr:port>", socket.SOCK_STREAM), build_server)


def build_server(config: ConversationConfig, udp_sock: socket.socket, target: Resolved,
                 udp_buffer: int, stats_interval: int, args: dict) -> TunnelServer:
    """The UDP socket's buffers were sized at bind time; the rest goes to the service."""
    limits = ServerLimits(
        connect_timeout=cli.int_option(SERVER_PROG, args, "--connect-timeout", 1, 3600),
        max_sessions=cli.int_option(SERVER_PROG, args, "--max-sessions", 1, 1 << 20),
        max_pending=cli.int_option(SERVER_PROG, args, "--max-pending", 1, 1 << 20),
    )
    return TunnelServer(config, udp_sock, target, stats_interval, limits)
