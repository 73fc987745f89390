"""kcptcp-server's targets: several of them (--balance, --max-fails, --fail-timeout: tcpfwd's
Upstreams), with the real processes on loopback; ``to = [...]`` in a [[kcptcp-server]] rule of
``portfwd run``; a reload. The server's --idle-timeout / --half-close-timeout are tested with
the client's in test_policy_tunnel.py."""

from __future__ import annotations

import socket
import time

from conftest import EchoServer, connect, free_port, run_cli, sample_value
from docopt import docopt
from proxy_peers import roundtrip
from test_metrics_export_e2e import scrape
from test_portfwd_run import key_file, write

from portfwd.kcptcp.cli import SERVER_FIELDS, SERVER_USAGE
from portfwd.kcptcp.config import server_config
from portfwd.kcptcp.server import TunnelServer
from portfwd.runtime.environment import Environment
from portfwd.runtime.options import Options
from portfwd.tunnel.origin import Origin

PSK = "0123456789abcdef" * 4


def start_tunnel(tool, *targets: int, server_extra: tuple = ()):
    """kcptcp-server to ``targets`` (ports on 127.0.0.1, in order) and a kcptcp-client;
    returns (the client's TCP port, server, client)."""
    udp = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = free_port()
    server = tool("kcptcp-server", "-K", PSK, *server_extra, f"127.0.0.1:{udp}",
                  *(f"127.0.0.1:{port}" for port in targets))
    client = tool("kcptcp-client", "-K", PSK, f"127.0.0.1:{tcp}", f"127.0.0.1:{udp}")
    server.wait_for_log("tunnelling")
    client.wait_for_log("tunnelling")
    return tcp, server, client


def exchanges(port: int, count: int, log) -> None:
    for _ in range(count):
        with connect("127.0.0.1", port) as sock:
            assert roundtrip(sock) == b"ping", log()


def test_first_skips_a_dead_target_and_exports_it(tool):
    live = EchoServer()
    dead = free_port()
    metrics = free_port()
    port, server, _ = start_tunnel(tool, dead, live.port,
                                   server_extra=("--metrics", f"127.0.0.1:{metrics}"))
    assert f"-> tcp 127.0.0.1:{dead}, 127.0.0.1:{live.port}" in server.log()
    exchanges(port, 10, server.log)
    assert live.accepted == 10  # every conversation landed on the live one
    assert f"destination 127.0.0.1:{dead} down for 10 s" in server.log()
    samples = scrape(metrics)
    assert sample_value(samples, "portfwd_destinations_down_total") == 1
    assert sample_value(samples, "portfwd_lookups_failed_total") == 0
    live.close()


def test_roundrobin_spreads_and_picks_up_a_returned_target(tool):
    first, second = EchoServer(), EchoServer()
    dead_port = free_port()
    port, server, _ = start_tunnel(tool, first.port, second.port, dead_port,
                                   server_extra=("--balance", "roundrobin",
                                                 "--fail-timeout", "1"))
    exchanges(port, 12, server.log)
    # in turn over the three; the dead one's turns go to the next live one
    assert first.accepted + second.accepted == 12 and min(first.accepted, second.accepted) >= 4
    revived = EchoServer(port=dead_port)
    time.sleep(1.2)  # past --fail-timeout: the returned one is tried again
    before = first.accepted + second.accepted
    exchanges(port, 12, server.log)
    assert revived.accepted == 4, server.log()  # a third of the turns
    assert first.accepted + second.accepted == before + 8
    for echo in (first, second, revived):
        echo.close()


def test_every_target_down_closes_the_client_connection(tool):
    port, server, _ = start_tunnel(tool, free_port(), free_port())
    with connect("127.0.0.1", port) as sock:
        sock.settimeout(15)
        sock.sendall(b"ping")
        assert sock.recv(10) == b""
    server.wait_for_log(r"conv=\d+: connect to 127\.0\.0\.1:\d+, 127\.0\.0\.1:\d+ failed: "
                        r"Connection refused")


def test_config_file_to_list(tool, tmp_path):
    """``to = [...]`` in a [[kcptcp-server]] rule: checked, listed, and run (with a
    [[kcptcp-client]] rule in the same process in front of it); a kcpudp-server rule takes
    one target."""
    live = EchoServer()
    dead, udp, tcp = free_port(), free_port(socket.AF_INET, socket.SOCK_DGRAM), free_port()
    key_file(tmp_path)
    path = write(tmp_path / "c.toml", f"""\
[[kcptcp-server]]
listen = "127.0.0.1:{udp}"
to = ["127.0.0.1:{dead}", "127.0.0.1:{live.port}"]
balance = "roundrobin"
idle_timeout = 30
psk_file = "tunnel.key"

[[kcptcp-client]]
listen = "127.0.0.1:{tcp}"
to = "127.0.0.1:{udp}"
psk_file = "tunnel.key"
""")
    checked = run_cli("portfwd", "check", path)
    assert checked.returncode == 0, checked.stderr
    assert f"127.0.0.1:{dead}, 127.0.0.1:{live.port}" in checked.stdout
    process = tool("portfwd", "run", path)
    process.wait_for_log("tunnelling .*udp")
    exchanges(tcp, 6, process.log)
    assert live.accepted == 6
    live.close()
    bad = write(tmp_path / "u.toml", f"""\
[[kcpudp-server]]
listen = "127.0.0.1:{udp}"
to = ["127.0.0.1:53", "127.0.0.1:54"]
""")
    result = run_cli("portfwd", "check", bad)
    assert result.returncode == 2 and "takes one host:port here, got 2" in result.stderr


def test_bad_options():
    result = run_cli("kcptcp-server", "--balance", "random", "127.0.0.1:4000", "127.0.0.1:22")
    assert result.returncode == 2
    assert result.stderr.strip() == ("kcptcp-server: error: --balance expects one of first, "
                                     "roundrobin, got 'random'")
    result = run_cli("kcptcp-client", "--balance", "first", "127.0.0.1:4000", "127.0.0.1:22")
    assert result.returncode == 2
    assert "--balance is a kcptcp-server option" in result.stderr


def server_config_of(*args: str):
    return server_config(Options.from_docopt(docopt(SERVER_USAGE, list(args)), SERVER_FIELDS),
                         Environment())


def test_reload_applies_targets_caps_and_headers():
    """reconfigure (portfwd run's reload of a [[kcptcp-server]] rule): conversations that
    start from now on get the new targets, balancing, --max-conns, --proxy-protocol and
    half-close timeout; unchanged targets keep their health."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    server = TunnelServer(server_config_of("127.0.0.1:4000", "127.0.0.1:5000"), sock)
    try:
        upstreams = server.upstreams
        server.reconfigure(server_config_of("--stats-interval", "0", "127.0.0.1:4000",
                                            "127.0.0.1:5000"))
        assert server.upstreams is upstreams  # same targets: their health is kept
        server.reconfigure(server_config_of(
            "--balance", "roundrobin", "--max-conns", "3", "--proxy-protocol", "v1",
            "--half-close-timeout", "5", "127.0.0.1:4000", "127.0.0.1:5000", "127.0.0.1:5001"))
        assert [str(d) for d in server.upstreams.destinations] == ["127.0.0.1:5000",
                                                                   "127.0.0.1:5001"]
        assert server.upstreams.selector.balance.value == "roundrobin"
        assert server.max_conns == 3 and server.sweeper.timeout == 5
        origin = Origin(("192.0.2.1", 7), ("127.0.0.1", 8))
        assert server._prelude(origin) == b"PROXY TCP4 192.0.2.1 127.0.0.1 7 8\r\n"
    finally:
        sock.close()


def test_a_target_by_name(tool):
    """``localhost``: resolved at start and re-resolved in the background, its addresses
    (::1 and 127.0.0.1 where both exist) raced with Happy Eyeballs: the echo on 127.0.0.1
    answers whichever comes first."""
    echo = EchoServer()
    udp, tcp = free_port(socket.AF_INET, socket.SOCK_DGRAM), free_port()
    server = tool("kcptcp-server", "-K", PSK, f"127.0.0.1:{udp}", f"localhost:{echo.port}")
    client = tool("kcptcp-client", "-K", PSK, f"127.0.0.1:{tcp}", f"127.0.0.1:{udp}")
    server.wait_for_log("tunnelling")
    client.wait_for_log("tunnelling")
    exchanges(tcp, 3, server.log)
    assert echo.accepted == 3
    echo.close()
