"""Process workers (``-w <n>``): the parent binds, forks n workers, supervises and sums them.

Glossary: the *parent* is the process the user started (it owns the pidfile, the ``--metrics``
endpoint and the signals); a *worker* is one of its forked children that runs the service; a
*slot* is a worker's place (``w1`` .. ``wn``): the sockets of slot i are bound once by the
parent and kept open by it, and whoever runs slot i, the first worker or one restarted after a
crash, serves exactly those sockets.

Why one SO_REUSEPORT socket per slot: the kernel picks a group member by a hash of the 4-tuple
over the group's sockets, so a UDP client always reaches the same socket (the tunnel servers
pick by conversation id instead: :func:`steer_by_u32`). Because the parent keeps every socket
open, a dead worker's socket stays in the group (its datagrams or connections wait in its
queue for the restarted worker) and the group never changes membership: sessions never split.
TCP uses the same scheme (bench/bench_workers.py compares it with one shared listener).

Metrics: the parent answers ``--metrics``, SIGUSR1 and systemd's STATUS= with the sum over
workers. It asks each worker for its ``rule_snapshots()`` over the worker's control socket (a
socketpair; the reply is a pickle, between our own processes only) and adds them field by field
(:func:`merge`). A worker that dies leaves its last snapshot behind with what was live taken
out (:func:`ended`), so counters never go backwards when a worker is restarted.
"""

from __future__ import annotations

import contextlib
import copyreg
import ctypes
import dataclasses
import logging
import os
import pickle
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import gevent
import gevent.event
import gevent.lock
from gevent.socket import socket as gsocket

from portfwd.runtime.addr import Resolved
from portfwd.runtime.logs import RateLimitedLog
from portfwd.runtime.options import Options
from portfwd.runtime.sockets import LISTEN_BACKLOG, ListenOptions, bind_socket, tune_tcp

log = logging.getLogger(__name__)

MAX_WORKERS = 1024
STOP_GRACE = 3.0  # s past the drain timeout before a worker that has not exited is killed
RESTART_FIRST = 0.1  # s before restarting a worker that died
RESTART_MAX = 10.0  # s, the back-off's cap (doubling per quick death)
STABLE_AFTER = 10.0  # s a worker must have lived for its back-off to start over
SNAPSHOT_TIMEOUT = 2.0  # s a worker has to answer a snapshot request
ASK = b"S"  # the one request on a control socket: "your rule snapshots, please"
LENGTH = struct.Struct("!I")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
# A live count or list of live entries: not carried over from a dead worker (see ended()).
LIVE_FIELDS = frozenset({"connections_active", "sessions", "conversations", "top",
                         "per_conversation", "draining"})
# A live count that a counter is derived from (the tunnels' opened = live + finished): what
# was live when the worker died counts as ended there.
ENDED_AS = {"conversations": "finished"}


def _mapping_proxy(items: dict) -> MappingProxyType:
    return MappingProxyType(items)


# Snapshots hold read-only mappings; pickle them as what they are.
copyreg.pickle(MappingProxyType, lambda m: (_mapping_proxy, (dict(m),)))

Snapshots = list[tuple[str, str, Any]]  # (kind, rule, snapshot) of every rule of a process
Work = Callable[[int, "WorkerLink"], int]  # a worker's body: (slot, link) -> exit status


def worker_count(options: Options, field: str = "workers") -> int:
    """``-w <n>``: 1 (the default) runs in this process, 0 one worker per CPU we may run on."""
    count = options.integer(field, 0, MAX_WORKERS, default=1)
    return count or len(os.sched_getaffinity(0))


def bind_slots(addr: Resolved, socktype: int, options: ListenOptions, count: int,
               group: bool = False) -> list[socket.socket]:
    """``count`` sockets on ``addr``: one as before when ``count`` is 1 (unless ``group``: it
    may grow later), else a SO_REUSEPORT group (port 0: the first socket's port for the
    others). Raises OSError."""
    return grow_slots([], addr, socktype, options, count, group)


def grow_slots(sockets: list[socket.socket], addr: Resolved, socktype: int,
               options: ListenOptions, count: int, group: bool = True) -> list[socket.socket]:
    """The reuseport group ``sockets`` (from bind_slots with ``group``) at ``count`` members:
    new ones bound, the last ones closed. Raises OSError (the new ones closed)."""
    if count == 1 and not group and not sockets:
        return [bind_socket(addr, socktype, options)]
    options = dataclasses.replace(options, reuseport=True)
    if sockets and addr.port == 0:
        addr = _at_port_of(addr, sockets[0])
    for sock in sockets[count:]:
        sock.close()
    kept, new = sockets[:count], []
    try:
        while len(kept) + len(new) < count:
            new.append(bind_socket(addr, socktype, options))
            if socktype == socket.SOCK_STREAM:
                # Listening from now on: a connection that comes before its worker runs (at
                # start, after a crash) waits in the queue instead of being refused. The
                # options accepted sockets inherit are set first, as AcceptLoop sets them.
                tune_tcp(new[-1])
                new[-1].listen(LISTEN_BACKLOG)
            if addr.port == 0:
                addr = _at_port_of(addr, new[0])
    except BaseException:
        for sock in new:
            sock.close()
        raise
    return kept + new


def close_all(groups: Iterable[Sequence[socket.socket]]) -> None:
    """Close every socket of every group (a rule's or a slot's)."""
    for socks in groups:
        for sock in socks:
            sock.close()


def _at_port_of(addr: Resolved, sock: socket.socket) -> Resolved:
    """``addr`` at the port ``sock`` is bound to (port 0: the group's members share it)."""
    return Resolved(addr.family, (addr.host, sock.getsockname()[1], *addr.sockaddr[2:]))


SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)  # asm-generic
# classic BPF: A = the u32 (network order) at payload offset k; A %= n; return A
BPF_LD_W_ABS, BPF_ALU_MOD_K, BPF_RET_A = 0x20, 0x94, 0x16
SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k


def steer_by_u32(sockets: Sequence[socket.socket], offset: int) -> None:
    """Make a UDP reuseport group pick its member by a number the datagram carries: member
    (big-endian u32 at payload ``offset``) mod the group's size, instead of the 4-tuple hash.

    The tunnel servers steer by the conversation id, so every datagram of a conversation
    reaches the same worker wherever it comes from: a client that moves to a new address
    (NAT rebinding) keeps its conversation, and a captured HELLO replayed from elsewhere meets
    the replay cache of the worker that saw it. Members are numbered in bind order, which is
    slot order (the parent binds them and keeps them: the numbering never changes). A datagram
    too short to carry the number goes to member 0."""
    if len(sockets) < 2:
        return
    program = b"".join(SOCK_FILTER.pack(*op) for op in (
        (BPF_LD_W_ABS, 0, 0, offset), (BPF_ALU_MOD_K, 0, 0, len(sockets)), (BPF_RET_A, 0, 0, 0)))
    buffer = ctypes.create_string_buffer(program)
    fprog = struct.pack("@HP", len(program) // SOCK_FILTER.size, ctypes.addressof(buffer))
    sockets[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


# --- summing snapshots ------------------------------------------------------------------------

def merge(a: Any, b: Any) -> Any:
    """Two snapshots of one rule added up: numbers add, errno counts add per name, lists of
    live entries concatenate, nested snapshots merge field by field, anything else is ``a``'s."""
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        return type(a)(**{f.name: merge(getattr(a, f.name), getattr(b, f.name))
                          for f in dataclasses.fields(a) if f.init})
    if isinstance(a, bool):
        return a or b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = dict(a)
        for key, value in b.items():
            out[key] = merge(out[key], value) if key in out else value
        return MappingProxyType(dict(sorted(out.items())))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return a + b
    return a


def ended(snapshot: Any) -> Any:
    """What a dead worker leaves behind: its counters, without what was live (LIVE_FIELDS)."""
    if not dataclasses.is_dataclass(snapshot):
        return snapshot
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(snapshot):
        if not f.init:
            continue
        value = getattr(snapshot, f.name)
        if f.name in LIVE_FIELDS:
            changes[f.name] = () if isinstance(value, tuple) else type(value)()
            target = ENDED_AS.get(f.name)
            if target is not None and hasattr(snapshot, target):
                changes[target] = getattr(snapshot, target) + value
        elif dataclasses.is_dataclass(value):
            changes[f.name] = ended(value)
    return dataclasses.replace(snapshot, **changes)


def merge_rules(*parts: Snapshots) -> Snapshots:
    """Rule snapshot lists of several processes summed by (kind, rule), in first-seen order."""
    out: dict[tuple[str, str], Any] = {}
    for part in parts:
        for kind, rule, snapshot in part:
            key = (kind, rule)
            out[key] = merge(out[key], snapshot) if key in out else snapshot
    return [(kind, rule, snapshot) for (kind, rule), snapshot in out.items()]


def _send_message(sock: Any, data: bytes) -> None:
    sock.sendall(LENGTH.pack(len(data)) + data)


def _recv_message(sock: Any) -> Snapshots:
    """One message of :func:`_send_message`, unpickled (raises OSError, EOFError,
    pickle.UnpicklingError)."""
    size = LENGTH.unpack(_recv_exactly(sock, LENGTH.size))[0]
    return pickle.loads(_recv_exactly(sock, size))


def _recv_exactly(sock: Any, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise EOFError("control socket closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# --- the worker's side ------------------------------------------------------------------------

class WorkerLink:
    """A worker's end of its control socket: answers the parent's snapshot requests and says
    when the parent is gone (EOF: the worker stops, no orphan keeps serving)."""

    def __init__(self, sock: socket.socket, slot: int) -> None:
        self.sock = gsocket(sock.family, sock.type, fileno=sock.detach())
        self.slot = slot
        self.tag = f"w{slot + 1}"
        self.parent_gone = gevent.event.Event()

    def serve(self, snapshots: Callable[[], Snapshots] | None) -> gevent.Greenlet:
        return gevent.spawn(self._serve, snapshots)

    def _serve(self, snapshots: Callable[[], Snapshots] | None) -> None:
        try:
            while self.sock.recv(1):
                self._answer(snapshots)
        except OSError:
            pass
        self.parent_gone.set()

    def _answer(self, snapshots: Callable[[], Snapshots] | None) -> None:
        try:
            data = pickle.dumps(list(snapshots()) if snapshots is not None else [],
                                pickle.HIGHEST_PROTOCOL)
        except Exception:  # a bug here must not stop the service: answer nothing
            log.exception("cannot take a snapshot for the parent")
            data = pickle.dumps([])
        _send_message(self.sock, data)

    def close(self, snapshots: Callable[[], Snapshots] | None) -> None:
        """After the drain: the final snapshot (the parent keeps it), then EOF."""
        with contextlib.suppress(OSError):
            self._answer(snapshots)
        self.sock.close()


def die_with_parent(parent: int) -> None:
    """SIGTERM us when the parent dies (PR_SET_PDEATHSIG), and exit if it is gone already."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


# --- the parent's side ------------------------------------------------------------------------

class Worker:
    """One forked worker process as the parent sees it."""

    __slots__ = ("slot", "pid", "control", "watcher", "started", "last")

    def __init__(self, slot: Slot, pid: int, control: gsocket, watcher: Any) -> None:
        self.slot = slot
        self.pid = pid
        self.control = control  # the parent's end of its control socket
        self.watcher = watcher  # libev's child watcher: calls back once it exited
        self.started = time.monotonic()
        self.last: Snapshots = []  # its most recent answer


class Slot:
    """One worker place: its current worker and its restart back-off."""

    __slots__ = ("index", "tag", "worker", "delay", "restart")

    def __init__(self, index: int) -> None:
        self.index = index
        self.tag = f"w{index + 1}"
        self.worker: Worker | None = None  # None: not running
        self.delay = RESTART_FIRST  # s before the next restart
        self.restart: gevent.Greenlet | None = None  # a pending restart


class Pool:
    """The parent's service with ``-w <n>``: :func:`portfwd.runtime.daemon.run` starts it like
    any service. ``start()`` forks a worker per slot that runs ``work(slot, link)``;
    ``stop(timeout)`` sends SIGTERM and returns once every worker has exited (SIGKILL after
    ``timeout`` + STOP_GRACE); ``replace_all()`` forks a new generation and stops the old one
    (a reload, nginx's way). ``sockets``: per slot, the sockets it serves (a worker closes the
    other slots'). ``after_fork``: callables a new worker runs first, to drop what the parent
    owns (signal handlers, the metrics endpoint, the pidfile's descriptor)."""

    def __init__(self, count: int, work: Work, sockets: Sequence[Sequence[socket.socket]] = ()
                 ) -> None:
        self.slots = [Slot(i) for i in range(count)]
        self.work = work
        self.sockets = sockets
        self.after_fork: list[Callable[[], None]] = []
        self.workers: list[Worker] = []  # every live one: the slots' and retiring ones
        self.retained: Snapshots = []  # dead workers' counters (ended())
        self.restarts = 0
        self._stopping = False
        self._exited = gevent.event.Event()
        self._asking = gevent.lock.Semaphore()  # one round of snapshot requests at a time
        self._faults = RateLimitedLog(log)

    # -- the Service protocol -------------------------------------------------------------

    def start(self) -> None:
        for slot in self.slots:
            self._fork(slot)
        log.info("started %d workers: %s", len(self.slots), self._listing())

    def stop(self, timeout: float) -> None:
        self._stopping = True
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.kill()
        self.signal_all(signal.SIGTERM)
        if not self.workers:
            self._exited.set()
        if not self._exited.wait(timeout + STOP_GRACE):
            for worker in self.workers:
                log.warning("worker %s (pid %d) did not stop within %.0f s: killing it",
                            worker.slot.tag, worker.pid, timeout + STOP_GRACE)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGKILL)
            self._exited.wait(STOP_GRACE)
        close_all(self.sockets)

    def metrics(self) -> Any:
        return None  # a pool is only read through rule_snapshots()

    def rule_snapshots(self) -> Snapshots:
        """Every rule, summed over the live workers' answers and the dead ones' counters."""
        with self._asking:
            asked = [(worker, gevent.spawn(self._ask, worker)) for worker in self.workers]
            gevent.joinall([g for _, g in asked], timeout=SNAPSHOT_TIMEOUT + 1)
            for worker, greenlet in asked:
                if greenlet.successful() and greenlet.value is not None:
                    worker.last = greenlet.value
            return merge_rules(self.retained, *(worker.last for worker in self.workers))

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to every live worker (stop, SIGUSR2's log reopening)."""
        for worker in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    def replace_all(self) -> None:
        """A new worker in every slot (forked now: it sees the parent's current settings),
        then SIGTERM to the old ones, which drain as on a stop."""
        old = [slot.worker for slot in self.slots if slot.worker is not None]
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.kill()
            self._fork(slot)
        for worker in old:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)
        log.info("new workers: %s; the old ones drain", self._listing())

    def metric_values(self) -> list[tuple[str, str, str, float]]:
        """The workers' own metrics (exporter.ValueCollector's rows): how many run, how many
        were restarted, their CPU (live and reaped: the parent's own is the standard
        ``process_cpu_seconds_total``)."""
        cpu = cpu_seconds("self", children=True)
        for pid in self.pids:
            with contextlib.suppress(OSError):
                cpu += cpu_seconds(pid)
        running = sum(slot.worker is not None for slot in self.slots)
        return [("workers", "Worker processes running now (-w)", "gauge", running),
                ("worker_restarts", "Workers restarted after they died", "counter",
                 self.restarts),
                ("workers_cpu_seconds", "User and system CPU of the worker processes, live "
                 "and exited", "counter", cpu)]

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self.workers]

    def _listing(self) -> str:
        return ", ".join(f"{s.tag} pid {s.worker.pid}" for s in self.slots if s.worker)

    # -- workers --------------------------------------------------------------------------

    def _ask(self, worker: Worker) -> Snapshots | None:
        try:
            with gevent.Timeout(SNAPSHOT_TIMEOUT):
                worker.control.sendall(ASK)
                return _recv_message(worker.control)
        except gevent.Timeout:
            self._faults.warning(f"ask {worker.slot.tag}", "worker %s gave no snapshot within "
                                 "%.0f s: its last one counts", worker.slot.tag,
                                 SNAPSHOT_TIMEOUT)
        except (OSError, EOFError, pickle.UnpicklingError):
            pass  # it is exiting: _retire() reads what it left
        return None

    def _fork(self, slot: Slot) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            status = 1
            try:
                parent_end.close()
                status = self._become_worker(slot, child_end, parent)
            except BaseException:
                log.exception("worker %s failed", slot.tag)
            finally:
                logging.shutdown()
                os._exit(status)
        child_end.close()
        # libev reaps the child (its SIGCHLD handler) and calls us back from the hub.
        watcher = gevent.get_hub().loop.child(pid, False)
        worker = Worker(slot, pid, gsocket(parent_end.family, parent_end.type,
                                           fileno=parent_end.detach()), watcher)
        watcher.start(self._child_exited, worker)
        slot.worker = worker
        slot.restart = None
        self.workers.append(worker)

    def _become_worker(self, slot: Slot, control: socket.socket, parent: int) -> int:
        gevent.reinit()
        die_with_parent(parent)
        for worker in self.workers:  # the parent's: its watchers would restart from here
            worker.watcher.stop()
            worker.control.close()
        for cleanup in self.after_fork:
            cleanup()
        mine = {sock.fileno() for sock in self.sockets[slot.index]} if self.sockets else set()
        for group in self.sockets:
            for sock in group:
                if sock.fileno() not in mine and sock.fileno() != -1:
                    sock.close()
        return self.work(slot.index, WorkerLink(control, slot.index))

    def _child_exited(self, worker: Worker) -> None:
        """From the hub (must not block): ``worker`` has exited."""
        worker.watcher.stop()
        gevent.spawn(self._retire, worker, worker.watcher.rstatus)

    def _retire(self, worker: Worker, status: int) -> None:
        """Keep a dead worker's counters: its final snapshot (sent as it stopped) if it
        sent one, else the last it answered; then restart its slot if it was not told to go."""
        with self._asking:  # no request of ours is reading its socket now
            final = self._final(worker)
            if final is not None:
                worker.last = final
            self.workers.remove(worker)
            worker.control.close()
            self.retained = merge_rules(self.retained,
                                        [(k, r, ended(s)) for k, r, s in worker.last])
        self._exited_worker(worker, status)
        if self._stopping and not self.workers:
            self._exited.set()

    @staticmethod
    def _final(worker: Worker) -> Snapshots | None:
        """The last complete message left in a dead worker's control socket, if any."""
        final = None
        try:
            with gevent.Timeout(SNAPSHOT_TIMEOUT):
                while True:
                    final = _recv_message(worker.control)
        except (OSError, EOFError, gevent.Timeout, pickle.UnpicklingError):
            pass
        return final

    def _exited_worker(self, worker: Worker, status: int) -> None:
        slot = worker.slot
        how = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exited with status {os.waitstatus_to_exitcode(status)}")
        if self._stopping or slot.worker is not worker:  # stopped, or of an old generation
            log.info("worker %s (pid %d) %s", slot.tag, worker.pid, how)
            return
        slot.worker = None
        lived = time.monotonic() - worker.started
        if lived >= STABLE_AFTER:
            slot.delay = RESTART_FIRST
        self._faults.warning(f"died {slot.tag}", "worker %s (pid %d) %s after %.1f s; "
                             "restarting it in %.1f s", slot.tag, worker.pid, how, lived,
                             slot.delay)
        slot.restart = gevent.spawn_later(slot.delay, self._restart, slot)
        slot.delay = min(slot.delay * 2, RESTART_MAX)

    def _restart(self, slot: Slot) -> None:
        if self._stopping:
            return
        self.restarts += 1
        self._fork(slot)
        log.info("worker %s restarted: pid %d", slot.tag, slot.worker.pid)


def cpu_seconds(pid: int | str, children: bool = False) -> float:
    """User + system CPU of ``pid`` from /proc (``children``: of its reaped children)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    first = 13 if children else 11  # utime stime cutime cstime, after the state field
    return (int(fields[first]) + int(fields[first + 1])) / os.sysconf("SC_CLK_TCK")
