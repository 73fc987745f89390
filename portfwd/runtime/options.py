"""Options shared by every tool: docopt usage text in, validated values out, errors rendered once.

Glossary: *options* are the raw settings of one tool, keyed by neutral *field* names
(``listen``, ``timeout``, ``psk``) whatever their source; a *label* is how the user spelled a
field (``-t``, ``--max-sessions``, ``<local_addr:local_port>``, or a config file key such as
``rules[0].timeout``), so every message names what the user wrote. Each tool's config function
turns :class:`Options` into its frozen config through the validators here, so a flag and a
config-file key are checked by one code path.

Bad input never starts anything: :func:`run_tool` prints one line ``<prog>: error: <reason>``
on stderr and returns status 2; a tool that could not start (address in use, live pidfile)
returns 1 the same way. ``-h`` and ``--version`` are docopt's: it prints and exits 0.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import docopt

from portfwd import __version__
from portfwd.policy.cidr import Network, parse_cidr
from portfwd.runtime.addr import AddressError, HostPort, Resolved, parse_and_resolve, parse_endpoint

EXIT_USAGE = 2  # bad input
EXIT_RUNTIME = 1  # could not start (address in use, live pidfile, ...)
PSK_SIZE = 32  # bytes; seed: "-K <hex> 32-byte PSK in hex"


class ConfigError(ValueError):
    """A setting that cannot be used: ``field`` names it, ``message`` is the user-facing text."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class UsageError(ConfigError):
    """The command line does not match the usage text."""


class StartupError(RuntimeError):
    """Valid settings, but the tool could not start (the message is the user-facing text)."""


def report(prog: str, message: str) -> None:
    """The one way a tool reports an error: one line on stderr."""
    print(f"{prog}: error: {message}", file=sys.stderr)


def run_tool(prog: str, body: Callable[[], int]) -> int:
    """Run an entry point's ``body``; render its ConfigError (2) or StartupError (1)."""
    try:
        return body()
    except ConfigError as exc:
        report(prog, exc.message)
        return EXIT_USAGE
    except StartupError as exc:
        report(prog, str(exc))
        return EXIT_RUNTIME


def parse_args(prog: str, usage: str, argv: list[str] | None) -> dict:
    """Run docopt; a command line that does not match raises UsageError with one clear line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # docopt reads a bare "-6" as a negative number, i.e. a positional argument; the seed's
    # flag is therefore declared as "-6 --v6only" and passed to docopt in its long spelling.
    docopt_argv = ["--v6only" if arg == "-6" else arg for arg in argv]
    try:
        return dict(docopt.docopt(usage, docopt_argv, version=f"{prog} {__version__}"))
    except docopt.DocoptExit:
        message = f"invalid arguments {' '.join(redacted(argv))!r} (see '{prog} -h')"
        raise UsageError("argv", message) from None
    except BrokenPipeError:
        # -h or --version into a reader that stopped early (``tcpfwd -h | head``): the reader
        # has what it wanted; no traceback, and none from the flush at exit either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None


SECRET_FLAGS = "K"  # short options whose value is a key: never echoed in any message
REDACTED = "<redacted>"


def redacted(argv: list[str]) -> list[str]:
    """``argv`` with the value of every secret option replaced (``-K <hex>``, ``-K<hex>``, and
    short-option clusters such as ``-dK<hex>``), for messages that quote the command line."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("-") and not arg.startswith("--"):
            for i, letter in enumerate(arg[1:], 1):
                if letter in SECRET_FLAGS:
                    if i + 1 < len(arg):
                        arg = arg[:i + 1] + REDACTED
                    else:
                        hide_next = True
                    break
        out.append(arg)
    return out


def _frozen(mapping: Mapping) -> Mapping:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Options:
    """Raw settings by field name, plus how the user spelled each field (for messages).

    A value is what the source gave: a string or bool from docopt, a string, int or bool from
    a config file, None when absent. The validators below turn one field into a typed value or
    raise ConfigError naming its label.
    """

    values: Mapping[str, object] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)  # field -> spelling; default: field

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", _frozen(self.values))
        object.__setattr__(self, "labels", _frozen(self.labels))

    @classmethod
    def from_docopt(cls, args: Mapping[str, object], fields: Mapping[str, str]) -> Options:
        """``fields`` maps field name -> docopt key; the key is also the label."""
        return cls({name: args.get(key) for name, key in fields.items()}, dict(fields))

    def label(self, name: str) -> str:
        return self.labels.get(name, name)

    def raw(self, name: str) -> object:
        return self.values.get(name)

    def flag(self, name: str) -> bool:
        """An on/off switch; absent is off."""
        raw = self.values.get(name)
        if raw is None:
            return False
        if not isinstance(raw, bool):
            raise ConfigError(name, f"{self.label(name)} expects true or false, got {raw!r}")
        return raw

    def text(self, name: str) -> str | None:
        """A free-form string (a path), or None when absent."""
        raw = self.values.get(name)
        if raw is None or isinstance(raw, str):
            return raw
        raise ConfigError(name, f"{self.label(name)} expects a string, got {raw!r}")

    def integer(self, name: str, lo: int, hi: int | None = None, default: int | None = None) -> int:
        """A whole number in ``[lo, hi]`` (``hi`` None: no upper bound)."""
        raw = self.values.get(name)
        label = self.label(name)
        if raw is None:
            if default is None:
                raise ConfigError(name, f"{label} is required")
            return default
        try:
            if isinstance(raw, bool):  # int(True) is 1: a switch is not a number
                raise ValueError(raw)
            value = raw if isinstance(raw, int) else int(str(raw), 10)
        except ValueError:
            raise ConfigError(name, f"{label} expects a whole number, got {raw!r}") from None
        if value < lo or (hi is not None and value > hi):
            bounds = f"{lo}-{hi}" if hi is not None else f">= {lo}"
            raise ConfigError(name, f"{label} must be {bounds}, got {value}")
        return value

    def address(self, name: str, socktype: int, *, passive: bool) -> Resolved:
        """A ``host:port``, parsed and resolved once (AddressError's text passes unchanged)."""
        raw = self.values.get(name)
        if isinstance(raw, (list, tuple)):
            if len(raw) != 1:
                raise ConfigError(name, f"{self.label(name)} takes one host:port here, got "
                                  f"{len(raw)}")
            raw = raw[0]
        if not isinstance(raw, str):
            raise ConfigError(name, f"{self.label(name)} is required")
        try:
            return parse_and_resolve(raw, socktype, passive=passive)
        except AddressError as exc:
            raise ConfigError(name, str(exc)) from None

    def psk(self, name: str) -> bytes | None:
        """Exactly 32 bytes written as 64 hex digits, or None when absent."""
        raw = self.values.get(name)
        if raw is None:
            return None
        message = f"{self.label(name)} expects 64 hex digits (a {PSK_SIZE}-byte key)"
        try:
            key = bytes.fromhex(raw) if isinstance(raw, str) else None
        except ValueError:
            key = None
        if key is None:
            raise ConfigError(name, message)
        if len(key) != PSK_SIZE:
            raise ConfigError(name, f"{message}, got {len(raw)} characters")
        return key

    def strings(self, name: str) -> tuple[str, ...]:
        """A repeatable value: docopt's list for ``[--allow <cidr>]...``, a config file's list or
        single string; absent is empty."""
        raw = self.values.get(name)
        if raw is None:
            return ()
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise ConfigError(name, f"{self.label(name)} expects a string or a list of strings, "
                                    f"got {raw!r}")
        return tuple(items)

    def cidrs(self, name: str) -> tuple[Network, ...]:
        """A repeatable CIDR block (``10.0.0.0/8``, ``2001:db8::/32``, a bare address)."""
        out = []
        for text in self.strings(name):
            try:
                out.append(parse_cidr(text))
            except ValueError as exc:
                raise ConfigError(name, f"{self.label(name)}: bad CIDR {text!r}: {exc}") from None
        return tuple(out)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        """One of ``choices``; absent is ``default``."""
        raw = self.values.get(name)
        if raw is None:
            return default
        if raw not in choices:
            raise ConfigError(name, f"{self.label(name)} expects one of {', '.join(choices)}, "
                                    f"got {raw!r}")
        return str(raw)

    def endpoints(self, name: str) -> tuple[HostPort, ...]:
        """One or more ``host:port`` (repeatable), parsed but not resolved."""
        texts = self.strings(name)
        if not texts:
            raise ConfigError(name, f"{self.label(name)} is required")
        try:
            return tuple(parse_endpoint(t) for t in texts)
        except AddressError as exc:
            raise ConfigError(name, str(exc)) from None
