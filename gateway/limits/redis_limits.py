"""Token buckets and connection leases in Redis, shared by every gateway process.

Each operation is one Lua script, run atomically by Redis (EVALSHA through
redis.asyncio, loaded again by redis-py when Redis forgot it):

* ``take``: the GCRA token bucket of ``gateway/limits/buckets.py`` in milliseconds,
  the same admissions as the in-memory bucket (a test drives both with the
  same table). The time is Redis's own clock (``TIME``), so gateway processes
  on different hosts agree; tests may pass it in. The key expires once the
  bucket is full again: an idle bucket costs Redis nothing.
* ``acquire``/``renew``/``release``: concurrent connections as a sorted set of
  leases (member = process and connection, score = when the lease lapses).
  A gateway renews its leases while they live; a crashed gateway's lapse
  within ``LEASE_MS``, so its connections stop counting by themselves.

Why not the ``limits`` package's async Redis storage: it has no token bucket
and no public way to run a script of our own atomically (its bridges to
coredis/redis-py are internal), and a second connection pool only to parse
the URL and answer a health check would cost more than ``Redis.from_url`` and
``PING``. ``limits`` is not used for the buckets at all (see ``buckets.py``).

Every call is bounded by ``timeout``: the caller treats any error or timeout
as "Redis is down" and falls back to its local limits (``limiter.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Iterable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

# A connection lease lapses this long after its last renewal.
LEASE_MS = 60_000
# Errors that mean "Redis is not answering": fall back, never raise to a client.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

_TAKE = """
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now
if ARGV[5] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
else
  now = tonumber(ARGV[5])
end
if cost * interval > tolerance + 0.001 then
  return {0, 'inf'}
end
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then
  tat = now
end
local new_tat = tat + cost * interval
local allow_at = new_tat - tolerance
if now + 0.001 < allow_at then
  return {0, string.format('%.3f', allow_at - now)}
end
if ARGV[4] ~= '1' then
  redis.call('SET', KEYS[1], string.format('%.4f', new_tat),
             'PX', math.ceil(new_tat - now) + 1000)
end
return {1, '0'}
"""

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
return redis.call('ZCARD', KEYS[1])
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
return 1
"""


def bounded_pool(url: str, *, timeout: float, max_connections: int) -> aioredis.ConnectionPool:
    """A connection pool whose every wait, connect and read is bounded by ``timeout``.

    No retries: a retry would only stretch the time a request waits. Every
    shared-state client of the gateway (limits, day quotas, presence) uses one.
    """
    return aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )


class RedisLimits:
    """Shared buckets and leases. Every method may raise one of ``REDIS_ERRORS``."""

    def __init__(self, url: str, *, timeout: float, prefix: str = "rabbitgate:") -> None:
        self.timeout = timeout
        self.prefix = prefix
        pool = bounded_pool(url, timeout=timeout, max_connections=64)
        self.client = aioredis.Redis(connection_pool=pool)
        self._take = self.client.register_script(_TAKE)
        self._acquire = self.client.register_script(_ACQUIRE)
        self._renew = self.client.register_script(_RENEW)

    def key(self, kind: str, key: str) -> str:
        # Keys hold user names and addresses; long ones are hashed to bound them.
        if len(key) > 128:
            key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
        return f"{self.prefix}{kind}:{key}"

    async def ping(self) -> None:
        async with asyncio.timeout(self.timeout):
            await self.client.ping()

    async def take(
        self,
        key: str,
        rate_per_second: float,
        burst: float,
        cost: float = 1,
        *,
        peek: bool = False,
        now_ms: float | None = None,
    ) -> tuple[bool, float]:
        """``TokenBucket.take`` (or ``check`` with ``peek``) on a shared bucket."""
        args = [
            repr(1000.0 / rate_per_second),
            repr(float(burst)),
            repr(float(cost)),
            "1" if peek else "0",
            "" if now_ms is None else repr(float(now_ms)),
        ]
        async with asyncio.timeout(self.timeout):
            allowed, retry_ms = await self._take(keys=[key], args=args)
        if int(allowed):
            return True, 0.0
        text = retry_ms.decode() if isinstance(retry_ms, bytes) else str(retry_ms)
        return False, math.inf if text == "inf" else float(text) / 1000.0

    async def acquire(self, key: str, member: str, maximum: int) -> bool:
        """Hold one of ``maximum`` leases of ``key``; False when all are held."""
        return await self.acquire_count(key, member, maximum) > 0

    async def acquire_count(self, key: str, member: str, maximum: int) -> int:
        """As ``acquire``; the leases of ``key`` held with this one (0: refused).

        The tenant quotas use the count to tell when a tenant nears its cap.
        """
        async with asyncio.timeout(self.timeout):
            return int(await self._acquire(keys=[key], args=[member, maximum, LEASE_MS]))

    async def release(self, key: str, member: str) -> None:
        async with asyncio.timeout(self.timeout):
            await self.client.zrem(key, member)

    async def renew(self, leases: Iterable[tuple[str, str]], batch: int = 500) -> None:
        """Extend every ``(key, member)`` lease (and re-add one lost in an outage)."""
        pending = list(leases)
        for start in range(0, len(pending), batch):
            async with asyncio.timeout(self.timeout * 4):
                async with self.client.pipeline(transaction=False) as pipe:
                    for key, member in pending[start : start + batch]:
                        await self._renew(keys=[key], args=[member, LEASE_MS], client=pipe)
                    await pipe.execute()

    async def reset(self) -> None:
        """Drop every pooled connection: after an outage they are all broken."""
        await self.client.connection_pool.disconnect()

    async def close(self) -> None:
        await self.client.aclose(close_connection_pool=True)
