"""Anti-replay window: the seed's cases (accept, replay, too old, window advance, near-wrap) at our
width, plus a hypothesis property test against a set-based model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portfwd.tunnel.replay import DEFAULT_WINDOW, MAX_SEQ, ReplayWindow, Verdict


def test_default_width_is_at_least_2048() -> None:
    assert DEFAULT_WINDOW >= 2048
    assert ReplayWindow().width == DEFAULT_WINDOW


def test_accept_first_and_increasing() -> None:
    w = ReplayWindow(64)
    for seq in (0, 1, 2, 10, 11):
        assert w.accept(seq) is Verdict.NEW
    assert w.top == 11


def test_replay_is_duplicate() -> None:
    w = ReplayWindow(64)
    assert w.accept(5) is Verdict.NEW
    assert w.accept(5) is Verdict.DUPLICATE
    assert w.check(5) is Verdict.DUPLICATE


def test_out_of_order_inside_window_accepted_once() -> None:
    w = ReplayWindow(64)
    assert w.accept(40) is Verdict.NEW
    assert w.accept(3) is Verdict.NEW
    assert w.accept(3) is Verdict.DUPLICATE
    assert w.accept(39) is Verdict.NEW


def test_too_old() -> None:
    w = ReplayWindow(64)
    w.accept(100)
    assert w.check(100 - 64) is Verdict.TOO_OLD  # exactly width below top: forgotten
    assert w.check(100 - 63) is Verdict.NEW  # the oldest remembered slot
    assert w.check(0) is Verdict.TOO_OLD


def test_window_advance_forgets_and_does_not_confuse_residues() -> None:
    w = ReplayWindow(8)
    for seq in range(8):
        w.accept(seq)
    # Jump far ahead: the slots still hold 0..7, none of which equals 20..27.
    assert w.accept(27) is Verdict.NEW
    for seq in range(20, 27):
        assert w.check(seq) is Verdict.NEW
    assert w.check(19) is Verdict.TOO_OLD
    assert w.accept(27) is Verdict.DUPLICATE


def test_check_does_not_record() -> None:
    w = ReplayWindow(16)
    assert w.check(3) is Verdict.NEW
    assert w.check(3) is Verdict.NEW
    assert w.top == -1
    w.record(3)
    assert w.check(3) is Verdict.DUPLICATE


def test_near_wrap_of_32_bit_seq() -> None:
    # send_seq never wraps within an epoch (guard at UINT32_MAX); the window must be exact up
    # to the very last usable numbers, and a fresh window (new epoch) starts again at 0.
    w = ReplayWindow(2048)
    top = MAX_SEQ - 1
    assert w.accept(top) is Verdict.NEW
    assert w.accept(top - 2047) is Verdict.NEW
    assert w.check(top - 2048) is Verdict.TOO_OLD
    assert w.accept(top) is Verdict.DUPLICATE
    assert w.accept(MAX_SEQ) is Verdict.NEW
    assert w.check(0) is Verdict.TOO_OLD
    fresh = ReplayWindow(2048)
    assert fresh.accept(0) is Verdict.NEW


def test_width_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReplayWindow(0)


class _Model:
    """The obvious specification: a set of everything accepted and the highest value."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.seen: set[int] = set()
        self.top = -1

    def accept(self, seq: int) -> Verdict:
        if seq <= self.top - self.width:
            return Verdict.TOO_OLD  # outside the window nothing is remembered, seen or not
        if seq in self.seen:
            return Verdict.DUPLICATE
        self.seen.add(seq)
        self.top = max(self.top, seq)
        return Verdict.NEW


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
        assert window.accept(seq) is model.accept(seq), (seq, window.top)
