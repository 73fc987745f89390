"""Reusable greenlets for per-connection jobs (accepted connections, relay directions).

Spawning a gevent Greenlet costs about 15 us: the object, its link machinery and, on CPython 3.11+,
a fresh 16 KiB frame stack that is mmap'd when it first runs and unmapped when it dies. A short TCP
connection needs two, and at thousands of connections per second spawning them costs a tenth of
tcpfwd's CPU. Here a worker whose job is done parks itself on a free list and takes the next job:
about 1 us per job. It is :func:`gevent.spawn_raw` plus that free list, so a job is plain
blocking-style code in a greenlet like any other.

A job may also run without a greenlet, on callbacks in the hub (tcpfwd's relays of short
connections): :meth:`Workers.adopt` counts it as running until :meth:`Workers.release`, so
``join`` waits for it and ``kill`` cuts it (its ``cut()``, called in the hub) like the others.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol

from gevent import GreenletExit, get_hub
from gevent.event import Event
from greenlet import getcurrent
from greenlet import greenlet as RawGreenlet

MAX_IDLE = 256  # parked workers kept; more than this retire when their job ends


class Cuttable(Protocol):
    def cut(self) -> None:
        """End now (the service is stopping); must release itself from its Workers."""


class Workers:
    """Runs jobs in pooled greenlets; ``join`` and ``kill`` act on the jobs still running."""

    def __init__(self, max_idle: int = MAX_IDLE) -> None:
        self._hub = get_hub()
        self._max_idle = max_idle
        self._idle: list[RawGreenlet] = []
        self._busy: set[RawGreenlet] = set()
        self._adopted: set[Cuttable] = set()  # jobs that run on callbacks, not in a worker
        self._quiet = Event()  # set whenever no job is running
        self._quiet.set()

    def __len__(self) -> int:
        """Jobs running now."""
        return len(self._busy) + len(self._adopted)

    def spawn(self, job: Callable[..., object], *args: object) -> None:
        """Run ``job(*args)`` in a worker greenlet, soon (the caller is not unscheduled)."""
        worker = self._idle.pop() if self._idle else RawGreenlet(self._work, self._hub)
        self._busy.add(worker)
        self._quiet.clear()
        self._hub.loop.run_callback(worker.switch, job, args)

    def adopt(self, job: Cuttable) -> None:
        """Count ``job``, which runs on callbacks, as running until :meth:`release`."""
        self._adopted.add(job)
        self._quiet.clear()

    def release(self, job: Cuttable) -> None:
        self._adopted.discard(job)
        if not self._busy and not self._adopted:
            self._quiet.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job is running; False if ``timeout`` seconds passed first."""
        return self._quiet.wait(timeout)

    def kill(self, timeout: float | None = None) -> bool:
        """Raise GreenletExit in every running job, then wait for them as :meth:`join` does."""
        for worker in list(self._busy):
            self._hub.loop.run_callback(self._throw, worker)
        for job in list(self._adopted):
            self._hub.loop.run_callback(self._cut, job)
        return self.join(timeout)

    def _cut(self, job: Cuttable) -> None:
        if job in self._adopted:  # it may have ended, or moved into workers, since kill()
            job.cut()

    def _throw(self, worker: RawGreenlet) -> None:
        if worker in self._busy:  # its job may have ended since kill() was called
            worker.throw(GreenletExit)

    def _work(self, job: Callable[..., object], args: tuple) -> None:
        me = getcurrent()
        while True:
            try:
                job(*args)
            except GreenletExit:
                self._done(me)
                return  # killed: this worker retires with its job
            except BaseException:
                self._done(me)
                self._hub.handle_error(me, *sys.exc_info())  # a bug: report it like gevent does
                return
            self._done(me)
            if len(self._idle) >= self._max_idle:
                return
            self._idle.append(me)
            job, args = self._hub.switch()  # parked until spawn() hands over the next job

    def _done(self, worker: RawGreenlet) -> None:
        self._busy.discard(worker)
        if not self._busy and not self._adopted:
            self._quiet.set()
