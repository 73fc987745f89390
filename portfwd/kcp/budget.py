"""A byte budget shared by many KCP engines: what they may hold received and not yet read.

Split from :mod:`portfwd.kcp.engine`, which takes one optionally (``Kcp(conv, config, budget)``).
"""

from __future__ import annotations


class ReassemblyBudget:
    """Bytes of received, not yet read data that many engines may hold together.

    One object is shared by every :class:`Kcp` given it; each engine reserves a segment's
    payload when it stores the segment and releases it when recv() hands it out (or at
    :meth:`Kcp.discard_received`).  ``held`` may pass ``limit`` by what :meth:`charge` forces
    (the next in-order segment of an engine that holds less than one message).
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0 bytes")
        self.limit: int = limit  # bytes
        self.held: int = 0  # bytes reserved now
        self.peak: int = 0  # bytes: highest held so far
        self.refused: int = 0  # reservations refused because held + size > limit

    def reserve(self, size: int) -> bool:
        """Take ``size`` bytes if they fit under the limit; False (and counted) if not."""
        held = self.held + size
        if held > self.limit:
            self.refused += 1
            return False
        self.held = held
        if held > self.peak:
            self.peak = held
        return True

    def charge(self, size: int) -> None:
        """Take ``size`` bytes even past the limit (progress must not wait for others)."""
        self.held += size
        if self.held > self.peak:
            self.peak = self.held

    def release(self, size: int) -> None:
        """Give back ``size`` bytes taken by reserve() or charge()."""
        self.held -= size
