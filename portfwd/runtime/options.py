"""Command-line parsing shared by every tool: docopt usage text in, validated values out.

Bad input never starts anything: it prints one line ``<prog>: error: <reason>`` on stderr
and exits with status 2 (``-h`` prints the usage text and exits 0).
"""

from __future__ import annotations

import sys
from typing import NoReturn

import docopt

from portfwd import __version__
from portfwd.runtime.addr import AddressError, Resolved, parse_and_resolve

EXIT_USAGE = 2  # bad input
EXIT_RUNTIME = 1  # could not start (address in use, live pidfile, ...)


def fail(prog: str, message: str, code: int = EXIT_USAGE) -> NoReturn:
    """The one way a tool reports bad input: one line on stderr, then exit."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def parse_args(prog: str, usage: str, argv: list[str] | None) -> dict:
    """Run docopt; turn its multi-line usage dump into one clear line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # docopt reads a bare "-6" as a negative number, i.e. a positional argument; the seed's
    # flag is therefore declared as "-6 --v6only" and passed to docopt in its long spelling.
    docopt_argv = ["--v6only" if arg == "-6" else arg for arg in argv]
    try:
        return dict(docopt.docopt(usage, docopt_argv, version=f"{prog} {__version__}"))
    except docopt.DocoptExit:
        fail(prog, f"invalid arguments {' '.join(argv)!r} (see '{prog} -h')")


def int_option(
    prog: str, args: dict, name: str, lo: int, hi: int | None = None, default: int | None = None
) -> int:
    """An integer flag value in ``[lo, hi]``; anything else is bad input."""
    raw = args.get(name)
    if raw is None:
        if default is None:
            fail(prog, f"{name} is required")
        return default
    try:
        value = int(str(raw), 10)
    except ValueError:
        fail(prog, f"{name} expects a whole number, got {raw!r}")
    if value < lo or (hi is not None and value > hi):
        bounds = f"{lo}-{hi}" if hi is not None else f">= {lo}"
        fail(prog, f"{name} must be {bounds}, got {value}")
    return value


def address_arg(prog: str, text: str, socktype: int, *, passive: bool) -> Resolved:
    """A command-line address, parsed and resolved once; bad ones exit 2."""
    try:
        return parse_and_resolve(text, socktype, passive=passive)
    except AddressError as exc:
        fail(prog, str(exc))


def psk_arg(prog: str, text: str | None) -> bytes | None:
    """``-K``: exactly 32 bytes written as 64 hex digits (seed: "32-byte PSK in hex")."""
    if text is None:
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        fail(prog, "-K expects 64 hex digits (a 32-byte key)")
    if len(key) != 32:
        fail(prog, f"-K expects 64 hex digits (a 32-byte key), got {len(text)} characters")
    return key
