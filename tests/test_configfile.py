"""The config file's parser and loader on pure text: no files, no sockets (addresses are
literals, so resolving them asks no resolver)."""

from __future__ import annotations

import ast
import inspect
import logging
import textwrap

import pytest
from test_layers import IO_MODULES, PACKAGE, imported_modules

from portfwd.app.configfile import parse_config
from portfwd.app.load import load_config
from portfwd.app.rules import KINDS, PARSER_KINDS
from portfwd.runtime import config as runtime_config
from portfwd.runtime.config import PROCESS_FIELDS
from portfwd.runtime.environment import Environment
from portfwd.runtime.options import ConfigError

ENV = Environment()


def parse(text: str, base_dir: str = ""):
    return parse_config(textwrap.dedent(text), "config.toml", PARSER_KINDS, PROCESS_FIELDS,
                        base_dir)


def load(text: str):
    return load_config(textwrap.dedent(text), "config.toml", ENV)


def error(text: str, loader=load) -> str:
    with pytest.raises(ConfigError) as info:
        loader(text)
    return info.value.message


def test_configfile_module_is_sans_io():
    modules = imported_modules(PACKAGE / "app" / "configfile.py")
    assert not {m.split(".")[0] for m in modules} & (IO_MODULES | {"os", "io"})


def test_process_fields_are_what_process_config_reads():
    """PROCESS_FIELDS (the top-level keys of a file) must list every field process_config
    reads: a field added there without it would not be settable from a config file."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(runtime_config.process_config)))
    def field_read(call: ast.Call) -> str | None:
        """``options.<validator>("field", ...)`` or ``helper(options, "field", ...)``."""
        args = call.args
        if (isinstance(call.func, ast.Attribute) and isinstance(call.func.value, ast.Name)
                and call.func.value.id == "options" and args
                and isinstance(args[0], ast.Constant)):
            return args[0].value
        if (len(args) > 1 and isinstance(args[0], ast.Name) and args[0].id == "options"
                and isinstance(args[1], ast.Constant)):
            return args[1].value
        return None

    read = {field_read(node) for node in ast.walk(tree) if isinstance(node, ast.Call)} - {None}
    assert read == PROCESS_FIELDS


def test_every_flag_of_every_tool_is_a_key():
    from portfwd.kcptcp.cli import CLIENT_FIELDS, SERVER_FIELDS
    from portfwd.tcpfwd.cli import FIELDS as TCP_FIELDS
    from portfwd.udpfwd.cli import FIELDS as UDP_FIELDS
    client_only = set(CLIENT_FIELDS) - {"connect_timeout", "max_sessions", "max_pending"}
    for kind, fields, dest in (("tcp", TCP_FIELDS, "dest"), ("udp", UDP_FIELDS, "dest"),
                               ("kcptcp-client", client_only, "remote"),
                               ("kcptcp-server", SERVER_FIELDS, "target")):
        # workers is a process key that a rule may set too (its share of the workers)
        assert set(fields) - PROCESS_FIELDS - {"listen", dest} | {"workers"} == KINDS[kind].keys


def test_defaults_apply_where_a_rule_does_not_set_the_key():
    parsed = parse("""
        [defaults]
        connect_timeout = 7
        timeout = 30

        [[tcp]]
        listen = "127.0.0.1:1000"
        to = "127.0.0.1:2000"

        [[tcp]]
        listen = "127.0.0.1:1001"
        to = "127.0.0.1:2001"
        connect_timeout = 3

        [[udp]]
        listen = "127.0.0.1:1002"
        to = "127.0.0.1:2002"
        """)
    first, second, udp = parsed.rules
    assert first.options.raw("connect_timeout") == 7
    assert first.options.raw("timeout") is None  # tcp has no timeout: not applied
    assert second.options.raw("connect_timeout") == 3
    assert udp.options.raw("timeout") == 30 and udp.options.raw("connect_timeout") is None
    assert first.options.raw("dest") == "127.0.0.1:2000"  # "to" is tcpfwd's dest
    assert first.rule == first.name == "tcp:127.0.0.1:1000"
    assert first.options.label("connect_timeout").startswith("config.toml:3: [defaults]")


def test_to_maps_onto_each_kinds_destination_field():
    parsed = parse("""
        [[kcptcp-client]]
        listen = "127.0.0.1:1000"
        to = "127.0.0.1:2000"
        [[kcptcp-server]]
        listen = "127.0.0.1:1001"
        to = "127.0.0.1:2001"
        """)
    client, server = parsed.rules
    assert client.options.raw("remote") == "127.0.0.1:2000"
    assert server.options.raw("target") == "127.0.0.1:2001"


def test_port_range_is_one_instance_per_port_mapped_1_to_1():
    parsed = parse("""
        [[tcp]]
        name = "web"
        listen = "[::1]:8100-8102"
        to = "10.0.0.5:9100-9102"
        """)
    assert [(r.name, r.options.raw("listen"), r.options.raw("dest")) for r in parsed.rules] == [
        ("web:8100", "[::1]:8100", "10.0.0.5:9100"),
        ("web:8101", "[::1]:8101", "10.0.0.5:9101"),
        ("web:8102", "[::1]:8102", "10.0.0.5:9102")]
    assert {r.rule for r in parsed.rules} == {"web"}


def test_labels_name_file_line_rule_and_key():
    message = error("""
        [[tcp]]
        listen = "127.0.0.1:1000"
        to = "127.0.0.1:2000"

        [[tcp]]
        name = "web"
        listen = "127.0.0.1:1001"
        to = "127.0.0.1:0"
        """)
    assert message.startswith('config.toml:9: [[tcp]] #2 "web": to: ')
    assert "0 is outside 1-65535" in message


@pytest.mark.parametrize("text, expected", [
    ('[[tcp]]\nlisten = "127.0.0.1:1"\nto = "127.0.0.1:2"\nspeed = 3\n',
     "config.toml:4: [[tcp]] #1: speed: unknown key for a tcp rule"),
    ('colour = "blue"\n', "config.toml:1: unknown key or table 'colour'"),
    ('[defaults]\nspeed = 1\n', "config.toml:2: [defaults]: unknown key 'speed'"),
    ('[[tcp]]\nto = "127.0.0.1:2"\n', "config.toml:1: [[tcp]] #1: listen: is required"),
    ('[[tcp]]\nlisten = 80\nto = "127.0.0.1:2"\n',
     "config.toml:2: [[tcp]] #1: listen: expects a string"),
    ('[[tcp]]\nlisten = "127.0.0.1:1-3"\nto = "127.0.0.1:5-6"\n',
     "config.toml:3: [[tcp]] #1: to: 2 port(s) for the 3 of listen"),
    ('[[tcp]]\nlisten = "127.0.0.1:9-3"\nto = "127.0.0.1:5-6"\n',
     "config.toml:2: [[tcp]] #1: listen: bad port range '9-3'"),
    ('[[udp]]\nlisten = "127.0.0.1:1"\nto = "127.0.0.1:2"\ntimeout = -1\n',
     "config.toml:4: [[udp]] #1: timeout must be 0-"),
    ('[[tcp]]\nlisten = "127.0.0.1:1"\nto = "127.0.0.1:2"\nreuseport = 1\n',
     "config.toml:4: [[tcp]] #1: reuseport expects true or false"),
    ('[[kcptcp-client]]\nlisten = "127.0.0.1:1"\nto = "127.0.0.1:2"\nmax_pending = 3\n',
     "max_pending: unknown key for a kcptcp-client rule"),
    ('[[kcptcp-server]]\nlisten = "127.0.0.1:1"\nto = "127.0.0.1:2"\npsk = "abc"\n',
     "config.toml:4: [[kcptcp-server]] #1: psk expects 64 hex digits"),
    ('tcp = 3\n', "config.toml:1: tcp: write rules as [[tcp]] tables"),
    ('[[tcp]]\nlisten = "127.0.0.1:1"\nto = "127.0.0.1:2"\nx = [\n',
     "config.toml:4: invalid TOML"),
])
def test_each_error_is_one_line_naming_where(text, expected):
    message = error(text)
    assert expected in message
    assert "\n" not in message


def test_duplicate_listen_address_across_rules():
    message = error("""
        [[tcp]]
        name = "a"
        listen = "127.0.0.1:1000"
        to = "127.0.0.1:2000"

        [[kcptcp-client]]
        name = "b"
        listen = "127.0.0.1:1000"
        to = "127.0.0.1:2001"
        """)
    assert message == ('config.toml:9: [[kcptcp-client]] #1 "b": listen: 127.0.0.1:1000 is '
                       'already the listen address of [[tcp]] #1 "a"')


def test_tcp_and_udp_may_share_a_port():
    loaded = load("""
        [[tcp]]
        listen = "127.0.0.1:1000"
        to = "127.0.0.1:2000"
        [[udp]]
        listen = "127.0.0.1:1000"
        to = "127.0.0.1:2000"
        """)
    assert len(loaded.rules) == 2


def test_overlapping_port_ranges():
    message = error("""
        [[udp]]
        name = "a"
        listen = "127.0.0.1:5300-5310"
        to = "127.0.0.1:6300-6310"

        [[udp]]
        name = "b"
        listen = "127.0.0.1:5310-5311"
        to = "127.0.0.1:7310-7311"
        """)
    assert message == ('config.toml:9: [[udp]] #2 "b": listen: 127.0.0.1:5310 is already the '
                       'listen address of [[udp]] #1 "a" (a:5310)')


def test_duplicate_rule_names():
    message = error("""
        [[tcp]]
        name = "x"
        listen = "127.0.0.1:1000"
        to = "127.0.0.1:2000"
        [[udp]]
        name = "x"
        listen = "127.0.0.1:1000"
        to = "127.0.0.1:2000"
        """, parse)
    assert message == ('config.toml:6: [[udp]] #1 "x": name: \'x\' is already the name of '
                       'config.toml:2: [[tcp]] #1 "x"')


def test_inline_psk_is_accepted_with_a_warning():
    loaded = load("""
        [[kcptcp-server]]
        listen = "127.0.0.1:1000"
        to = "127.0.0.1:2000"
        psk = "%s"
        """ % ("ab" * 32))
    assert loaded.rules[0].config.conversation.tunnel.psk == b"\xab" * 32
    assert loaded.holds_key
    assert len(loaded.warnings) == 1 and "psk: the key is written in the file" in \
        loaded.warnings[0]
    assert "ab" * 32 not in loaded.warnings[0]


def test_tunnel_without_key_warns():
    loaded = load("""
        [[kcptcp-client]]
        listen = "127.0.0.1:1000-1001"
        to = "127.0.0.1:2000-2001"
        """)
    assert not loaded.holds_key
    assert loaded.warnings == ["config.toml:2: [[kcptcp-client]] #1: no psk or psk_file: the "
                               "tunnel is NOT encrypted or authenticated"]


def test_relative_paths_are_relative_to_the_file():
    parsed = parse("""
        pidfile = "run/p.pid"
        [[kcptcp-server]]
        listen = "127.0.0.1:1000"
        to = "127.0.0.1:2000"
        psk_file = "tunnel.key"
        [[kcptcp-client]]
        listen = "127.0.0.1:1001"
        to = "127.0.0.1:2000"
        psk_file = "/abs/tunnel.key"
        """, base_dir="/etc/portfwd")
    assert parsed.process.raw("pidfile") == "/etc/portfwd/run/p.pid"
    assert parsed.rules[0].options.raw("psk_file") == "/etc/portfwd/tunnel.key"
    assert parsed.rules[1].options.raw("psk_file") == "/abs/tunnel.key"


def test_process_keys_at_top_level():
    parsed = parse('pidfile = "/run/x.pid"\ndaemonize = false\n')
    assert parsed.process.raw("pidfile") == "/run/x.pid"
    assert parsed.process.label("pidfile") == "config.toml:1: pidfile"
    assert parsed.rules == ()
    with pytest.raises(ConfigError, match="config.toml:2: daemonize expects true or false"):
        runtime_config.process_config(parse('pidfile = "x"\ndaemonize = 1\n').process, ENV)


def test_log_level_key_at_top_level():
    process = parse('log_level = "debug"\n').process
    assert runtime_config.process_config(process, ENV).log_level == logging.DEBUG
    with pytest.raises(ConfigError, match="config.toml:1: log_level expects one of"):
        runtime_config.process_config(parse('log_level = "verbose"\n').process, ENV)


def test_configs_compare_equal_when_the_text_means_the_same():
    """What a reload keeps untouched: the same rule written again gives an equal config."""
    a = load('[[tcp]]\nlisten = "127.0.0.1:1"\nto = "127.0.0.1:2"\n')
    b = load('# comment\n[[tcp]]\nto = "127.0.0.1:2"\nlisten = "127.0.0.1:1"\n'
             'connect_timeout = 10\n')
    assert a.rules[0].config == b.rules[0].config
    assert a.rules[0].key == b.rules[0].key


def test_to_may_list_several_destinations_for_one_listener():
    text = '[[tcp]]\nlisten = "127.0.0.1:8080"\nto = ["10.0.0.5:80", "10.0.0.6:80"]\n'
    (spec,) = parse(text).rules
    assert spec.options.raw("dest") == ["10.0.0.5:80", "10.0.0.6:80"]
    ranged = '[[tcp]]\nlisten = "127.0.0.1:8080-8081"\nto = ["10.0.0.5:80"]\n'
    with pytest.raises(ConfigError, match="cannot go with a port range"):
        parse(ranged)
