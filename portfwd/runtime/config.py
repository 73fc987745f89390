"""The settings every tool shares, from parsed options: the process's and the listener's.

Fields read: ``daemonize``, ``pidfile``, ``metrics``, ``log_format`` (process); ``reuseaddr``,
``reuseport``, ``v6only`` (listener).
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from portfwd.runtime.addr import Resolved
from portfwd.runtime.environment import Environment
from portfwd.runtime.options import ConfigError, Options
from portfwd.runtime.sockets import ListenOptions


@dataclass(frozen=True)
class ProcessConfig:
    """How the process runs, whatever service it hosts (-d, -p, PORTFWD_LOGLEVEL)."""

    daemonize: bool = False  # -d: detach and log to syslog
    pidfile: str | None = None  # -p: path of the pidfile, None = none
    log_level: int = logging.INFO  # root logger level
    metrics: Resolved | None = None  # --metrics: where /metrics is served, None = nowhere
    log_format: str = "text"  # --log-format: "text" (the seed's lines) or "json" (one object)


LOG_FORMATS = ("text", "json")


def process_config(options: Options, env: Environment) -> ProcessConfig:
    metrics = None
    if options.raw("metrics") is not None:
        metrics = options.address("metrics", socket.SOCK_STREAM, passive=True)
    log_format = options.text("log_format") or "text"
    if log_format not in LOG_FORMATS:
        raise ConfigError("log_format", f"{options.label('log_format')} expects text or json, "
                          f"got {log_format!r}")
    return ProcessConfig(
        daemonize=options.flag("daemonize"),
        pidfile=options.text("pidfile") or None,
        log_level=logging.INFO if env.log_level is None else env.log_level,
        metrics=metrics,
        log_format=log_format,
    )


def listen_options(options: Options, bufsize: int | None = None) -> ListenOptions:
    return ListenOptions(reuseaddr=options.flag("reuseaddr"), reuseport=options.flag("reuseport"),
                         v6only=options.flag("v6only"), bufsize=bufsize)
