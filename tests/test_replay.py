"""Anti-replay window: the seed's cases (accept, replay, too old, window advance, near-wrap) at our
width, plus a hypothesis property test against a set-based model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portfwd.tunnel.replay import DEFAULT_WINDOW, ReplayWindow
from portfwd.tunnel.wire import UINT32_MAX as MAX_SEQ


def accept(window: ReplayWindow, seq: int) -> bool:
    """What the session does with an authenticated packet: record it if it is new."""
    if not window.is_new(seq):
        return False
    window.record(seq)
    return True


def too_old(window: ReplayWindow, seq: int) -> bool:
    """At or below ``top - width``: outside what the window remembers."""
    return seq <= window.top - window.width


def test_default_width_is_at_least_2048() -> None:
    assert DEFAULT_WINDOW >= 2048
    assert ReplayWindow().width == DEFAULT_WINDOW


def test_accept_first_and_increasing() -> None:
    w = ReplayWindow(64)
    for seq in (0, 1, 2, 10, 11):
        assert accept(w, seq)
    assert w.top == 11


def test_replay_is_duplicate() -> None:
    w = ReplayWindow(64)
    assert accept(w, 5)
    assert not accept(w, 5)
    assert not w.is_new(5) and not too_old(w, 5)


def test_out_of_order_inside_window_accepted_once() -> None:
    w = ReplayWindow(64)
    assert accept(w, 40)
    assert accept(w, 3)
    assert not accept(w, 3)
    assert accept(w, 39)


def test_too_old() -> None:
    w = ReplayWindow(64)
    accept(w, 100)
    assert too_old(w, 100 - 64) and not w.is_new(100 - 64)  # exactly width below top: forgotten
    assert w.is_new(100 - 63)  # the oldest remembered slot
    assert too_old(w, 0) and not w.is_new(0)


def test_window_advance_forgets_and_does_not_confuse_residues() -> None:
    w = ReplayWindow(8)
    for seq in range(8):
        accept(w, seq)
    # Jump far ahead: the slots still hold 0..7, none of which equals 20..27.
    assert accept(w, 27)
    for seq in range(20, 27):
        assert w.is_new(seq)
    assert too_old(w, 19) and not w.is_new(19)
    assert not accept(w, 27)


def test_is_new_does_not_record() -> None:
    w = ReplayWindow(16)
    assert w.is_new(3)
    assert w.is_new(3)
    assert w.top == -1
    w.record(3)
    assert not w.is_new(3) and not too_old(w, 3)


def test_near_wrap_of_32_bit_seq() -> None:
    # send_seq never wraps within an epoch (guard at UINT32_MAX); the window must be exact up
    # to the very last usable numbers, and a fresh window (new epoch) starts again at 0.
    w = ReplayWindow(2048)
    top = MAX_SEQ - 1
    assert accept(w, top)
    assert accept(w, top - 2047)
    assert too_old(w, top - 2048) and not w.is_new(top - 2048)
    assert not accept(w, top)
    assert accept(w, MAX_SEQ)
    assert too_old(w, 0) and not w.is_new(0)
    fresh = ReplayWindow(2048)
    assert accept(fresh, 0)


def test_width_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(0)


class _Model:
    """The obvious specification: a set of everything accepted and the highest value."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.seen: set[int] = set()
        self.top = -1

    def accept(self, seq: int) -> bool:
        if seq <= self.top - self.width:
            return False  # too old: outside the window nothing is remembered, seen or not
        if seq in self.seen:
            return False  # duplicate
        self.seen.add(seq)
        self.top = max(self.top, seq)
        return True


@settings(max_examples=300, deadline=None)
@given(
    width=st.integers(min_value=1, max_value=64),
    base=st.sampled_from([0, 1000, MAX_SEQ - 300]),
    steps=st.lists(st.integers(min_value=0, max_value=300), max_size=200),
)
def test_matches_set_model(width: int, base: int, steps: list[int]) -> None:
    window = ReplayWindow(width)
    model = _Model(width)
    for step in steps:
        seq = base + step
        assert accept(window, seq) is model.accept(seq), (seq, window.top)
