"""The limiter in memory (no Redis) and the per-connection guard, with an injected clock."""

from __future__ import annotations

import math

import orjson
import pytest

from gateway.config import ConfigError, LimitSettings, Settings, load_settings
from gateway.limits.limiter import (
    ConnectionGuard,
    Limiter,
    Refusal,
    Slot,
    rate_limited_frame,
    retry_after_header,
    retry_after_seconds,
)
from gateway.policy.rules import Rule, RuleLimits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def rule(rate: float | None, burst: int | None, number: int = 1) -> Rule:
    return Rule(
        index=0,
        source="10-test.yaml",
        line=1,
        pattern="chat.{room}",
        exchange="chat",
        limits=RuleLimits(publish_per_second=rate, burst=burst),
        number=number,
    )


def limiter(clock: Clock, **limits: float) -> Limiter:
    return Limiter(Settings(limits=LimitSettings(**limits)), clock=clock)  # type: ignore[arg-type]


# --- ConnectionGuard ------------------------------------------------------------


def test_guard_frames_admit_the_burst_then_refuse_with_retry_after() -> None:
    clock = Clock()
    guard = ConnectionGuard(LimitSettings(frames_per_second=2, frames_burst=3), clock)
    assert [guard.frame() for _ in range(3)] == [None, None, None]
    refusal = guard.frame()
    assert refusal == Refusal("frames", pytest.approx(0.5))
    clock.now += 0.5
    assert guard.frame() is None


def test_guard_closes_after_the_strikes_within_the_window() -> None:
    clock = Clock()
    limits = LimitSettings(
        rate_limited_strikes_before_close=3, rate_limited_strike_window_seconds=30
    )
    guard = ConnectionGuard(limits, clock)
    assert [guard.strike() for _ in range(3)] == [False, False, False]
    assert guard.strike() is True and guard.closing


def test_guard_strikes_spread_over_time_never_close() -> None:
    clock = Clock()
    limits = LimitSettings(
        rate_limited_strikes_before_close=3, rate_limited_strike_window_seconds=30
    )
    guard = ConnectionGuard(limits, clock)
    for _ in range(100):  # one refusal every 10 s: the window forgets them
        assert guard.strike() is False
        clock.now += 10
    assert not guard.closing


def test_guard_idle_time_counts_from_the_last_frame() -> None:
    clock = Clock()
    guard = ConnectionGuard(LimitSettings(idle_timeout_seconds=300), clock)
    assert guard.idle_left() == 300
    clock.now += 200
    guard.frame()
    clock.now += 100
    assert guard.idle_left() == 200
    clock.now += 200
    left = guard.idle_left()
    assert left is not None and left <= 0


def test_guard_idle_timeout_zero_is_off() -> None:
    assert ConnectionGuard(LimitSettings(idle_timeout_seconds=0), Clock()).idle_left() is None


def test_guard_subscribes_have_their_own_bucket() -> None:
    guard = ConnectionGuard(LimitSettings(subscribes_per_second=1, subscribes_burst=2), Clock())
    assert [guard.subscribe() is None for _ in range(3)] == [True, True, False]
    assert guard.frame() is None


# --- Limiter (memory) -----------------------------------------------------------


async def test_publish_limit_is_per_user_and_rule_with_exact_counts() -> None:
    clock = Clock()
    lim = limiter(clock)
    chat, other = rule(2, 4, number=1), rule(2, 4, number=2)
    assert sum([await lim.take_publish("alice", chat) is None for _ in range(10)]) == 4
    assert sum([await lim.take_publish("bob", chat) is None for _ in range(10)]) == 4
    assert sum([await lim.take_publish("alice", other) is None for _ in range(10)]) == 4
    clock.now += 1.0
    assert sum([await lim.take_publish("alice", chat) is None for _ in range(10)]) == 2
    refusal = await lim.take_publish("alice", chat)
    assert refusal is not None and refusal.limit == "publish"
    assert refusal.retry_after == pytest.approx(0.5)


async def test_a_rule_without_limits_is_not_limited() -> None:
    lim = limiter(Clock())
    assert all([await lim.take_publish("alice", rule(None, None)) is None for _ in range(1000)])


async def test_connects_per_address_refuse_with_retry_after() -> None:
    clock = Clock()
    lim = limiter(clock, connects_per_second_per_address=0.5, connects_burst=2)
    slots = [await lim.admit_connection("203.0.113.9") for _ in range(2)]
    assert all(isinstance(s, Slot) for s in slots)
    refusal = await lim.admit_connection("203.0.113.9")
    assert refusal == Refusal("connects", pytest.approx(2.0))
    assert isinstance(await lim.admit_connection("198.51.100.1"), Slot)


async def test_auth_failures_refuse_the_address_once_the_bucket_is_empty() -> None:
    clock = Clock()
    lim = limiter(clock, auth_failures_per_minute_per_address=6, auth_failures_burst=2)
    for _ in range(2):
        assert isinstance(await lim.admit_connection("203.0.113.9"), Slot)
        await lim.record_auth_failure("203.0.113.9")
    refusal = await lim.admit_connection("203.0.113.9")
    assert isinstance(refusal, Refusal) and refusal.limit == "auth_failures"
    assert refusal.retry_after == pytest.approx(10.0)  # one failure forgiven every 10 s
    clock.now += 10
    assert isinstance(await lim.admit_connection("203.0.113.9"), Slot)


async def test_an_address_closed_with_4429_too_often_is_refused_for_a_while() -> None:
    clock = Clock()
    lim = limiter(clock, strikeouts_per_minute_per_address=6, strikeouts_burst=2)
    for _ in range(2):
        assert isinstance(await lim.admit_connection("203.0.113.9"), Slot)
        await lim.record_strikeout("203.0.113.9")
    refusal = await lim.admit_connection("203.0.113.9")
    assert refusal == Refusal("strikeouts", pytest.approx(10.0))
    assert isinstance(await lim.admit_connection("198.51.100.1"), Slot)
    clock.now += 10
    assert isinstance(await lim.admit_connection("203.0.113.9"), Slot)


async def test_connection_caps_count_held_slots_and_release_is_idempotent() -> None:
    lim = limiter(Clock(), max_connections_per_user=2)
    first, second = await lim.admit_user("carol"), await lim.admit_user("carol")
    assert isinstance(first, Slot) and isinstance(second, Slot)
    assert await lim.admit_user("carol") == Refusal("connections_per_user", 5.0)
    lim.release(first)
    lim.release(first)
    assert lim.held("user", "carol") == 1
    assert isinstance(await lim.admit_user("carol"), Slot)


async def test_an_unknown_address_is_not_limited() -> None:
    lim = limiter(Clock(), connects_burst=1)
    assert [await lim.admit_connection(None) for _ in range(5)] == [None] * 5


async def test_without_a_redis_url_the_limits_are_local_and_not_healthy() -> None:
    lim = limiter(Clock())
    await lim.start()
    assert lim.redis_healthy is False and lim.redis_failures == 0
    await lim.close()


def test_memory_stays_bounded_under_many_addresses() -> None:
    import asyncio

    async def flood() -> Limiter:
        lim = limiter(Clock(), bucket_table_size=100, connects_per_second_per_address=0.001)
        for i in range(5000):
            slot = await lim.admit_connection(f"10.0.{i // 250}.{i % 250}")
            lim.release(slot if isinstance(slot, Slot) else None)
        return lim

    lim = asyncio.run(flood())
    assert all(len(table) <= 100 for table in lim._tables.values())
    assert lim._held == {}


# --- the answer -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"), [(0.0001, 0.001), (0.15, 0.15), (1.2345, 1.235), (math.inf, 3600.0)]
)
def test_retry_after_is_rounded_up_to_the_millisecond_and_capped(
    seconds: float, expected: float
) -> None:
    assert retry_after_seconds(Refusal("frames", seconds)) == expected


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.001, "1"), (1.0, "1"), (1.001, "2"), (59.2, "60"), (math.inf, "3600")],
)
def test_retry_after_header_is_whole_seconds_rounded_up(seconds: float, header: str) -> None:
    assert retry_after_header(Refusal("connects", seconds)) == header


def test_the_rate_limited_frame_follows_the_contract() -> None:
    frame = orjson.loads(rate_limited_frame(Refusal("publish", 0.2), "r1"))
    assert frame["type"] == "error" and frame["code"] == "rate_limited"
    assert frame["id"] == "r1" and frame["retry_after"] == 0.2
    assert "publish" in frame["message"]


# --- settings -------------------------------------------------------------------


def test_redis_url_comes_from_the_environment() -> None:
    settings = load_settings(
        environ={
            "RABBITGATE_REDIS_URL": "redis://10.0.0.5:6379/2",
            "RABBITGATE_JWT_SECRET": "x" * 64,
        }
    )
    assert settings.redis_url == "redis://10.0.0.5:6379/2"
    assert load_settings(environ={"RABBITGATE_JWT_SECRET": "x" * 64}).redis_url is None


@pytest.mark.parametrize(
    "override",
    [
        {"limits.frames_per_second": 0},
        {"limits.frames_burst": 0},
        {"limits.connects_per_second_per_address": -1},
        {"limits.max_connections_per_user": 0},
        {"limits.rate_limited_strikes_before_close": 0},
        {"limits.idle_timeout_seconds": -5},
        {"limits.bucket_table_size": 0},
        {"limits.strikeouts_burst": 0},
        {"limits.strikeouts_per_minute_per_address": 0},
        {"limits.redis_timeout_seconds": 0},
    ],
)
def test_limits_that_would_lock_everyone_out_are_refused(override: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="limits\\."):
        load_settings(environ={"RABBITGATE_JWT_SECRET": "x" * 64}, overrides=override)


def test_limits_from_the_environment() -> None:
    settings = load_settings(
        environ={
            "RABBITGATE_JWT_SECRET": "x" * 64,
            "RABBITGATE_LIMITS_FRAMES_PER_SECOND": "7.5",
            "RABBITGATE_LIMITS_MAX_CONNECTIONS_PER_ADDRESS": "20",
        }
    )
    assert settings.limits.frames_per_second == 7.5
    assert settings.limits.max_connections_per_address == 20
