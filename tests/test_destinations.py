"""The destination selector, the re-resolution cache and Happy Eyeballs timing
(portfwd.policy.destinations), on a virtual clock."""

from __future__ import annotations

import pytest

from portfwd.policy.destinations import (
    ATTEMPT_DELAY,
    TTL_FLOOR,
    Attempts,
    Balance,
    DestinationSelector,
    NameCache,
    happy_eyeballs_order,
)


def test_first_tries_in_order():
    sel = DestinationSelector(3)
    assert sel.order(0.0) == [0, 1, 2]
    assert sel.order(1.0) == [0, 1, 2]


def test_failed_destination_is_skipped_for_fail_timeout():
    sel = DestinationSelector(2, fail_timeout=10.0)
    assert sel.failed(0, now=5.0)
    assert sel.order(5.0) == [1] and sel.order(14.9) == [1]
    assert sel.order(15.0) == [0, 1]  # back after the timeout, first again


def test_max_fails_counts_consecutive_failures():
    sel = DestinationSelector(2, max_fails=3, fail_timeout=10.0)
    assert not sel.failed(0, 0.0) and not sel.failed(0, 1.0)
    sel.succeeded(0)  # a success starts the count over
    assert not sel.failed(0, 2.0) and not sel.failed(0, 3.0)
    assert sel.failed(0, 4.0)
    assert sel.order(4.0) == [1]


def test_all_down_tries_everyone():
    sel = DestinationSelector(2)
    sel.failed(0, 0.0)
    sel.failed(1, 0.0)
    assert sel.order(1.0) == [0, 1]


def test_roundrobin_rotates_and_skips_the_dead():
    sel = DestinationSelector(3, Balance.ROUNDROBIN, fail_timeout=10.0)
    assert [sel.order(0.0)[0] for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    sel.failed(1, 0.0)
    firsts = [sel.order(1.0)[0] for _ in range(6)]
    assert 1 not in firsts and set(firsts) == {0, 2}
    # back after fail_timeout: round robin uses it again
    assert 1 in [sel.order(10.0)[0] for _ in range(3)]


def test_success_clears_the_down_state():
    sel = DestinationSelector(2)
    sel.failed(0, 0.0)
    sel.succeeded(0)
    assert sel.order(0.1) == [0, 1]


@pytest.mark.parametrize("args", [(0,), (1, Balance.FIRST, 0), (1, Balance.FIRST, 1, -1)])
def test_bad_selector_settings(args):
    with pytest.raises(ValueError):
        DestinationSelector(*args)


def test_cache_floor_and_ttl():
    cache = NameCache(["a"], now=0.0, ttl=5)
    assert not cache.due(TTL_FLOOR - 0.1) and cache.due(TTL_FLOOR)
    cache = NameCache(["a"], now=0.0, ttl=300)
    assert not cache.due(299) and cache.due(300)


def test_cache_one_lookup_at_a_time_and_update():
    cache = NameCache(["a"], now=0.0)
    assert cache.due(30.0)
    cache.begin()
    assert not cache.due(31.0)  # a lookup is running: never a second one
    assert cache.update(["b", "c"], now=32.0)
    assert cache.addresses == ("b", "c") and not cache.due(61.9) and cache.due(62.0)
    assert not cache.update(["b", "c"], now=62.0)


def test_failed_lookup_keeps_the_last_answer():
    cache = NameCache(["a"], now=0.0)
    cache.begin()
    cache.fail(30.0)
    assert cache.addresses == ("a",) and cache.failures == 1
    assert not cache.due(34.9) and cache.due(35.0)  # retried sooner than the floor
    cache.begin()
    assert not cache.update([], now=35.0)  # an empty answer is a failure too
    assert cache.addresses == ("a",) and cache.failures == 2


def test_happy_eyeballs_interleaves_ipv6_first():
    addrs = ["1.1.1.1", "2.2.2.2", "3.3.3.3", "::1", "::2"]
    assert happy_eyeballs_order(addrs, lambda a: ":" in a) == [
        "::1", "1.1.1.1", "::2", "2.2.2.2", "3.3.3.3"]
    assert happy_eyeballs_order(["1.1.1.1"], lambda a: ":" in a) == ["1.1.1.1"]


def test_attempts_are_staggered_by_250_ms():
    attempts = Attempts(3, now=0.0)
    assert attempts.due(0.0) == [0]
    assert attempts.timer() == ATTEMPT_DELAY
    assert attempts.due(0.1) == []
    assert attempts.due(0.25) == [1]
    assert attempts.due(0.5) == [2]
    assert attempts.timer() is None and not attempts.exhausted


def test_a_failure_starts_the_next_attempt_at_once():
    attempts = Attempts(3, now=0.0)
    attempts.due(0.0)
    attempts.failed(0, 0.01)
    assert attempts.due(0.01) == [1]
    attempts.due(0.26)
    attempts.failed(1, 0.3)  # attempt 2 still running: no hurry
    attempts.failed(2, 0.4)
    assert attempts.exhausted
