"""``portfwd run`` with ``workers = n`` (n > 1): the parent's side, nginx's model.

The parent reads the file, binds a socket per rule and worker slot (runtime/prefork.py) and
forks the workers; each runs a :class:`~portfwd.app.supervisor.Supervisor` over its slot's
sockets. A rule's own ``workers`` key (or ``[defaults]``) runs it in that many of the
process's workers (slots 1..n); the process has as many as its largest rule or the file's
``workers`` key. A reload (SIGHUP, to the parent) is validated and bound in the parent, all or
nothing like the one-process reload; then a new *generation* of workers is forked with the new
file while the old one drains (stop accepting, DRAIN_TIMEOUT for open connections). Sockets of
rules that stay are kept by the parent, so no connection is refused meanwhile and a UDP
client's datagrams keep reaching the same slot. What a generation change costs: UDP sessions
and tunnel conversations start over in the new workers (the one-process reload keeps them).
"""

from __future__ import annotations

import dataclasses
import logging
import socket

import gevent.lock

from portfwd.app.load import LoadedConfig, Rule
from portfwd.app.rules import EXPORTED
from portfwd.app.supervisor import (
    Refused,
    Supervisor,
    bind_all_slots,
    bind_failure,
    bind_rule_slots,
    diff_rules,
    read_for_reload,
    timed_reload,
    warn_process_change,
)
from portfwd.runtime import daemon
from portfwd.runtime.config import ProcessConfig
from portfwd.runtime.environment import Environment
from portfwd.runtime.prefork import Pool, WorkerLink, close_all, grow_slots

log = logging.getLogger(__name__)


class Generations:
    """What ``portfwd run`` hands to ``daemon.run`` with workers: the :class:`Pool` (the
    service) and ``reload`` (the SIGHUP handler)."""

    def __init__(self, prog: str, path: str, label: str, env: Environment,
                 loaded: LoadedConfig, process: ProcessConfig) -> None:
        self.prog = prog
        self.path = path  # absolute: re-read on every reload
        self.label = label
        self.env = env
        self.loaded = loaded
        self.process = process
        self.count = process_workers(loaded, process)
        self.sockets = bind_all_slots(loaded, self._count)  # rule key -> a socket per slot
        self._steer()
        if loaded.holds_key:  # the parent read the keys too
            daemon.disable_core_dumps()
        self.pool = Pool(self.count, self._work, self._per_slot())
        self.reloads = 0
        self.reload_failures = 0
        self._reloading = gevent.lock.Semaphore()

    def _count(self, rule: Rule) -> int:
        return rule_workers(rule, self.process)

    def _per_slot(self) -> list[list[socket.socket]]:
        return [[socks[i] for socks in self.sockets.values() if i < len(socks)]
                for i in range(self.count)]

    def _work(self, slot: int, link: WorkerLink) -> int:
        """A worker: this generation's file (the rules that run in ``slot``) over the slot's
        sockets."""
        listeners = {key: socks[slot] for key, socks in self.sockets.items()
                     if slot < len(socks)}
        mine = dataclasses.replace(self.loaded, rules=tuple(
            rule for rule in self.loaded.rules if rule.key in listeners))
        supervisor = Supervisor(self.path, self.label, self.env, mine, listeners)
        return daemon.serve_worker(self.prog, supervisor, self.process, link, kinds=EXPORTED,
                                   reload=lambda: log.info("SIGHUP: the parent reloads"))

    def reload(self) -> None:
        with self._reloading:
            if timed_reload(self.label, self._reload):
                self.reloads += 1
            else:
                self.reload_failures += 1

    def _reload(self) -> str:
        """Validate and bind in the parent, then a new generation (raises Refused when
        nothing could change)."""
        new = read_for_reload(self.path, self.env, self.label)
        old = {rule.key: rule for rule in self.loaded.rules}
        diff = diff_rules(old, new)
        refusal = self._over(new)
        if refusal is not None:
            raise Refused(refusal)
        takeover = {key: rule.key for key, rule in diff.takeover.items()}
        try:
            bound = bind_rule_slots((r for r in diff.added if r.key not in takeover),
                                    self._count)
        except OSError as exc:
            raise Refused(bind_failure(exc)) from None
        for key, old_key in takeover.items():
            bound[key] = self.sockets[old_key]
        extra: dict[tuple, list[socket.socket]] = {}
        try:  # a rule that runs in more workers now: its group grows (nothing closed yet)
            for rule in new.rules:
                extra[rule.key] = self._grow(rule, bound.get(rule.key)
                                             or self.sockets[rule.key])
        except OSError as exc:
            for key in takeover:
                del bound[key]
            close_all([*bound.values(), *extra.values()])
            raise Refused(bind_failure(exc)) from None
        if new.holds_key and not self.loaded.holds_key:
            daemon.disable_core_dumps()
        warn_process_change(self.label, self.loaded, new)
        # Applied from here on. The old workers hold their own copies while they drain.
        gone = [self.sockets.pop(rule.key) for rule in diff.removed
                if rule.key in self.sockets and rule.key not in takeover.values()]
        for old_key in takeover.values():
            self.sockets.pop(old_key)
        self.sockets.update(bound)
        for rule in new.rules:
            socks = self.sockets[rule.key] + extra[rule.key]
            gone.append(socks[self._count(rule):])  # a rule that runs in fewer workers now
            self.sockets[rule.key] = socks[:self._count(rule)]
        self.loaded = new
        self._steer()
        self.pool.sockets = self._per_slot()
        self.pool.replace_all()
        close_all(gone)
        moved = [rule for rule in diff.kept if rule.workers != old[rule.key].workers]
        diff = dataclasses.replace(diff, changed=diff.changed + moved,
                                   kept=[rule for rule in diff.kept if rule not in moved])
        return diff.summary() + " (new workers)"

    def _steer(self) -> None:
        """The kinds that choose their worker (the tunnel servers: by conv), for the group's
        size now (a failure leaves the kernel's address hash: logged)."""
        for rule in self.loaded.rules:
            if rule.kind.steer is not None:
                try:
                    rule.kind.steer(self.sockets[rule.key])
                except OSError as exc:
                    log.warning("%s: cannot steer by conversation, the client's address "
                                "picks the worker: %s", rule.spec.where, exc.strerror or exc)

    def _grow(self, rule: Rule, socks: list[socket.socket]) -> list[socket.socket]:
        """The sockets ``rule`` needs beyond ``socks`` (bound now; raises OSError)."""
        if self._count(rule) <= len(socks):
            return []
        try:
            return grow_slots(socks, rule.config.listen, rule.kind.socktype,
                              rule.config.listen_options, self._count(rule))[len(socks):]
        except OSError as exc:
            exc.rule = rule  # type: ignore[attr-defined]
            raise

    def _over(self, new: LoadedConfig) -> str | None:
        """Why ``new`` needs more workers than this process started with, or None."""
        for rule in new.rules:
            if self._count(rule) > self.count:
                return (f"{rule.spec.where}: {self._count(rule)} workers, but this process "
                        f"started {self.count} (restart it to change that)")
        return None


def rule_workers(rule: Rule, process: ProcessConfig) -> int:
    """How many workers run ``rule``: its own ``workers`` key, else the file's."""
    return rule.workers if rule.workers is not None else process.workers


def process_workers(loaded: LoadedConfig, process: ProcessConfig) -> int:
    """The workers of a ``portfwd run`` process: the file's (or -w) or its largest rule's."""
    return max([process.workers, *(rule_workers(rule, process) for rule in loaded.rules)])
