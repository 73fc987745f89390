"""What a conversation's ticker sleeps on: a flag that says its deadline may have moved
earlier, and the deadline itself.

gevent's ``Event.wait(timeout)`` makes a ``Timeout`` (an exception object with a timer) for
every call and throws it into the greenlet when the time is up; a ticker waits about four times
per short connection, and that machinery was ~3 us a wait. An :class:`Alarm` sleeps with one
libev timer and a plain switch back: the same wake-ups at the same moments (the timer after
``timeout`` s, a :meth:`Alarm.set` at the hub's next turn, as an Event's), without the
exception.
"""

from __future__ import annotations

from gevent import get_hub, getcurrent


class Alarm:
    """An Event with only what the ticker needs: set, clear, wait with a timeout; one waiter."""

    __slots__ = ("_flag", "_sleeper", "_loop", "_hub", "_notice")

    def __init__(self) -> None:
        self._flag = False
        self._sleeper = None  # the greenlet in wait(), if any
        self._hub = get_hub()
        self._loop = self._hub.loop
        self._notice = None  # the hub callback a set() scheduled to wake the sleeper

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        """Raise the flag; a waiting greenlet wakes at the hub's next turn."""
        self._flag = True
        if self._sleeper is not None and self._notice is None:
            self._notice = self._loop.run_callback(self._wake)

    def clear(self) -> None:
        self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until the flag is raised or ``timeout`` s have passed (None: no limit); the
        flag's state, as ``Event.wait`` returns it."""
        if self._flag:
            return True
        self._sleeper = getcurrent()
        timer = None
        if timeout is not None:
            timer = self._loop.timer(timeout)
            timer.start(self._wake, update=True)  # from now, not the loop's cached now: as Timeout
        try:
            self._hub.switch()
        finally:  # woken, or killed (GreenletExit): nothing of this wait may fire later
            self._sleeper = None
            if timer is not None:
                timer.close()
            if self._notice is not None:
                self._notice.stop()
                self._notice = None
        return self._flag

    def _wake(self) -> None:
        """In the hub: the timer fired or a set() came. One switch per wait."""
        sleeper, self._sleeper = self._sleeper, None
        if sleeper is not None:
            sleeper.switch()
