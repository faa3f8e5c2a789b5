"""Tenant quotas on two real gateways sharing the real Redis: the caps hold across them.

Each test names a fresh tenant (a claim of the tokens), so the shared Redis
counts of one test never meet another's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.app import Gateway
from gateway.config import Settings
from gateway.limits.tenants import parse_tenant_settings
from gateway.policy.rules import load_policy_set

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"
Pair = Callable[[dict[str, Any]], Awaitable[tuple[Gateway, Gateway, str]]]


@pytest.fixture
async def two_gateways(settings: Settings, cleanup_broker: None) -> AsyncIterator[Pair]:
    """two_gateways(quota) -> two running gateways sharing Redis, and the tenant's name."""
    started: list[Gateway] = []

    async def start(quota: dict[str, Any]) -> tuple[Gateway, Gateway, str]:
        tenant = f"t{uuid.uuid4().hex[:10]}"
        tenants = parse_tenant_settings({"claim": "tenant", "overrides": {tenant: quota}})
        custom = dataclasses.replace(settings, redis_url=REDIS_URL, tenants=tenants)
        for _ in range(2):
            gw = Gateway(custom, load_policy_set(custom.policies_dir))
            await gw.start()
            started.append(gw)
            assert gw.node.limiter.redis_healthy
        return started[-2], started[-1], tenant

    yield start
    for gw in started:
        await gw.stop()


async def closed_with(gw: Gateway, client_ssl: ssl.SSLContext, token: str) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(
        f"wss://localhost:{gw.port}/ws", ssl=client_ssl, additional_headers=headers
    ) as ws:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code is not None
        return ws.close_code, ws.close_reason or ""


async def samples(gw: Gateway, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{gw.admin_port}/metrics") as response:
            text = await response.text()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = float(sample.value)
    return found


async def test_tenant_connections_cap_holds_across_two_gateways(
    two_gateways: Pair,
    connect_client: Any,
    client_ssl: ssl.SSLContext,
    make_token: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b, tenant = await two_gateways({"connections": 3})
    caplog.set_level(logging.WARNING, "rabbitgate.limits")
    # Three users of the tenant, on both gateways: the tenant's cap, not a user's.
    first = await connect_client("ann", gw=a, tenant=tenant)
    await connect_client("bob", gw=b, tenant=tenant)
    await connect_client("cat", gw=b, tenant=tenant)
    for gw in (a, b):
        code, reason = await closed_with(gw, client_ssl, make_token("dan", tenant=tenant))
        assert (code, reason) == (1008, "too many connections")
    await connect_client("dan", gw=a, tenant="another-tenant")  # other tenants unaffected
    await connect_client("eve", gw=a)  # and users of no tenant
    near = [r for r in caplog.records if getattr(r, "event", None) == "tenant_near_cap"]
    # Once per process that saw the tenant pass warn_ratio (0.8 of 3), not per request.
    assert [(r.tenant, r.quota) for r in near] == [(tenant, "connections")] * 2  # type: ignore[attr-defined]
    used = await samples(a, "rabbitgate_tenant_used")
    assert used[(("quota", "connections"), ("tenant", tenant))] == 1
    cap = await samples(b, "rabbitgate_tenant_cap")
    assert cap[(("quota", "connections"), ("tenant", tenant))] == 3
    refused = await samples(b, "rabbitgate_tenant_refusals_total")
    assert refused[(("quota", "connections"), ("tenant", tenant))] == 1
    await first.close()
    await asyncio.sleep(0.3)
    await connect_client("dan", gw=b, tenant=tenant)  # the freed lease is shared


async def test_tenant_subscriptions_cap_is_shared_and_given_back_on_unsubscribe(
    two_gateways: Pair, connect_client: Any
) -> None:
    a, b, tenant = await two_gateways({"subscriptions": 2})
    ann = await connect_client("ann", gw=a, tenant=tenant)
    bob = await connect_client("bob", gw=b, tenant=tenant)
    assert (await ann.request("subscribe", channel="chat.one"))["type"] == "ack"
    assert (await bob.request("subscribe", channel="chat.two"))["type"] == "ack"
    refused = await ann.request("subscribe", channel="chat.three")
    assert refused["type"] == "error" and refused["code"] == "rate_limited"
    assert refused["retry_after"] > 0
    assert (await bob.request("unsubscribe", channel="chat.two"))["type"] == "ack"
    await asyncio.sleep(0.3)
    assert (await ann.request("subscribe", channel="chat.three"))["type"] == "ack"
    await ann.close()  # a close gives its subscriptions' leases back
    await asyncio.sleep(0.3)
    assert (await bob.request("subscribe", channel="chat.four"))["type"] == "ack"
    assert a.node.limiter.held("tenant-subscription", tenant) == 0


async def test_tenant_publish_rate_is_one_bucket_across_two_gateways(
    two_gateways: Pair, connect_client: Any
) -> None:
    a, b, tenant = await two_gateways({"publish": "1/minute", "burst": 4})
    ann = await connect_client("ann", gw=a, tenant=tenant)
    bob = await connect_client("bob", gw=b, tenant=tenant)
    answers = []
    for i in range(6):
        client = ann if i % 2 else bob
        answers.append(await client.request("publish", channel="chat.room", data={"n": i}))
    assert [f["type"] for f in answers] == ["ack"] * 4 + ["error"] * 2
    assert all(f["code"] == "rate_limited" and f["retry_after"] > 0 for f in answers[4:])


async def test_tenant_messages_per_day_is_a_shared_window(
    two_gateways: Pair, connect_client: Any
) -> None:
    a, b, tenant = await two_gateways({"messages_per_day": 3})
    ann = await connect_client("ann", gw=a, tenant=tenant)
    bob = await connect_client("bob", gw=b, tenant=tenant)
    try:
        answers = []
        for i in range(5):
            client = ann if i % 2 else bob
            answers.append(await client.request("publish", channel="chat.room", data={"n": i}))
        assert [f["type"] for f in answers] == ["ack"] * 3 + ["error"] * 2
        # Until the UTC day ends: more than a second, at most a day.
        assert all(1 <= f["retry_after"] <= 3600 for f in answers[3:])
        assert "tenant_messages_per_day" in answers[3]["message"]
        ratio = await samples(a, "rabbitgate_tenant_day_ratio")
        assert ratio[(("tenant", tenant),)] == 1.0
    finally:
        daily = a.node.limiter._daily  # noqa: SLF001 - the test's own window, cleared
        assert daily is not None
        await daily.clear(tenant, 3)


def test_a_bad_tenants_section_is_a_one_line_config_error(tmp_path: Any) -> None:
    from gateway.config import ConfigError, load_settings

    config = tmp_path / "gateway.yaml"
    config.write_text("tenants:\n  claim: tenant\n  default: {publish: fast}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config, environ={}, check_jwt=False)
    assert str(caught.value) == 'tenants.default.publish: must be a rate such as "100/second"'
    assert "\n" not in str(caught.value)
    assert orjson.dumps(str(caught.value))  # plain text
