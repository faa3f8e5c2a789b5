"""Messages per tenant per day, as windows in the real Redis (``limits``), shared."""

from __future__ import annotations

import uuid

import pytest

from gateway.limits.quota_windows import DailyQuotas

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"


async def test_two_processes_share_one_day_window() -> None:
    tenant = f"t{uuid.uuid4().hex[:8]}"
    prefix = f"rgtest-{uuid.uuid4().hex[:8]}"
    a = DailyQuotas(REDIS_URL, timeout=1.0, prefix=prefix)
    b = DailyQuotas(REDIS_URL, timeout=1.0, prefix=prefix)
    try:
        answers = [await (a if i % 2 else b).hit(tenant, 5) for i in range(7)]
        assert answers[:5] == [None] * 5
        assert all(wait is not None and 1.0 <= wait <= 86_400 for wait in answers[5:])
        assert await a.used(tenant, 5) == 5
        assert a.fallbacks == b.fallbacks == 0
    finally:
        await a.clear(tenant, 5)
        await a.close()
        await b.close()


async def test_redis_down_counts_in_memory_and_never_raises() -> None:
    quotas = DailyQuotas("redis://127.0.0.1:1/0", timeout=0.2)
    tenant = f"t{uuid.uuid4().hex[:8]}"
    assert [await quotas.hit(tenant, 2) for _ in range(3)][:2] == [None, None]
    assert await quotas.hit(tenant, 2) is not None
    assert quotas.fallbacks == 4
    await quotas.close()
