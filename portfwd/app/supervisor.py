"""The gevent side of ``portfwd run``: every rule's service, started, reloaded and stopped.

A reload (SIGHUP) follows the contract of mitmproxy's OptManager and nginx's reload: the new
file is read and validated completely, every new listener is bound, and only then is anything
changed; any failure before that point leaves the running set exactly as it was. Then:
unchanged rules are untouched; a changed rule keeps its listener (``rules.Kind.reuse``:
TCP listeners are handed over to a new service while the old one's connections finish, UDP
services take the new settings for new sessions); a removed rule stops accepting and drains
for DRAIN_TIMEOUT, like a stop; a new rule starts on its new listener.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import gevent
import gevent.lock
import gevent.pool

from portfwd.app.load import LoadedConfig, Rule, read_config
from portfwd.app.rules import HANDOVER
from portfwd.runtime import daemon
from portfwd.runtime.environment import Environment
from portfwd.runtime.options import ConfigError, StartupError
from portfwd.runtime.prefork import bind_slots, close_all

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupervisorMetrics:
    """``portfwd run`` as a whole (each rule's own snapshot: Supervisor.rule_snapshots)."""

    rules: int  # listeners running (a port range counts one per port)
    draining: int  # services of removed or replaced rules still finishing their connections
    reloads: int  # reloads applied
    reload_failures: int  # reloads refused (invalid file, unbindable rule): nothing changed


class Running:
    """A rule and the service that runs it on ``listener``."""

    __slots__ = ("rule", "service", "listener")

    def __init__(self, rule: Rule, service: daemon.Service, listener: socket.socket) -> None:
        self.rule = rule
        self.service = service
        self.listener = listener


def bind_rules(rules: Iterable[Rule]) -> dict[tuple, socket.socket]:
    """A listener per rule, or none: on the first failure the others are closed and OSError
    propagates with ``.rule`` naming the rule that could not bind."""
    return {key: socks[0] for key, socks in bind_rule_slots(rules).items()}


def bind_rule_slots(rules: Iterable[Rule], count: Callable[[Rule], int] | None = None
                    ) -> dict[tuple, list[socket.socket]]:
    """:func:`bind_rules` with ``count(rule)`` sockets per rule, one per worker slot (with a
    ``count``: a SO_REUSEPORT group, which a reload may grow)."""
    bound: dict[tuple, list[socket.socket]] = {}
    try:
        for rule in rules:
            try:
                bound[rule.key] = bind_slots(rule.config.listen, rule.kind.socktype,
                                             rule.config.listen_options,
                                             count(rule) if count else 1, count is not None)
            except OSError as exc:
                exc.rule = rule  # type: ignore[attr-defined]
                raise
    except OSError:
        close_all(bound.values())
        raise
    return bound


def bind_failure(exc: OSError) -> str:
    rule: Rule = exc.rule  # type: ignore[attr-defined]
    return (f"cannot listen on {rule.config.listen} for {rule.spec.where.split(': ', 1)[1]}: "
            f"{exc.strerror or exc}")


def bind_all(loaded: LoadedConfig) -> dict[tuple, socket.socket]:
    """Bind at start, in the foreground: a failure is a StartupError (exit 1)."""
    return {key: socks[0] for key, socks in bind_all_slots(loaded).items()}


def bind_all_slots(loaded: LoadedConfig, count: Callable[[Rule], int] | None = None
                   ) -> dict[tuple, list[socket.socket]]:
    """:func:`bind_all` with ``count(rule)`` sockets per rule, one per worker slot."""
    try:
        return bind_rule_slots(loaded.rules, count)
    except OSError as exc:
        raise StartupError(bind_failure(exc)) from None


class Supervisor:
    """The service ``portfwd run`` hands to ``daemon.run``: all rules of one file."""

    def __init__(self, path: str, label: str, env: Environment, loaded: LoadedConfig,
                 listeners: dict[tuple, socket.socket]) -> None:
        self.path = path  # absolute: re-read on every reload
        self.label = label  # the file's name as the user gave it, in messages
        self.env = env
        self.loaded = loaded
        self._listeners = listeners  # bound by bind_all, until start() hands them on
        self.running: dict[tuple, Running] = {}
        self.draining = gevent.pool.Group()
        self.reloads = 0
        self.reload_failures = 0
        self._reloading = gevent.lock.Semaphore()  # one reload at a time, in signal order
        self._key_guarded = False
        self._stopped = False  # a SIGHUP after the stop signal must not start anything

    # -- the Service protocol -------------------------------------------------------------

    def start(self) -> None:
        for warning in self.loaded.warnings:
            log.warning("%s", warning)
        self._guard_keys(self.loaded)
        for rule in self.loaded.rules:
            self._start_rule(rule, self._listeners.pop(rule.key))
        log.info("running %d rules on %d listeners from %s", len(names(self.loaded.rules)),
                 len(self.running), self.label)

    def stop(self, timeout: float) -> None:
        with self._reloading:
            self._stopped = True
            group = gevent.pool.Group()
            for running in self.running.values():
                group.spawn(running.service.stop, timeout)
            self.running.clear()
            group.join()
            self.draining.join(timeout=timeout + 1)
            self.draining.kill(timeout=1)

    def metrics(self) -> SupervisorMetrics:
        return SupervisorMetrics(rules=len(self.running), draining=len(self.draining),
                                 reloads=self.reloads, reload_failures=self.reload_failures)

    def rule_snapshots(self) -> list[tuple[str, str, object]]:
        """(kind, instance name, that service's metrics()) of every running listener; an
        instance of a port range is named ``<rule name>:<port>``."""
        return [(r.rule.kind.name, r.rule.name, r.service.metrics())
                for r in self.running.values()]

    # -- reload ---------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the file and apply it, or change nothing (logged either way)."""
        with self._reloading:
            if self._stopped:
                return
            if timed_reload(self.label, self._reload):
                self.reloads += 1
            else:
                self.reload_failures += 1

    def _reload(self) -> str:
        """Apply the file; what changed (raises Refused when nothing could)."""
        new = read_for_reload(self.path, self.env, self.label)
        diff = diff_rules({key: running.rule for key, running in self.running.items()}, new)
        added, removed, changed, kept = diff.added, diff.removed, diff.changed, diff.kept
        takeover = diff.takeover
        try:
            self._guard_keys(new)
            bound = bind_rules(rule for rule in added if rule.key not in takeover)
        except (OSError, StartupError) as exc:
            raise Refused(bind_failure(exc) if isinstance(exc, OSError) else str(exc)) from None
        warn_process_change(self.label, self.loaded, new)
        for rule in added:
            if rule.key in takeover:
                bound[rule.key] = self._retire(takeover[rule.key].key, handover=True)
        for rule in removed:
            if rule.key in self.running:  # not taken over above
                self._retire(rule.key)
        for rule in changed:
            self._change(rule)
        for rule in added:
            self._start_rule(rule, bound[rule.key])
        for rule in kept:  # the same rule, perhaps on other lines of the file now
            self.running[rule.key].rule = rule
        self.loaded = new
        return diff.summary()

    # -- one rule -------------------------------------------------------------------------

    def _start_rule(self, rule: Rule, listener: socket.socket) -> None:
        service = rule.kind.make_service(rule.config, listener)
        service.start()
        self.running[rule.key] = Running(rule, service, listener)

    def _change(self, rule: Rule) -> None:
        running = self.running[rule.key]
        options = rule.config.listen_options
        for flag, option in ((options.reuseaddr, socket.SO_REUSEADDR),
                             (options.reuseport, socket.SO_REUSEPORT)):
            running.listener.setsockopt(socket.SOL_SOCKET, option, int(flag))
        if rule.kind.reuse == HANDOVER:
            self._start_rule(rule, self._retire(rule.key, handover=True))
        else:
            running.service.reconfigure(rule.config)  # type: ignore[attr-defined]
            running.rule = rule

    def _retire(self, key: tuple, handover: bool = False) -> socket.socket | None:
        """Take a rule's service out of the running set and let it drain in the background;
        with ``handover``, first take its listener (still listening) and return it."""
        service = self.running.pop(key).service
        listener = service.handover() if handover else None  # type: ignore[attr-defined]
        self.draining.spawn(service.stop, daemon.DRAIN_TIMEOUT)
        return listener

    def _guard_keys(self, loaded: LoadedConfig) -> None:
        """A process that holds a tunnel key does not dump core (as the kcptcp tools)."""
        if loaded.holds_key and not self._key_guarded:
            daemon.disable_core_dumps()
            self._key_guarded = True


class Refused(Exception):
    """A reload that cannot apply, and why (logged; nothing was changed)."""


def timed_reload(label: str, apply: Callable[[], str]) -> bool:
    """Run ``apply`` (it returns what changed, or raises Refused) and log the outcome."""
    started = time.monotonic()
    try:
        done = apply()
    except Refused as exc:
        log.error("reload refused, still running the previous configuration: %s", exc)
        return False
    log.info("reload of %s in %.0f ms: %s", label, (time.monotonic() - started) * 1000, done)
    return True


def warn_process_change(label: str, old: LoadedConfig, new: LoadedConfig) -> None:
    if new.file.process != old.file.process:
        log.warning("reload: the process settings of %s take effect at the next start", label)


def read_for_reload(path: str, env: Environment, label: str) -> LoadedConfig:
    try:
        return read_config(path, env, label)
    except ConfigError as exc:
        raise Refused(exc.message) from None


@dataclass(frozen=True)
class RuleDiff:
    """What a reload changes, rule by rule (by key: kind and listen address)."""

    added: list[Rule]
    removed: list[Rule]
    changed: list[Rule]  # same key, other settings or name
    kept: list[Rule]
    # added rule key -> the removed rule of another kind whose TCP listener it takes over
    # (tcp <-> kcptcp-client): binding it anew would find the address in use
    takeover: dict[tuple, Rule]

    def summary(self) -> str:
        return (f"added {listing(self.added)}; changed {listing(self.changed)}; removed "
                f"{listing(self.removed)}; kept {listing(self.kept)}")


def diff_rules(old: dict[tuple, Rule], new: LoadedConfig) -> RuleDiff:
    """The rules of ``new`` against the running ``old``; raises Refused when a bound IPv6
    listener's v6only would change."""
    fresh = {rule.key: rule for rule in new.rules}
    added = [rule for key, rule in fresh.items() if key not in old]
    removed = [rule for key, rule in old.items() if key not in fresh]
    changed = [rule for key, rule in fresh.items()
               if key in old and (rule.config != old[key].config or rule.name != old[key].name)]
    kept = [rule for key, rule in fresh.items() if key in old and rule not in changed]
    for rule in changed:
        v6only = rule.config.listen_options.v6only
        if (rule.config.listen.family == socket.AF_INET6
                and v6only != old[rule.key].config.listen_options.v6only):
            raise Refused(f"{rule.spec.options.label('listen')}: v6only of a bound listener "
                          "cannot change (remove the rule, reload, then add it back)")
    vacated = {rule.socket_key: rule for rule in removed if rule.kind.reuse == HANDOVER}
    takeover = {rule.key: vacated[rule.socket_key] for rule in added
                if rule.socket_key in vacated and rule.kind.reuse == HANDOVER}
    return RuleDiff(added, removed, changed, kept, takeover)


def names(rules: Iterable[Rule]) -> dict[str, int]:
    """Rule name -> number of its listeners, in file order."""
    counts: dict[str, int] = {}
    for rule in rules:
        counts[rule.spec.rule] = counts.get(rule.spec.rule, 0) + 1
    return counts


def listing(rules: Iterable[Rule]) -> str:
    """``"ssh", "web" (100 ports), "dns:5301"`` or ``none``, for the reload line: a rule by
    its name, one port of a range by the instance's."""
    rules = list(rules)
    counts = names(rules)
    parts, seen = [], set()
    for rule in rules:
        count = counts[rule.spec.rule]
        if count == 1:
            parts.append(f'"{rule.name}"')
        elif rule.spec.rule not in seen:
            seen.add(rule.spec.rule)
            parts.append(f'"{rule.spec.rule}" ({count} ports)')
    return ", ".join(parts) or "none"
