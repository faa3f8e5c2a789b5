"""Every rate limit and connection cap of the gateway, behind one object.

``Node.limiter`` answers, for each limit, "admitted" (``None``) or a
``Refusal`` naming the limit and when to retry. Which limit lives where:

=============================  ===============  ==================================
limit                          key              storage
=============================  ===============  ==================================
publishes per rule             user + rule      shared (Redis when configured)
new connections                address          shared
failed authentications         address          shared
closes with 4429 (strikeouts)  address          shared
concurrent connections         address, user    shared (leases)
tenant connections, subs       tenant           shared (leases)
tenant publishes               tenant           shared (bucket)
tenant messages per day        tenant           shared (``limits`` day window)
frames, subscribe requests     connection       this process (``ConnectionGuard``)
rate_limited strikes, idle     connection       this process (``ConnectionGuard``)
=============================  ===============  ==================================

A connection lives in one process, so its own buckets never need Redis. The
shared ones use Redis when ``redis_url`` is set and it answers; otherwise the
same buckets in memory (``buckets.BucketTable``). When Redis stops answering
the limiter logs one WARNING, turns ``redis_healthy`` False, and limits every
request locally (per process) until a background PING succeeds again (one
INFO on recovery). No request waits for an unreachable Redis longer than
``limits.redis_timeout_seconds``, and only the requests in flight when it went
away wait at all. ``redis_failures`` counts the transitions to "down".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from gateway.auth.principal import Principal
from gateway.config import LimitSettings, Settings
from gateway.limits.buckets import BucketTable, TokenBucket
from gateway.limits.quota_windows import DailyQuotas
from gateway.limits.redis_limits import LEASE_MS, REDIS_ERRORS, RedisLimits
from gateway.policy.rules import Rule
from gateway.protocol.frames import RequestId, error_frame

log = logging.getLogger("rabbitgate.limits")

# A refused connection cap cannot say when a slot frees up; this is the hint.
CAP_RETRY_AFTER_SECONDS = 5.0
# While Redis is down, try it this often; while up, renew leases this often.
PROBE_INTERVAL_SECONDS = 1.0
RENEW_INTERVAL_SECONDS = LEASE_MS / 1000 / 3

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A limit said no. ``limit`` is the event detail; ``retry_after`` in seconds."""

    limit: str
    retry_after: float


@dataclass(frozen=True, slots=True)
class Slot:
    """One held connection lease; give it back with ``Limiter.release``."""

    kind: str  # "address", "user", "tenant" or "tenant-subscription"
    key: str
    member: str
    # Leases taken with this one and given back with it (a user's tenant lease).
    linked: tuple[Slot, ...] = ()


class LimitRefused(Exception):
    """A limit refused a subscribe on its way into the hub (``Node.add_subscriber``)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.limit)
        self.refusal = refusal


class ConnectionGuard:
    """The limits of one connection: frames, subscribes, strikes, idleness.

    Plain state over an injected clock, no I/O. The caller answers a
    ``Refusal`` with ``rate_limited`` and then calls ``strike``; when that
    returns True the connection must be closed with 4429.
    """

    def __init__(self, limits: LimitSettings, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.frames = TokenBucket(limits.frames_per_second, limits.frames_burst)
        self.subscribes = TokenBucket(limits.subscribes_per_second, limits.subscribes_burst)
        strikes = limits.rate_limited_strikes_before_close
        self.strikes = TokenBucket(strikes / limits.rate_limited_strike_window_seconds, strikes)
        self.idle_timeout = limits.idle_timeout_seconds
        self.last_frame = clock()
        self.closing = False  # set once the connection is being closed for its limits

    def frame(self) -> Refusal | None:
        """Charge one incoming frame (any kind); records activity for the idle timeout."""
        now = self.last_frame = self._clock()
        return _refusal("frames", self.frames.take(now))

    def subscribe(self) -> Refusal | None:
        return _refusal("subscribes", self.subscribes.take(self._clock()))

    def strike(self) -> bool:
        """Count one ``rate_limited`` answer; True: too many, close with 4429 now."""
        allowed, _ = self.strikes.take(self._clock())
        if not allowed:
            self.closing = True
        return self.closing

    def idle_left(self) -> float | None:
        """Seconds until the idle timeout (<= 0: idle now); None when it is off."""
        if not self.idle_timeout:
            return None
        return self.last_frame + self.idle_timeout - self._clock()


class Limiter:
    """The shared limits of one gateway process. ``start`` before use, ``close`` after."""

    def __init__(self, settings: Settings, clock: Clock = time.monotonic) -> None:
        self.limits = settings.limits
        self.redis_url = settings.redis_url
        self._clock = clock
        self._tables: dict[str, BucketTable] = {}
        # Leases this process holds: (kind, key) -> members. The local count
        # when Redis is down, and what gets renewed in Redis while it is up.
        self._held: dict[tuple[str, str], set[str]] = {}
        self._members = (f"{uuid.uuid4().hex[:12]}:{n}" for n in itertools.count())
        self._redis: RedisLimits | None = None
        self._healthy = False
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.redis_failures = 0
        # Tenant quotas (gateway/limits/tenants.py). ``tenant_usage``: the last
        # shared day count seen per tenant label as a fraction of its quota, for
        # the metrics; ``tenant_refusals``: refusals per (tenant label, quota).
        self.tenants = settings.tenants
        self.tenant_usage: dict[tuple[str, str], float] = {}
        self.tenant_refusals: dict[tuple[str, str], int] = {}
        self._near: set[tuple[str, str]] = set()
        self._daily: DailyQuotas | None = None
        if any(
            q.messages_per_day for q in (self.tenants.default, *self.tenants.overrides.values())
        ):
            self._daily = DailyQuotas(settings.redis_url, timeout=self.limits.redis_timeout_seconds)

    # --- life cycle ---------------------------------------------------------

    @property
    def redis_healthy(self) -> bool:
        """True while the limits are shared through Redis (False without a Redis URL)."""
        return self._redis is not None and self._healthy

    async def start(self) -> None:
        if self.redis_url is None:
            return
        self._redis = RedisLimits(self.redis_url, timeout=self.limits.redis_timeout_seconds)
        try:
            await self._redis.ping()
        except REDIS_ERRORS as exc:
            self._down(exc)
        else:
            self._healthy = True
            log.info("rate limits shared through Redis")
        self._task = asyncio.get_running_loop().create_task(self._maintain())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._background:
            await asyncio.wait(set(self._background), timeout=self.limits.redis_timeout_seconds)
        if self._redis is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await self._redis.close()
        if self._daily is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await self._daily.close()

    def connection_guard(self) -> ConnectionGuard:
        return ConnectionGuard(self.limits, self._clock)

    # --- limits -------------------------------------------------------------

    async def admit_connection(self, address: str | None) -> Refusal | Slot | None:
        """At the handshake, before any token work: the address's failed
        authentications and 4429 closes, its connect rate, its concurrent
        connections.

        Returns a Refusal (answer HTTP 429 with ``Retry-After``), or the Slot
        to release when the connection ends (None when the address is unknown).
        """
        if address is None:
            return None
        limits = self.limits
        refusal = _refusal(
            "auth_failures",
            await self._bucket(
                "authfail",
                address,
                limits.auth_failures_per_minute_per_address / 60.0,
                limits.auth_failures_burst,
                peek=True,
            ),
        )
        if refusal is None:
            refusal = _refusal(
                "strikeouts",
                await self._bucket(
                    "strikeout",
                    address,
                    limits.strikeouts_per_minute_per_address / 60.0,
                    limits.strikeouts_burst,
                    peek=True,
                ),
            )
        if refusal is None:
            refusal = _refusal(
                "connects",
                await self._bucket(
                    "connect",
                    address,
                    limits.connects_per_second_per_address,
                    limits.connects_burst,
                ),
            )
        if refusal is not None:
            return refusal
        return await self._acquire(
            "address", address, limits.max_connections_per_address, "connections_per_address"
        )

    async def record_auth_failure(self, address: str | None) -> None:
        """A token from ``address`` was refused (handshake header or auth frame)."""
        if address is not None:
            limits = self.limits
            await self._bucket(
                "authfail",
                address,
                limits.auth_failures_per_minute_per_address / 60.0,
                limits.auth_failures_burst,
            )

    async def record_strikeout(self, address: str | None) -> None:
        """A connection from ``address`` was closed with 4429.

        A flooder that reconnects at once would cost a handshake, a token
        check and a read of its flood per connection; past a few strikeouts
        its address is refused at the handshake instead, for a while.
        """
        if address is not None:
            limits = self.limits
            await self._bucket(
                "strikeout",
                address,
                limits.strikeouts_per_minute_per_address / 60.0,
                limits.strikeouts_burst,
            )

    async def admit_user(self, user: str) -> Refusal | Slot:
        """After authentication: the user's concurrent connections (close 1008 when full)."""
        return await self._acquire(
            "user", user, self.limits.max_connections_per_user, "connections_per_user"
        )

    async def take_publish(self, user: str, rule: Rule) -> Refusal | None:
        """One publish by ``user`` on ``rule``; no limit when the rule sets none."""
        rate, burst = rule.limits.publish_per_second, rule.limits.burst
        if rate is None:
            return None
        decision = await self._bucket("publish", f"{rule.label}:{user}", rate, burst or 1)
        return _refusal("publish", decision)

    async def take_presence(self, user: str) -> Refusal | None:
        """One presence request by ``user`` (shared across processes with Redis)."""
        limits = self.limits
        decision = await self._bucket(
            "presence", user, limits.presence_per_second, limits.presence_burst
        )
        return _refusal("presence", decision)

    # --- tenant quotas (gateway/limits/tenants.py) -----------------------------

    def tenant_of(self, principal: Principal) -> str | None:
        return self.tenants.tenant_of(principal.claims)

    def tenant_label(self, tenant: str) -> str:
        """The metric label of ``tenant``: bounded to the configured tenants plus "other"."""
        return tenant if tenant in self.tenants.overrides else "other"

    async def admit_tenant(self, principal: Principal) -> Refusal | Slot | None:
        """The tenant's concurrent connections; None: no tenant or no such cap."""
        tenant = self.tenant_of(principal)
        if tenant is None:
            return None
        cap = self.tenants.quota_for(tenant).connections
        if cap is None:
            return None
        return await self._tenant_lease("tenant", tenant, cap, "tenant_connections")

    async def take_tenant_subscription(self, principal: Principal) -> Refusal | Slot | None:
        """One subscription of the tenant (a lease until unsubscribe or close)."""
        tenant = self.tenant_of(principal)
        if tenant is None:
            return None
        cap = self.tenants.quota_for(tenant).subscriptions
        if cap is None:
            return None
        return await self._tenant_lease("tenant-subscription", tenant, cap, "tenant_subscriptions")

    async def take_tenant_publish(self, principal: Principal) -> Refusal | None:
        """One publish of the tenant: its token bucket, then its messages per day."""
        tenant = self.tenant_of(principal)
        if tenant is None:
            return None
        quota = self.tenants.quota_for(tenant)
        if quota.publish_per_second is not None:
            refusal = _refusal(
                "tenant_publish",
                await self._bucket(
                    "tenant-publish", tenant, quota.publish_per_second, quota.burst or 1
                ),
            )
            if refusal is not None:
                self._tenant_refused(tenant, "publish")
                return refusal
        if quota.messages_per_day is not None and self._daily is not None:
            wait = await self._daily.hit(tenant, quota.messages_per_day)
            if wait is not None:
                self._tenant_refused(tenant, "messages_per_day")
                per_day = quota.messages_per_day
                self._tenant_seen(tenant, "messages_per_day", per_day, per_day)
                return Refusal("tenant_messages_per_day", wait)
            used = await self._daily.used(tenant, quota.messages_per_day)
            self._tenant_seen(tenant, "messages_per_day", used, quota.messages_per_day)
        return None

    async def _tenant_lease(self, kind: str, tenant: str, cap: int, limit: str) -> Refusal | Slot:
        quota = "connections" if kind == "tenant" else "subscriptions"
        acquired, count = await self._acquire_counted(kind, tenant, cap, limit)
        if isinstance(acquired, Refusal):
            self._tenant_refused(tenant, quota)
            self._tenant_seen(tenant, quota, cap, cap)
            return acquired
        self._tenant_seen(tenant, quota, count, cap)
        return acquired

    def tenant_gauges(self) -> list[tuple[str, str, int, int | None]]:
        """(tenant label, quota, leases this process holds, cap or None) for the metrics.

        Summed over processes these are the tenant's shared use; the cap is
        given for the configured tenants only ("other" is many tenants).
        """
        held: dict[tuple[str, str], int] = {}
        for (kind, key), members in self._held.items():
            if kind in ("tenant", "tenant-subscription"):
                quota = "connections" if kind == "tenant" else "subscriptions"
                row = (self.tenant_label(key), quota)
                held[row] = held.get(row, 0) + len(members)
        rows: list[tuple[str, str, int, int | None]] = []
        for name, q in sorted(self.tenants.overrides.items()):
            for quota, cap in (("connections", q.connections), ("subscriptions", q.subscriptions)):
                if cap is not None:
                    rows.append((name, quota, held.pop((name, quota), 0), cap))
        for (name, quota), count in sorted(held.items()):
            rows.append((name, quota, count, None))
        return rows

    def _tenant_refused(self, tenant: str, quota: str) -> None:
        key = (self.tenant_label(tenant), quota)
        self.tenant_refusals[key] = self.tenant_refusals.get(key, 0) + 1

    def _tenant_seen(self, tenant: str, quota: str, used: int, cap: int) -> None:
        """Record the tenant's use; log once when it passes ``warn_ratio`` of the cap."""
        if quota == "messages_per_day":
            self.tenant_usage[(self.tenant_label(tenant), quota)] = used / cap
        key = (tenant, quota)
        if self.tenants.near_cap(used, cap):
            if key not in self._near and len(self._near) < 10_000:
                self._near.add(key)
                # The audit stream's logger: one line per tenant and quota
                # crossing, not one per request (cleared when use falls back).
                log.warning(
                    "tenant %s near its %s cap: %d of %d",
                    tenant,
                    quota,
                    used,
                    cap,
                    extra={"event": "tenant_near_cap", "tenant": tenant, "quota": quota},
                )
        else:
            self._near.discard(key)

    def release(self, slot: Slot | None) -> None:
        """Give back a lease (idempotent); Redis is told in the background."""
        if slot is None:
            return
        for linked in slot.linked:
            self.release(linked)
        members = self._held.get((slot.kind, slot.key))
        if members is None or slot.member not in members:
            return
        members.discard(slot.member)
        if not members:
            del self._held[(slot.kind, slot.key)]
        if self.redis_healthy:
            assert self._redis is not None
            task = asyncio.get_running_loop().create_task(
                self._redis_release(self._redis.key(slot.kind, slot.key), slot.member)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def held(self, kind: str, key: str) -> int:
        """Leases of ``key`` this process holds (for tests and metrics)."""
        return len(self._held.get((kind, key), ()))

    # --- storage ------------------------------------------------------------

    async def _bucket(
        self, kind: str, key: str, rate: float, burst: float, *, peek: bool = False
    ) -> tuple[bool, float]:
        if self._redis is not None and self._healthy:
            try:
                return await self._redis.take(self._redis.key(kind, key), rate, burst, peek=peek)
            except REDIS_ERRORS as exc:
                self._down(exc)
        table = self._tables.get(kind)
        if table is None:
            table = self._tables[kind] = BucketTable(self.limits.bucket_table_size)
        now = self._clock()
        if peek:
            return table.check(key, rate, burst, now)
        return table.take(key, rate, burst, now)

    async def _acquire(self, kind: str, key: str, maximum: int, limit: str) -> Refusal | Slot:
        return (await self._acquire_counted(kind, key, maximum, limit))[0]

    async def _acquire_counted(
        self, kind: str, key: str, maximum: int, limit: str
    ) -> tuple[Refusal | Slot, int]:
        """A lease, and how many leases of ``key`` are held with it (shared with Redis)."""
        member = next(self._members)
        members = self._held.setdefault((kind, key), set())
        admitted: bool | None = None
        count = len(members) + 1
        if self._redis is not None and self._healthy:
            try:
                count = await self._redis.acquire_count(self._redis.key(kind, key), member, maximum)
                admitted = count > 0
            except REDIS_ERRORS as exc:
                self._down(exc)
        if admitted is None:
            admitted = len(members) < maximum
        if not admitted:
            if not members:
                del self._held[(kind, key)]
            return Refusal(limit, CAP_RETRY_AFTER_SECONDS), maximum
        members.add(member)
        return Slot(kind, key, member), count

    async def _redis_release(self, key: str, member: str) -> None:
        assert self._redis is not None
        try:
            await self._redis.release(key, member)
        except REDIS_ERRORS as exc:
            self._down(exc)  # the lease lapses by itself

    def _down(self, exc: BaseException) -> None:
        if self._healthy or self.redis_failures == 0:
            self.redis_failures += 1
            log.warning(
                "Redis for rate limits unreachable (%s): limiting locally in this process "
                "until it answers again",
                type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}",
            )
        self._healthy = False

    async def _maintain(self) -> None:
        """Probe Redis while it is down; renew this process's leases while it is up."""
        assert self._redis is not None
        renewed = self._clock()
        while True:
            await asyncio.sleep(PROBE_INTERVAL_SECONDS)
            try:
                if not self._healthy:
                    await self._redis.reset()
                    await self._redis.ping()
                    # Leases taken during the outage are counted from now on.
                    await self._redis.renew(self._leases())
                    renewed = self._clock()
                    self._healthy = True
                    log.info("Redis for rate limits answers again: limits are shared again")
                elif self._clock() - renewed >= RENEW_INTERVAL_SECONDS:
                    await self._redis.renew(self._leases())
                    renewed = self._clock()
            except REDIS_ERRORS as exc:
                if self._healthy:
                    self._down(exc)

    def _leases(self) -> list[tuple[str, str]]:
        assert self._redis is not None
        return [
            (self._redis.key(kind, key), member)
            for (kind, key), members in self._held.items()
            for member in members
        ]


def retry_after_seconds(refusal: Refusal) -> float:
    """``retry_after`` for an error frame: rounded up to the millisecond, at most an hour."""
    return math.ceil(min(3600.0, refusal.retry_after) * 1000) / 1000


def retry_after_header(refusal: Refusal) -> str:
    """An HTTP ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(retry_after_seconds(refusal))))


def rate_limited_frame(refusal: Refusal, request_id: RequestId | None = None) -> bytes:
    """The ``rate_limited`` error frame answering a refused request."""
    retry_after = retry_after_seconds(refusal)
    message = f"rate limit ({refusal.limit}) reached; retry after {retry_after:g} s"
    return error_frame("rate_limited", message, request_id, retry_after=retry_after)


def _refusal(limit: str, decision: tuple[bool, float]) -> Refusal | None:
    allowed, retry_after = decision
    return None if allowed else Refusal(limit, retry_after)
