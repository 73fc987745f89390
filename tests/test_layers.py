"""The layer rules of docs/ARCHITECTURE.md, checked on the source: what each package may import.

The protocol cores (``portfwd.kcp``, ``portfwd.tunnel``) are sans-IO: they never touch a socket,
a clock, a thread or the event loop, and never reach up into the drivers. A test that walks every
module's AST keeps it so, including imports inside functions.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "portfwd"
IO_MODULES = {"gevent", "greenlet", "socket", "select", "selectors", "threading", "time",
              "asyncio", "subprocess"}
TOOL_PACKAGES = {"portfwd.kcptcp", "portfwd.kcpudp", "portfwd.tcpfwd", "portfwd.udpfwd"}
POLICY = "portfwd.policy"
APP = "portfwd.app"  # portfwd run: hosts every tool, so it may import them all
TESTING = "portfwd.testing"
EVERYTHING = {"portfwd.kcp", "portfwd.tunnel", POLICY, "portfwd.runtime", *TOOL_PACKAGES, APP,
              TESTING}


def tools_but(*allowed: str) -> set[str]:
    return {APP, TESTING, *(TOOL_PACKAGES - set(allowed))}


# package -> portfwd packages it must not import (besides itself being free to import itself)
FORBIDDEN = {
    "portfwd.kcp": EVERYTHING - {"portfwd.kcp"},
    POLICY: EVERYTHING - {POLICY},
    "portfwd.tunnel": EVERYTHING - {"portfwd.tunnel", "portfwd.kcp"},
    "portfwd.runtime": tools_but(),
    "portfwd.tcpfwd": tools_but("portfwd.tcpfwd"),
    "portfwd.udpfwd": tools_but("portfwd.udpfwd"),
    "portfwd.kcptcp": tools_but("portfwd.kcptcp"),
    # kcpudp runs on kcptcp's drivers, server and options (docs/ARCHITECTURE.md): never the reverse
    "portfwd.kcpudp": tools_but("portfwd.kcpudp", "portfwd.kcptcp"),
    APP: {TESTING},
}
SANS_IO = {"portfwd.kcp", "portfwd.tunnel", POLICY}
MAX_MODULE_LINES = 600  # lines; the KCP engine alone may pass it (it mirrors ikcp.c)
LONG_MODULES = {"portfwd/kcp/engine.py"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute names of everything ``path`` imports, relative imports resolved."""
    return imports_of(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_of(source: str, name: str, is_package: bool) -> set[str]:
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_package_has_rules():
    packages = {".".join(module_name(p).split(".")[:2]) for p in MODULES if p.parent != PACKAGE}
    assert packages == set(FORBIDDEN) | {"portfwd.testing"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_follow_the_layers(path: pathlib.Path):
    name = module_name(path)
    imports = imported_modules(path)
    for package, forbidden in FORBIDDEN.items():
        if not within(name, package):
            continue
        wrong = sorted(i for i in imports for f in forbidden if within(i, f))
        assert not wrong, f"{name} imports {wrong}, which {package} must not"
        if package in SANS_IO:
            io = sorted(i for i in imports if i.split(".")[0] in IO_MODULES)
            assert not io, f"{name} is sans-IO but imports {io}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_modules_stay_small(path: pathlib.Path):
    relative = str(path.relative_to(PACKAGE.parent))
    lines = len(path.read_text().splitlines())
    if relative not in LONG_MODULES:
        assert lines <= MAX_MODULE_LINES, f"{relative} has {lines} lines: split it by concern"


def test_the_walker_sees_nested_and_relative_imports():
    source = ("from . import crypto\nfrom .replay import ReplayWindow\nfrom .. import kcp\n"
              "def f():\n    import time\n    from gevent.socket import wait\n")
    found = imports_of(source, "portfwd.tunnel.session", is_package=False)
    assert {"portfwd.tunnel.crypto", "portfwd.tunnel.replay", "portfwd.kcp", "time",
            "gevent.socket"} <= found
    assert imports_of("from . import engine\n", "portfwd.kcp", is_package=True) >= {
        "portfwd.kcp.engine"}
