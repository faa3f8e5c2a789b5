"""Presence in Redis: every subscriber of a channel, on every gateway process.

Layout (``P`` is the key prefix, default ``rabbitgate:presence:``):

* ``P{exchange}\\x00{channel}``: a hash, field = session id, value =
  ``{process}\\n{user}``. A channel is named with its exchange, as the
  policies decide it, so two rule sets that reuse a channel name on other
  exchanges never see each other's members.
* ``P~proc:{process}``: one key per live gateway process, with a TTL of
  ``PROCESS_TTL_MS`` that the process renews every third of it. Entries of a
  process whose key lapsed (it died, or was cut off from Redis) no longer
  count and are removed by the next read of their channel. A process that died
  is gone from every count within ``PROCESS_TTL_MS`` (20 s; the contract asks 30).
* ``P~events``: a pub/sub channel; each process publishes, once per tick, one
  batch of join/leave events per channel, and every process listens.

Why per-process liveness and not a lease per entry (as the connection caps in
``gateway/limits/redis_limits.py`` do): a lease per entry must be renewed per
entry, 1,000 writes a second for 10,000 subscriptions; one key per process is
one write every few seconds, whatever the number of subscribers.

A restart of Redis loses the hashes; the renewal sees its process key gone
(``SET ... GET`` answers nil) and writes every local entry again, so presence
is whole again within one renewal period. The user name is whatever the
token's ``sub`` holds: it is stored after the first newline, so no name can
forge a process id.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.limits.redis_limits import bounded_pool

PROCESS_TTL_MS = 20_000
# At most this many members are listed; ``count`` is always exact.
MAX_LISTED = 1_000
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

# KEYS[1] the channel's hash. ARGV: process-key prefix, how many to list.
# Reads processes' liveness keys not named in KEYS: fine on one Redis (and on
# Sentinel); a Redis Cluster would need the process keys in the same slot.
_LIST = """
local entries = redis.call('HGETALL', KEYS[1])
local limit = tonumber(ARGV[2])
local alive = {}
local count = 0
local listed = {}
local dead = {}
for i = 1, #entries, 2 do
  local value = entries[i + 1]
  local cut = string.find(value, '\\n', 1, true)
  local process = cut and string.sub(value, 1, cut - 1) or ''
  local live = alive[process]
  if live == nil then
    live = redis.call('EXISTS', ARGV[1] .. process) == 1
    alive[process] = live
  end
  if live then
    count = count + 1
    if count <= limit then
      listed[#listed + 1] = entries[i]
      listed[#listed + 1] = string.sub(value, cut + 1)
    end
  else
    dead[#dead + 1] = entries[i]
  end
end
for i = 1, #dead, 500 do
  redis.call('HDEL', KEYS[1], unpack(dead, i, math.min(i + 499, #dead)))
end
return {count, listed}
"""


class PresenceUnavailable(Exception):
    """Redis did not answer in time: the request gets ``unavailable``."""


@dataclass(frozen=True, slots=True)
class Member:
    user: str
    session: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    count: int  # every live subscriber, exact
    members: tuple[Member, ...]  # at most MAX_LISTED of them


ChannelKey = tuple[str, str]  # (exchange, channel)


class PresenceStore:
    """The Redis side. Every method may raise one of ``REDIS_ERRORS`` (or times out)."""

    def __init__(
        self,
        url: str,
        process: str,
        *,
        timeout: float,
        prefix: str = "rabbitgate:presence:",
        process_ttl_ms: int = PROCESS_TTL_MS,
    ) -> None:
        self.process = process
        self.process_ttl_ms = process_ttl_ms
        self.timeout = timeout
        self.prefix = prefix
        self.events_channel = f"{prefix}~events"
        pool = bounded_pool(url, timeout=timeout, max_connections=16)
        self.client = aioredis.Redis(connection_pool=pool)
        self._list = self.client.register_script(_LIST)
        self._process_key = f"{prefix}~proc:{process}"

    def key(self, exchange: str, channel: str) -> str:
        # Exchange and channel are validated names (at most 127 and 200 bytes).
        return f"{self.prefix}{exchange}\x00{channel}"

    async def renew(self) -> bool:
        """Keep this process alive; True when Redis had forgotten it (rebuild needed)."""
        async with asyncio.timeout(self.timeout):
            previous = await self.client.set(
                self._process_key, b"1", px=self.process_ttl_ms, get=True
            )
        return previous is None

    async def write(
        self,
        joined: Iterable[tuple[ChannelKey, Member]],
        left: Iterable[tuple[ChannelKey, str]],
        events: Mapping[ChannelKey, list[tuple[str, str, str]]],
    ) -> None:
        """One pipeline: entries added and removed, then one event batch per channel."""
        async with asyncio.timeout(self.timeout * 4):
            async with self.client.pipeline(transaction=False) as pipe:
                for (exchange, channel), member in joined:
                    value = f"{self.process}\n{member.user}"
                    pipe.hset(self.key(exchange, channel), member.session, value)
                for (exchange, channel), session in left:
                    pipe.hdel(self.key(exchange, channel), session)
                for (exchange, channel), batch in events.items():
                    body = orjson.dumps({"x": exchange, "c": channel, "e": batch})
                    pipe.publish(self.events_channel, body)
                await pipe.execute()

    async def snapshot(self, exchange: str, channel: str, limit: int = MAX_LISTED) -> Snapshot:
        try:
            async with asyncio.timeout(self.timeout):
                count, flat = await self._list(
                    keys=[self.key(exchange, channel)], args=[f"{self.prefix}~proc:", limit]
                )
        except REDIS_ERRORS as exc:
            raise PresenceUnavailable(type(exc).__name__) from None
        members = tuple(
            Member(user=flat[i + 1].decode(errors="replace"), session=flat[i].decode())
            for i in range(0, len(flat), 2)
        )
        return Snapshot(int(count), members)

    async def forget_process(self, entries: Iterable[tuple[ChannelKey, str]]) -> None:
        """On a clean stop: this process's entries and its liveness key go at once."""
        async with asyncio.timeout(self.timeout * 4):
            async with self.client.pipeline(transaction=False) as pipe:
                for (exchange, channel), session in entries:
                    pipe.hdel(self.key(exchange, channel), session)
                pipe.delete(self._process_key)
                await pipe.execute()

    def pubsub(self) -> aioredis.client.PubSub:
        return self.client.pubsub(ignore_subscribe_messages=True)

    async def close(self) -> None:
        await self.client.aclose(close_connection_pool=True)


def process_id(seed: str) -> str:
    """A short id for this process's entries (hex: it can never hold a newline)."""
    return hashlib.sha256(seed.encode()).hexdigest()[:16]
