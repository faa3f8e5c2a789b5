"""Long-period quotas (messages per tenant per day) as fixed windows, with ``limits``.

The ``limits`` package keeps the counters, in its async Redis storage when the
gateway has a ``redis_url`` (every process shares one count) and in memory
otherwise. A window is a calendar-aligned day (``limits`` aligns fixed windows
to the epoch), so "messages per day" means per UTC day, as a bill would.

When Redis does not answer within the Redis timeout, the hit is counted in a
per-process memory window instead, as the other shared limits fall back
(``gateway/limits/limiter.py``): a Redis outage never blocks a publish.
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from limits import RateLimitItemPerDay, storage
from limits.aio.strategies import FixedWindowRateLimiter

from gateway.limits.redis_limits import bounded_pool

NAMESPACE = "tenant-messages"


def _async_url(redis_url: str) -> str:
    # limits names its async storages async+redis:// (rediss:// for TLS).
    for scheme in ("redis://", "rediss://"):
        if redis_url.startswith(scheme):
            return "async+" + redis_url
    raise ValueError("redis_url must start with redis:// or rediss:// for tenant day quotas")


class DailyQuotas:
    def __init__(
        self, redis_url: str | None, *, timeout: float, prefix: str = "rabbitgate"
    ) -> None:
        self.timeout = timeout
        self._memory = FixedWindowRateLimiter(storage.storage_from_string("async+memory://"))
        self._shared: FixedWindowRateLimiter | None = None
        self._pool: aioredis.ConnectionPool | None = None
        if redis_url is not None:
            # limits over redis-py (its "redispy" implementation) with a pool of
            # ours: the same client library and timeouts as the other shared
            # limits, no second Redis client package, and a pool we can close.
            self._pool = bounded_pool(redis_url, timeout=timeout, max_connections=16)
            shared = storage.storage_from_string(
                _async_url(redis_url),
                implementation="redispy",
                key_prefix=prefix,
                connection_pool=self._pool,  # type: ignore[arg-type]  # passed to redis-py
            )
            self._shared = FixedWindowRateLimiter(shared)
        self.fallbacks = 0  # hits counted in memory because Redis did not answer

    async def hit(self, tenant: str, per_day: int, cost: int = 1) -> float | None:
        """Count ``cost`` messages; None when within the quota, else seconds until it resets."""
        item = RateLimitItemPerDay(per_day)
        limiter = self._shared
        if limiter is not None:
            try:
                async with asyncio.timeout(self.timeout):
                    if await limiter.hit(item, NAMESPACE, tenant, cost=cost):
                        return None
                    stats = await limiter.get_window_stats(item, NAMESPACE, tenant)
                return max(1.0, stats.reset_time - time.time())
            except Exception:  # noqa: BLE001 - any storage failure means "Redis down"
                self.fallbacks += 1
        if await self._memory.hit(item, NAMESPACE, tenant, cost=cost):
            return None
        stats = await self._memory.get_window_stats(item, NAMESPACE, tenant)
        return max(1.0, stats.reset_time - time.time())

    async def used(self, tenant: str, per_day: int) -> int:
        """Messages counted in the tenant's current day (the shared count when it answers)."""
        item = RateLimitItemPerDay(per_day)
        limiter = self._shared or self._memory
        try:
            async with asyncio.timeout(self.timeout):
                stats = await limiter.get_window_stats(item, NAMESPACE, tenant)
        except Exception:  # noqa: BLE001
            stats = await self._memory.get_window_stats(item, NAMESPACE, tenant)
        return per_day - stats.remaining

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.disconnect()

    async def clear(self, tenant: str, per_day: int) -> None:
        item = RateLimitItemPerDay(per_day)
        for limiter in (self._shared, self._memory):
            if limiter is not None:
                await limiter.clear(item, NAMESPACE, tenant)
