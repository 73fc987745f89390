"""The UDP session table on a virtual clock: expiry, touch, cap eviction, bounded sweeps."""

from __future__ import annotations

import pytest

from portfwd.runtime.session_table import SessionTable


def filled(n: int, timeout: float = 10.0, capacity: int = 100, step: float = 1.0):
    table: SessionTable[int, str] = SessionTable(capacity, timeout)
    for i in range(n):
        assert table.add(i, f"s{i}", now=i * step) == []
    return table


def test_expire_removes_only_idle_entries_oldest_first():
    table = filled(5)  # last_active 0, 1, 2, 3, 4; timeout 10
    assert table.expire(now=9.5) == []
    assert table.expire(now=11.0) == [(0, "s0"), (1, "s1")]  # idle >= 10 s at t=11
    assert list(table) == [2, 3, 4]
    assert table.expired == 2
    assert table.expire(now=11.9) == []  # entry 2 (last active at 2) times out at 12
    assert table.expire(now=12.0) == [(2, "s2")]


def test_touch_moves_to_end_and_postpones_expiry():
    table = filled(3)
    assert table.get(0, now=5.0) == "s0"
    assert list(table) == [1, 2, 0]
    assert table.expire(now=12.5) == [(1, "s1"), (2, "s2")]
    assert table.touch(0, now=14.0)
    assert table.expire(now=23.9) == []
    assert table.expire(now=24.0) == [(0, "s0")]
    assert not table.touch(0, now=25.0)  # gone


def test_membership_does_not_refresh():
    table = filled(2)
    assert 0 in table
    assert list(table) == [0, 1]
    assert table.expire(now=10.0) == [(0, "s0")]


def test_cap_evicts_least_recently_active_live_entry():
    table = filled(3, capacity=3)
    table.get(0, now=3.0)  # order now 1, 2, 0
    removed = table.add(99, "new", now=4.0)
    assert removed == [(1, "s1", True)]
    assert list(table) == [2, 0, 99]
    assert (table.evicted, table.expired) == (1, 0)


def test_cap_recycles_timed_out_entry_before_counting_eviction():
    table = filled(2, capacity=2, timeout=5.0)
    removed = table.add(99, "new", now=5.5)  # entry 0 idle 5.5 s >= 5: recycled, not evicted
    assert removed == [(0, "s0", False)]
    assert (table.evicted, table.expired) == (0, 1)


def test_sweep_cost_is_bounded_by_expired_entries_not_table_size():
    table = filled(10_000, timeout=100.0, capacity=20_000, step=0.01)  # t = 0 .. 99.99
    assert table.expire(now=100.05) == [(i, f"s{i}") for i in range(6)]
    assert table.last_sweep_visited == 7  # six removed + the first live one, of 10,000
    assert table.expire(now=100.055) == []
    assert table.last_sweep_visited == 1


def test_sweep_limit_spreads_a_mass_expiry_over_ticks():
    table = filled(1000, timeout=1.0, capacity=1000, step=0.0)
    assert len(table.expire(now=5.0, limit=300)) == 300
    assert table.last_sweep_visited == 300
    assert len(table) == 700
    assert len(table.expire(now=5.0)) == 700


def test_timeout_zero_never_expires():
    table = filled(3, timeout=0.0)
    assert table.expire(now=1e9) == []
    assert table.add(3, "s3", now=1e9) == []


def test_add_existing_key_is_a_caller_error():
    table = filled(1)
    with pytest.raises(KeyError):
        table.add(0, "again", now=1.0)


def test_bad_configuration_raises():
    with pytest.raises(ValueError):
        SessionTable(0, 1.0)
    with pytest.raises(ValueError):
        SessionTable(1, -1.0)


def test_clear():
    table = filled(3)
    assert table.clear() == [(0, "s0"), (1, "s1"), (2, "s2")]
    assert len(table) == 0 and table.expire(now=1e9) == []
