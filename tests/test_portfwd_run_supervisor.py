"""The supervisor in-process (gevent): its metrics and per-rule snapshots, what a metrics
exporter reads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import gevent
from conftest import free_port, needs_ipv6
from test_portfwd_run import free_range, rule, tcp_rule

from portfwd.app.load import read_config
from portfwd.app.supervisor import Supervisor, SupervisorMetrics, bind_all
from portfwd.runtime.environment import Environment
from portfwd.tcpfwd.metrics import TcpMetrics
from portfwd.udpfwd.metrics import UdpMetrics


@contextlib.contextmanager
def started(path) -> Iterator[Supervisor]:
    """The supervisor of the file at ``path``, started, stopped on exit."""
    env = Environment()
    loaded = read_config(str(path), env)
    supervisor = Supervisor(str(path), "c.toml", env, loaded, bind_all(loaded))
    supervisor.start()
    try:
        yield supervisor
    finally:
        gevent.spawn(supervisor.stop, 1).join(10)


def test_rule_snapshots_and_metrics_across_a_reload(tmp_path):
    base = free_range(3)
    path = tmp_path / "c.toml"
    path.write_text(tcp_rule(f"127.0.0.1:{base}-{base + 1}", "127.0.0.1:7-8", "web")
                    + rule("udp", f"127.0.0.1:{base + 2}", "127.0.0.1:9", stats_interval=0))
    with started(path) as supervisor:
        snapshots = supervisor.rule_snapshots()
        assert [(kind, name) for kind, name, _ in snapshots] == [
            ("tcp", f"web:{base}"), ("tcp", f"web:{base + 1}"),
            ("udp", f"udp:127.0.0.1:{base + 2}")]
        assert isinstance(snapshots[0][2], TcpMetrics)
        assert isinstance(snapshots[2][2], UdpMetrics)
        assert supervisor.metrics() == SupervisorMetrics(rules=3, draining=0, reloads=0,
                                                         reload_failures=0)
        other = free_port()
        path.write_text(tcp_rule(f"127.0.0.1:{base}", "127.0.0.1:7", "web")
                        + tcp_rule(f"127.0.0.1:{other}", "127.0.0.1:7", "new"))
        supervisor.reload()
        assert [name for _, name, _ in supervisor.rule_snapshots()] == ["web", "new"]
        metrics = supervisor.metrics()
        assert (metrics.rules, metrics.reloads, metrics.reload_failures) == (2, 1, 0)
        path.write_text("nonsense = 1\n")
        supervisor.reload()
        assert supervisor.metrics().reload_failures == 1
        assert [name for _, name, _ in supervisor.rule_snapshots()] == ["web", "new"]
    assert supervisor.rule_snapshots() == []
    supervisor.reload()  # after a stop, a late SIGHUP starts nothing
    assert supervisor.rule_snapshots() == []


def test_a_tcp_address_changing_kind_takes_the_listener_over(tmp_path):
    """tcp -> kcptcp-client on one address: the new rule's service gets the old listener
    (binding anew would find the address in use); the reload is not refused."""
    port = free_port()
    path = tmp_path / "c.toml"
    path.write_text(tcp_rule(f"127.0.0.1:{port}", "127.0.0.1:7", "plain"))
    with started(path) as supervisor:
        path.write_text(rule("kcptcp-client", f"127.0.0.1:{port}", "127.0.0.1:9", "tunnel",
                             stats_interval=0))
        supervisor.reload()
        assert supervisor.metrics().reload_failures == 0
        assert [(kind, name) for kind, name, _ in supervisor.rule_snapshots()] == [
            ("kcptcp-client", "tunnel")]


@needs_ipv6
def test_v6only_of_a_bound_listener_cannot_change(tmp_path):
    port = free_port()
    path = tmp_path / "c.toml"
    path.write_text(tcp_rule(f"[::1]:{port}", "127.0.0.1:7", "six"))
    with started(path) as supervisor:
        before = next(iter(supervisor.running.values())).service
        path.write_text(tcp_rule(f"[::1]:{port}", "127.0.0.1:7", "six", v6only=True))
        supervisor.reload()
        assert supervisor.metrics().reload_failures == 1
        path.write_text(tcp_rule(f"[::1]:{port}", "127.0.0.1:8", "six"))
        supervisor.reload()  # another option of the same rule: handed over, not refused
        assert supervisor.metrics().reload_failures == 1
        assert supervisor.metrics().reloads == 1
        assert next(iter(supervisor.running.values())).service is not before  # a new service
