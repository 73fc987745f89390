"""The PSK does not leak: never echoed in a message, never in a core file (docs/SECURITY.md,
"A local user")."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from conftest import free_port, run_cli

from portfwd.runtime.options import REDACTED, redacted

PSK = "c0ffee" * 10 + "beef"


@pytest.mark.parametrize("argv, shown", [
    (["-K", PSK, "-x"], ["-K", REDACTED, "-x"]),
    ([f"-K{PSK}", "a:1"], [f"-K{REDACTED}", "a:1"]),
    ([f"-dK{PSK}"], [f"-dK{REDACTED}"]),
    (["-dK", PSK, "b:2"], ["-dK", REDACTED, "b:2"]),
    (["-K"], ["-K"]),
    (["--keepalive", "30", "-M", "1350"], ["--keepalive", "30", "-M", "1350"]),
])
def test_redacted(argv, shown):
    assert redacted(argv) == shown


@pytest.mark.parametrize("tool_name", ["kcptcp-client", "kcptcp-server"])
@pytest.mark.parametrize("form", [["-K", PSK], [f"-K{PSK}"], [f"-dK{PSK}"]])
def test_usage_error_does_not_echo_the_key(tool_name, form):
    result = run_cli(tool_name, *form, "--no-such-flag", "127.0.0.1:1", "127.0.0.1:2")
    assert result.returncode == 2
    assert PSK not in result.stderr and PSK[:16] not in result.stderr
    assert REDACTED in result.stderr


def test_bad_key_value_is_not_echoed():
    result = run_cli("kcptcp-client", "-K", PSK + "00", "127.0.0.1:1", "127.0.0.1:2")
    assert result.returncode == 2 and PSK not in result.stderr


def test_disable_core_dumps_makes_the_process_undumpable():
    code = ("import ctypes, resource; from portfwd.runtime.daemon import disable_core_dumps; "
            "disable_core_dumps(); print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0), "
            "resource.getrlimit(resource.RLIMIT_CORE))")  # 3 = PR_GET_DUMPABLE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split(maxsplit=1)
    assert out == ["0", "(0, 0)\n"]


def core_limit(pid: int | str) -> list[str]:
    """(soft, hard) of RLIMIT_CORE as /proc shows them."""
    with open(f"/proc/{pid}/limits") as f:
        return next(line for line in f if line.startswith("Max core file size")).split()[4:6]


@pytest.mark.parametrize("with_key", [True, False])
def test_a_server_with_a_key_cannot_dump_core(tool, echo_server, with_key):
    port = free_port(socktype=socket.SOCK_DGRAM)
    key = ["-K", PSK] if with_key else []
    server = tool("kcptcp-server", *key, f"127.0.0.1:{port}", f"127.0.0.1:{echo_server.port}")
    server.wait_for_log("tunnelling udp")
    soft, hard = core_limit(server.pid)
    if with_key:
        assert [soft, hard] == ["0", "0"]
    else:
        assert hard == core_limit("self")[1]  # untouched without a key
