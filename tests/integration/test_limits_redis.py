"""The shared limits against the real Redis (127.0.0.1:6379): the same exact
counts as the in-memory bucket, shared between limiter instances (as between
gateway processes), and local limits that still hold when Redis is gone."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import gateway.limits.redis_limits
from gateway.app import Gateway
from gateway.config import LimitSettings, Settings
from gateway.limits.buckets import TokenBucket
from gateway.limits.limiter import Limiter, Refusal, Slot
from gateway.limits.redis_limits import RedisLimits
from gateway.policy.rules import Rule, RuleLimits, load_policy_set

from .processes import free_port

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"


def every(step: float, duration: float, start: float = 0.0) -> list[float]:
    return [start + i * step for i in range(round(duration / step))]


# The table of tests/unit/test_buckets.py, times in seconds from an epoch-sized origin.
CASES = [
    (10, 20, [0.0] * 100, 20),
    (0.5, 3, [5.0] * 10, 3),
    (10, 20, every(0.001, 1.0), 29),
    (100, 5, every(0.001, 1.0), 104),
    (3, 2, every(0.001, 2.0), 7),
    (10, 1, every(0.1, 10.0), 100),
    (5, 10, every(0.1, 10.0), 59),
    (10, 3, [0.0] * 10 + [100.0] * 10, 6),
]


@pytest.fixture
async def redis_limits() -> AsyncIterator[RedisLimits]:
    storage = RedisLimits(REDIS_URL, timeout=1.0, prefix=f"rgtest:{uuid.uuid4().hex[:8]}:")
    try:
        await storage.ping()
    except gateway.limits.redis_limits.REDIS_ERRORS:
        pytest.fail("Redis does not answer on 127.0.0.1:6379: run scripts/setup")
    yield storage
    await storage.close()


def make_settings(redis_url: str | None = REDIS_URL, **limits: float) -> Settings:
    return Settings(redis_url=redis_url, limits=LimitSettings(**limits))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Limiter]:
    limiter = Limiter(settings)
    await limiter.start()
    try:
        yield limiter
    finally:
        await limiter.close()


def rule(rate: float, burst: int) -> Rule:
    return Rule(
        index=0,
        source=f"{uuid.uuid4().hex[:8]}.yaml",
        line=1,
        pattern="chat.{room}",
        exchange="chat",
        limits=RuleLimits(publish_per_second=rate, burst=burst),
    )


@pytest.mark.parametrize(("rate", "burst", "times", "expected"), CASES)
async def test_redis_bucket_admits_exactly_what_the_memory_bucket_admits(
    redis_limits: RedisLimits, rate: float, burst: int, times: list[float], expected: int
) -> None:
    key = redis_limits.key("case", uuid.uuid4().hex)
    origin_ms = time.time() * 1000  # realistic magnitudes: epoch milliseconds
    admitted = 0
    for t in times:
        allowed, _ = await redis_limits.take(key, rate, burst, now_ms=origin_ms + t * 1000)
        admitted += allowed
    memory = TokenBucket(rate, burst)
    assert admitted == expected == sum(memory.take(t)[0] for t in times)


async def test_redis_retry_after_and_peek_match_the_memory_bucket(
    redis_limits: RedisLimits,
) -> None:
    key = redis_limits.key("retry", uuid.uuid4().hex)
    now = time.time() * 1000
    assert await redis_limits.take(key, 4, 2, now_ms=now) == (True, 0.0)
    assert await redis_limits.take(key, 4, 2, now_ms=now) == (True, 0.0)
    allowed, retry_after = await redis_limits.take(key, 4, 2, now_ms=now + 100)
    assert not allowed and retry_after == pytest.approx(0.15, abs=1e-3)
    # peek: the same answer, nothing taken
    assert (await redis_limits.take(key, 4, 2, peek=True, now_ms=now + 250))[0]
    assert (await redis_limits.take(key, 4, 2, now_ms=now + 250))[0]
    assert not (await redis_limits.take(key, 4, 2, now_ms=now + 250))[0]


async def test_an_idle_bucket_expires_from_redis(redis_limits: RedisLimits) -> None:
    key = redis_limits.key("ttl", uuid.uuid4().hex)
    await redis_limits.take(key, 10, 2)  # full again after 0.1 s
    ttl = await redis_limits.client.pttl(key)
    assert 0 < ttl <= 1100


async def test_two_limiters_sharing_redis_admit_the_exact_shared_count() -> None:
    settings = make_settings()
    shared_rule = rule(0.001, 50)  # no refill during the test
    async with running(settings) as first, running(settings) as second:
        assert first.redis_healthy and second.redis_healthy
        results = []
        for _ in range(50):
            results.append(await first.take_publish("alice", shared_rule))
            results.append(await second.take_publish("alice", shared_rule))
        assert sum(r is None for r in results) == 50
        refused = [r for r in results if r is not None]
        assert all(r.limit == "publish" and r.retry_after > 900 for r in refused)
        # Another user has a bucket of its own.
        assert await second.take_publish("bob", shared_rule) is None


async def test_shared_refill_is_capped_at_the_burst() -> None:
    fast_rule = rule(10, 5)
    async with running(make_settings()) as first, running(make_settings()) as second:
        while await first.take_publish("carol", fast_rule) is None:
            pass
        await asyncio.sleep(0.8)  # refills 8 tokens, the bucket holds 5
        admitted = 0
        for _ in range(4):  # well within the 0.1 s the next token takes
            admitted += await first.take_publish("carol", fast_rule) is None
            admitted += await second.take_publish("carol", fast_rule) is None
        assert admitted == 5


async def test_connection_caps_are_shared_and_leases_released() -> None:
    settings = make_settings(max_connections_per_address=3, connects_burst=100)
    address = f"198.51.100.{uuid.uuid4().int % 250}-{uuid.uuid4().hex[:6]}"
    async with running(settings) as first, running(settings) as second:
        slots = [await first.admit_connection(address) for _ in range(2)]
        slots.append(await second.admit_connection(address))
        assert all(isinstance(slot, Slot) for slot in slots)
        refused = await second.admit_connection(address)
        assert isinstance(refused, Refusal) and refused.limit == "connections_per_address"
        first.release(slots[0])  # type: ignore[arg-type]
        await asyncio.sleep(0.1)  # the release reaches Redis in the background
        assert isinstance(await second.admit_connection(address), Slot)


async def test_a_crashed_gateways_leases_lapse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.limits.redis_limits, "LEASE_MS", 500)
    settings = make_settings(max_connections_per_user=2)
    user = f"dave-{uuid.uuid4().hex[:6]}"
    async with running(settings) as survivor:
        crashed = Limiter(settings)
        await crashed.start()
        assert isinstance(await crashed.admit_user(user), Slot)
        assert isinstance(await crashed.admit_user(user), Slot)
        await crashed.close()  # never released: as if the process died
        assert isinstance(await survivor.admit_user(user), Refusal)
        await asyncio.sleep(0.7)
        assert isinstance(await survivor.admit_user(user), Slot)


async def test_unreachable_redis_falls_back_to_local_limits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="rabbitgate.limits")
    settings = make_settings(f"redis://127.0.0.1:{free_port()}/0", redis_timeout_seconds=0.2)
    slow_rule = rule(0.001, 7)
    async with running(settings) as limiter:
        assert not limiter.redis_healthy
        started = time.monotonic()
        admitted = sum([await limiter.take_publish("erin", slow_rule) is None for _ in range(20)])
        assert admitted == 7  # the local bucket holds the same limit
        assert time.monotonic() - started < 1.0  # no request waits on the dead Redis
        # The limiter's own warning (the fleet control path warns on its own logger).
        warnings = [
            r
            for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "rabbitgate.limits"
        ]
        assert len(warnings) == 1 and "locally" in warnings[0].getMessage()


class Proxy:
    """A TCP proxy in front of Redis that can be cut and restored on one port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.links):
            writer.transport.abort()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=2)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 6379)
        self.links.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.links.difference_update((writer, up_writer))


async def test_redis_going_away_and_coming_back_is_logged_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="rabbitgate.limits")
    proxy = Proxy()
    await proxy.start()
    settings = make_settings(f"redis://127.0.0.1:{proxy.port}/0", redis_timeout_seconds=0.2)
    slow_rule = rule(0.001, 3)
    async with running(settings) as limiter:
        assert limiter.redis_healthy
        assert await limiter.take_publish("frank", slow_rule) is None
        await proxy.cut()
        # Each request is answered from the local bucket, none waits long.
        started = time.monotonic()
        answers = [await limiter.take_publish("frank", slow_rule) for _ in range(10)]
        assert time.monotonic() - started < 1.0
        assert sum(a is None for a in answers) == 3  # local bucket, full at first
        assert not limiter.redis_healthy and limiter.redis_failures == 1
        await proxy.start()
        for _ in range(50):
            if limiter.redis_healthy:
                break
            await asyncio.sleep(0.1)
        assert limiter.redis_healthy
        # Shared again: the Redis bucket kept its state (2 of 3 tokens left).
        answers = [await limiter.take_publish("frank", slow_rule) for _ in range(5)]
        assert sum(a is None for a in answers) == 2
    messages = [r.getMessage() for r in caplog.records if r.name == "rabbitgate.limits"]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert sum("unreachable" in m for m in messages) == 1
    assert sum("shared again" in m for m in messages) == 1
    await proxy.cut()


async def metric(gw: Gateway, name: str) -> float | None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as response:
            text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


@pytest.mark.parametrize("redis_up", [True, False])
async def test_a_gateway_serves_with_redis_up_or_down_and_says_which_in_its_metrics(
    settings: Settings,
    cleanup_broker: None,
    connect_client: Any,
    caplog: pytest.LogCaptureFixture,
    redis_up: bool,
) -> None:
    caplog.set_level(logging.WARNING, logger="rabbitgate.limits")
    url = REDIS_URL if redis_up else f"redis://127.0.0.1:{free_port()}/0"
    gw = Gateway(
        dataclasses.replace(settings, redis_url=url),
        load_policy_set(settings.policies_dir),
    )
    await gw.start()
    try:
        alice = await connect_client(f"alice-{uuid.uuid4().hex[:6]}", gw=gw)
        assert (await alice.request("ping"))["type"] == "pong"
        assert gw.node.limiter.redis_healthy is redis_up
        assert await metric(gw, "rabbitgate_limits_redis_healthy") == (1.0 if redis_up else 0.0)
        warned = [
            r
            for r in caplog.records
            if r.levelno == logging.WARNING and r.name == "rabbitgate.limits"
        ]
        assert len(warned) == (0 if redis_up else 1)
    finally:
        await gw.stop()
