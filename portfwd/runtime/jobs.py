"""The greenlets of one owner (a tunnel conversation) on a shared pool of reusable workers.

A tunnelled connection runs three to five greenlets (ticker, UDP receiver, TCP reader and
writer, the conversation's own); spawning each costs about 13 us (runtime/workers.py says why),
a pooled worker about 4. What a conversation needs beyond the pool is to wait for one of its
jobs and to end the others when it is over: :meth:`Jobs.stop` raises :class:`JobStop` where each
one waits, and the job's worker goes back to the pool (a killed gevent greenlet would be gone).
"""

from __future__ import annotations

from collections.abc import Callable

from gevent import get_hub
from gevent.event import Event
from greenlet import getcurrent
from greenlet import greenlet as RawGreenlet

from portfwd.runtime.workers import Workers

_shared: Workers | None = None


def shared_workers() -> Workers:
    """The process's pool for conversation jobs (made on first use, in the hub's thread)."""
    global _shared
    if _shared is None:
        _shared = Workers()
    return _shared


class JobStop(BaseException):
    """Raised in a job by :meth:`Jobs.stop`. A BaseException, as GreenletExit is, so that no
    ``except OSError`` / ``except Exception`` of the job takes it for a fault."""


class Jobs:
    """Jobs run on a shared :class:`Workers` pool, ended together by :meth:`stop`."""

    def __init__(self, workers: Workers | None = None) -> None:
        self._workers = workers if workers is not None else shared_workers()
        self._running: set[RawGreenlet] = set()
        self._count = 0  # spawned and not yet ended (started or not)
        self._none = Event()  # set while no job is left
        self._none.set()
        self._stopping = False

    def __len__(self) -> int:
        return self._count

    def spawn(self, job: Callable[..., object], *args: object, done: Event | None = None) -> None:
        """Run ``job(*args)`` soon; ``done`` (if given) is set when it has ended, however."""
        self._count += 1
        self._none.clear()
        self._workers.spawn(self._run, job, args, done)

    def _run(self, job: Callable[..., object], args: tuple, done: Event | None) -> None:
        me = getcurrent()
        try:
            if not self._stopping:  # stopped before it started: it never runs
                self._running.add(me)
                job(*args)
        except JobStop:
            pass  # ended by stop(): the worker is reused
        finally:
            self._running.discard(me)
            self._count -= 1
            if not self._count:
                self._none.set()
            if done is not None:
                done.set()

    def stop(self, timeout: float | None = None) -> bool:
        """End every job (but the caller's own), then wait up to ``timeout`` s for them to be
        over; True if they are. Jobs spawned later do not run."""
        self._stopping = True
        current = getcurrent()
        loop = get_hub().loop
        for worker in self._running:
            if worker is not current:
                loop.run_callback(self._throw, worker)
        if current in self._running:
            return self._count <= 1
        return self._none.wait(timeout)

    def _throw(self, worker: RawGreenlet) -> None:
        if worker in self._running:  # it may have ended since stop() was called
            worker.throw(JobStop)
