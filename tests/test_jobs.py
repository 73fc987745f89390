"""runtime/jobs.py: a conversation's greenlets on the shared worker pool."""

import gevent
import gevent.event
import gevent.socket

from portfwd.runtime.jobs import Jobs
from portfwd.runtime.workers import Workers


def test_jobs_run_and_done_is_set_when_one_ends():
    jobs = Jobs(Workers())
    out = []
    done = gevent.event.Event()
    jobs.spawn(out.append, 1, done=done)
    assert len(jobs) == 1 and out == []  # soon, not at once
    assert done.wait(1)
    assert out == [1] and len(jobs) == 0


def test_stop_ends_blocked_jobs_and_their_workers_are_reused():
    workers = Workers()
    jobs = Jobs(workers)
    ended = []

    def blocked(name):
        try:
            gevent.event.Event().wait()  # forever, as a receiver waits for datagrams
        finally:
            ended.append(name)

    def catches_everything():
        try:
            a, b = gevent.socket.socketpair()
            a.recv(1)  # blocked in a socket wait
        except Exception:  # a job's own fault handling must not swallow the stop
            ended.append("swallowed")
            raise

    jobs.spawn(blocked, "a")
    jobs.spawn(blocked, "b")
    jobs.spawn(catches_everything)
    gevent.sleep(0)
    assert len(workers) == 3
    assert jobs.stop(timeout=2)
    assert sorted(ended) == ["a", "b"] and len(jobs) == 0
    assert len(workers) == 0 and len(workers._idle) == 3  # parked for the next jobs
    done = gevent.event.Event()
    Jobs(workers).spawn(lambda: None, done=done)
    assert len(workers._idle) == 2  # one of the parked greenlets took it
    assert done.wait(1)
    gevent.sleep(0)
    assert len(workers._idle) == 3  # and is parked again: nothing new was made


def test_jobs_spawned_after_stop_never_run():
    jobs = Jobs(Workers())
    assert jobs.stop(timeout=1)  # nothing running: returns at once
    ran = []
    jobs.spawn(ran.append, 1)
    gevent.sleep(0.01)
    assert ran == [] and len(jobs) == 0
