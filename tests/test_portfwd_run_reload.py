"""``portfwd run`` reloads (SIGHUP and the control script): real processes on loopback."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
from conftest import BIN, EchoServer, connect, echo_roundtrip, free_port
from test_portfwd_run import (
    CONTROL,
    MIB,
    Reloader,
    free_range,
    key_file,
    refused,
    rule,
    tcp_rule,
    udp_exchange,
    write,
)
from test_udpfwd import UdpPeer

TOP = "[defaults]\nstats_interval = 0\n\n"


class Background(threading.Thread):
    """A thread whose exception the test sees (``result()`` re-raises it)."""

    def __init__(self, target, *args) -> None:
        super().__init__(daemon=True)
        self._target_fn, self._args = target, args
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._target_fn(*self._args)
        except BaseException as exc:  # handed to the test thread
            self.error = exc

    def result(self, timeout: float) -> None:
        self.join(timeout)
        assert not self.is_alive(), "still running"
        if self.error is not None:
            raise self.error


@pytest.fixture
def udp_echo_port():
    peer = UdpPeer()
    yield peer.port
    peer.close()


def test_reload_under_load_then_remove_drains(tool, tmp_path, echo_server, udp_echo_port):
    """A 256 MiB transfer through A and a UDP exchange through B stay intact across 20 reloads
    that add, change and remove other rules; removing A then drains its connection."""
    base = free_range(12)
    a, b = f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"
    rule_a = tcp_rule(a, f"127.0.0.1:{echo_server.port}", "A")
    rule_b = rule("udp", b, f"127.0.0.1:{udp_echo_port}", "B")

    def others(i: int) -> list[str]:
        """Round i: rules O(i) and O(i+1) on ports base+2.., O(i+1)'s options change
        every round; O(i-1) of the round before is gone (removed)."""
        out = []
        for j in (i, i + 1):
            port = base + 2 + j % 10
            kind = "tcp" if j % 2 else "udp"
            keys = {"connect_timeout": 1 + i} if kind == "tcp" else {"timeout": 10 + i}
            out.append(rule(kind, f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}", f"O{j}",
                            **keys))
        return out

    path = tmp_path / "c.toml"
    write(path, rule_a, rule_b, *others(0), top=TOP)
    process = tool("portfwd", "run", str(path))
    process.wait_for_log("running 4 rules on 4 listeners")
    reloader = Reloader(process)
    with connect("127.0.0.1", base) as big:
        transfer = Background(echo_roundtrip, big, 256 * MIB, 7)
        exchange = Background(udp_exchange, base + 1, 3000, 11)
        transfer.start()
        exchange.start()
        for i in range(1, 21):
            write(path, rule_a, rule_b, *others(i), top=TOP)
            line = reloader.reload()
            assert f'added "O{i + 1}"; changed "O{i}"; removed "O{i - 1}"; kept "A", "B"' \
                in line, line
        transfer.result(300)
        exchange.result(120)
    with connect("127.0.0.1", base) as draining:
        draining.sendall(b"before")
        assert draining.recv(100) == b"before"
        write(path, rule_b, top=TOP)
        assert 'removed "A"' in reloader.reload()
        assert refused(base)  # stopped accepting at once
        draining.sendall(b"after")  # ... while the open connection goes on
        assert draining.recv(100) == b"after"
        draining.settimeout(15)
        started = time.monotonic()
        with pytest.raises(ConnectionResetError):  # the drain period is over: reset
            while draining.recv(100):
                pass
        assert time.monotonic() - started < 12
    udp_exchange(base + 1, 10, 12)
    assert process.stop() == 0
    assert "Traceback" not in process.log()


def test_invalid_or_unbindable_reload_changes_nothing(tool, tmp_path, echo_server, udp_echo_port):
    base = free_range(4)
    r1 = tcp_rule(f"127.0.0.1:{base}", f"127.0.0.1:{echo_server.port}", "R1")
    r2 = rule("udp", f"127.0.0.1:{base + 1}", f"127.0.0.1:{udp_echo_port}", "R2")
    n1 = tcp_rule(f"127.0.0.1:{base + 2}", f"127.0.0.1:{echo_server.port}", "N1")
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    n2 = tcp_rule(f"127.0.0.1:{held.getsockname()[1]}", f"127.0.0.1:{echo_server.port}", "N2")
    path = tmp_path / "c.toml"
    write(path, r1, r2, top=TOP)
    process = tool("portfwd", "run", str(path))
    process.wait_for_log("running 2 rules")
    reloader = Reloader(process)
    changed_r2 = r2.replace("\n\n", "\ntimeout = 5\n\n")
    attempts = {
        "unbindable": ((r2, n1, n2), r"cannot listen on 127\.0\.0\.1:\d+ for \[\[tcp\]\] #2 "
                                     r'"N2": Address already in use'),
        "invalid": ((changed_r2, n1, "[[tcp]]\nlisten = 3\n"), r"listen: expects a string"),
        "bad value": ((n1, r2.replace("\n\n", "\ntimeout = -1\n\n")), r"timeout must be 0-"),
    }
    try:
        with connect("127.0.0.1", base) as live:
            for n, (rules, reason) in enumerate(attempts.values()):
                write(path, *rules, top=TOP)
                line = reloader.reload()
                assert "reload refused, still running the previous configuration" in line
                assert re.search(reason, line), line
                # R1 was to be removed and N1 added: neither happened.
                live.sendall(b"x%d" % n)
                assert live.recv(10) == b"x%d" % n
                with connect("127.0.0.1", base) as again:
                    echo_roundtrip(again, 10_000)
                assert refused(base + 2)
                udp_exchange(base + 1, 5, n)
        write(path, r2, n1, top=TOP)  # a good file after the bad ones applies
        assert 'added "N1"; changed none; removed "R1"; kept "R2"' in reloader.reload()
        with connect("127.0.0.1", base + 2) as sock:
            echo_roundtrip(sock, 10_000)
        assert process.stop() == 0
    finally:
        held.close()


def test_changed_rule_keeps_listener_new_connections_get_new_options(tool, tmp_path):
    old_target, new_target = EchoServer(), EchoServer()
    old_peer, new_peer = UdpPeer(), UdpPeer()
    try:
        base = free_range(2)

        def rules(tcp_to: int, udp_to: int) -> list[str]:
            return [tcp_rule(f"127.0.0.1:{base}", f"127.0.0.1:{tcp_to}", "T"),
                    rule("udp", f"127.0.0.1:{base + 1}", f"127.0.0.1:{udp_to}", "U")]

        path = tmp_path / "c.toml"
        write(path, *rules(old_target.port, old_peer.port), top=TOP)
        process = tool("portfwd", "run", str(path))
        process.wait_for_log("running 2 rules")
        old_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        old_udp.settimeout(5)
        old_udp.sendto(b"first", ("127.0.0.1", base + 1))
        assert old_udp.recv(100) == b"first"
        refusals, knocks = [], []
        stop = threading.Event()

        def knock() -> None:  # connects all through the reload: the listener never closes
            for _ in range(2000):
                if stop.is_set():
                    return
                try:
                    socket.create_connection(("127.0.0.1", base), timeout=5).close()
                    knocks.append(1)
                except ConnectionRefusedError:
                    refusals.append(1)
                time.sleep(0.002)

        with connect("127.0.0.1", base) as old_conn:
            knocker = threading.Thread(target=knock)
            knocker.start()
            time.sleep(0.1)
            write(path, *rules(new_target.port, new_peer.port), top=TOP)
            assert 'changed "T", "U"' in Reloader(process).reload()
            time.sleep(0.1)
            stop.set()
            knocker.join(30)
            assert not refusals
            old_conn.sendall(b"still old")  # the open connection finishes on the old options
            assert old_conn.recv(100) == b"still old"
            deadline = time.monotonic() + 10  # every knock reached a target (accepts lag)
            while old_target.accepted + new_target.accepted < len(knocks) + 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            accepted_before = new_target.accepted
            with connect("127.0.0.1", base) as new_conn:
                echo_roundtrip(new_conn, 10_000)
            assert new_target.accepted == accepted_before + 1
        old_udp.sendto(b"second", ("127.0.0.1", base + 1))  # an open session: old target
        assert old_udp.recv(100) == b"second"
        assert len(new_peer.sources) == 0
        udp_exchange(base + 1, 3, 1)  # a new session: the new target
        assert len(new_peer.sources) == 1
        old_udp.close()
        assert process.stop() == 0
    finally:
        for server in (old_target, new_target):
            server.close()
        for peer in (old_peer, new_peer):
            peer.close()


def test_tunnel_pair_in_one_process_survives_reloads(tool, tmp_path, echo_server):
    key = key_file(tmp_path)
    base = free_range(8)
    pair = [rule("kcptcp-server", f"127.0.0.1:{base}", f"127.0.0.1:{echo_server.port}", "in",
                 psk_file=os.path.basename(key)),
            rule("kcptcp-client", f"127.0.0.1:{base + 1}", f"127.0.0.1:{base}", "out",
                 psk_file=os.path.basename(key))]
    path = tmp_path / "c.toml"
    write(path, *pair, top=TOP)
    process = tool("portfwd", "run", str(path))
    process.wait_for_log("running 2 rules")
    assert process.log().count("(encrypted)") == 2
    reloader = Reloader(process)
    with connect("127.0.0.1", base + 1) as tunnelled:
        for i in range(5):
            extra = [tcp_rule(f"127.0.0.1:{base + 2 + j}", f"127.0.0.1:{echo_server.port}")
                     for j in range(i % 3)]
            write(path, *pair, *extra, top=TOP)
            assert 'kept "in", "out"' in reloader.reload()
            message = b"round %d " % i * 1000
            tunnelled.sendall(message)
            got = b""
            while len(got) < len(message):
                got += tunnelled.recv(65536)
            assert got == message
    with connect("127.0.0.1", base + 1) as fresh:
        echo_roundtrip(fresh, 1 * MIB, seed=4)
    # Changed options: the server's target and the client's send window. A conversation
    # open across the reload stays on the old ones, a new one gets the new ones.
    other = EchoServer()
    try:
        with connect("127.0.0.1", base + 1) as open_conv:
            open_conv.sendall(b"hello")
            assert open_conv.recv(100) == b"hello"
            write(path, pair[0].replace(f"127.0.0.1:{echo_server.port}", f"127.0.0.1:{other.port}"),
                  pair[1].replace("\n\n", "\nsndwnd = 512\n\n"), top=TOP)
            assert 'changed "in", "out"' in reloader.reload()
            open_conv.sendall(b"still there")
            assert open_conv.recv(100) == b"still there"
            assert other.accepted == 0
            with connect("127.0.0.1", base + 1) as fresh:
                echo_roundtrip(fresh, 1 * MIB, seed=5)
            assert other.accepted == 1
    finally:
        other.close()
    assert process.stop() == 0
    assert "Traceback" not in process.log()


def control(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", CONTROL, command], env=env, capture_output=True, text=True,
                          timeout=60)


def test_daemon_pidfile_and_reload_through_the_control_script(tmp_path, echo_server):
    first, second = free_port(), free_port()
    path = tmp_path / "c.toml"
    write(path, tcp_rule(f"127.0.0.1:{first}", f"127.0.0.1:{echo_server.port}"), top=TOP)
    pidfile = tmp_path / "portfwd.pid"
    env = dict(os.environ, BIN=os.path.join(BIN, "portfwd"), CONFIG=str(path),
               PIDFILE=str(pidfile))
    started = control("start", env)
    assert started.returncode == 0, started.stderr
    pid = int(pidfile.read_text())
    try:
        assert os.getsid(pid) != os.getsid(0)  # detached
        with connect("127.0.0.1", first) as sock:
            echo_roundtrip(sock, 100_000)
        write(path, tcp_rule(f"127.0.0.1:{first}", f"127.0.0.1:{echo_server.port}"),
              tcp_rule(f"127.0.0.1:{second}", f"127.0.0.1:{echo_server.port}"), top=TOP)
        reloaded = control("reload", env)
        assert reloaded.returncode == 0, reloaded.stderr
        with connect("127.0.0.1", second) as sock:  # retried until the new rule listens
            echo_roundtrip(sock, 100_000)
        path.write_text("[[tcp]]\nlisten = 1\n")
        bad = control("reload", env)
        assert bad.returncode == 1
        assert "listen: expects a string" in bad.stderr and "not reloaded" in bad.stderr
        with connect("127.0.0.1", second) as sock:
            echo_roundtrip(sock, 100_000)
        assert int(pidfile.read_text()) == pid
        assert control("stop", env).returncode == 0
        assert not pidfile.exists()
    finally:
        if pidfile.exists():
            os.kill(pid, signal.SIGKILL)


def test_one_rule_tools_refuse_reload_in_the_control_script(tmp_path):
    env = dict(os.environ, BIN=os.path.join(BIN, "tcpfwd"), PIDFILE=str(tmp_path / "t.pid"))
    result = control("reload", env)
    assert result.returncode == 3 and "use restart" in result.stderr
