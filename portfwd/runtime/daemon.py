"""Process life cycle shared by every tool: pidfile, daemonizing, signals, fd limit.

Seed "Signals, PID files, and graceful shutdown": the pidfile is created exclusively, a stale
one is taken over, and SIGINT/SIGTERM/SIGHUP/SIGQUIT all stop the service gracefully and remove
it. Unlike the C original we also stop on SIGTERM in tcpfwd and remove the pidfile on SIGHUP.
``portfwd run`` alone reloads its config file on SIGHUP (see :func:`run`).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import gevent
import gevent.event

from portfwd.runtime.addr import Resolved
from portfwd.runtime.config import ProcessConfig, process_config
from portfwd.runtime.environment import Environment, read_environment
from portfwd.runtime.exporter import (
    MetricsEndpoint,
    RuleKind,
    RuleSnapshots,
    ValueCollector,
    make_registry,
    rule_name,
    rule_snapshots,
    status_lines,
    summary_line,
)
from portfwd.runtime.logs import SYSLOG_SOCKET, logs_are_lost, reopen_log_files, setup_logging
from portfwd.runtime.notify import Notifier
from portfwd.runtime.options import EXIT_RUNTIME, Options, StartupError, parse_args, run_tool
from portfwd.runtime.prefork import Pool, WorkerLink, bind_slots
from portfwd.runtime.proctitle import SECRET_ON_COMMAND_LINE, hide_secret_arguments
from portfwd.runtime.sockets import ListenOptions

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
DRAIN_TIMEOUT = 5.0  # s that active connections get to finish after a stop signal
NOTIFY_STATUS_INTERVAL = 30.0  # s between systemd STATUS= updates when there is no watchdog


class PidFileBusy(RuntimeError):
    """Another live instance holds the pidfile."""


class PidFile:
    """An exclusively created, ``flock``-ed pidfile.

    The lock is the proof of life: it lives on the open file description, so it survives the
    daemonizing forks and dies with the process however it dies. A file that is unlocked and
    names a dead (or no) process is stale and taken over.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)  # the daemon chdirs to /
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            fd = self._take_over_stale()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PidFileBusy(f"pidfile {self.path} is held by a running instance") from None
        self.fd = fd
        self.write_pid()

    def _take_over_stale(self) -> int:
        fd = os.open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = _read_pid(self.path)
            raise PidFileBusy(
                f"pidfile {self.path} is held by a running instance (pid {pid})"
            ) from None
        pid = _read_pid(self.path)
        if pid is not None and pid != os.getpid() and _alive(pid):
            os.close(fd)
            raise PidFileBusy(
                f"pidfile {self.path} names live process {pid}; remove the file if it is stale"
            )
        log.info("taking over stale pidfile %s (pid %s)", self.path, pid)
        return fd

    def write_pid(self) -> None:
        """(Re)write our PID: called again after daemonizing changes it."""
        assert self.fd is not None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def forget(self) -> None:
        """Close our descriptor without removing the file (a forked worker: the parent owns
        it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def _read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(32).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: each connection costs several fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def detach() -> int:
    """Fork twice and setsid; the original process waits for ``ready()`` and exits.

    Returns the write end of a pipe: the daemon writes one byte to it once it is serving, so
    ``tcpfwd -d`` returns only when the pidfile holds the daemon's PID (no race for a control
    script that reads it at once), and returns 1 if the daemon died before that.
    """
    read_fd, write_fd = os.pipe()
    if os.fork() > 0:
        os.close(write_fd)
        ok = os.read(read_fd, 1) == b"1"
        os._exit(0 if ok else EXIT_RUNTIME)
    os.close(read_fd)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    return write_fd


PR_SET_DUMPABLE = 4  # linux/prctl.h


def disable_core_dumps() -> None:
    """For a process that holds a key: no core file (RLIMIT_CORE 0, soft and hard) and not
    dumpable (PR_SET_DUMPABLE 0: no ptrace attach and no /proc/<pid>/mem for other processes of
    the same user), so the key cannot be read out of its memory by those means."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise StartupError(f"cannot protect the key's memory: {os.strerror(error)}")


def bind_listener(addr: Resolved, socktype: int, options: ListenOptions) -> socket.socket:
    """Bind in the foreground, so a failure reaches the terminal as StartupError (exit 1)."""
    return bind_listeners(addr, socktype, options, 1)[0]


def bind_listeners(addr: Resolved, socktype: int, options: ListenOptions, count: int
                   ) -> list[socket.socket]:
    """:func:`bind_listener` for ``count`` worker slots (a SO_REUSEPORT group when > 1)."""
    try:
        return bind_slots(addr, socktype, options, count)
    except OSError as exc:
        raise StartupError(f"cannot listen on {addr}: {exc.strerror or exc}") from None


class Service(Protocol):
    """What a tool hands to :func:`run`: sockets are bound already, greenlets not started."""

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...

    def metrics(self) -> Any: ...


def run(prog: str, service: Service, process: ProcessConfig, *,
        warnings: tuple[str, ...] = (), reload: Callable[[], None] | None = None,
        kinds: Mapping[str, RuleKind] | None = None, rule: tuple[str, str] | None = None) -> int:
    """Run a bound service until a stop signal; the common ``main()`` tail of every tool.

    ``warnings`` are logged once logging is set up. ``reload`` (``portfwd run``): SIGHUP calls
    it (between systemd's RELOADING=1 and READY=1) instead of stopping (nginx's convention); the
    one-rule tools keep the seed's SIGHUP = stop. ``kinds`` (kind name -> :class:`RuleKind`)
    and ``rule`` (``(kind, name)`` of a one-rule service; a service with ``rule_snapshots()``
    names its rules itself) feed ``--metrics``, the SIGUSR1 status dump and systemd's STATUS=
    line. Raises StartupError when the pidfile, the log file or the metrics port cannot be
    taken (before anything is served).
    """
    rule_label = rule[1] if rule is not None else None
    try:
        setup_logging(prog, detached=False, level=process.log_level, log_file=process.log_file,
                      log_format=process.log_format, rule=rule_label)
    except OSError as exc:
        raise StartupError(f"cannot open log file {process.log_file}: "
                           f"{exc.strerror or exc}") from None
    for warning in warnings:
        log.warning("%s", warning)
    if logs_are_lost(process.daemonize, process.log_file):
        # Said on the terminal (stderr, even with --log-file absent) before it goes away.
        log.warning("-d without %s (no syslog daemon here): log lines from now on are lost; "
                    "give --log-file <path>", SYSLOG_SOCKET)
    raise_nofile_limit()
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a vanished peer is an error, not a kill
    # Without ``kinds`` the service's snapshots cannot be rendered: no --metrics, no SIGUSR1.
    snapshots = rule_snapshots(service, rule) if kinds is not None else None
    endpoint = None
    if process.metrics is not None:
        if snapshots is None:
            raise StartupError("this service has no metrics to serve")
        registry = make_registry(snapshots, kinds)
        if isinstance(service, Pool):
            registry.register(ValueCollector(service.metric_values))
        endpoint = MetricsEndpoint(process.metrics, registry)
    pid = PidFile(process.pidfile) if process.pidfile else None
    if pid is not None:
        try:
            pid.acquire()
        except PidFileBusy as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot create pidfile {pid.path}: "
                               f"{exc.strerror or exc}") from None
    ready_fd = None
    if process.daemonize:
        ready_fd = detach()
        gevent.reinit()
        setup_logging(prog, detached=True, level=process.log_level, log_file=process.log_file,
                      log_format=process.log_format, rule=rule_label)
        if pid is not None:
            pid.write_pid()
    notifier = Notifier.from_environ()
    summary = (lambda: summary_line(snapshots, kinds)) if snapshots else (lambda: "")
    stopping = gevent.event.Event()
    on_sighup = reloader(reload, notifier, summary) if reload is not None else None
    handles = install_signals(stopping, on_sighup, snapshots, kinds)
    greenlets: list[gevent.Greenlet] = []
    pool = service if isinstance(service, Pool) else None
    if pool is not None:
        # A worker drops what the parent owns before it serves.
        pool.after_fork += [*(handle.cancel for handle in handles), notifier.close,
                            lambda: gevent.killall(greenlets, block=False)]
        if endpoint is not None:
            pool.after_fork.append(endpoint.server.close)
        if pid is not None:
            pool.after_fork.append(pid.forget)
        handles.append(gevent.signal_handler(signal.SIGUSR2, pool.signal_all, signal.SIGUSR2))
    try:
        service.start()
        if endpoint is not None:
            endpoint.start()
        if ready_fd is not None:
            os.write(ready_fd, b"1")
            os.close(ready_fd)
        if notifier.enabled:
            notifier.ready(summary())
            greenlets.append(gevent.spawn(notify_loop, notifier, summary))
        stopping.wait()
        notifier.stopping()
        gevent.killall(greenlets)
        drain(service)
        if endpoint is not None:
            endpoint.stop()
    finally:
        if pid is not None:
            pid.release()
        notifier.close()
    log.info("stopped")
    return 0


def install_signals(stopping: gevent.event.Event, on_sighup: Callable[[], None] | None,
                    snapshots: RuleSnapshots | None, kinds: Mapping[str, RuleKind] | None
                    ) -> list[Any]:
    """The seed's stop signals set ``stopping`` (SIGHUP calls ``on_sighup`` instead when
    given), SIGUSR1 logs the status of ``snapshots``, SIGUSR2 reopens the log files. Returns
    the handles (a forked worker cancels its parent's)."""
    handles = [gevent.signal_handler(signum, stopping.set) for signum in STOP_SIGNALS
               if signum != signal.SIGHUP or on_sighup is None]
    if on_sighup is not None:
        handles.append(gevent.signal_handler(signal.SIGHUP, on_sighup))
    if snapshots is not None and kinds is not None:
        handles.append(gevent.signal_handler(signal.SIGUSR1, log_status, snapshots, kinds))
    handles.append(gevent.signal_handler(signal.SIGUSR2, reopen_log_files))
    return handles


def drain(service: Service) -> None:
    log.info("stopping: closing listeners, draining connections for up to %.0f s",
             DRAIN_TIMEOUT)
    service.stop(DRAIN_TIMEOUT)


def serve_worker(prog: str, service: Service, process: ProcessConfig, link: WorkerLink, *,
                 kinds: Mapping[str, RuleKind] | None = None,
                 rule: tuple[str, str] | None = None,
                 reload: Callable[[], None] | None = None) -> int:
    """A ``-w`` worker's :func:`run`: the parent has the pidfile, the metrics endpoint and
    systemd; the worker logs as ``<prog>/w<n>``, serves until a stop signal or its parent's
    end, and answers the parent's snapshot requests over ``link``."""
    setup_logging(f"{prog}/{link.tag}", detached=process.daemonize, level=process.log_level,
                  log_file=process.log_file, log_format=process.log_format,
                  rule=rule[1] if rule is not None else None)
    snapshots = rule_snapshots(service, rule) if kinds is not None else None
    stopping = gevent.event.Event()
    install_signals(stopping, reload, snapshots, kinds)
    service.start()
    answering = link.serve(snapshots)
    gevent.wait([stopping, link.parent_gone], count=1)
    if link.parent_gone.is_set() and not stopping.is_set():
        log.warning("the parent process is gone: stopping")
    answering.kill()
    # The final snapshot goes to the parent after the drain; a rule whose service forgets
    # it once stopped (portfwd run's supervisor) is reported as it was before the drain.
    before = list(snapshots()) if snapshots is not None else []
    drain(service)
    final = {(kind, name): snapshot for kind, name, snapshot in before}
    if snapshots is not None:
        final.update({(kind, name): snapshot for kind, name, snapshot in snapshots()})
    link.close(lambda: [(kind, name, snapshot) for (kind, name), snapshot in final.items()])
    log.info("stopped")
    return 0


def log_status(snapshots: RuleSnapshots, kinds: Mapping[str, RuleKind]) -> None:
    """SIGUSR1: one status snapshot of every rule to the log; changes nothing."""
    for line in status_lines(snapshots, kinds):
        log.info("%s", line)


def reloader(reload: Callable[[], None], notifier: Notifier,
             summary: Callable[[], str]) -> Callable[[], None]:
    """The SIGHUP handler of a service that reloads: RELOADING=1, ``reload()``, READY=1. A
    failed reload is logged and the service goes on with what it had."""
    def on_sighup() -> None:
        notifier.reloading()
        try:
            reload()
        except Exception:  # a reload must never take the running service down
            log.exception("reload failed; still running the previous configuration")
        notifier.ready(summary())

    return on_sighup


def notify_loop(notifier: Notifier, summary: Callable[[], str]) -> None:
    """WATCHDOG=1 at half of WATCHDOG_USEC (from the hub: a stuck loop misses it) with a fresh
    STATUS= line; without a watchdog, STATUS= alone every NOTIFY_STATUS_INTERVAL."""
    interval = notifier.watchdog_interval
    while True:
        gevent.sleep(interval or NOTIFY_STATUS_INTERVAL)
        if interval:
            notifier.notify(WATCHDOG=1, STATUS=summary())
        else:
            notifier.status(summary())


def one_rule_main(prog: str, usage: str, argv: list[str] | None, fields: Mapping[str, str],
                  make_config: Callable[[Options, Environment], Any], socktype: int,
                  make_service: Callable[[Any, socket.socket], Service], kind: RuleKind,
                  steer: Callable[[list[socket.socket]], None] | None = None) -> int:
    """The whole ``main()`` of a one-rule tool: command line -> Options -> the tool's frozen
    config (``make_config``, which has ``listen`` and ``listen_options``) -> a listener bound
    in the foreground, so its errors reach the terminal -> ``make_service`` -> :func:`run`
    with the rule ``kind`` named ``<kind>:<listen as written>``. With ``-w <n>`` (a field
    ``workers`` in ``fields``) the listener is a socket per worker slot and :func:`run` gets a
    :class:`~portfwd.runtime.prefork.Pool` whose workers each build the service; a
    ``make_service.guard(config)`` (the tunnel tools' key guard) is then called in the parent,
    and ``steer(sockets)`` may make the group choose its worker (the tunnel servers: by conv).
    Bad input exits 2 and start-up failures 1, each as one line (:func:`run_tool`)."""
    def body() -> int:
        args = list(sys.argv[1:] if argv is None else argv)
        hidden = hide_secret_arguments(args)  # first: the key leaves ps as early as we can
        options = Options.from_docopt(parse_args(prog, usage, args), fields)
        env = read_environment()
        config = make_config(options, env)
        process = process_config(options, env)
        if env.shared_listener and socktype == socket.SOCK_STREAM:  # to compare (bench)
            listeners = [bind_listener(config.listen, socktype, config.listen_options)]
            listeners *= process.workers
        else:
            listeners = bind_listeners(config.listen, socktype, config.listen_options,
                                       process.workers)
        warnings = (SECRET_ON_COMMAND_LINE,) if hidden else ()
        rule = (kind.name, rule_name(kind.name, options.raw("listen")))
        kinds = {kind.name: kind}
        if process.workers == 1:
            return run(prog, make_service(config, listeners[0]), process, warnings=warnings,
                       kinds=kinds, rule=rule)

        if steer is not None:
            try:
                steer(listeners)
            except OSError as exc:
                raise StartupError(f"cannot steer {config.listen} by conversation: "
                                   f"{exc.strerror or exc}") from None
        guard = getattr(make_service, "guard", None)  # a tunnel tool's key guard
        if guard is not None:  # the parent holds the key too
            guard(config)

        def work(slot: int, link: WorkerLink) -> int:
            return serve_worker(prog, make_service(config, listeners[slot]), process, link,
                                kinds=kinds, rule=rule)

        pool = Pool(process.workers, work, [[sock] for sock in listeners])
        return run(prog, pool, process, warnings=warnings, kinds=kinds, rule=rule)

    return run_tool(prog, body)
