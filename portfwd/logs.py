"""Logging set-up (stderr in the foreground, syslog when detached) and rate-limited failure logs."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time

FOREGROUND_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"
SYSLOG_SOCKET = "/dev/log"
RATE_LIMIT_INTERVAL = 10.0  # s between two log lines of one kind of failure


def setup_logging(prog: str, *, detached: bool, level: int = logging.INFO) -> None:
    """Route the root logger to stderr, or to syslog once the process is a daemon."""
    # Per-connection lines are on the hot path: skip what our formats never print (logging
    # HOWTO, "Optimization"): the caller's file/line lookup walks the stack for every record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    if detached and os.path.exists(SYSLOG_SOCKET):
        handler = logging.handlers.SysLogHandler(address=SYSLOG_SOCKET)
        handler.setFormatter(logging.Formatter(f"{prog}[%(process)d]: %(levelname)s %(message)s"))
    elif detached:
        handler = logging.NullHandler()  # no syslog daemon and stdio is /dev/null
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FOREGROUND_FORMAT.replace("%(name)s", prog)))
    root.addHandler(handler)
    root.setLevel(int(os.environ.get("PORTFWD_LOGLEVEL", level)))


class RateLimitedLog:
    """At most one line per ``interval`` per key; the next line says how many were suppressed.

    Runtime faults (refused targets, garbage datagrams) can arrive thousands of times per
    second; logging each would turn a fault into a disk-filling and CPU-burning one.
    """

    def __init__(self, logger: logging.Logger, interval: float = RATE_LIMIT_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, key: str, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += " (%d similar suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(key, logging.WARNING, msg, *args)
