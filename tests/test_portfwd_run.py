"""``portfwd run`` / ``portfwd check`` end to end: real processes on loopback, bounded loops."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest
from conftest import REPO, EchoServer, connect, echo_roundtrip, free_port, run_cli
from test_kcptcp import PSK
from test_udpfwd import UdpPeer

EXAMPLE = os.path.join(REPO, "contrib", "portfwd.example.toml")
CONTROL = os.path.join(REPO, "contrib", "portfwd-control.sh")
MIB = 1 << 20


def free_range(count: int, socktype: int = socket.SOCK_STREAM) -> int:
    """The first of ``count`` consecutive ports free for both TCP and UDP on 127.0.0.1."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - count)
        held = []
        try:
            for port in range(base, base + count):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    s = socket.socket(socket.AF_INET, kind)
                    held.append(s)
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise AssertionError("no free port range")


def tcp_rule(listen: str, to: str, name: str | None = None, **keys) -> str:
    return rule("tcp", listen, to, name, **keys)


def rule(kind: str, listen: str, to: str, name: str | None = None, **keys) -> str:
    lines = [f"[[{kind}]]"]
    if name:
        lines.append(f'name = "{name}"')
    lines += [f'listen = "{listen}"', f'to = "{to}"']
    for key, value in keys.items():
        lines.append(f"{key} = {str(value).lower() if isinstance(value, bool) else repr(value)}"
                     .replace("'", '"'))
    return "\n".join(lines) + "\n\n"


def write(path, *rules: str, top: str = "") -> str:
    path.write_text(top + "".join(rules))
    return str(path)


def key_file(tmp_path) -> str:
    path = tmp_path / "tunnel.key"
    path.write_text(PSK + "\n")
    os.chmod(path, 0o600)
    return str(path)


def udp_exchange(port: int, count: int, seed: int) -> None:
    """``count`` datagrams to 127.0.0.1:port one after the other, each answered intact."""
    rng = random.Random(seed)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for _ in range(count):
            data = rng.randbytes(rng.randrange(1, 1400))
            sock.sendto(data, ("127.0.0.1", port))
            assert sock.recvfrom(65536)[0] == data


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


class Reloader:
    """SIGHUP a ``portfwd run`` and wait for its answer: the n-th reload or refusal line."""

    def __init__(self, process) -> None:
        self.process = process

    def count(self) -> int:
        return len(re.findall(r"reload of .* in \d+ ms|reload refused", self.process.log()))

    def reload(self) -> str:
        before = self.count()
        self.process.proc.send_signal(1)
        deadline = time.monotonic() + 20
        while self.count() == before:
            assert time.monotonic() < deadline, self.process.log()
            time.sleep(0.02)
        return re.findall(r".*(?:reload of .* in \d+ ms|reload refused).*",
                          self.process.log())[-1]


@pytest.fixture
def udp_echo():
    peer = UdpPeer()
    yield peer
    peer.close()


# -- check ------------------------------------------------------------------------------------

def test_check_accepts_the_example():
    result = run_cli("portfwd", "check", EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "14 listeners: configuration OK"
    assert 'tcp "web:8105": 127.0.0.1:8105 -> 10.0.0.5:8105' in result.stdout


def test_help_and_version():
    usage = run_cli("portfwd", "-h").stdout
    assert "portfwd run [-d] [-p <pidfile>] [-w <n>] <config.toml>" in usage
    assert run_cli("portfwd", "--version").stdout.startswith("portfwd ")


ERRORS = {
    "unknown key": (tcp_rule("127.0.0.1:1", "127.0.0.1:2", speed=1),
                    r"c\.toml:4: \[\[tcp\]\] #1: speed: unknown key for a tcp rule"),
    "duplicate listen": (tcp_rule("127.0.0.1:1", "127.0.0.1:2", "a")
                         + rule("kcptcp-client", "127.0.0.1:1", "127.0.0.1:3", "b"),
                         r'c\.toml:8: \[\[kcptcp-client\]\] #1 "b": listen: 127\.0\.0\.1:1 is '
                         r'already the listen address of \[\[tcp\]\] #1 "a"'),
    "overlapping ranges": (rule("udp", "127.0.0.1:10-20", "127.0.0.1:30-40", "a")
                           + rule("udp", "127.0.0.1:20-21", "127.0.0.1:50-51", "b"),
                           r'c\.toml:8: \[\[udp\]\] #2 "b": listen: 127\.0\.0\.1:20 is already '
                           r'the listen address of \[\[udp\]\] #1 "a" \(a:20\)'),
    "range sizes": (tcp_rule("127.0.0.1:10-20", "127.0.0.1:30-31", "w"),
                    r'c\.toml:4: \[\[tcp\]\] #1 "w": to: 2 port\(s\) for the 11 of listen'),
    "port 0": (tcp_rule("127.0.0.1:1", "127.0.0.1:2") + tcp_rule("127.0.0.1:3", "1.2.3.4:0",
                                                                 "web"),
               r'c\.toml:8: \[\[tcp\]\] #2 "web": to: bad port in .1\.2\.3\.4:0.: 0 is outside'),
    "missing psk_file": (rule("kcptcp-server", "127.0.0.1:1", "127.0.0.1:2",
                              psk_file="/nonexistent/k"),
                         r"c\.toml:4: \[\[kcptcp-server\]\] #1: psk_file: cannot read "
                         r"/nonexistent/k: No such file or directory"),
    "bad TOML": ("[[tcp]\n", r"c\.toml:1: invalid TOML"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_check_and_run_errors_exit_2_with_one_line(tmp_path, case):
    text, pattern = ERRORS[case]
    path = write(tmp_path / "c.toml", text)
    for command in ("check", "run"):
        result = run_cli("portfwd", command, path)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stdout == ""
        assert re.fullmatch(f"portfwd: error: .*{pattern}.*\n", result.stderr), result.stderr


def test_loose_psk_file_refused(tmp_path):
    key = key_file(tmp_path)
    os.chmod(key, 0o644)
    path = write(tmp_path / "c.toml", rule("kcptcp-client", "127.0.0.1:1", "127.0.0.1:2",
                                           "t", psk_file="tunnel.key"))
    result = run_cli("portfwd", "check", path)
    assert result.returncode == 2
    assert result.stderr == (f'portfwd: error: {path}:5: [[kcptcp-client]] #1 "t": psk_file: '
                             f"{key} is readable or writable by group or others (mode 0644): "
                             f"chmod 600 it\n")


def test_inline_psk_warns_in_check(tmp_path):
    path = write(tmp_path / "c.toml", rule("kcptcp-server", "127.0.0.1:1", "127.0.0.1:2",
                                           psk=PSK))
    result = run_cli("portfwd", "check", path)
    assert result.returncode == 0
    assert "psk: the key is written in the file, which is then a secret" in result.stderr
    assert PSK not in result.stdout + result.stderr


def test_invalid_file_starts_nothing(tool, tmp_path, echo_server):
    port = free_port()
    path = write(tmp_path / "c.toml",
                 tcp_rule(f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}"),
                 tcp_rule(f"127.0.0.1:{free_port()}", "127.0.0.1:2", connect_timeout=0))
    process = tool("portfwd", "run", path)
    assert process.proc.wait(20) == 2
    assert "connect_timeout must be 1-3600, got 0" in process.log()
    assert refused(port)


def test_unbindable_rule_at_start_exits_1(tool, tmp_path, echo_server):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = free_port()
    path = write(tmp_path / "c.toml",
                 tcp_rule(f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}"),
                 tcp_rule(f"127.0.0.1:{held.getsockname()[1]}", "127.0.0.1:2", "busy"))
    result = run_cli("portfwd", "run", path)
    held.close()
    assert result.returncode == 1
    assert re.fullmatch(r'portfwd: error: cannot listen on 127\.0\.0\.1:\d+ for \[\[tcp\]\] #2 '
                        r'"busy": Address already in use\n', result.stderr)


# -- run ----------------------------------------------------------------------------------------

def test_100_mixed_rules_each_forward_intact_data(tool, tmp_path, echo_server, udp_echo):
    """100 listeners in one process: tcp (a range of 20 onto 20 echo servers, 40 single
    rules), udp (a range of 10 onto 10 echo peers, 20 single rules), 5 kcptcp-server +
    5 kcptcp-client pairs."""
    key = key_file(tmp_path)
    base = free_range(130)
    echoes = [EchoServer(port=base + 100 + i) for i in range(20)]
    peers = [UdpPeer(port=base + 120 + i) for i in range(10)]
    try:
        rules = [tcp_rule(f"127.0.0.1:{base}-{base + 19}", f"127.0.0.1:{base + 100}-{base + 119}",
                          "tcp-range")]
        rules += [tcp_rule(f"127.0.0.1:{base + 20 + i}", f"127.0.0.1:{echo_server.port}")
                  for i in range(40)]
        rules.append(rule("udp", f"127.0.0.1:{base + 60}-{base + 69}",
                          f"127.0.0.1:{base + 120}-{base + 129}", "udp-range"))
        rules += [rule("udp", f"127.0.0.1:{base + 70 + i}", f"127.0.0.1:{udp_echo.port}")
                  for i in range(20)]
        for i in range(5):
            rules.append(rule("kcptcp-server", f"127.0.0.1:{base + 90 + i}",
                              f"127.0.0.1:{echo_server.port}", f"in{i}", psk_file=key))
            rules.append(rule("kcptcp-client", f"127.0.0.1:{base + 95 + i}",
                              f"127.0.0.1:{base + 90 + i}", f"out{i}", psk_file=key))
        path = write(tmp_path / "c.toml", *rules, top="[defaults]\nstats_interval = 0\n\n")
        process = tool("portfwd", "run", path)
        process.wait_for_log(r"running 72 rules on 100 listeners", timeout=30)
        for i in range(60):
            with connect("127.0.0.1", base + i) as sock:
                echo_roundtrip(sock, 64 * 1024, seed=i)
        assert all(server.accepted == 1 for server in echoes)  # 1:1 onto the range
        for i in range(30):
            udp_exchange(base + 60 + i, 5, seed=i)
        assert all(len(peer.sources) == 1 for peer in peers)
        for i in range(5):
            with connect("127.0.0.1", base + 95 + i) as sock:
                echo_roundtrip(sock, 256 * 1024, seed=100 + i)
        assert process.stop() == 0
        assert "Traceback" not in process.log()
    finally:
        for server in echoes:
            server.close()
        for peer in peers:
            peer.close()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGQUIT])
def test_stop_signals_stop_and_sighup_does_not(tool, tmp_path, echo_server, signum):
    port = free_port()
    pidfile = tmp_path / "p.pid"
    path = write(tmp_path / "c.toml", tcp_rule(f"127.0.0.1:{port}",
                                               f"127.0.0.1:{echo_server.port}"))
    process = tool("portfwd", "run", "-p", str(pidfile), path)
    process.wait_for_log("running 1 rules")
    assert pidfile.read_text() == f"{process.pid}\n"
    assert "kept" in Reloader(process).reload()  # SIGHUP: a reload, not a stop
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 10_000)
    assert process.stop(signum) == 0
    assert "stopping: closing listeners" in process.log()
    assert not pidfile.exists()


def test_a_process_holding_a_key_does_not_dump_core(tool, tmp_path):
    path = write(tmp_path / "c.toml", rule("kcptcp-server", f"127.0.0.1:{free_port()}",
                                           "127.0.0.1:9", psk_file=key_file(tmp_path)))
    process = tool("portfwd", "run", path)
    process.wait_for_log("running 1 rules")
    with open(f"/proc/{process.pid}/limits") as f:
        core = next(line for line in f if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"]
    assert process.stop() == 0


UNIT = os.path.join(REPO, "contrib", "systemd", "portfwd.service")


def test_systemd_unit_runs_the_config_mode_and_reloads_with_sighup(tmp_path):
    text = open(UNIT).read()
    assert "ExecStart=/usr/bin/env ${BINDIR}/portfwd run /etc/portfwd/portfwd.toml\n" in text
    assert "Type=notify\n" in text and "Environment=BINDIR=/usr/local/bin\n" in text
    assert "ExecReload=/bin/kill -HUP $MAINPID\n" in text
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    unit = tmp_path / "portfwd.service"  # the binary need not exist for the unit to verify
    unit.write_text(text.replace("/usr/bin/env ${BINDIR}/portfwd", shutil.which("true")))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert str(unit) not in result.stderr  # what it could not parse is named by file:line
