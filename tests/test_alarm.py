"""kcptcp/alarm.py: the ticker's Alarm wakes as gevent's Event does, without a Timeout per wait
(#19: the cost per connection)."""

from __future__ import annotations

import socket

import gevent
import gevent.event
import gevent.socket
import pytest
from gevent.timeout import Timeout

from portfwd.kcptcp.alarm import Alarm
from portfwd.kcptcp.driver import ConversationDriver, UdpEndpoint, now_ms, wall_ms
from portfwd.tunnel.stream import Conversation
from portfwd.tunnel.wire import PacketType

try:  # tests/ is not a package: pytest puts it on sys.path
    from test_conversation_cost import CONFIG
except ImportError:  # pragma: no cover
    from .test_conversation_cost import CONFIG

KINDS = [gevent.event.Event, Alarm]


@pytest.mark.parametrize("kind", KINDS)
def test_a_raised_flag_returns_at_once_and_a_timeout_returns_false(kind):
    flag = kind()
    assert flag.wait(0.001) is False and not flag.is_set()
    flag.set()
    assert flag.wait(5) is True and flag.wait() is True
    flag.clear()
    assert flag.wait(0) is False


@pytest.mark.parametrize("kind", KINDS)
def test_set_wakes_the_sleeper_at_the_hubs_next_turn_not_inside_set(kind):
    flag, woke = kind(), []
    sleeper = gevent.spawn(lambda: woke.append(flag.wait(30)))
    gevent.sleep(0)  # it sleeps now
    flag.set()
    assert woke == []  # set() only schedules the wake-up
    sleeper.join(timeout=5)
    assert woke == [True]


@pytest.mark.parametrize("kind", KINDS)
def test_a_sleep_woken_early_leaves_nothing_to_fire_later(kind):
    """The timer of a wait that set() ended must not wake the next wait, nor a set() that
    came while the sleeper was busy elsewhere."""
    flag, turns = kind(), []

    def sleeper() -> None:
        turns.append(flag.wait(0.02))  # woken early by set()
        flag.clear()
        turns.append(flag.wait())  # no limit: only a set() may end it

    job = gevent.spawn(sleeper)
    gevent.sleep(0)
    flag.set()
    gevent.sleep(0.1)  # well past the first wait's 0.02 s
    assert turns == [True] and not job.dead
    flag.set()
    job.join(timeout=5)
    assert turns == [True, True]


@pytest.mark.parametrize("kind", KINDS)
def test_a_killed_sleeper_leaves_nothing_scheduled(kind):
    flag = kind()
    job = gevent.spawn(flag.wait, 0.02)
    gevent.sleep(0)
    job.kill(block=True, timeout=5)
    assert job.dead
    flag.set()  # nobody waits: nothing to switch into
    gevent.sleep(0.05)  # the dead wait's timer would have fired meanwhile
    assert flag.wait(0) is True
    if kind is Alarm:  # and the wait left nothing behind: no sleeper, no pending wake-up
        assert flag._sleeper is None and flag._notice is None


def test_a_tickers_timed_sleeps_make_no_gevent_timeout(monkeypatch):
    """A conversation waiting for its WELCOME retransmits its HELLO on its ticker's timer:
    each of those sleeps made a gevent Timeout (an exception object thrown in on expiry)."""
    made, ticker = [], []  # Timeouts the ticker's greenlet made (only its own: others run too)
    real = Timeout._start_new_or_dummy

    def counting(timeout, *args, **kwargs):
        if timeout is not None and gevent.getcurrent() is ticker[0]:
            made.append(timeout)
        return real(timeout, *args, **kwargs)

    monkeypatch.setattr(Timeout, "_start_new_or_dummy", staticmethod(counting))
    server = gevent.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    conv = Conversation.client(CONFIG, 7, server.getsockname(), now_ms(), wall_ms())
    driver = ConversationDriver(conv, UdpEndpoint(client), "conv=7")
    try:
        ticker.append(gevent.spawn(driver._tick))  # start_ticker's job, in a greenlet we know
        with Timeout(10):  # made here, not where the count looks (a socket's timeout would be)
            hellos = [server.recv(2048) for _ in range(3)]  # the first, then two retries
        assert all(hello[0] & 0x7F == PacketType.HELLO for hello in hellos)
        assert made == []
    finally:
        driver.abort("test over")
        gevent.killall(ticker, timeout=5)
        driver.stop_jobs()
        driver.udp.close()
        server.close()
