"""-w <n> process workers: forwarding, restarts, signals, sessions that never split, metrics
summed over workers (runtime/prefork.py), with real tool processes."""

from __future__ import annotations

import os
import pickle
import re
import resource
import signal
import socket
import threading
import time

import pytest
from conftest import connect, echo_roundtrip, free_port, run_cli, sample_value
from test_metrics_export_e2e import scrape
from test_udpfwd import UdpPeer, udp_socket, wait_until

from portfwd.kcptcp.metrics import ConversationMetrics, ConversationTotals, TunnelServerMetrics
from portfwd.runtime import prefork
from portfwd.runtime.metrics import ErrorCounts
from portfwd.tcpfwd.metrics import ConnectionEntry, TcpMetrics

PSK = "0123456789abcdef" * 4
STARTED = r"started (\d+) workers: ((?:w\d+ pid \d+(?:, )?)+)"
ONE_RULE_TOOLS = ["tcpfwd", "udpfwd", "kcptcp-client", "kcptcp-server", "kcpudp-client",
                  "kcpudp-server"]
TWO = ("127.0.0.1:%d", "127.0.0.1:%d")


def worker_pids(process) -> dict[str, int]:
    """``{"w1": pid, ...}`` from the parent's ``started n workers`` line."""
    listing = process.wait_for_log(STARTED).group(2)
    return {tag: int(pid) for tag, pid in re.findall(r"(w\d+) pid (\d+)", listing)}


def gone(pid: int) -> bool:
    """No such process (or only a zombie nobody waits for)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def echo_connections(port: int, count: int, size: int) -> None:
    """``count`` connections one after the other, each echoing ``size`` seeded bytes."""
    for n in range(count):
        with connect("127.0.0.1", port) as sock:
            echo_roundtrip(sock, size, seed=n)


def tcp_snapshot(accepted: int, active: int, failures: dict, top: tuple = ()) -> TcpMetrics:
    return TcpMetrics(accepted=accepted, connections_opened=accepted, connections_active=active,
                      connections_closed=accepted - active, connections_reset=0,
                      bytes_up=10 * accepted, bytes_down=20 * accepted,
                      dial_failures=failures, no_destination=0, accept_errors={}, top=top)


# --- sans-IO: summing snapshots --------------------------------------------------------------

def test_merge_adds_counters_and_errno_counts_and_keeps_every_live_entry():
    errors = ErrorCounts()
    errors.add(ConnectionRefusedError(111, "refused"))
    a = tcp_snapshot(5, 1, errors.snapshot(), (ConnectionEntry(1, 5, 5, 1.0),))
    b = tcp_snapshot(7, 2, {"ECONNREFUSED": 2, "ETIMEDOUT": 1}, (ConnectionEntry(1, 9, 9, 2.0),))
    total = prefork.merge(a, b)
    assert (total.accepted, total.connections_active, total.bytes_down) == (12, 3, 240)
    assert dict(total.dial_failures) == {"ECONNREFUSED": 3, "ETIMEDOUT": 1}
    assert len(total.top) == 2


def test_ended_keeps_counters_and_drops_what_was_live():
    conv = ConversationMetrics(conv=1, up=1, down=2, srtt=3, rto=4, inflight=0, queued=0,
                               peer_wnd=0, rcv_queue=0, retrans=0, fast_retrans=0, epoch=0,
                               dgrams_out=5, dgrams_in=6, dropped_auth=0, dropped_replay=0,
                               age=1.0, rekeys_started=0, epoch_switches=0,
                               peer_address_changes=0)
    fields = {f: 1 for f in ("finished", "handshakes", "rejected_auth", "rejected_replay",
                             "rejected_stale", "rejected_rate", "rejected_before_start",
                             "rejected_load", "cookies_sent", "cookie_hellos", "restarted",
                             "dropped_unknown", "dropped_malformed", "refused_pending",
                             "refused_full", "evicted", "send_errors")}
    server = TunnelServerMetrics(conversations=3, dial_failures={}, per_conversation=(conv,),
                                 totals=ConversationTotals(handshakes=4, up=100), **fields)
    left = prefork.ended(server)
    assert left.conversations == 0 and left.per_conversation == ()
    assert left.handshakes == 1 and left.totals.up == 100
    # what the parent sums: the dead worker's counters plus a live one's
    total = prefork.merge_rules([("kcptcp-server", "r", left)], [("kcptcp-server", "r", server)])
    assert len(total) == 1 and total[0][2].totals.up == 200 and total[0][2].conversations == 3


def sample(cls: type) -> object:
    """An instance of snapshot class ``cls`` with every number 1 and one entry per list."""
    import collections.abc
    import dataclasses
    import typing

    def value(hint: object) -> object:
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            return sample(hint)
        if origin is tuple:
            return (value(typing.get_args(hint)[0]),)
        if origin in (collections.abc.Mapping, dict):
            return {"EXAMPLE": 1}
        if hint is bool:
            return True
        return {int: 1, float: 1.0, str: "x"}.get(hint, 1)

    hints = typing.get_type_hints(cls)
    return cls(**{f.name: value(hints[f.name]) for f in dataclasses.fields(cls) if f.init})


def test_what_a_dead_worker_leaves_shows_nothing_live():
    """Every gauge of every kind reads 0 from ended(): a live field missing from LIVE_FIELDS
    would keep a dead worker's connections "active" forever."""
    from portfwd.kcptcp.metrics import CLIENT_KIND, SERVER_KIND, TunnelClientMetrics
    from portfwd.kcpudp import metrics as kcpudp
    from portfwd.runtime.exporter import Families
    from portfwd.tcpfwd.metrics import KIND as TCP
    from portfwd.udpfwd.metrics import KIND as UDP
    from portfwd.udpfwd.metrics import UdpMetrics
    kinds = [(TCP, TcpMetrics), (UDP, UdpMetrics), (CLIENT_KIND, TunnelClientMetrics),
             (SERVER_KIND, TunnelServerMetrics),
             (kcpudp.CLIENT_KIND, kcpudp.DatagramClientMetrics),
             (kcpudp.SERVER_KIND, kcpudp.DatagramServerMetrics)]
    for kind, cls in kinds:
        live, left = Families(), Families()
        kind.families(live, {"rule": "r"}, sample(cls))
        kind.families(left, {"rule": "r"}, prefork.ended(sample(cls)))
        gauges = 0
        for family in left.collect():
            if family.type not in ("gauge", "gaugehistogram"):
                continue
            for s in family.samples:
                if not s.name.endswith(("_bucket", "_gsum")) or s.value:
                    gauges += 1
                    assert s.value == 0, (kind.name, s)
        assert gauges, kind.name  # the kind has gauges at all (the test sees them)
        counters = {s.name: s.value for f in live.collect() if f.type == "counter"
                    for s in f.samples}
        kept = {s.name: s.value for f in left.collect() if f.type == "counter"
                for s in f.samples}
        assert kept == counters, kind.name  # counters survive the worker


def test_bind_slots_port_zero_and_growing_a_group():
    from portfwd.runtime.addr import Resolved
    from portfwd.runtime.sockets import ListenOptions
    wildcard = Resolved(socket.AF_INET, ("127.0.0.1", 0))
    for socktype in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        group = prefork.bind_slots(wildcard, socktype, ListenOptions(), 2)
        port = group[0].getsockname()[1]
        assert {sock.getsockname()[1] for sock in group} == {port}
        grown = prefork.grow_slots(group, wildcard, socktype, ListenOptions(), 4)
        assert grown[:2] == group and {s.getsockname()[1] for s in grown} == {port}
        for sock in grown:
            sock.close()


def test_a_steered_group_picks_its_member_by_the_conversation_id():
    import select
    import struct

    from portfwd.kcptcp.cli import steer_conversations
    from portfwd.runtime.addr import Resolved
    from portfwd.runtime.sockets import ListenOptions
    group = prefork.bind_slots(Resolved(socket.AF_INET, ("127.0.0.1", 0)), socket.SOCK_DGRAM,
                               ListenOptions(), 4)
    steer_conversations(group)
    port = group[0].getsockname()[1]
    try:
        for conv in (0, 1, 2, 3, 4, 7, 0xFFFFFFFF, 123456789):
            for _ in range(3):  # from three source ports: the address does not matter
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                    client.sendto(struct.pack(">BI", 1, conv) + b"body", ("127.0.0.1", port))
                    ready, _, _ = select.select(group, [], [], 5)
                    assert [group.index(sock) for sock in ready] == [conv % 4]
                    ready[0].recv(100)
    finally:
        for sock in group:
            sock.close()


def test_snapshots_cross_the_control_socket_as_they_are():
    snapshot = tcp_snapshot(3, 0, ErrorCounts().snapshot())
    assert pickle.loads(pickle.dumps([("tcp", "r", snapshot)])) == [("tcp", "r", snapshot)]


def test_worker_count_zero_is_one_per_cpu():
    from portfwd.runtime.options import Options
    assert prefork.worker_count(Options({})) == 1
    assert prefork.worker_count(Options({"workers": "0"})) == len(os.sched_getaffinity(0))
    assert prefork.worker_count(Options({"workers": "3"})) == 3


# --- bad values -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ONE_RULE_TOOLS)
@pytest.mark.parametrize("value, message", [("-1", "-w must be 0-1024, got -1"),
                                            ("x", "-w expects a whole number, got 'x'")])
def test_bad_worker_count_is_one_line_and_exit_2(name, value, message):
    done = run_cli(name, "-w", value, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    assert done.returncode == 2
    assert done.stderr == f"{name}: error: {message}\n"


# --- tcpfwd -----------------------------------------------------------------------------------

def test_tcpfwd_two_workers_forward_intact_data_and_share_the_load(tool, echo_server):
    port = free_port()
    fwd = tool("tcpfwd", "-w", "2", "--log-level", "debug", f"127.0.0.1:{port}",
               f"127.0.0.1:{echo_server.port}")
    pids = worker_pids(fwd)
    assert set(pids) == {"w1", "w2"} and fwd.pid not in pids.values()
    fwd.wait_for_log(r"tcpfwd/w2\[\d+\] INFO: forwarding")
    fwd.wait_for_log(r"tcpfwd/w1\[\d+\] INFO: forwarding")
    for n in range(24):
        with connect("127.0.0.1", port) as sock:
            echo_roundtrip(sock, 1 << 18 if n % 8 == 0 else 1000, seed=n)
    # the kernel's hash spreads 24 connections over both (all on one: p = 2**-23)
    for tag in ("w1", "w2"):
        fwd.wait_for_log(rf"tcpfwd/{tag}\[{pids[tag]}\] DEBUG: conn \d+ closed")
    assert fwd.stop() == 0


def test_tcpfwd_worker_killed_is_restarted_and_metrics_never_go_back(tool, echo_server):
    port, metrics = free_port(), free_port()
    fwd = tool("tcpfwd", "-w", "2", "--log-level", "debug", "--metrics", f"127.0.0.1:{metrics}",
               f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}")
    pids = worker_pids(fwd)
    fwd.wait_for_log("metrics on")
    echo_connections(port, 20, 1000)
    rule = {"rule": f"tcp:127.0.0.1:{port}"}
    before = scrape(metrics)
    assert sample_value(before, "portfwd_connections_opened_total", **rule) == 20
    assert sample_value(before, "portfwd_bytes_total", direction="up", **rule) == 20_000
    os.kill(pids["w1"], signal.SIGKILL)
    fwd.wait_for_log(rf"worker w1 \(pid {pids['w1']}\) killed by signal 9 after [\d.]+ s; "
                     r"restarting it in 0\.1 s")
    new = int(fwd.wait_for_log(r"worker w1 restarted: pid (\d+)").group(1))
    assert new != pids["w1"] and gone(pids["w1"])
    after = scrape(metrics)
    assert sample_value(after, "portfwd_connections_opened_total", **rule) == 20
    assert sample_value(after, "portfwd_bytes_total", direction="up", **rule) == 20_000
    # both slots serve again: the restarted one took its socket over
    echo_connections(port, 20, 1000)
    fwd.wait_for_log(rf"tcpfwd/w1\[{new}\] DEBUG: conn \d+ closed")
    final = scrape(metrics)
    assert sample_value(final, "portfwd_connections_opened_total", **rule) == 40
    assert sample_value(final, "portfwd_connections_active", **rule) == 0
    assert sample_value(final, "portfwd_workers") == 2
    assert sample_value(final, "portfwd_worker_restarts_total") == 1
    assert sample_value(final, "portfwd_workers_cpu_seconds_total") >= 0  # (ticks: may be 0)
    assert fwd.stop() == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_each_stop_signal_stops_every_worker_and_removes_the_pidfile(tool, echo_server,
                                                                     tmp_path, signum):
    pidfile = tmp_path / "w.pid"
    port = free_port()
    fwd = tool("tcpfwd", "-w", "2", "-p", str(pidfile), f"127.0.0.1:{port}",
               f"127.0.0.1:{echo_server.port}")
    pids = worker_pids(fwd)
    fwd.wait_for_log(r"w2\[\d+\] INFO: forwarding")
    assert pidfile.read_text() == f"{fwd.pid}\n"  # the parent's, not a worker's
    held = connect("127.0.0.1", port)  # an open relay drains, then ends
    echo_roundtrip(held, 100, shutdown=False)
    assert fwd.stop(signum) == 0
    held.close()
    assert not pidfile.exists()
    assert all(gone(pid) for pid in pids.values())
    log = fwd.log()
    for tag, pid in pids.items():
        assert f"worker {tag} (pid {pid}) exited with status 0" in log
        assert re.search(rf"tcpfwd/{tag}\[{pid}\] INFO: stopped", log)


def test_a_worker_that_does_not_stop_is_killed_after_the_stop_timeout(tool, echo_server,
                                                                      tmp_path):
    pidfile = tmp_path / "w.pid"
    fwd = tool("tcpfwd", "-w", "2", "-p", str(pidfile), f"127.0.0.1:{free_port()}",
               f"127.0.0.1:{echo_server.port}")
    pids = worker_pids(fwd)
    fwd.wait_for_log(r"w2\[\d+\] INFO: forwarding")
    os.kill(pids["w2"], signal.SIGSTOP)  # it cannot act on SIGTERM any more
    assert fwd.stop(signal.SIGTERM, timeout=30) == 0
    log = fwd.log()
    assert f"worker w2 (pid {pids['w2']}) did not stop within 8 s: killing it" in log
    assert f"worker w2 (pid {pids['w2']}) killed by signal 9" in log
    assert not pidfile.exists() and all(gone(pid) for pid in pids.values())


def test_workers_stop_when_the_parent_is_killed(tool, echo_server):
    fwd = tool("tcpfwd", "-w", "2", f"127.0.0.1:{free_port()}",
               f"127.0.0.1:{echo_server.port}")
    pids = worker_pids(fwd)
    fwd.wait_for_log(r"w2\[\d+\] INFO: forwarding")
    fwd.proc.kill()
    fwd.proc.wait()
    wait_until(lambda: all(gone(pid) for pid in pids.values()), 15, "orphaned workers to stop")


def test_zero_workers_is_one_per_cpu(tool, echo_server):
    port = free_port()
    fwd = tool("tcpfwd", "-w", "0", f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}")
    cpus = len(os.sched_getaffinity(0))
    if cpus == 1:
        fwd.wait_for_log("forwarding")
        assert "workers" not in fwd.log()  # one CPU: served in the process itself
    else:
        assert len(worker_pids(fwd)) == cpus
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 10_000)
    assert fwd.stop() == 0


def test_one_worker_is_todays_single_process(tool, echo_server):
    port = free_port()
    fwd = tool("tcpfwd", f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}")
    fwd.wait_for_log(rf"tcpfwd\[{fwd.pid}\] INFO: forwarding")
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 10_000)
    assert "worker" not in fwd.log()
    assert fwd.stop() == 0


# --- udpfwd: a client's datagrams always reach one worker -------------------------------------

def client_number(datagram: bytes) -> bytes:
    """The client a test datagram comes from: its first line."""
    return datagram.split(b"\n", 1)[0]


@pytest.fixture
def recorder():
    """A UDP echo target that records, per client number, every source address a datagram of
    that client came from: one per session."""
    target = UdpPeer(key=client_number)
    yield target
    target.close()


def many_udp_clients(count: int) -> list[socket.socket]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < count + 500:
        pytest.skip(f"fd hard limit {hard} is too low for {count} client sockets")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 2000)), hard))
    clients = []
    for _ in range(count):
        sock = udp_socket("127.0.0.1")
        sock.setblocking(False)
        clients.append(sock)
    return clients


def round_trip_all(clients: list[socket.socket], addr: tuple, rounds: int, tag: bytes,
                   seconds: float = 60) -> None:
    """Every client sends ``rounds`` datagrams (its number, the tag, the round) and reads
    every answer back; datagrams lost on a loaded machine are sent again, bounded in time."""
    want = {(n, r) for n in range(len(clients)) for r in range(rounds)}
    deadline = time.monotonic() + seconds
    while want and time.monotonic() < deadline:
        for n, r in sorted(want):
            clients[n].sendto(b"%d\n%s %d" % (n, tag, r), addr)
        end = time.monotonic() + 1.0
        while want and time.monotonic() < end:
            for n, sock in enumerate(clients):
                try:
                    while True:
                        data = sock.recv(100)
                        number, rest = data.split(b"\n")
                        got_tag, r = rest.split(b" ")
                        assert int(number) == n
                        if got_tag == tag:
                            want.discard((n, int(r)))
                except BlockingIOError:
                    pass
            time.sleep(0.01)
    assert not want, f"{len(want)} datagrams never answered"


def test_1000_udp_clients_each_see_one_session_across_two_workers(tool, recorder):
    clients = many_udp_clients(1000)
    port, metrics = free_port(socket.AF_INET, socket.SOCK_DGRAM), free_port()
    fwd = tool("udpfwd", "-w", "2", "--metrics", f"127.0.0.1:{metrics}", "--stats-interval",
               "0", f"127.0.0.1:{port}", f"127.0.0.1:{recorder.port}")
    pids = worker_pids(fwd)
    fwd.wait_for_log(r"w1\[\d+\] INFO: forwarding")
    fwd.wait_for_log(r"w2\[\d+\] INFO: forwarding")
    try:
        round_trip_all(clients, ("127.0.0.1", port), 3, b"a")
        assert len(recorder.by_key) == 1000
        split = {n: s for n, s in recorder.by_key.items() if len(s) != 1}
        assert not split, f"{len(split)} clients reached the target from several sessions"
        samples = scrape(metrics)
        rule = {"rule": f"udp:127.0.0.1:{port}"}
        assert sample_value(samples, "portfwd_sessions_active", **rule) == 1000
        assert sample_value(samples, "portfwd_sessions_opened_total", **rule) == 1000
        # Kill one worker: its clients get a new session in the restarted worker (on the
        # same socket); the other worker's clients keep theirs, and nobody ever splits.
        before = {n: next(iter(s)) for n, s in recorder.by_key.items()}
        os.kill(pids["w1"], signal.SIGKILL)
        fwd.wait_for_log(r"worker w1 restarted: pid \d+")
        round_trip_all(clients, ("127.0.0.1", port), 2, b"b")
        moved = {n for n, s in recorder.by_key.items() if len(s) == 2}
        assert all(len(s) <= 2 for s in recorder.by_key.values())
        assert 0 < len(moved) < 1000  # the dead worker's clients only
        round_trip_all(clients, ("127.0.0.1", port), 2, b"c")
        assert all(len(s) <= 2 for s in recorder.by_key.values())
        assert {n for n, s in recorder.by_key.items() if len(s) == 2} == moved
        opened = sample_value(scrape(metrics), "portfwd_sessions_opened_total", **rule)
        assert opened == 1000 + len(moved)  # the dead worker's count kept, plus the new ones
        assert all(before[n] in recorder.by_key[n] for n in before)
    finally:
        for sock in clients:
            sock.close()
    assert fwd.stop() == 0


# --- the tunnel servers -----------------------------------------------------------------------

def test_kcptcp_two_workers_each_end_carry_intact_streams(tool, echo_server):
    udp = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    local, metrics = free_port(), free_port()
    server = tool("kcptcp-server", "-w", "2", "-K", PSK, "--metrics", f"127.0.0.1:{metrics}",
                  f"127.0.0.1:{udp}", f"127.0.0.1:{echo_server.port}")
    pids = worker_pids(server)
    server.wait_for_log(r"w1\[\d+\] INFO: tunnelling")
    server.wait_for_log(r"w2\[\d+\] INFO: tunnelling")
    client = tool("kcptcp-client", "-w", "2", "-K", PSK, f"127.0.0.1:{local}",
                  f"127.0.0.1:{udp}")
    client.wait_for_log(r"w1\[\d+\] INFO: tunnelling")
    client.wait_for_log(r"w2\[\d+\] INFO: tunnelling")
    # each connection is a conversation from its own UDP port: spread by the kernel's hash
    socks = [connect("127.0.0.1", local) for _ in range(12)]
    threads = [threading.Thread(target=echo_roundtrip, args=(s, 1 << 17, n))
               for n, s in enumerate(socks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for sock in socks:
        sock.close()
    for tag in ("w1", "w2"):
        server.wait_for_log(rf"kcptcp-server/{tag}\[{pids[tag]}\] INFO: .* open ")
    rule = {"rule": f"kcptcp-server:127.0.0.1:{udp}"}
    samples = scrape(metrics)
    assert sample_value(samples, "portfwd_tunnel_handshakes_total", **rule) == 12
    assert client.stop() == 0 and server.stop() == 0


def test_kcpudp_two_workers_each_end_keep_each_client_in_one_conversation(tool, recorder):
    udp = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    local = free_port(socket.AF_INET, socket.SOCK_DGRAM)
    server = tool("kcpudp-server", "-w", "2", "-K", PSK, f"127.0.0.1:{udp}",
                  f"127.0.0.1:{recorder.port}")
    worker_pids(server)
    server.wait_for_log(r"w2\[\d+\] INFO: tunnelling")
    client = tool("kcpudp-client", "-w", "2", "-K", PSK, f"127.0.0.1:{local}",
                  f"127.0.0.1:{udp}")
    client.wait_for_log(r"w1\[\d+\] INFO: tunnelling")
    client.wait_for_log(r"w2\[\d+\] INFO: tunnelling")
    clients = many_udp_clients(40)
    try:
        round_trip_all(clients, ("127.0.0.1", local), 4, b"a")
    finally:
        for sock in clients:
            sock.close()
    assert len(recorder.by_key) == 40
    assert all(len(s) == 1 for s in recorder.by_key.values())
    log = server.log()
    assert re.search(r"kcpudp-server/w1\[\d+\] INFO: .* open ", log)
    assert re.search(r"kcpudp-server/w2\[\d+\] INFO: .* open ", log)
    log = client.log()  # the client's workers, too, each took some of the 40 client addresses
    assert re.search(r"kcpudp-client/w1\[\d+\] INFO: .* open ", log)
    assert re.search(r"kcpudp-client/w2\[\d+\] INFO: .* open ", log)
    assert client.stop() == 0 and server.stop() == 0


def test_daemon_with_workers_signals_and_log_files(echo_server, tmp_path):
    """-d -w 2: the pidfile names the daemon (the parent); SIGUSR1 logs the totals once,
    SIGUSR2 makes every process reopen its log file; SIGTERM stops them all."""
    pidfile, log_file = tmp_path / "d.pid", tmp_path / "d.log"
    port = free_port()
    done = run_cli("tcpfwd", "-d", "-w", "2", "-p", str(pidfile), "--log-file", str(log_file),
                   "--log-level", "debug", f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}")
    assert done.returncode == 0, done.stderr
    parent = int(pidfile.read_text())
    pids: dict[str, int] = {}
    try:
        wait_until(lambda: len(re.findall(r"INFO: forwarding", log_file.read_text())) == 2,
                   15, "both workers")
        pids = {tag: int(pid) for tag, pid in re.findall(r"(w\d) pid (\d+)",
                                                        log_file.read_text())}
        echo_connections(port, 10, 100)
        os.kill(parent, signal.SIGUSR1)
        wait_until(lambda: "10 opened, 10 closed" in log_file.read_text(), 10, "totals")
        status = [line for line in log_file.read_text().splitlines() if "status rule=" in line]
        assert len(status) == 2 and all(f"tcpfwd[{parent}]" in line for line in status)
        log_file.rename(tmp_path / "d.log.1")  # logrotate
        os.kill(parent, signal.SIGUSR2)
        time.sleep(0.5)
        # the kernel's hash gives both some (all on one: p = 2**-23)
        echo_connections(port, 24, 100)
        for tag, pid in pids.items():  # each worker writes to the new file now
            wait_until(lambda t=tag, p=pid: f"tcpfwd/{t}[{p}]" in log_file.read_text()
                       if log_file.exists() else False, 10, f"{tag} in the new log file")
    finally:
        os.kill(parent, signal.SIGTERM)
        wait_until(lambda: not pidfile.exists(), 20, "the pidfile removed")
    wait_until(lambda: gone(parent) and all(gone(pid) for pid in pids.values()), 10,
               "every process gone")


def test_systemd_hears_the_parent_with_the_totals(tool, echo_server, tmp_path):
    from test_notify import messages
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(10)
    port = free_port()
    with sock:
        fwd = tool("tcpfwd", "-w", "2", f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}",
                   env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        assert messages(sock, "READY")[-1]["READY"] == "1"
        worker_pids(fwd)
        echo_connections(port, 12, 100)
        deadline = time.monotonic() + 20
        while True:  # a ping's STATUS= sums both workers' connections
            ping = messages(sock, "WATCHDOG")[-1]
            if ping.get("STATUS") == f"tcp:127.0.0.1:{port}: 0 connections, 12 opened":
                break
            assert time.monotonic() < deadline, ping
        fwd.proc.send_signal(signal.SIGTERM)
        assert messages(sock, "STOPPING")[-1] == {"STOPPING": "1"}
        assert fwd.proc.wait(20) == 0


def test_kcptcp_server_workers_follow_a_client_that_changes_address(tool, echo_server):
    """Steered by conv, the conversation stays in its worker when the client's source port
    changes (NAT rebinding) seven times or more; by the address hash its datagrams would go to
    the other worker, which does not know the conversation, at about every second change."""
    from test_roaming import RebindingRelay
    udp, metrics = free_port(socket.AF_INET, socket.SOCK_DGRAM), free_port()
    server = tool("kcptcp-server", "-w", "2", "-K", PSK, "--stats-interval", "0", "--metrics",
                  f"127.0.0.1:{metrics}", f"127.0.0.1:{udp}", f"127.0.0.1:{echo_server.port}")
    worker_pids(server)
    server.wait_for_log(r"w2\[\d+\] INFO: tunnelling")
    relay = RebindingRelay(("127.0.0.1", udp), 1 << 20)
    tcp = free_port()
    client = tool("kcptcp-client", "-K", PSK, "--stats-interval", "0", f"127.0.0.1:{tcp}",
                  f"127.0.0.1:{relay.port}")
    client.wait_for_log("tunnelling")
    try:
        with connect("127.0.0.1", tcp, timeout=60) as sock:
            sock.settimeout(60)
            echo_roundtrip(sock, 8 << 20, shutdown=False)
            # While the conversation lives (after it ends, its late datagrams are unknown in
            # its own worker too): none of its datagrams reached the worker that does not
            # hold it. By the address hash, those after about every second rebind would,
            # until KCP's retransmissions made the relay rebind onto the right worker again.
            unmatched = sample_value(scrape(metrics),
                                     "portfwd_tunnel_datagrams_unmatched_total",
                                     reason="unknown")
            assert unmatched == 0
        assert len(relay.ports) >= 8  # seven rebinds during the transfer
        assert len(re.findall(r"kcptcp-server/w\d\[\d+\] INFO: conv=\d+ open", server.log())) == 1
    finally:
        relay.close()
    assert client.stop() == 0 and server.stop() == 0
