"""The config file, sans-IO: TOML text and its file name in, Options out.

Glossary: a *rule* is one table of the file (``[[tcp]]`` #2); an *instance* is one listener of
it (a rule whose ``listen`` is a port range has one instance per port). A *key* is what the
file says (``to``), a *field* what the tool's config function reads (``dest``): keys are the
tools' field names except ``to``, which names each kind's destination field.

Nothing here resolves a name, reads a key file or binds: the result is the process's
:class:`Options` and one :class:`RuleSpec` per instance, each an ``Options`` whose labels say
where the user wrote the value (``config.toml:14: [[tcp]] #2 "web": to``), so the tools' own
config functions validate every key and their errors name the file, line, rule and key.
"""

from __future__ import annotations

import posixpath
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field

from portfwd.runtime.options import ConfigError, Options

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULTS = "defaults"  # the table of keys applied to every rule that does not set them
RULE_KEYS = ("name", "listen", "to")  # keys every rule kind has besides its tool's fields
MAX_RANGE = 4096  # ports in one range: beyond, it is a typo rather than a wish
# Keys that name files: a relative path is relative to the config file's directory (as in
# nginx), so a daemon that chdir'd to / reads the same file on a reload.
PATH_KEYS = frozenset({"psk_file", "pidfile", "log_file"})


@dataclass(frozen=True)
class KindKeys:
    """What the parser needs to know of a rule kind: its keys and its destination field."""

    dest_field: str  # the tool's field that ``to`` maps onto (dest, target, remote)
    keys: frozenset[str]  # the tool's other fields a rule may set (its long flag names)


@dataclass(frozen=True)
class RuleSpec:
    """One instance of a rule: its tool's Options, labelled with where the user wrote them."""

    kind: str  # "tcp", "udp", "kcptcp-client", "kcptcp-server"
    rule: str  # the rule's name: ``name``, default ``<kind>:<listen as written>``
    name: str  # this instance's name: ``rule``, or ``<rule>:<port>`` for a port range
    where: str  # ``config.toml:14: [[tcp]] #2 "web"``: the prefix of its messages
    options: Options = field(default_factory=Options)


@dataclass(frozen=True)
class ConfigFile:
    """A parsed file: the process's settings, every rule instance, and warnings for ``check``."""

    process: Options
    rules: tuple[RuleSpec, ...]
    warnings: tuple[str, ...] = ()


def parse_config(text: str, filename: str, kinds: Mapping[str, KindKeys],
                 process_keys: frozenset[str], base_dir: str = "") -> ConfigFile:
    """Parse and check the file's shape; raises ConfigError naming file, line, rule and key.

    ``kinds`` are the rule kinds (table names) and their keys, ``process_keys`` the top-level
    keys (the fields of ``runtime.config.process_config``), ``base_dir`` the directory that
    relative paths (PATH_KEYS) are relative to.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        line = found.group(1) if found else len(text.splitlines()) or 1  # "end of document"
        where = f"{filename}:{line}"
        raise ConfigError("file", f"{where}: invalid TOML: {exc}") from None
    doc = _with_paths(doc, base_dir)
    lines = KeyLines(text)
    process: dict[str, object] = {}
    process_labels: dict[str, str] = {}
    defaults: Mapping[str, object] = {}
    rule_tables: list[tuple[str, int, Mapping[str, object]]] = []
    for key, value in doc.items():
        if key == DEFAULTS:
            if not isinstance(value, dict):
                raise ConfigError(key, f"{filename}:{lines.of((), key)}: [defaults] must be a "
                                  f"table")
            defaults = value
        elif key in kinds:
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise ConfigError(key, f"{filename}:{lines.of((), key)}: {key}: write rules "
                                  f"as [[{key}]] tables")
            rule_tables.extend((key, number, table) for number, table in enumerate(value, 1))
        elif key in process_keys:
            process[key] = value
            process_labels[key] = f"{filename}:{lines.of((), key)}: {key}"
        else:
            known = ", ".join(sorted({*kinds, DEFAULTS, *process_keys}))
            raise ConfigError(key, f"{filename}:{lines.of((), key)}: unknown key or table "
                              f"{key!r} (known: {known})")
    _check_defaults(defaults, filename, lines, kinds)
    rules: list[RuleSpec] = []
    warnings: list[str] = []
    names: dict[str, str] = {}
    for kind, number, table in rule_tables:
        specs = _rule(kind, number, table, defaults, filename, lines, kinds[kind])
        first = specs[0]
        if first.rule in names:
            raise ConfigError("name", f"{first.where}: name: {first.rule!r} is already the "
                              f"name of {names[first.rule]}")
        names[first.rule] = first.where
        if "psk" in table or "psk" in defaults:
            warnings.append(f"{first.where}: psk: the key is written in the file, which is "
                            f"then a secret (keep it mode 0600), or use psk_file")
        rules.extend(specs)
    return ConfigFile(Options(process, process_labels), tuple(rules), tuple(warnings))


def _with_paths(doc: dict, base_dir: str) -> dict:
    """``doc`` with every relative PATH_KEYS string joined to ``base_dir``."""
    def fix(table: object) -> object:
        if not isinstance(table, dict):
            return table
        return {k: posixpath.join(base_dir, v) if k in PATH_KEYS and isinstance(v, str) and v
                else v for k, v in table.items()}

    out = dict(fix(doc))  # type: ignore[arg-type]
    for key, value in out.items():
        if isinstance(value, dict):
            out[key] = fix(value)
        elif isinstance(value, list):
            out[key] = [fix(item) for item in value]
    return out


def _check_defaults(defaults: Mapping[str, object], filename: str, lines: KeyLines,
                    kinds: Mapping[str, KindKeys]) -> None:
    every = set().union(*(k.keys for k in kinds.values()))
    for key in defaults:
        if key not in every:
            raise ConfigError(key, f"{filename}:{lines.of((DEFAULTS,), key)}: [defaults]: "
                              f"unknown key {key!r} (no rule kind has it)")


def _rule(kind: str, number: int, table: Mapping[str, object], defaults: Mapping[str, object],
          filename: str, lines: KeyLines, keys: KindKeys) -> list[RuleSpec]:
    """The instances of one ``[[kind]]`` table: its keys over the defaults, ports expanded."""
    section = (kind, number)
    listen = table.get("listen")
    name = table.get("name")
    title = f"[[{kind}]] #{number}"
    if isinstance(name, str) and name:
        title += f" {name!r}".replace("'", '"')
    where = f"{filename}:{lines.of(section)}: {title}"

    def label(key: str) -> str:
        return f"{filename}:{lines.of(section, key)}: {title}: {key}"

    for key in table:
        if key not in keys.keys and key not in RULE_KEYS:
            raise ConfigError(key, f"{label(key)}: unknown key for a {kind} rule (known: "
                              f"{', '.join(sorted({*RULE_KEYS, *keys.keys}))})")
    for key in ("listen", "to"):
        if key not in table:
            raise ConfigError(key, f"{where}: {key}: is required")
        if not isinstance(table[key], str) and not (key == "to" and _strings(table[key])):
            raise ConfigError(key, f"{label(key)}: expects a string host:port"
                              + (" or a list of them" if key == "to" else ""))
    if name is not None and (not isinstance(name, str) or not name):
        raise ConfigError("name", f"{label('name')}: expects a non-empty string")
    assert isinstance(listen, str)
    to = table["to"]
    rule_name = name if isinstance(name, str) else f"{kind}:{listen}"
    listens = _expand(listen, label("listen"))
    if isinstance(to, list):  # several destinations (tcp: --balance, --max-fails)
        if len(listens) > 1 or any(len(_expand(one, label("to"))) > 1 for one in to):
            raise ConfigError("to", f"{label('to')}: a list of destinations cannot go with a "
                              f"port range")
        tos: list[tuple[object, str]] = [(list(to), listens[0][1])]
    else:
        tos = _expand(to, label("to"))
    if len(tos) != len(listens):
        raise ConfigError("to", f"{label('to')}: {len(tos)} port(s) for the {len(listens)} of "
                          f"listen: ranges map 1:1 and must be the same size")
    values: dict[str, object] = {k: v for k, v in defaults.items() if k in keys.keys}
    labels = {k: f"{filename}:{lines.of((DEFAULTS,), k)}: [defaults]: {k} (for {title})"
              for k in values}
    for key, value in table.items():
        if key in keys.keys:
            values[key] = value
            labels[key] = label(key)
    labels["listen"], labels[keys.dest_field] = label("listen"), label("to")
    ranged = len(listens) > 1
    specs = []
    for (listen_one, port), (to_one, _) in zip(listens, tos, strict=True):
        instance = {**values, "listen": listen_one, keys.dest_field: to_one}
        specs.append(RuleSpec(kind, rule_name, f"{rule_name}:{port}" if ranged else rule_name,
                              where, Options(instance, labels)))
    return specs


def _strings(value: object) -> bool:
    """A non-empty TOML array of strings."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _expand(text: str, label: str) -> list[tuple[str, str]]:
    """``host:8100-8102`` -> [("host:8100", "8100"), ..., ("host:8102", "8102")].

    Anything that is not a port range is one address, passed on as written for the tool's
    address parser to judge: [(text, port as written)]."""
    host, sep, ports = text.rpartition(":")
    first, dash, last = ports.partition("-")
    if not sep or not dash or (host.startswith("[") and not host.endswith("]")):
        return [(text, ports)]
    if not (first.isdigit() and last.isdigit()):
        raise ConfigError("range", f"{label}: bad port range {ports!r}: expected first-last")
    lo, hi = int(first), int(last)
    if not 1 <= lo <= hi <= 65535:
        raise ConfigError("range", f"{label}: bad port range {ports!r}: expected "
                          f"1 <= first <= last <= 65535")
    if hi - lo + 1 > MAX_RANGE:
        raise ConfigError("range", f"{label}: port range {ports!r} has more than {MAX_RANGE} "
                          f"ports")
    return [(f"{host}:{port}", str(port)) for port in range(lo, hi + 1)]


HEADER = re.compile(r"\s*(\[\[?)\s*([A-Za-z0-9_.\"-]+)\s*\]\]?")
KEY = re.compile(r"\s*([A-Za-z0-9_-]+|\"[^\"]*\")\s*=")


class KeyLines:
    """Line numbers of tables and keys, found by scanning the text (tomllib gives none).

    A section is ``()`` (top level), ``("defaults",)`` or ``(kind, n)`` (the n-th ``[[kind]]``).
    Only simple ``key = value`` lines are found; anything else falls back to the table's line.
    """

    def __init__(self, text: str) -> None:
        self.tables: dict[tuple, int] = {}
        self.keys: dict[tuple, int] = {}
        counts: dict[str, int] = {}
        section: tuple = ()
        for number, line in enumerate(text.splitlines(), 1):
            header = HEADER.match(line)
            if header:
                name = header.group(2).strip('"')
                if header.group(1) == "[[":
                    counts[name] = counts.get(name, 0) + 1
                    section = (name, counts[name])
                else:
                    section = (name,)
                self.tables.setdefault(section, number)
                continue
            key = KEY.match(line)
            if key:
                self.keys.setdefault((section, key.group(1).strip('"')), number)

    def of(self, section: tuple, key: str | None = None) -> int | str:
        if key is not None and (section, key) in self.keys:
            return self.keys[(section, key)]
        if key is not None and not section and key in {s[0] for s in self.tables}:
            return min(n for s, n in self.tables.items() if s[0] == key)
        return self.tables.get(section, 1)
