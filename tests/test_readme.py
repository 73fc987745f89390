"""README and ``-h`` say the same thing: every option and environment line of each tool's usage
text appears in the README's block for that tool, and the README lists nothing -h does not."""

from __future__ import annotations

import os
import re

import pytest
from conftest import REPO, run_cli

SECTIONS = {"tcpfwd": "## tcpfwd", "udpfwd": "## udpfwd",
            "kcptcp-client": "## kcptcp-client / kcptcp-server",
            "kcptcp-server": "## kcptcp-client / kcptcp-server",
            "kcpudp-client": "## kcpudp-client / kcpudp-server",
            "kcpudp-server": "## kcpudp-client / kcpudp-server"}
SERVER_ONLY_MARK = "{}-server only:"


def help_lines(tool: str) -> list[str]:
    """The indented lines of ``tool -h`` from its Options: section on (options, their
    continuation lines, environment variables)."""
    result = run_cli(tool, "-h")
    assert result.returncode == 0, result.stderr
    body = result.stdout[result.stdout.index("Options:"):]
    return [line.rstrip() for line in body.splitlines() if line.startswith("  ")]


def readme_block(tool: str) -> str:
    """The first fenced block of the tool's README section (its usage), after the usage lines
    (which may be indented continuations too)."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index(SECTIONS[tool] + "\n"):]
    return re.search(r"```\n(.*?)```", section, re.S).group(1).split("\n\n", 1)[1]


def indented(block: str) -> list[str]:
    return [line.rstrip() for line in block.splitlines() if line.startswith("  ")]


def option_names(lines: list[str]) -> set[str]:
    """The flags and PORTFWD_ variables named at the start of usage lines."""
    names = set()
    for line in lines:
        spec = line.strip().split("  ")[0]
        names.update(word.split("=")[0] for word in spec.split()
                     if word.startswith("-") or word.startswith("PORTFWD_"))
    return names


@pytest.mark.parametrize("tool", ["tcpfwd", "udpfwd"])
def test_one_rule_tool_readme_matches_help(tool: str) -> None:
    readme = indented(readme_block(tool))
    shown = help_lines(tool)
    assert sorted(set(shown) - set(readme)) == [], "in -h, missing from the README"
    assert sorted(set(readme) - set(shown)) == [], "in the README, not in -h"


@pytest.mark.parametrize("pair", ["kcptcp", "kcpudp"])
def test_tunnel_readme_matches_both_helps(pair: str) -> None:
    block = readme_block(f"{pair}-client")
    client, server = help_lines(f"{pair}-client"), help_lines(f"{pair}-server")
    readme = indented(block)
    assert sorted((set(client) | set(server)) - set(readme)) == [], "in -h, not in the README"
    assert sorted(set(readme) - set(client) - set(server)) == [], "in the README, not in -h"
    # What the README lists under "<pair>-server only" is exactly what the client lacks.
    server_part = block[block.index(SERVER_ONLY_MARK.format(pair)):].split("\n\n")[0]
    assert option_names(indented(server_part)) == option_names(server) - option_names(client)


@pytest.mark.parametrize("tool", list(SECTIONS))
def test_each_default_is_shown_once(tool: str) -> None:
    for line in help_lines(tool):
        assert len(re.findall(r"default", line, re.I)) <= 1, line


def test_every_environment_variable_is_documented() -> None:
    """The variables runtime/environment.py reads are each in some -h and in the README."""
    from portfwd.runtime import environment

    names = {value for key, value in vars(environment).items()
             if key.isupper() and isinstance(value, str) and value.startswith("PORTFWD_")}
    shown = set().union(*(option_names(help_lines(tool)) for tool in SECTIONS))
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert sorted(names - shown) == []
    assert sorted(name for name in names if name not in readme) == []


def test_client_rejects_server_only_options() -> None:
    for flag, value in [("--connect-timeout", "3"), ("--max-sessions", "5"),
                        ("--max-pending", "5")]:
        result = run_cli("kcptcp-client", flag, value, "127.0.0.1:1", "127.0.0.1:2")
        assert result.returncode == 2
        assert result.stderr == f"kcptcp-client: error: {flag} is a kcptcp-server option\n"


def readme_commands() -> list[str]:
    """The one-line ``sh`` blocks of the README's Set-up section."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    setup = readme[readme.index("## Set-up\n"):readme.index("## Addresses\n")]
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", setup, re.S)]


def test_ci_runs_the_readme_test_command() -> None:
    install, test = readme_commands()
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert ci.rstrip().splitlines()[-1] == test
    # Both work on an externally-managed system Python: they install into a venv.
    for command in (install, test):
        assert command.count("\n") == 0
        assert "python3 -m venv .venv && . .venv/bin/activate && pip install" in command
    assert "python3-venv" in install and "python3-venv" in ci
