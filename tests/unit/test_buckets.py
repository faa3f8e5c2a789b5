"""Token buckets with an injected clock: exact admitted counts for known rates and bursts."""

from __future__ import annotations

import math

import pytest

from gateway.limits.buckets import BucketTable, TokenBucket


def admitted(bucket: TokenBucket, times: list[float]) -> int:
    return sum(bucket.take(t)[0] for t in times)


def every(step: float, duration: float, start: float = 0.0) -> list[float]:
    count = round(duration / step)
    return [start + i * step for i in range(count)]


# (rate per second, burst, request times, admitted)
CASES = [
    # A burst at one instant: exactly the burst.
    (10, 20, [0.0] * 100, 20),
    (1, 1, [0.0] * 5, 1),
    (0.5, 3, [5.0] * 10, 3),
    # Every millisecond for one second: the burst plus what a second refills,
    # the refill due at exactly t=1.0 not included.
    (10, 20, every(0.001, 1.0), 29),
    (100, 5, every(0.001, 1.0), 104),
    (3, 2, every(0.001, 2.0), 7),
    # Slower than the rate: all admitted.
    (10, 1, every(0.1, 10.0), 100),
    (10, 1, every(0.2, 10.0), 50),
    # Twice the rate for ten seconds: burst + rate * 10 (minus the boundary).
    (5, 10, every(0.1, 10.0), 10 + 49),
    # Idle time refills only up to the burst.
    (10, 3, [0.0] * 10 + [100.0] * 10, 6),
    # Large clock values (epoch seconds): no precision trouble.
    (10, 20, every(0.001, 1.0, start=1.7e9), 29),
]


@pytest.mark.parametrize(("rate", "burst", "times", "expected"), CASES)
def test_exact_admitted_counts(rate: float, burst: int, times: list[float], expected: int) -> None:
    assert admitted(TokenBucket(rate, burst), times) == expected


def test_retry_after_is_when_the_next_token_is_due() -> None:
    bucket = TokenBucket(4, 2)
    assert bucket.take(0.0) == (True, 0.0)
    assert bucket.take(0.0) == (True, 0.0)
    allowed, retry_after = bucket.take(0.1)
    assert not allowed and retry_after == pytest.approx(0.15)
    assert bucket.take(0.1 + retry_after)[0]


def test_a_refused_request_takes_nothing() -> None:
    bucket = TokenBucket(1, 1)
    assert bucket.take(0.0)[0]
    for _ in range(100):
        assert not bucket.take(0.5)[0]
    assert bucket.take(1.0)[0]


def test_check_answers_like_take_without_taking() -> None:
    bucket = TokenBucket(1, 2)
    assert bucket.check(0.0) == (True, 0.0)
    assert bucket.check(0.0) == (True, 0.0)
    assert bucket.tokens(0.0) == 2
    bucket.take(0.0)
    bucket.take(0.0)
    allowed, retry_after = bucket.check(0.25)
    assert not allowed and retry_after == pytest.approx(0.75)
    assert bucket.tokens(0.25) == pytest.approx(0.25)


def test_cost_more_than_the_burst_is_never_admitted() -> None:
    bucket = TokenBucket(10, 5)
    assert bucket.take(0.0, cost=6) == (False, math.inf)
    assert bucket.take(0.0, cost=5) == (True, 0.0)


def test_a_bucket_starts_full_and_is_full_again_after_refilling() -> None:
    bucket = TokenBucket(2, 4)
    assert bucket.is_full(0.0) and bucket.tokens(0.0) == 4
    bucket.take(0.0, cost=4)
    assert not bucket.is_full(1.0)
    assert bucket.is_full(2.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (1, 0.5), (math.nan, 1)])
def test_bad_parameters_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_table_keeps_one_bucket_per_key() -> None:
    table = BucketTable()
    assert sum(table.take("a", 1, 3, 0.0)[0] for _ in range(10)) == 3
    assert sum(table.take("b", 1, 3, 0.0)[0] for _ in range(10)) == 3
    assert not table.take("a", 1, 3, 0.5)[0]
    assert table.take("a", 1, 3, 1.0)[0]


def test_table_check_creates_nothing() -> None:
    table = BucketTable()
    assert table.check("a", 1, 1, 0.0) == (True, 0.0)
    assert "a" not in table
    table.take("a", 1, 1, 0.0)
    assert not table.check("a", 1, 1, 0.0)[0]


def test_table_drops_full_buckets_without_changing_answers() -> None:
    table = BucketTable()
    for i in range(1000):
        table.take(f"addr{i}", 10, 1, 0.0)
    # One second later every one of them is full again: they go as keys are used.
    for i in range(1000):
        table.take(f"new{i}", 10, 1, 1.0)
    assert len(table) <= 1000 + 1
    assert table.evicted == 0


def test_table_is_bounded_under_many_keys() -> None:
    table = BucketTable(max_size=100)
    for i in range(10_000):
        table.take(f"attacker{i}", 0.001, 1, 0.0)  # never refills during the test
    assert len(table) == 100
    assert table.evicted == 10_000 - 100


def test_table_evicts_the_least_recently_used() -> None:
    table = BucketTable(max_size=2)
    table.take("flooder", 1, 1, 0.0)
    table.take("other", 1, 1, 0.0)
    table.take("flooder", 1, 1, 0.1)  # used again: the most recent
    table.take("third", 1, 1, 0.2)
    assert "flooder" in table and "other" not in table
    assert not table.take("flooder", 1, 1, 0.3)[0]


def test_table_carries_the_tokens_over_when_the_rate_changes() -> None:
    table = BucketTable()
    assert sum(table.take("u", 1, 5, 0.0)[0] for _ in range(10)) == 5
    # A policy reload: rate 10/s, burst 10. The emptied bucket stays empty ...
    assert not table.take("u", 10, 10, 0.0)[0]
    # ... and refills at the new rate, up to the new burst.
    assert table.take("u", 10, 10, 0.1)[0]
    assert sum(table.take("u", 10, 10, 100.0)[0] for _ in range(20)) == 10
