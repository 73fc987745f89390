"""The settings every tool shares, from parsed options: the process's and the listener's.

Fields read: ``daemonize``, ``pidfile``, ``log_file``, ``metrics``, ``log_format``,
``workers``, ``log_level`` (process);
``reuseaddr``, ``reuseport``, ``v6only`` (listener).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from portfwd.runtime.addr import Resolved
from portfwd.runtime.environment import Environment
from portfwd.runtime.options import ConfigError, Options
from portfwd.runtime.prefork import worker_count
from portfwd.runtime.sockets import ListenOptions

# Every field process_config reads: the top-level keys of a config file (portfwd run), which
# no rule kind may take as its own. tests/test_configfile.py checks it against the code below.
PROCESS_FIELDS = frozenset({"daemonize", "pidfile", "log_file", "metrics", "log_format",
                            "workers", "log_level"})


@dataclass(frozen=True)
class ProcessConfig:
    """How the process runs, whatever service it hosts (-d, -p, --log-file, --log-level)."""

    daemonize: bool = False  # -d: detach and log to syslog
    pidfile: str | None = None  # -p: path of the pidfile, None = none
    log_level: int = logging.INFO  # root logger level: --log-level, else PORTFWD_LOGLEVEL
    log_file: str | None = None  # --log-file: append log lines here, reopened on SIGUSR2
    metrics: Resolved | None = None  # --metrics: where /metrics is served, None = nowhere
    log_format: str = "text"  # --log-format: "text" (the seed's lines) or "json" (one object)
    workers: int = 1  # -w: worker processes (0 given = one per CPU); 1 = serve in this process


LOG_FORMATS = ("text", "json")
# --log-level names (syslog's, as nginx's error_log spells them); the flag (or config key)
# wins over PORTFWD_LOGLEVEL, which wins over the default, info.
LOG_LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO,
              "debug": logging.DEBUG}



def process_config(options: Options, env: Environment) -> ProcessConfig:
    metrics = None
    if options.raw("metrics") is not None:
        metrics = options.address("metrics", socket.SOCK_STREAM, passive=True)
    log_format = options.choice("log_format", LOG_FORMATS, "text")
    level = options.choice("log_level", tuple(LOG_LEVELS), "")
    if level:
        log_level = LOG_LEVELS[level]
    else:
        log_level = logging.INFO if env.log_level is None else env.log_level
    return ProcessConfig(
        daemonize=options.flag("daemonize"),
        pidfile=_in_existing_directory(options, "pidfile"),
        log_level=log_level,
        log_file=_in_existing_directory(options, "log_file"),
        metrics=metrics,
        log_format=log_format,
        workers=worker_count(options, "workers"),
    )


def _in_existing_directory(options: Options, name: str) -> str | None:
    """A path option whose directory must exist (nothing creates it for us): bad input."""
    path = options.text(name) or None
    if path is not None:
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise ConfigError(name, f"{options.label(name)} {path}: directory {directory} "
                                    "does not exist")
        path = os.path.abspath(path)  # the daemon chdirs to /
    return path


def listen_options(options: Options, bufsize: int | None = None) -> ListenOptions:
    return ListenOptions(reuseaddr=options.flag("reuseaddr"), reuseport=options.flag("reuseport"),
                         v6only=options.flag("v6only"), bufsize=bufsize)


STATS_INTERVAL = 60  # s: --stats-interval's default, every tool
MAX_STATS_INTERVAL = 86400  # s


def stats_interval(options: Options) -> float:
    """``--stats-interval`` (the ``stats_interval`` key): seconds, 0 = no periodic lines."""
    return float(options.integer("stats_interval", 0, MAX_STATS_INTERVAL, STATS_INTERVAL))
