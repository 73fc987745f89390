"""The tunnel key from a file: ``--psk-file`` of the kcptcp tools and ``psk_file`` of a config
file share runtime.keyfile.read_psk_file."""

from __future__ import annotations

import os

import pytest
from conftest import connect, echo_roundtrip, run_cli
from test_kcptcp import PSK, start_tunnel

from portfwd.runtime.keyfile import read_psk_file
from portfwd.runtime.options import ConfigError


def key_file(tmp_path, content: str = PSK + "\n", mode: int = 0o600) -> str:
    path = tmp_path / "tunnel.key"
    path.write_text(content)
    os.chmod(path, mode)
    return str(path)


def test_key_read_with_whitespace_trimmed(tmp_path):
    assert read_psk_file(key_file(tmp_path, f"  {PSK}\n\n"), "psk_file") == bytes.fromhex(PSK)


@pytest.mark.parametrize("content, mode, message", [
    (PSK, 0o640, "readable or writable by group or others (mode 0640): chmod 600 it"),
    (PSK, 0o604, "(mode 0604)"),
    (PSK[:-2], 0o600, "must hold 64 hex digits"),
    ("zz" * 32, 0o600, "must hold 64 hex digits"),
    ("", 0o600, "must hold 64 hex digits"),
])
def test_bad_key_files_refused(tmp_path, content, mode, message):
    path = key_file(tmp_path, content, mode)
    with pytest.raises(ConfigError) as info:
        read_psk_file(path, "--psk-file")
    assert info.value.message.startswith("--psk-file: ")
    assert message in info.value.message
    assert content[:8] not in info.value.message or not content  # never echoes the key


def test_missing_and_unreadable_key_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read .*: No such file or directory"):
        read_psk_file(str(tmp_path / "none"), "psk_file")
    with pytest.raises(ConfigError, match="is not a regular file"):
        read_psk_file(str(tmp_path), "psk_file")


@pytest.mark.parametrize("prog", ["kcptcp-client", "kcptcp-server"])
def test_cli_psk_file_errors_exit_2_with_one_line(tmp_path, prog):
    loose = key_file(tmp_path, mode=0o644)
    result = run_cli(prog, "--psk-file", loose, "127.0.0.1:1", "127.0.0.1:2")
    assert result.returncode == 2
    assert result.stderr == (f"{prog}: error: --psk-file: {loose} is readable or writable by "
                             f"group or others (mode 0644): chmod 600 it\n")
    os.chmod(loose, 0o600)
    result = run_cli(prog, "--psk-file", loose, "-K", PSK, "127.0.0.1:1", "127.0.0.1:2")
    assert result.returncode == 2
    assert result.stderr == f"{prog}: error: -K and --psk-file both give the key: use one\n"


def test_cli_tunnel_with_psk_file(tool, echo_server, tmp_path):
    path = key_file(tmp_path)
    port, server, client = start_tunnel(tool, echo_server.port, "--psk-file", path)
    with connect("127.0.0.1", port) as sock:
        echo_roundtrip(sock, 1 << 20, seed=3)
    assert "(encrypted)" in server.log() and "(encrypted)" in client.log()
    assert client.stop() == 0 and server.stop() == 0
