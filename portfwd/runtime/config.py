"""The settings every tool shares, from parsed options: the process's and the listener's.

Fields read: ``daemonize``, ``pidfile`` (process); ``reuseaddr``, ``reuseport``, ``v6only``
(listener).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from portfwd.runtime.environment import Environment
from portfwd.runtime.options import Options
from portfwd.runtime.sockets import ListenOptions

# Every field process_config reads: the top-level keys of a config file (portfwd run), which
# no rule kind may take as its own. tests/test_configfile.py checks it against the code below.
PROCESS_FIELDS = frozenset({"daemonize", "pidfile"})


@dataclass(frozen=True)
class ProcessConfig:
    """How the process runs, whatever service it hosts (-d, -p, PORTFWD_LOGLEVEL)."""

    daemonize: bool = False  # -d: detach and log to syslog
    pidfile: str | None = None  # -p: path of the pidfile, None = none
    log_level: int = logging.INFO  # root logger level


def process_config(options: Options, env: Environment) -> ProcessConfig:
    return ProcessConfig(
        daemonize=options.flag("daemonize"),
        pidfile=options.text("pidfile") or None,
        log_level=logging.INFO if env.log_level is None else env.log_level,
    )


def listen_options(options: Options, bufsize: int | None = None) -> ListenOptions:
    return ListenOptions(reuseaddr=options.flag("reuseaddr"), reuseport=options.flag("reuseport"),
                         v6only=options.flag("v6only"), bufsize=bufsize)
