"""Pooled greenlets: jobs reuse parked workers, and join/kill/cancel act on running jobs only."""

import gevent
import pytest
from gevent.event import Event
from greenlet import getcurrent

from portfwd.runtime.workers import Workers


def test_finished_workers_are_reused():
    workers, seen = Workers(), []
    for _ in range(3):
        workers.spawn(lambda: seen.append(getcurrent()))
        assert workers.join(1)
    assert len(seen) == 3 and seen[0] is seen[1] is seen[2]


def test_concurrent_jobs_get_their_own_workers_and_idle_ones_are_bounded():
    workers, gate, seen = Workers(max_idle=2), Event(), set()

    def job():
        seen.add(getcurrent())
        gate.wait()

    for _ in range(5):
        workers.spawn(job)
    gevent.sleep(0)
    assert len(workers) == 5 and len(seen) == 5
    gate.set()
    assert workers.join(1) and len(workers) == 0
    again = set()
    for _ in range(5):
        workers.spawn(lambda: (again.add(getcurrent()), gevent.sleep(0.01)))
    assert workers.join(1)
    assert len(again & seen) == 2  # only max_idle workers were parked for reuse


def test_join_times_out_while_a_job_runs():
    workers, gate = Workers(), Event()
    workers.spawn(gate.wait)
    assert workers.join(0.05) is False
    gate.set()
    assert workers.join(1) is True


def test_kill_raises_greenlet_exit_in_running_jobs_and_their_cleanup_runs():
    workers, cleaned = Workers(), []

    def job(name):
        try:
            gevent.sleep(30)
        finally:
            cleaned.append(name)

    workers.spawn(job, "a")
    workers.spawn(job, "b")
    gevent.sleep(0)
    assert workers.kill(1) is True
    assert sorted(cleaned) == ["a", "b"] and len(workers) == 0
    done = []
    workers.spawn(done.append, 1)  # the pool still works after a kill
    assert workers.join(1) and done == [1]


def test_a_crashing_job_is_reported_and_the_pool_keeps_working(capsys):
    workers = Workers()

    def crash():
        raise RuntimeError("bug in a handler")

    workers.spawn(crash)
    assert workers.join(1)
    assert "RuntimeError: bug in a handler" in capsys.readouterr().err
    out = []
    workers.spawn(out.append, "after")
    assert workers.join(1) and out == ["after"]


@pytest.mark.parametrize("count", [1, 50])
def test_join_with_nothing_running_returns_at_once(count):
    workers = Workers()
    for _ in range(count):
        workers.spawn(lambda: None)
    assert workers.join(0.5)
    assert workers.join(0)
