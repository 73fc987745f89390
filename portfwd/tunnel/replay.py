"""Anti-replay sliding window over 32-bit per-epoch sequence numbers.

The seed ("AEAD Rekeying", Anti-replay) keeps a 64-bit window; with KCP send windows of 1024
segments and reordering that is far too narrow, so the width here is configurable and defaults to
2048 (docs/PROTOCOL.md, "Anti-replay").

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
``UINT32_MAX`` (seed "AEAD Rekeying", wraparound guard), and the window is replaced at each epoch
switch.
"""

from __future__ import annotations

from array import array

DEFAULT_WINDOW = 2048  # packets; at least a KCP send window (1024) with room for reordering


class ReplayWindow:
    """Remembers which of the last ``width`` sequence numbers were accepted.

    Call :meth:`is_new` before authenticating a packet (cheap early drop of replays) and
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

    def is_new(self, seq: int) -> bool:
        """Whether ``seq`` may be accepted: above ``top``, or inside the window and unseen.

        False for a duplicate and for anything at or below ``top - width`` (too old to tell).
        """
        top = self.top
        if seq > top:
            return True
        width = self.width
        return seq > top - width and self._slots[seq % width] != seq

    def record(self, seq: int) -> None:
        """Mark ``seq`` as accepted (call only after :meth:`is_new` returned True)."""
        self._slots[seq % self.width] = seq
        if seq > self.top:
            self.top = seq
