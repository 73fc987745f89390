"""Anti-replay sliding window over 32-bit per-epoch sequence numbers.

The seed ("AEAD Rekeying", Anti-replay) keeps a 64-bit window; with KCP send windows of 1024
segments and reordering that is far too narrow, so the width here is configurable and defaults to
2048 (issue 5).

Glossary:
  top     -- the highest sequence number accepted so far in this epoch (-1 before the first one).
  width   -- how many sequence numbers at and below ``top`` are remembered; anything at or below
             ``top - width`` is *too old* and rejected without further thought.

Implementation: instead of a shifting bitmap (RFC 6479 style) the window is a ring of ``width``
slots, slot ``seq % width`` holding the last sequence number recorded in it.  A sequence ``s``
inside the window was seen iff ``slot[s % width] == s``: any other number with the same residue
that could have overwritten it is at least ``width`` away, i.e. either too old to matter or above
``top``.  Both the check and the record are O(1) with no big-int shifts, which keeps the
per-packet path lean.

Sequence numbers never wrap inside one epoch: the sender rekeys at a threshold and closes at
``UINT32_MAX`` (seed, wraparound guard), and the window is replaced at each epoch switch.
"""

from __future__ import annotations

import enum
import logging
from array import array

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 2048  # packets; issue 5 requires >= 2048
MAX_SEQ = 0xFFFFFFFF  # largest 32-bit sequence number


class Verdict(enum.IntEnum):
    """Outcome of :meth:`ReplayWindow.check`."""

    NEW = 0  #: never seen and inside (or above) the window: may be accepted
    DUPLICATE = 1  #: already recorded
    TOO_OLD = 2  #: at or below ``top - width``: cannot tell, so reject


class ReplayWindow:
    """Remembers which of the last ``width`` sequence numbers were accepted.

    Use :meth:`check` before authenticating a packet (cheap early drop of replays) and
    :meth:`record` only *after* the packet authenticated, so forged packets never move the window.
    """

    __slots__ = ("width", "top", "_slots")

    def __init__(self, width: int = DEFAULT_WINDOW) -> None:
        if width < 1:
            raise ValueError(f"replay window width must be >= 1, got {width}")
        self.width: int = width
        self.top: int = -1
        # -1 never equals a real sequence number, so every slot starts "unseen".  A typed array
        # costs 8 bytes a slot (16 KiB at 2048); a list of ints would cost up to 36 bytes a slot.
        self._slots: array[int] = array("q", [-1]) * width

    def check(self, seq: int) -> Verdict:
        """Classify ``seq`` without recording it."""
        if seq > self.top:
            return Verdict.NEW
        if seq <= self.top - self.width:
            return Verdict.TOO_OLD
        if self._slots[seq % self.width] == seq:
            return Verdict.DUPLICATE
        return Verdict.NEW

    def is_new(self, seq: int) -> bool:
        """``check(seq) is Verdict.NEW`` without the enum, for the per-packet path."""
        top = self.top
        if seq > top:
            return True
        width = self.width
        return seq > top - width and self._slots[seq % width] != seq

    def record(self, seq: int) -> None:
        """Mark ``seq`` as accepted (call only after :meth:`check` returned NEW)."""
        self._slots[seq % self.width] = seq
        if seq > self.top:
            self.top = seq

    def accept(self, seq: int) -> Verdict:
        """``check`` and, when NEW, ``record`` in one call (for already-authenticated input)."""
        verdict = self.check(seq)
        if verdict is Verdict.NEW:
            self.record(seq)
        return verdict
