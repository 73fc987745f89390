"""Logging set-up (stderr in the foreground, syslog when detached, or a file with --log-file,
reopened on SIGUSR2 for logrotate) and rate-limited failure logs.

Two formats: ``text`` (the seed's lines, the default) and ``json`` (``--log-format json``: one
object per line with ``time``, ``level``, ``tool``, ``rule``, ``logger`` and ``message``, for
log shippers).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time

FOREGROUND_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s"
SYSLOG_SOCKET = "/dev/log"
RATE_LIMIT_INTERVAL = 10.0  # s between two log lines of one kind of failure
STARTED = time.time()  # relativeCreated counts from here


def setup_logging(prog: str, *, detached: bool, level: int = logging.INFO,
                  log_file: str | None = None, log_format: str = "text",
                  rule: str | None = None) -> None:
    """Route the root logger to ``log_file`` if given, else to stderr, or to syslog once the
    process is a daemon.

    ``level`` is the root logger's (PORTFWD_LOGLEVEL, read by :mod:`portfwd.runtime.environment`);
    ``log_format`` and ``rule`` (the one rule of a one-rule tool) choose the formatter
    (:func:`make_formatter`). Raises OSError when ``log_file`` cannot be opened.
    """
    # Per-connection lines are on the hot path: skip what our formats never print (logging
    # HOWTO, "Optimization"): the caller's file/line lookup walks the stack for every record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    LeanRecord.pid = os.getpid()  # after detaching: the daemon's pid, not the parent's
    logging.setLogRecordFactory(LeanRecord)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler: logging.Handler
    if log_file is not None:
        handler = ReopenableFileHandler(log_file)
        handler.setFormatter(make_formatter(prog, log_format, rule))
    elif detached and os.path.exists(SYSLOG_SOCKET):
        handler = logging.handlers.SysLogHandler(address=SYSLOG_SOCKET)
        handler.setFormatter(make_formatter(prog, log_format, rule, syslog=True))
    elif detached:
        handler = logging.NullHandler()  # no syslog daemon and stdio is /dev/null
    else:
        handler = LineHandler(sys.stderr)
        handler.setFormatter(make_formatter(prog, log_format, rule))
    root.addHandler(handler)
    root.setLevel(level)


def logs_are_lost(detached: bool, log_file: str | None) -> bool:
    """True when a daemon would have nowhere to write: no --log-file and no syslog socket
    (containers), its stdio being /dev/null."""
    return detached and log_file is None and not os.path.exists(SYSLOG_SOCKET)


def reopen_log_files() -> None:
    """SIGUSR2: reopen every log file (logrotate renamed it; nginx's USR1, for us USR2)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopenableFileHandler):
            handler.reopen()


class ReopenableFileHandler(logging.FileHandler):
    """A log file, opened for appending at once (a bad path fails at start) and reopened on
    request, so logrotate can move it away without copytruncate."""

    def __init__(self, path: str) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=False)

    def reopen(self) -> None:
        self.acquire()
        try:
            stream, self.stream = self.stream, self._open()
            if stream is not None:
                stream.close()
        finally:
            self.release()
def make_formatter(prog: str, log_format: str, rule: str | None = None, *,
                   syslog: bool = False) -> logging.Formatter:
    """The formatter of ``log_format`` ("text" or "json"); syslog adds its own time stamp."""
    if log_format == "json":
        return JsonFormatter(prog, rule)
    if syslog:
        return Formatter(f"{prog}[%(process)d]: %(levelname)s %(message)s")
    return Formatter(FOREGROUND_FORMAT.replace("%(name)s", prog))


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (RFC 3339, UTC, ms), ``level``, ``tool``, ``rule``
    (a record's own ``rule`` attribute, given with ``extra=``, else the process's one rule),
    ``logger``, ``pid``, ``message``, and ``exception`` with the traceback when there is one."""

    def __init__(self, tool: str, rule: str | None = None) -> None:
        super().__init__()
        self.tool = tool
        self.rule = rule

    def format(self, record: logging.LogRecord) -> str:
        created = record.created
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        out = {"time": f"{stamp}.{int(record.msecs):03d}Z", "level": record.levelname,
               "tool": self.tool, "rule": getattr(record, "rule", self.rule),
               "logger": record.name, "pid": record.process, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class LeanRecord(logging.LogRecord):
    """A LogRecord without the per-record work our formats never print.

    tcpfwd writes two lines per connection. The stock record splits a source path, asks for
    thread and process names and calls getpid() each time; on short connections that work is
    about a seventh of tcpfwd's CPU (a cold cache makes Python code dearer than microbenchmarks
    show). Every documented attribute is still set, so any format string keeps working: the
    skipped ones read "?" or None, and ``process`` is the pid recorded by :func:`setup_logging`.
    """

    pid: int | None = None

    def __init__(self, name: str, level: int, pathname: str, lineno: int, msg: object,
                 args: tuple | dict | None, exc_info: object, func: str | None = None,
                 sinfo: str | None = None, **_: object) -> None:
        created = time.time()
        self.name, self.msg, self.levelno = name, msg, level
        if args and len(args) == 1 and isinstance(args[0], dict) and args[0]:
            args = args[0]  # as the stock record does: one dict argument is a mapping for %
        self.args = args
        self.levelname = logging.getLevelName(level)
        self.pathname, self.filename, self.module = pathname, "?", "?"
        self.lineno, self.funcName, self.stack_info = lineno, func, sinfo
        self.exc_info, self.exc_text = exc_info, None
        self.created, self.msecs = created, (created - int(created)) * 1000
        self.relativeCreated = (created - STARTED) * 1000
        self.process = self.pid
        self.thread = self.threadName = self.processName = self.taskName = None


class Formatter(logging.Formatter):
    """A %-style logging.Formatter for the hot path: %(asctime)s formats the date and time once
    per second, and a plain record (no traceback) is one ``%`` instead of five method calls."""

    _second = -1
    _stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.stack_info:
            return super().format(record)
        record.message = record.getMessage()
        record.asctime = self.formatTime(record)
        return self._fmt % record.__dict__

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return self.default_msec_format % (self._stamp, record.msecs)


def hot_log(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """``logger.log(level, msg, *args)`` for lines written per connection, minus logging's layers.

    Logger.log, _log, makeRecord, handle, filter, callHandlers, Handler.handle, filter,
    acquire, emit: in situ (cold caches between connections) the two lines per short
    connection cost tcpfwd about a seventh of its CPU, and the layers about half of that
    (py-spy; 243 -> 226 us per connection over 8 interleaved rounds). Here the record goes
    straight to emit() of the handlers logging would have picked: the logger's and its
    ancestors' (looked up per call, so reconfiguration is seen), at or below ``level``.
    Skipped: handler filters (ours have none) and the handler lock (gevent runs one OS thread).
    A level that is off costs one cached isEnabledFor().
    """
    if logger.disabled or not logger.isEnabledFor(level):
        return
    record = LeanRecord(logger.name, level, "", 0, msg, args, None)
    node: logging.Logger | None = logger
    while node is not None:
        for handler in node.handlers:
            if handler.level <= level:
                handler.emit(record)
        node = node.parent if node.propagate else None


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


class LineHandler(logging.StreamHandler):
    """StreamHandler for a line-buffered stream (sys.stderr is, since Python 3.9): the newline
    already flushes it, so no flush() call chain per record."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:  # what logging.StreamHandler does: report, never kill the caller
            self.handleError(record)
