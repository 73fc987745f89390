"""Pidfile, signals, daemon mode and the control script."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from conftest import BIN, REPO, connect, echo_roundtrip, free_port

from portfwd.runtime.daemon import PidFile, PidFileBusy

CONTROL = os.path.join(REPO, "contrib", "portfwd-control.sh")


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_pidfile_exclusive_and_removed(tmp_path):
    path = tmp_path / "a.pid"
    first = PidFile(str(path))
    first.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    with pytest.raises(PidFileBusy, match="held by a running instance"):
        PidFile(str(path)).acquire()
    first.release()
    assert not path.exists()


@pytest.mark.parametrize("content", ["{dead}\n", "", "garbage\n"])
def test_stale_pidfile_taken_over(tmp_path, content):
    path = tmp_path / "stale.pid"
    path.write_text(content.format(dead=dead_pid()))
    pid = PidFile(str(path))
    pid.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    pid.release()


def test_unlocked_pidfile_of_live_process_refused(tmp_path):
    path = tmp_path / "live.pid"
    path.write_text(f"{os.getppid()}\n")
    with pytest.raises(PidFileBusy, match="names live process"):
        PidFile(str(path)).acquire()
    assert path.exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT])
def test_each_stop_signal_removes_pidfile(tool, echo_server, tmp_path, signum):
    pidfile = tmp_path / "t.pid"
    port = free_port()
    fwd = tool("tcpfwd", "-p", str(pidfile), f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}")
    fwd.wait_for_log("forwarding")
    assert pidfile.read_text() == f"{fwd.pid}\n"
    assert fwd.stop(signum) == 0
    assert not pidfile.exists()


def test_live_instance_refused(tool, echo_server, tmp_path):
    pidfile = tmp_path / "t.pid"
    first = tool("tcpfwd", "-p", str(pidfile), f"127.0.0.1:{free_port()}",
                 f"127.0.0.1:{echo_server.port}")
    first.wait_for_log("forwarding")
    second = tool("tcpfwd", "-p", str(pidfile), f"127.0.0.1:{free_port()}",
                  f"127.0.0.1:{echo_server.port}")
    assert second.proc.wait(10) == 1
    assert "held by a running instance" in second.log()
    assert len(second.log().strip().splitlines()) == 1
    assert pidfile.read_text() == f"{first.pid}\n"  # untouched
    assert first.stop() == 0


def test_pidfile_after_sigkill_is_taken_over(tool, echo_server, tmp_path):
    pidfile = tmp_path / "t.pid"
    args = (f"127.0.0.1:{free_port()}", f"127.0.0.1:{echo_server.port}")
    first = tool("tcpfwd", "-p", str(pidfile), *args)
    first.wait_for_log("forwarding")
    first.proc.kill()
    first.proc.wait()
    assert pidfile.exists()  # stale
    second = tool("tcpfwd", "-p", str(pidfile), *args)
    second.wait_for_log("forwarding")
    assert "taking over stale pidfile" in second.log()
    assert pidfile.read_text() == f"{second.pid}\n"
    assert second.stop() == 0


def control(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", CONTROL, command], env=env, capture_output=True, text=True,
                          timeout=30)


def test_control_script_daemon_lifecycle(echo_server, tmp_path):
    port = free_port()
    pidfile = tmp_path / "ctl.pid"
    env = dict(os.environ, BIN=os.path.join(BIN, "tcpfwd"), PIDFILE=str(pidfile),
               ARGS=f"127.0.0.1:{port} 127.0.0.1:{echo_server.port}")
    assert control("status", env).returncode == 3
    started = control("start", env)
    assert started.returncode == 0, started.stderr
    pid = int(pidfile.read_text())
    assert os.getsid(pid) != os.getsid(0)  # detached: a session of its own
    assert control("status", env).stdout.strip().endswith(f"tcpfwd running (pid {pid})")
    assert "already running" in control("start", env).stdout
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 100_000)
    assert control("restart", env).returncode == 0
    new_pid = int(pidfile.read_text())
    assert new_pid != pid
    os.kill(new_pid, signal.SIGKILL)  # crash: the pidfile is left behind
    for _ in range(100):
        try:
            os.kill(new_pid, 0)
        except ProcessLookupError:
            break
        subprocess.run(["sleep", "0.05"])
    status = control("status", env)
    assert status.returncode == 3 and "removing stale pidfile" in status.stderr
    assert control("start", env).returncode == 0
    assert control("stop", env).returncode == 0
    assert not pidfile.exists()
    assert control("status", env).returncode == 3


def test_daemon_start_failure_reported(tmp_path):
    """A daemon that cannot start makes `tcpfwd -d` fail in the foreground, not silently."""
    blocker = __import__("socket").socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    out = subprocess.run([os.path.join(BIN, "tcpfwd"), "-d", f"127.0.0.1:{port}", "127.0.0.1:9"],
                         capture_output=True, text=True, timeout=20)
    blocker.close()
    assert out.returncode == 1 and "cannot listen" in out.stderr
