"""Presence in the real Redis (gateway/presence): two processes' services, one truth.

Each test uses its own key prefix, so it never sees another test's entries.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.presence.service import PresenceService
from gateway.presence.store import PresenceUnavailable

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"


class Received:
    def __init__(self) -> None:
        self.frames: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, exchange: str, channel: str, frames: list[bytes]) -> None:
        self.frames.extend((exchange, channel, orjson.loads(f)) for f in frames)


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check() if asyncio.iscoroutinefunction(check) else check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


@pytest.fixture
def prefix() -> str:
    return f"rgtest:{uuid.uuid4().hex[:10]}:presence:"


@pytest.fixture
async def make_service(prefix: str) -> AsyncIterator[Callable[..., Any]]:
    made: list[PresenceService] = []

    async def make(
        name: str, received: Received | None = None, ttl_ms: int = 20_000, url: str = REDIS_URL
    ) -> PresenceService:
        service = PresenceService(
            url,
            f"{name}-{uuid.uuid4().hex}",
            timeout=0.25,
            deliver=received if received is not None else Received(),
            wants_events=lambda exchange, channel: channel.startswith("room."),
            prefix=prefix,
            process_ttl_ms=ttl_ms,
        )
        await service.start()
        made.append(service)
        return service

    yield make
    for service in made:
        await service.stop()
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=prefix + "*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


async def test_count_and_members_are_exact_across_two_processes(make_service: Any) -> None:
    a, b = await make_service("a"), await make_service("b")
    a.joined("ex1", "room.lobby", "s1", "alice")
    a.joined("ex1", "room.lobby", "s2", "alice")
    b.joined("ex1", "room.lobby", "s3", "bob")
    b.joined("ex2", "room.lobby", "s4", "carol")  # same name on another exchange: not counted
    await a.flush()
    await b.flush()
    snapshot = await a.snapshot("ex1", "room.lobby")
    assert snapshot.count == 3
    assert {(m.user, m.session) for m in snapshot.members} == {
        ("alice", "s1"),
        ("alice", "s2"),
        ("bob", "s3"),
    }
    b.left("ex1", "room.lobby", "s3")
    await b.flush()
    assert (await a.snapshot("ex1", "room.lobby")).count == 2


async def test_at_most_the_limit_is_listed_but_the_count_is_exact(make_service: Any) -> None:
    a = await make_service("a")
    for i in range(1_500):
        a.joined("ex", "room.big", f"s{i}", f"user{i}")
    await a.flush()
    snapshot = await a.snapshot("ex", "room.big")
    assert snapshot.count == 1_500
    assert len(snapshot.members) == 1_000


async def test_join_and_leave_events_reach_every_process(make_service: Any) -> None:
    seen_a, seen_b = Received(), Received()
    a, b = await make_service("a", seen_a), await make_service("b", seen_b)
    await asyncio.sleep(0.3)  # both listening
    a.joined("ex", "room.x", "s1", "alice")
    await eventually(lambda: seen_b.frames and seen_a.frames)
    expected = (
        "ex",
        "room.x",
        {"type": "join", "channel": "room.x", "user": "alice", "session": "s1"},
    )
    assert seen_a.frames == [expected]
    assert seen_b.frames == [expected]
    b.left("ex", "room.x", "s1")  # not b's session: ignored
    a.left("ex", "room.x", "s1")
    await eventually(lambda: len(seen_b.frames) == 2)
    assert seen_b.frames[1][2]["type"] == "leave"
    a.joined("ex", "quiet.x", "s9", "dave")  # wants_events says no: never rendered
    await asyncio.sleep(0.5)
    assert len(seen_b.frames) == 2


async def test_churn_is_coalesced_into_one_frame_per_tick(make_service: Any) -> None:
    seen = Received()
    await make_service("a", seen)
    b = await make_service("b")
    await asyncio.sleep(0.3)
    for i in range(5_000):
        b.joined("ex", "room.crowd", f"s{i}", f"user{i}")
    await eventually(lambda: sum(f[2].get("joined", 0) for f in seen.frames) == 5_000)
    assert all(f[2]["type"] == "presence_changed" for f in seen.frames)
    assert len(seen.frames) <= 5  # a few ticks at most, never 5,000 frames


async def test_a_dead_process_disappears_when_its_liveness_lapses(make_service: Any) -> None:
    a = await make_service("a", ttl_ms=1_000)
    b = await make_service("b", ttl_ms=1_000)
    a.joined("ex", "room.y", "s1", "alice")
    b.joined("ex", "room.y", "s2", "bob")
    await a.flush()
    await b.flush()
    assert (await a.snapshot("ex", "room.y")).count == 2
    for task in b._tasks:  # b dies without a word: no renewal, no cleanup
        task.cancel()
    b._tasks = []
    b._local.clear()

    async def only_alice() -> bool:
        return (await a.snapshot("ex", "room.y")).count == 1

    await eventually(only_alice, timeout=5)


async def test_lost_redis_data_is_rebuilt_by_the_next_renewal(
    make_service: Any, prefix: str
) -> None:
    a = await make_service("a", ttl_ms=1_000)
    a.joined("ex", "room.z", "s1", "alice")
    a.joined("ex", "room.z", "s2", "bob")
    await a.flush()
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=prefix + "*")]
    await client.delete(*keys)  # what a restart of Redis (no persistence) does to us
    await client.aclose()
    assert (await a.snapshot("ex", "room.z")).count == 0

    async def rebuilt() -> bool:
        return (await a.snapshot("ex", "room.z")).count == 2

    await eventually(rebuilt, timeout=3)


async def test_redis_down_answers_unavailable_quickly_and_never_raises_to_the_node(
    make_service: Any,
) -> None:
    a = await make_service("a", url="redis://127.0.0.1:1/0")  # nothing listens there
    a.joined("ex", "room.q", "s1", "alice")  # must not raise
    await a.flush()
    a.left("ex", "room.q", "s1")
    started = time.monotonic()
    with pytest.raises(PresenceUnavailable):
        await a.snapshot("ex", "room.q")
    assert time.monotonic() - started < 2.0
