"""systemd's service notification protocol (sd_notify(3)): a few datagrams, no dependency.

When systemd starts a ``Type=notify`` unit it sets ``NOTIFY_SOCKET`` to a unix datagram socket
(a path, or ``@name`` in the abstract namespace); the service sends newline-separated
``KEY=value`` assignments to it: ``READY=1`` once it serves, ``RELOADING=1`` (with
``MONOTONIC_USEC``, as systemd 253's ``Type=notify-reload`` requires) and ``READY=1`` again
around a reload, ``STOPPING=1`` when it starts to shut down, ``STATUS=`` with a line that
``systemctl status`` shows, and ``WATCHDOG=1`` at least every ``WATCHDOG_USEC`` microseconds
when the unit has ``WatchdogSec=`` (we ping at half of it, as sd_watchdog_enabled(3) advises).
Without ``NOTIFY_SOCKET`` every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


class Notifier:
    """Sends sd_notify messages to ``path``; ``path`` None makes every call a no-op."""

    def __init__(self, path: str | None, watchdog_usec: int | None = None) -> None:
        self.path = path
        self.watchdog_usec = watchdog_usec  # µs; None: no watchdog asked for
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier systemd asked for. ``WATCHDOG_PID``, when set, must name this process
        (a child that inherited the environment must not ping for its parent)."""
        env = os.environ if environ is None else environ
        path = env.get(NOTIFY_SOCKET) or None
        usec: int | None = None
        raw = env.get(WATCHDOG_USEC, "")
        pid = env.get(WATCHDOG_PID, "")
        if raw.isdigit() and int(raw) > 0 and (not pid or pid == str(os.getpid())):
            usec = int(raw)
        return cls(path, usec)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two WATCHDOG=1 pings (half the deadline), None when not asked."""
        if self.path is None or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2e6

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=value`` lines (``notify(READY=1, STATUS="...")``); True if it was sent.

        Failures are logged once and never raise: systemd going away must not stop the service.
        """
        if self.path is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        address = "\0" + self.path[1:] if self.path.startswith("@") else self.path
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, address)
            return True
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("sd_notify to %s failed: %s", self.path, exc.strerror or exc)
            return False

    def ready(self, status: str | None = None) -> None:
        self.notify(READY=1, **({"STATUS": status} if status else {}))

    def reloading(self) -> None:
        self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> None:
        self.notify(STOPPING=1)

    def status(self, line: str) -> None:
        self.notify(STATUS=line)

    def watchdog(self) -> None:
        self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
