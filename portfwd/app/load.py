"""A config file to runnable rules: the parsed text through each tool's own config function.

Here names are resolved and key files read (the parser in ``configfile`` does neither), and
the file as a whole is checked: two rules may not listen on the same address.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from portfwd.app.configfile import ConfigFile, RuleSpec, parse_config
from portfwd.app.rules import KINDS, PARSER_KINDS, RULE_WORKERS, Kind
from portfwd.runtime.addr import format_sockaddr
from portfwd.runtime.config import PROCESS_FIELDS
from portfwd.runtime.environment import Environment
from portfwd.runtime.options import ConfigError
from portfwd.runtime.prefork import worker_count

MAX_CONFIG_BYTES = 16 << 20  # a config file larger than this is not one


@dataclass(frozen=True)
class Rule:
    """One listener of the file, validated: its kind, where it was written, its tool config."""

    kind: Kind
    spec: RuleSpec
    config: Any  # the tool's frozen config (TcpConfig, UdpConfig, ClientConfig, ServerConfig)
    workers: int | None = None  # the rule's ``workers`` (0 given = one per CPU); None = the file's

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def key(self) -> tuple:
        """What a rule is across reloads: its kind and the address it listens on."""
        return (self.kind.name, self.config.listen.family, self.config.listen.sockaddr)

    @property
    def socket_key(self) -> tuple:
        """What the kernel sees of its listener: socket type and address (two rules may not
        share one)."""
        return (self.kind.socktype, self.config.listen.family, self.config.listen.sockaddr)

    def describe(self) -> str:
        several = getattr(self.config, "destinations", ())  # tcp: every destination
        dest = (", ".join(map(str, several)) if len(several) > 1
                else getattr(self.config, self.kind.dest_field))
        return f'{self.kind.name} "{self.name}": {self.config.listen} -> {dest}'


@dataclass(frozen=True)
class LoadedConfig:
    """A whole file, ready to run: process options, rules in file order, ``check`` warnings."""

    file: ConfigFile
    rules: tuple[Rule, ...]

    @property
    def holds_key(self) -> bool:
        return any(rule.kind.holds_key is not None and rule.kind.holds_key(rule.config)
                   for rule in self.rules)

    @property
    def warnings(self) -> list[str]:
        """The parser's (an inline key), then one per tunnel rule that has no key."""
        plaintext = {rule.spec.where: None for rule in self.rules
                     if rule.kind.plaintext(rule.config)}
        return [*self.file.warnings, *(f"{where}: no psk or psk_file: the tunnel is NOT "
                                       f"encrypted or authenticated" for where in plaintext)]


def read_config(path: str, env: Environment, label: str | None = None) -> LoadedConfig:
    """Read and load the file at ``path`` (``label``: its name in messages, default ``path``)."""
    label = path if label is None else label
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError("file", f"cannot read {label}: {exc.strerror or exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError("file", f"{label}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("file", f"{label}: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None
    return load_config(text, label, env, os.path.dirname(os.path.abspath(path)))


def load_config(text: str, filename: str, env: Environment, base_dir: str = "") -> LoadedConfig:
    """Parse, then validate and resolve every instance with its tool's config function."""
    parsed = parse_config(text, filename, PARSER_KINDS, PROCESS_FIELDS, base_dir)
    rules: list[Rule] = []
    listening: dict[tuple, Rule] = {}
    for spec in parsed.rules:
        kind = KINDS[spec.kind]
        try:
            config = kind.make_config(spec.options, env)
            workers = (worker_count(spec.options, RULE_WORKERS)
                       if spec.options.raw(RULE_WORKERS) is not None else None)
        except ConfigError as exc:
            raise ConfigError(exc.field, located(spec, exc)) from None
        rule = Rule(kind, spec, config, workers)
        if rule.socket_key in listening:
            other = listening[rule.socket_key]
            raise ConfigError("listen", f"{spec.options.label('listen')}: "
                              f"{format_sockaddr(config.listen.sockaddr)} is already the "
                              f"listen address of {other.spec.where.split(': ', 1)[1]}"
                              f"{'' if other.name == other.spec.rule else f' ({other.name})'}")
        listening[rule.socket_key] = rule
        rules.append(rule)
    return LoadedConfig(parsed, tuple(rules))


def located(spec: RuleSpec, exc: ConfigError) -> str:
    """A tool's message, led by where the key is written (its label) unless it already is."""
    label = spec.options.labels.get(exc.field)
    if label is None:
        return f"{spec.where}: {exc.message}"
    return exc.message if exc.message.startswith(label) else f"{label}: {exc.message}"


def absolute(path: str) -> str:
    """The file's path for reloads: the daemon chdirs to /."""
    return os.path.abspath(path)
