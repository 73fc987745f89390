"""Every tool: -h prints its usage and exits 0; bad input is one line on stderr and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import BIN, run_cli

PSK = "00" * 32
# tool -> (valid positional args, {bad extra args: expected message fragment})
CASES = {
    "tcpfwd": (["127.0.0.1:1", "127.0.0.1:2"], {}),
    "udpfwd": (["127.0.0.1:1", "127.0.0.1:2"], {
        ("-t", "abc"): "-t expects a whole number",
        ("-t", "-5"): "-t",
        ("-H", "0"): "-H",
    }),
    "kcptcp-client": (["127.0.0.1:1", "127.0.0.1:2"], {
        ("-M", "abc"): "-M expects a whole number",
        ("-M", "10"): "-M must be",
        ("-S", "x"): "-S expects a whole number",
        ("-K", "xyz"): "-K expects 64 hex digits",
        ("-K", "00" * 31): "-K expects 64 hex digits",
    }),
    "kcptcp-server": (["127.0.0.1:1", "127.0.0.1:2"], {
        ("-M", "99999"): "-M must be",
        ("-K", PSK + "00"): "-K expects 64 hex digits",
    }),
    "kcpudp-client": (["127.0.0.1:1", "127.0.0.1:2"], {
        ("--mode", "lossy"): "--mode must be reliable or datagram, got 'lossy'",
        ("-t", "-1"): "-t must be 0-86400, got -1",
        ("--max-sessions", "0"): "--max-sessions must be",
        ("-K", "xyz"): "-K expects 64 hex digits",
    }),
    "kcpudp-server": (["127.0.0.1:1", "127.0.0.1:2"], {
        ("--mode", ""): "--mode must be reliable or datagram",
        ("-t", "x"): "-t expects a whole number",
        ("-M", "10"): "-M must be",
    }),
}
TOOLS = [t for t in CASES if os.path.exists(os.path.join(BIN, t))]


def one_error_line(result, fragment: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{result.args[1].rsplit('/', 1)[1]}: error: ")
    assert fragment in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("tool_name", TOOLS)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help(tool_name, flag):
    result = run_cli(tool_name, flag)
    assert result.returncode == 0
    assert "Usage:" in result.stdout and tool_name in result.stdout
    for option in ("-d", "-p <pidfile>", "-r", "-R"):
        assert option in result.stdout


@pytest.mark.parametrize("tool_name", [*TOOLS, "portfwd"])
@pytest.mark.parametrize("flag", ["-h", "--version"])
def test_help_into_a_reader_that_stops_early(tool_name, flag):
    """``tcpfwd -h | head -1``: the reader closing the pipe is not an error (no traceback)."""
    read, write = os.pipe()
    os.close(read)  # the reader is already gone: the first write raises EPIPE
    try:
        proc = subprocess.run([sys.executable, os.path.join(BIN, tool_name), flag], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=20,
                              stdin=subprocess.DEVNULL)
    finally:
        os.close(write)
    assert proc.stderr == ""
    assert proc.returncode == 0


@pytest.mark.parametrize("tool_name", TOOLS)
@pytest.mark.parametrize("args, fragment", [
    (["-x"], "invalid arguments"),
    ([], "invalid arguments"),
    (["127.0.0.1:1"], "invalid arguments"),
])
def test_usage_errors(tool_name, args, fragment):
    positional = CASES[tool_name][0]
    extra = positional if args == ["-x"] else []
    one_error_line(run_cli(tool_name, *args, *extra), fragment)


@pytest.mark.parametrize("tool_name", TOOLS)
@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("bad, fragment", [
    ("127.0.0.1:0", "outside 1-65535"),
    ("127.0.0.1:99999", "outside 1-65535"),
    ("127.0.0.1", "expected host:port"),
    ("no-such-host.invalid:80", "cannot resolve"),
])
def test_bad_address(tool_name, which, bad, fragment):
    args = list(CASES[tool_name][0])
    args[which] = bad
    one_error_line(run_cli(tool_name, *args), fragment)


@pytest.mark.parametrize("tool_name, extra, fragment", [
    (name, list(extra), fragment)
    for name in TOOLS for extra, fragment in CASES[name][1].items()
])
def test_bad_option_values(tool_name, extra, fragment):
    one_error_line(run_cli(tool_name, *extra, *CASES[tool_name][0]), fragment)
