"""``portfwd run`` with workers (app/generations.py): every rule in every worker, a reload that
starts a new generation while the old one drains, counters summed across generations."""

from __future__ import annotations

import re
import signal
import socket

from conftest import connect, echo_roundtrip, free_port, run_cli, sample_value
from test_metrics_export_e2e import scrape
from test_portfwd_run import Reloader, rule, tcp_rule, udp_echo, udp_exchange, write  # noqa: F401
from test_prefork import echo_connections, gone, worker_pids


def test_workers_run_every_rule_and_a_reload_replaces_them(tool, tmp_path, echo_server,
                                                            udp_echo):  # noqa: F811
    tcp, udp, added, metrics = (free_port(), free_port(socket.AF_INET, socket.SOCK_DGRAM),
                                free_port(), free_port())
    pidfile = tmp_path / "run.pid"
    rules = (tcp_rule(f"127.0.0.1:{tcp}", f"127.0.0.1:{echo_server.port}", "web"),
             rule("udp", f"127.0.0.1:{udp}", f"127.0.0.1:{udp_echo.port}", "dns"))
    path = write(tmp_path / "c.toml", *rules,
                 top=f'workers = 2\nmetrics = "127.0.0.1:{metrics}"\n')
    run = tool("portfwd", "run", "-p", str(pidfile), path)
    first = worker_pids(run)
    run.wait_for_log(r"portfwd/w2\[\d+\] INFO: running 2 rules")
    run.wait_for_log(r"portfwd/w1\[\d+\] INFO: running 2 rules")
    run.wait_for_log("metrics on")
    echo_connections(tcp, 10, 5000)
    udp_exchange(udp, 5, seed=1)
    before = scrape(metrics)
    assert sample_value(before, "portfwd_connections_opened_total", rule="web") == 10
    held = connect("127.0.0.1", tcp)  # open across the reload: its old worker drains it
    echo_roundtrip(held, 1000, shutdown=False)

    write(tmp_path / "c.toml", *rules,
          tcp_rule(f"127.0.0.1:{added}", f"127.0.0.1:{echo_server.port}", "new"),
          top=f'workers = 2\nmetrics = "127.0.0.1:{metrics}"\n')
    line = Reloader(run).reload()
    assert 'added "new"; changed none; removed none; kept "web", "dns" (new workers)' in line
    echo_roundtrip(held, 1000, seed=7)  # still relayed by the draining worker, then EOF
    held.close()
    for tag, pid in first.items():
        run.wait_for_log(rf"worker {tag} \(pid {pid}\) exited with status 0")
    listing = run.wait_for_log(r"new workers: (.*);").group(1)
    second = {tag: int(pid) for tag, pid in re.findall(r"(w\d) pid (\d+)", listing)}
    assert set(second) == {"w1", "w2"} and not set(second.values()) & set(first.values())
    for port in (tcp, added):
        echo_connections(port, 6, 5000)
    udp_exchange(udp, 5, seed=2)
    after = scrape(metrics)
    assert sample_value(after, "portfwd_connections_opened_total", rule="web") == 17
    assert sample_value(after, "portfwd_connections_opened_total", rule="new") == 6
    assert sample_value(after, "portfwd_connections_active", rule="web") == 0
    assert run.stop(signal.SIGTERM) == 0
    assert not pidfile.exists()
    assert all(gone(pid) for pid in [*first.values(), *second.values()])


def test_bad_worker_counts_of_portfwd_run(tmp_path):
    path = write(tmp_path / "c.toml", tcp_rule("127.0.0.1:1", "127.0.0.1:2"), top="workers = -1\n")
    for command in (["run", path], ["run", "-w", "x", path]):
        done = run_cli("portfwd", *command)
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("portfwd: error: ")
    assert "workers must be 0-1024, got -1" in run_cli("portfwd", "run", path).stderr
    assert run_cli("portfwd", "run", "-w", "x", path).stderr == (
        "portfwd: error: -w expects a whole number, got 'x'\n")


def test_a_rule_runs_in_as_many_workers_as_it_asks(tool, tmp_path, echo_server,
                                                   udp_echo):  # noqa: F811
    tcp, udp = free_port(), free_port(socket.AF_INET, socket.SOCK_DGRAM)
    web = tcp_rule(f"127.0.0.1:{tcp}", f"127.0.0.1:{echo_server.port}", "web", workers=2)
    dns = rule("udp", f"127.0.0.1:{udp}", f"127.0.0.1:{udp_echo.port}", "dns")
    path = write(tmp_path / "c.toml", web, dns)
    run = tool("portfwd", "run", path)
    assert set(worker_pids(run)) == {"w1", "w2"}  # the largest rule's count
    run.wait_for_log(r"portfwd/w1\[\d+\] INFO: running 2 rules on 2 listeners")
    run.wait_for_log(r"portfwd/w2\[\d+\] INFO: running 1 rules on 1 listeners")
    echo_connections(tcp, 8, 2000)
    udp_exchange(udp, 3, seed=1)
    reloader = Reloader(run)
    write(tmp_path / "c.toml", web,
          rule("udp", f"127.0.0.1:{udp}", f"127.0.0.1:{udp_echo.port}", "dns", workers=2))
    assert 'changed "dns"' in reloader.reload()
    run.wait_for_log(r"portfwd/w2\[\d+\] INFO: running 2 rules on 2 listeners")
    for n in range(4):
        udp_exchange(udp, 2, seed=n)  # from several source ports: both workers' sockets
    write(tmp_path / "c.toml", web,
          rule("udp", f"127.0.0.1:{udp}", f"127.0.0.1:{udp_echo.port}", "dns", workers=3))
    line = reloader.reload()
    assert "reload refused" in line and "3 workers, but this process started 2" in line
    udp_exchange(udp, 2, seed=9)
    assert run.stop() == 0


def test_a_bad_rule_worker_count_names_the_rule(tmp_path):
    path = write(tmp_path / "c.toml", tcp_rule("127.0.0.1:1", "127.0.0.1:2", "web",
                                               workers="x"))
    done = run_cli("portfwd", "check", path)
    assert done.returncode == 2
    assert done.stderr == (f'portfwd: error: {path}:5: [[tcp]] #1 "web": workers expects a '
                           "whole number, got 'x'\n")


def test_a_tunnel_server_rule_in_two_workers(tool, tmp_path, echo_server):
    from test_portfwd_run import key_file
    from test_prefork import PSK
    udp, local = free_port(socket.AF_INET, socket.SOCK_DGRAM), free_port()
    path = write(tmp_path / "c.toml", rule("kcptcp-server", f"127.0.0.1:{udp}",
                                           f"127.0.0.1:{echo_server.port}", "tunnel",
                                           psk_file=key_file(tmp_path), workers=2))
    run = tool("portfwd", "run", path)
    worker_pids(run)
    run.wait_for_log(r"portfwd/w2\[\d+\] INFO: running 1 rules")
    client = tool("kcptcp-client", "-K", PSK, f"127.0.0.1:{local}", f"127.0.0.1:{udp}")
    client.wait_for_log("tunnelling")
    echo_connections(local, 16, 20_000)  # 16 conversations, steered by conv over both
    log = run.log()
    for tag in ("w1", "w2"):
        assert re.search(rf"portfwd/{tag}\[\d+\] INFO: conv=\d+ open", log), log
    assert "cannot steer" not in log
    assert client.stop() == 0 and run.stop() == 0
