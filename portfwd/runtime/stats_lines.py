"""The periodic stats line of tcpfwd and udpfwd (``--stats-interval``): the summary at INFO
while the per-connection and per-session lines are DEBUG.

A line is written only when the snapshot differs from the one the last line showed, so an idle
service stays quiet. A libev timer in the hub: a snapshot and one line, never a wait.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gevent import get_hub


class StatsLines:
    """``render(snapshot())`` at INFO every ``interval`` s while started, when it changed."""

    def __init__(self, logger: logging.Logger, snapshot: Callable[[], Any],
                 render: Callable[[Any], str]) -> None:
        self.logger = logger
        self.snapshot = snapshot
        self.render = render
        self._timer: Any = None
        self._last: Any = None  # the snapshot the last line showed

    @property
    def running(self) -> bool:
        return self._timer is not None

    def start(self, interval: float) -> None:
        """Every ``interval`` s from now on (0: none); replaces an earlier start (a reload)."""
        self.stop()
        if interval > 0:
            self._timer = get_hub().loop.timer(interval, interval)
            self._timer.start(self.write)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None

    def write(self, force: bool = False) -> None:
        """The line now, if the snapshot changed since the last one (or ``force``)."""
        snapshot = self.snapshot()
        if snapshot != self._last or force:
            self._last = snapshot
            self.logger.info("%s", self.render(snapshot))
