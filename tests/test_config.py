"""Options -> frozen config, in process: every tool's config function, the environment and the
entry points' error rendering, without starting anything."""

from __future__ import annotations

import dataclasses
import logging
import re
import socket

import pytest

from portfwd.kcptcp import cli as kcptcp_cli
from portfwd.kcptcp.config import (
    ClientConfig,
    ServerConfig,
    ServerLimits,
    client_config,
    server_config,
)
from portfwd.runtime.addr import HostPort, Resolved, any_host
from portfwd.runtime.config import ProcessConfig, process_config
from portfwd.runtime.environment import Environment, read_environment
from portfwd.runtime.options import (
    ConfigError,
    Options,
    StartupError,
    UsageError,
    parse_args,
    run_tool,
)
from portfwd.runtime.sockets import ListenOptions
from portfwd.runtime.upstream import Destination
from portfwd.tcpfwd import cli as tcpfwd_cli
from portfwd.tcpfwd.config import TcpConfig, tcpfwd_config
from portfwd.tcpfwd.pump import SPLICE_AVAILABLE
from portfwd.tunnel.config import REKEY_SEQ_THRESHOLD
from portfwd.tunnel.session import OVERHEAD, PLAINTEXT_OVERHEAD, TunnelConfig
from portfwd.tunnel.stream import ConversationConfig
from portfwd.udpfwd import cli as udpfwd_cli
from portfwd.udpfwd.config import GSO_AVAILABLE, UdpConfig, udpfwd_config

ENV = Environment()
PSK_HEX = "ab" * 32
V4 = socket.AF_INET
V6 = socket.AF_INET6


def local(port: int) -> Resolved:
    return Resolved(V4, ("127.0.0.1", port))


def docopt_options(usage: str, argv: list[str], fields: dict[str, str]) -> Options:
    return Options.from_docopt(parse_args("tool", usage, argv), fields)


# --- valid settings -------------------------------------------------------------------------

def test_tcpfwd_config():
    options = Options({"listen": "127.0.0.1:8000", "dest": "[::1]:80", "base_addr": True,
                       "reuseport": True, "connect_timeout": "5"})
    config = tcpfwd_config(options, ENV)
    dest = Resolved(V6, ("::1", 80, 0, 0))
    assert config == TcpConfig(listen=local(8000), dest=dest,
                               listen_options=ListenOptions(reuseport=True), base_addr=True,
                               splice=SPLICE_AVAILABLE, connect_timeout=5.0,
                               destinations=(Destination(HostPort("::1", 80), (dest,)),))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.base_addr = False  # type: ignore[misc]


def test_tcpfwd_config_no_splice_from_environment():
    options = Options({"listen": ":8000", "dest": ":80"})
    config = tcpfwd_config(options, Environment(no_splice=True))
    assert config.splice is False
    # "any" for a listener: dual-stack where the system has IPv6
    assert config.listen.host == any_host() and config.listen.port == 8000
    assert config.dest == local(80)  # loopback for a destination


def test_udpfwd_config():
    options = Options({"listen": "127.0.0.1:5000", "dest": "127.0.0.1:53", "timeout": "0",
                       "max_sessions": "10", "sockbuf": "8192", "v6only": True})
    config = udpfwd_config(options, Environment(no_gso=True))
    assert config == UdpConfig(listen=local(5000), dest=local(53),
                               listen_options=ListenOptions(v6only=True, bufsize=8192),
                               idle_timeout=0.0, max_sessions=10, sockbuf=8192, gso=False)


def test_udpfwd_defaults():
    config = udpfwd_config(Options({"listen": "127.0.0.1:5000", "dest": "127.0.0.1:53"}), ENV)
    assert (config.idle_timeout, config.max_sessions, config.stats_interval, config.sockbuf,
            config.table_hint, config.gso) == (60.0, 8192, 60, 262144, 4093, GSO_AVAILABLE)


def test_kcptcp_client_config():
    options = Options({"listen": "127.0.0.1:7000", "remote": "127.0.0.1:7001", "psk": PSK_HEX,
                       "mtu": "1200", "interval": "20", "nc": "0", "sndwnd": "64",
                       "keepalive": "9", "sockbuf": "65536", "stats_interval": "0"})
    env = Environment(rekey_seq_threshold=100, rekey_timeout_ms=700)
    config = client_config(options, env)
    tunnel = TunnelConfig(psk=bytes.fromhex(PSK_HEX), rekey_seq_threshold=100,
                          rekey_timeout_ms=700, idle_timeout_ms=9000, keepalive_interval_ms=3000)
    assert config == ClientConfig(
        listen=local(7000), remote=local(7001),
        conversation=ConversationConfig(tunnel=tunnel, mtu=1200, interval=20, nc=False,
                                        snd_wnd=64),
        listen_options=ListenOptions(), udp_buffer=65536, stats_interval=0)


def test_kcptcp_server_config():
    options = Options({"listen": "127.0.0.1:7001", "target": "127.0.0.1:22",
                       "max_pending": "3", "connect_timeout": "2"})
    config = server_config(options, ENV)
    assert isinstance(config, ServerConfig)
    assert config.target == local(22)
    assert config.limits == ServerLimits(connect_timeout=2, max_sessions=4096, max_pending=3)
    assert config.listen_options.bufsize == config.udp_buffer == 4 * 1024 * 1024
    assert config.conversation.tunnel.psk is None
    assert config.conversation.tunnel.rekey_seq_threshold == REKEY_SEQ_THRESHOLD


@pytest.mark.parametrize("usage, fields, positional, build", [
    (tcpfwd_cli.__doc__, tcpfwd_cli.FIELDS, {"listen": "127.0.0.1:1", "dest": "127.0.0.1:2"},
     tcpfwd_config),
    (udpfwd_cli.__doc__, udpfwd_cli.FIELDS, {"listen": "127.0.0.1:1", "dest": "127.0.0.1:2"},
     udpfwd_config),
    (kcptcp_cli.CLIENT_USAGE, kcptcp_cli.CLIENT_FIELDS,
     {"listen": "127.0.0.1:1", "remote": "127.0.0.1:2"}, client_config),
    (kcptcp_cli.SERVER_USAGE, kcptcp_cli.SERVER_FIELDS,
     {"listen": "127.0.0.1:1", "target": "127.0.0.1:2"}, server_config),
])
def test_usage_defaults_are_the_config_defaults(usage, fields, positional, build):
    """A config file that names only the addresses gets what a bare command line gets."""
    from_cli = build(docopt_options(usage, list(positional.values()), fields), ENV)
    assert from_cli == build(Options(positional), ENV)


@pytest.mark.parametrize("pacing", [False, True])
@pytest.mark.parametrize("fec, with_fec", [(None, False), ("off", False), ("10:3", True),
                                           ("auto", True)])
def test_kcptcp_fec_and_pacing_set_the_conservative_fast_ack(fec, with_fec, pacing):
    values = {"listen": "127.0.0.1:7000", "remote": "127.0.0.1:7001", "pacing": pacing}
    if fec is not None:
        values["fec"] = fec
    conversation = client_config(Options(values), ENV).conversation
    conserve = with_fec or pacing
    assert conversation.fastack_conserve is conserve
    assert conversation.kcp_config(0).fastack_conserve is conserve
    assert conversation.pacing is pacing


def test_kcptcp_client_ignores_server_limits():
    options = Options({"listen": "127.0.0.1:7000", "remote": "127.0.0.1:7001",
                       "max_sessions": "0", "connect_timeout": "x"})
    assert client_config(options, ENV).remote == local(7001)


def test_process_config():
    options = Options({"daemonize": True, "pidfile": "/run/x.pid"})
    assert process_config(options, Environment(log_level=10)) == ProcessConfig(
        daemonize=True, pidfile="/run/x.pid", log_level=logging.DEBUG)
    assert process_config(Options({"pidfile": ""}), ENV) == ProcessConfig()


@pytest.mark.parametrize(("flag", "env", "level"), [
    (None, None, logging.INFO),  # the default
    (None, 30, logging.WARNING),  # PORTFWD_LOGLEVEL alone
    ("debug", 30, logging.DEBUG),  # --log-level wins over the environment
    ("error", 10, logging.ERROR),
    ("warning", None, logging.WARNING),
    ("info", 40, logging.INFO),
])
def test_log_level_flag_beats_environment(flag, env, level):
    options = Options({"log_level": flag}, {"log_level": "--log-level"})
    assert process_config(options, Environment(log_level=env)).log_level == level


def test_log_level_bad_value_names_the_flag():
    options = Options({"log_level": "loud"}, {"log_level": "--log-level"})
    with pytest.raises(ConfigError, match="--log-level expects one of error, warning, info, "
                                          "debug, got 'loud'"):
        process_config(options, ENV)


# --- one MTU -------------------------------------------------------------------------------

def test_conversation_config_has_one_mtu():
    config = ConversationConfig(mtu=1000, snd_wnd=32)
    assert config.kcp_config(OVERHEAD).mtu == 1000 - OVERHEAD
    assert config.kcp_config(PLAINTEXT_OVERHEAD).mtu == 1000 - PLAINTEXT_OVERHEAD
    assert config.kcp_config(OVERHEAD).snd_wnd == 32
    assert not any("mtu" in f.name and f.name != "mtu" for f in dataclasses.fields(config))


def test_conversation_config_checked_at_construction():
    with pytest.raises(ValueError, match="mtu"):
        ConversationConfig(mtu=OVERHEAD + 10)


# --- bad settings --------------------------------------------------------------------------

TCP = {"listen": "127.0.0.1:1", "dest": "127.0.0.1:2"}
CLIENT = {"listen": "127.0.0.1:1", "remote": "127.0.0.1:2"}
SERVER = {"listen": "127.0.0.1:1", "target": "127.0.0.1:2"}


@pytest.mark.parametrize("build, values, field, message", [
    (tcpfwd_config, {**TCP, "connect_timeout": "0"}, "connect_timeout",
     "connect_timeout must be 1-3600, got 0"),
    (tcpfwd_config, {**TCP, "dest": "127.0.0.1"}, "dest",
     "bad address '127.0.0.1': expected host:port"),
    (tcpfwd_config, {**TCP, "listen": "127.0.0.1:0"}, "listen",
     "bad port in '127.0.0.1:0': 0 is outside 1-65535"),
    (tcpfwd_config, {"listen": "127.0.0.1:1"}, "dest", "dest is required"),
    (tcpfwd_config, {**TCP, "base_addr": "yes"}, "base_addr",
     "base_addr expects true or false, got 'yes'"),
    (udpfwd_config, {**TCP, "timeout": "abc"}, "timeout",
     "timeout expects a whole number, got 'abc'"),
    (udpfwd_config, {**TCP, "timeout": "-5"}, "timeout", "timeout must be 0-2592000, got -5"),
    (udpfwd_config, {**TCP, "stats_interval": "-1"}, "stats_interval",
     "stats_interval must be 0-86400, got -1"),
    (udpfwd_config, {**TCP, "max_sessions": True}, "max_sessions",
     "max_sessions expects a whole number, got True"),
    (client_config, {**CLIENT, "mtu": "10"}, "mtu", "mtu must be 576-9000, got 10"),
    (client_config, {**CLIENT, "psk": "xyz"}, "psk", "psk expects 64 hex digits (a 32-byte key)"),
    (client_config, {**CLIENT, "psk": "00" * 31}, "psk",
     "psk expects 64 hex digits (a 32-byte key), got 62 characters"),
    (client_config, {**CLIENT, "psk": 7}, "psk", "psk expects 64 hex digits (a 32-byte key)"),
    (client_config, {**CLIENT, "nc": "2"}, "nc", "nc must be 0-1, got 2"),
    (server_config, {**SERVER, "max_pending": "abc"}, "max_pending",
     "max_pending expects a whole number, got 'abc'"),
    (server_config, {**SERVER, "target": "no-such-host.invalid:80"}, "target",
     "cannot resolve no-such-host.invalid:80"),
])
def test_bad_value(build, values, field, message):
    with pytest.raises(ConfigError) as info:
        build(Options(values), ENV)
    assert info.value.field == field
    assert info.value.message.startswith(message)
    assert str(info.value) == info.value.message


@pytest.mark.parametrize("fields, argv, message", [
    (udpfwd_cli.FIELDS, ["-t", "abc"], "-t expects a whole number, got 'abc'"),
    (udpfwd_cli.FIELDS, ["-H", "0"], "-H must be 1-1048576, got 0"),
    (udpfwd_cli.FIELDS, ["--max-sessions", "x"], "--max-sessions expects a whole number, got 'x'"),
])
def test_bad_flag_named_as_spelled(fields, argv, message):
    options = docopt_options(udpfwd_cli.__doc__, ["127.0.0.1:1", "127.0.0.1:2", *argv], fields)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        udpfwd_config(options, ENV)


@pytest.mark.parametrize("values, message", [
    ({"mtu": "10"}, "-M must be 576-9000, got 10"),
    ({"psk": "xyz"}, "-K expects 64 hex digits (a 32-byte key)"),
    ({"sockbuf": "x"}, "-S expects a whole number, got 'x'"),
    ({"listen": "127.0.0.1"}, "bad address '127.0.0.1': expected host:port"),
])
def test_kcptcp_flag_labels(values, message):
    options = Options({**CLIENT, **values}, kcptcp_cli.CLIENT_FIELDS)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        client_config(options, ENV)


def test_label_from_a_config_file_key():
    """A config-file loader passes its own spelling; the same validator names it."""
    options = Options({**TCP, "timeout": "abc"}, {"timeout": "rules[0].timeout"})
    with pytest.raises(ConfigError) as info:
        udpfwd_config(options, ENV)
    assert info.value.field == "timeout"
    assert info.value.message == "rules[0].timeout expects a whole number, got 'abc'"


def test_config_file_values_may_be_typed():
    options = Options({**TCP, "timeout": 30, "v6only": False, "max_sessions": 5})
    config = udpfwd_config(options, ENV)
    assert (config.idle_timeout, config.max_sessions) == (30.0, 5)


def test_options_are_read_only():
    values = {"timeout": "5"}
    options = Options(values)
    values["timeout"] = "6"  # the caller's dict is copied
    assert options.raw("timeout") == "5"
    with pytest.raises(TypeError):
        options.values["timeout"] = "7"  # type: ignore[index]


# --- environment ---------------------------------------------------------------------------

def test_environment_defaults():
    assert read_environment({}) == Environment()


@pytest.mark.parametrize("environ, expected", [
    ({"PORTFWD_NO_SPLICE": "1"}, Environment(no_splice=True)),
    ({"PORTFWD_NO_SPLICE": "0", "PORTFWD_NO_GSO": ""}, Environment()),
    ({"PORTFWD_NO_GSO": "yes"}, Environment(no_gso=True)),
    ({"PORTFWD_LOGLEVEL": "10"}, Environment(log_level=10)),
    ({"PORTFWD_REKEY_SEQ_THRESHOLD": "0x10"}, Environment(rekey_seq_threshold=16)),
    ({"PORTFWD_REKEY_TIMEOUT_MS": "250"}, Environment(rekey_timeout_ms=250)),
])
def test_environment_values(environ, expected):
    assert read_environment(environ) == expected


@pytest.mark.parametrize("name, raw, message", [
    ("PORTFWD_REKEY_SEQ_THRESHOLD", "abc",
     "PORTFWD_REKEY_SEQ_THRESHOLD expects a number, got 'abc'"),
    ("PORTFWD_REKEY_SEQ_THRESHOLD", "0", "PORTFWD_REKEY_SEQ_THRESHOLD must be 1-4294967295, got 0"),
    ("PORTFWD_REKEY_TIMEOUT_MS", "99999999",
     "PORTFWD_REKEY_TIMEOUT_MS must be 1-3600000, got 99999999"),
    ("PORTFWD_LOGLEVEL", "DEBUG", "PORTFWD_LOGLEVEL expects a number, got 'DEBUG'"),
])
def test_environment_errors(name, raw, message):
    with pytest.raises(ConfigError) as info:
        read_environment({name: raw})
    assert (info.value.field, info.value.message) == (name, message)


def test_environment_feeds_the_tunnel():
    env = read_environment({"PORTFWD_REKEY_SEQ_THRESHOLD": "2000"})
    config = client_config(Options(CLIENT), env)
    assert config.conversation.tunnel.rekey_seq_threshold == 2000


# --- entry points ----------------------------------------------------------------------------

def test_parse_args_raises_usage_error():
    with pytest.raises(UsageError) as info:
        parse_args("tcpfwd", tcpfwd_cli.__doc__, ["-x"])
    assert info.value.message == "invalid arguments '-x' (see 'tcpfwd -h')"


def test_run_tool_renders_errors(capsys):
    def config_error() -> int:
        raise ConfigError("timeout", "-t must be 0-5, got 9")

    def startup_error() -> int:
        raise StartupError("cannot listen on 127.0.0.1:1: Address already in use")

    assert run_tool("udpfwd", config_error) == 2
    assert run_tool("udpfwd", startup_error) == 1
    assert run_tool("udpfwd", lambda: 0) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("udpfwd: error: -t must be 0-5, got 9\n"
                            "udpfwd: error: cannot listen on 127.0.0.1:1: Address already in use\n")


@pytest.mark.parametrize("main", [tcpfwd_cli.main, udpfwd_cli.main, kcptcp_cli.client_main,
                                  kcptcp_cli.server_main])
def test_main_returns_2_on_bad_input(main, capsys):
    assert main(["-x", "127.0.0.1:1", "127.0.0.1:2"]) == 2
    assert "error: invalid arguments" in capsys.readouterr().err


def test_main_returns_1_when_the_port_is_taken(capsys):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    try:
        port = blocker.getsockname()[1]
        assert tcpfwd_cli.main([f"127.0.0.1:{port}", "127.0.0.1:9"]) == 1
    finally:
        blocker.close()
    err = capsys.readouterr().err
    assert err == f"tcpfwd: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_rekey_timeout_above_the_grace_period_is_refused_by_the_tunnel_config():
    from portfwd.tunnel.session import TunnelConfig

    with pytest.raises(ValueError, match="rekey_grace_ms"):
        TunnelConfig(rekey_timeout_ms=6000, rekey_grace_ms=5000)


def test_a_longer_rekey_timeout_stretches_the_grace_period():
    from portfwd.kcptcp.config import conversation_config
    from portfwd.runtime.environment import read_environment
    from portfwd.runtime.options import Options

    env = read_environment({"PORTFWD_REKEY_TIMEOUT_MS": "8000"})
    tunnel = conversation_config(Options({}, {}), env).tunnel
    assert (tunnel.rekey_timeout_ms, tunnel.rekey_grace_ms) == (8000, 8000)
    tunnel = conversation_config(Options({}, {}), read_environment({})).tunnel
    assert (tunnel.rekey_timeout_ms, tunnel.rekey_grace_ms) == (5000, 5000)
