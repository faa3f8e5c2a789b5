"""Tenant quotas on two real gateways sharing the real Redis: the caps hold across them,
and across transports: WebSocket (JSON), SSE and STOMP connections, subscriptions
and publishes all count against the same caps, each refused its own way
(docs/operators.md "Tenant quotas", docs/stomp.md "Limits").

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
from tests.integration.stomp_wire import StompWire, frame, open_wire

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


# --- SSE and STOMP count against the same caps --------------------------------------

SseFn = Callable[..., Awaitable[aiohttp.ClientResponse]]
StompFn = Callable[..., Awaitable[StompWire]]


@pytest.fixture
async def open_sse(client_ssl: ssl.SSLContext, make_token: Any) -> AsyncIterator[SseFn]:
    """open_sse(gw, sub, tenant, *channels) -> the response (a stream when 200)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        opened: list[aiohttp.ClientResponse] = []

        async def open_stream(
            gw: Gateway, sub: str, tenant: str, *channels: str
        ) -> aiohttp.ClientResponse:
            response = await http.get(
                f"https://localhost:{gw.sse_port}/events",
                params=[("channel", channel) for channel in channels],
                headers={"Authorization": f"Bearer {make_token(sub, tenant=tenant)}"},
                ssl=client_ssl,
            )
            opened.append(response)
            return response

        yield open_stream
        for response in opened:
            response.close()


@pytest.fixture
def open_stomp(client_ssl: ssl.SSLContext, make_token: Any) -> StompFn:
    """open_stomp(gw, sub, tenant) -> the wire after CONNECT (CONNECTED or ERROR unread)."""

    async def open_conversation(gw: Gateway, sub: str, tenant: str) -> StompWire:
        wire = await open_wire(gw.port, client_ssl)
        await wire.send(
            frame(
                "CONNECT",
                accept_version="1.2",
                host="/",
                passcode=make_token(sub, tenant=tenant),
                heart_beat="0,0",
            )
        )
        return wire

    return open_conversation


async def stomp_connected(open_stomp: StompFn, gw: Gateway, sub: str, tenant: str) -> StompWire:
    wire = await open_stomp(gw, sub, tenant)
    answer = await wire.recv()
    assert answer.command == "CONNECTED", (answer.headers, answer.body)
    return wire


async def sse_refused(response: aiohttp.ClientResponse) -> tuple[int, str, int]:
    """(status, the JSON error, Retry-After) of a refused SSE request."""
    body = orjson.loads(await response.read())
    return response.status, body["error"], int(response.headers["Retry-After"])


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not await check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_sse_streams_count_against_the_tenant_connections_cap(
    two_gateways: Pair,
    connect_client: Any,
    client_ssl: ssl.SSLContext,
    make_token: Any,
    open_sse: SseFn,
) -> None:
    a, b, tenant = await two_gateways({"connections": 2})
    await connect_client("ann", gw=a, tenant=tenant)
    stream = await open_sse(b, "bob", tenant, "chat.one")
    assert stream.status == 200
    # Full: another stream is refused before it starts, on either process ...
    for gw in (a, b):
        refused = await open_sse(gw, "cat", tenant, "chat.one")
        status, error, retry_after = await sse_refused(refused)
        assert (status, error) == (429, "too many requests (tenant_connections)")
        assert retry_after >= 1
    # ... and so is a WebSocket: the stream holds one of the two.
    code, reason = await closed_with(a, client_ssl, make_token("dan", tenant=tenant))
    assert (code, reason) == (1008, "too many connections")
    assert (await open_sse(a, "eve", "another-tenant", "chat.one")).status == 200
    stream.close()  # the stream's lease is given back when it ends

    async def admitted() -> bool:
        response = await open_sse(a, "cat", tenant, "chat.one")
        response.close()
        return response.status == 200

    await eventually(admitted, "the stream's connection lease to come back")


async def test_sse_channels_count_against_the_tenant_subscriptions_cap(
    two_gateways: Pair, connect_client: Any, open_sse: SseFn
) -> None:
    a, b, tenant = await two_gateways({"subscriptions": 3})
    ann = await connect_client("ann", gw=a, tenant=tenant)
    assert (await ann.request("subscribe", channel="chat.one"))["type"] == "ack"
    stream = await open_sse(b, "bob", tenant, "chat.two", "chat.three")  # one per channel
    assert stream.status == 200
    assert b.node.limiter.held("tenant-subscription", tenant) == 2
    status, error, retry_after = await sse_refused(await open_sse(a, "cat", tenant, "chat.four"))
    assert (status, error) == (429, "too many requests (tenant_subscriptions)")
    assert retry_after >= 1
    refused = await ann.request("subscribe", channel="chat.four")
    assert refused["type"] == "error" and refused["code"] == "rate_limited"
    stream.close()

    async def given_back() -> bool:  # a release reaches Redis in the background
        return await shared_subscriptions(a, tenant) == 1

    await eventually(given_back, "the stream's subscription leases to come back")
    # Two are free: a stream of three channels gets the first two and is refused
    # at the third, and gives the two back (no lease leaks from a refused stream).
    status, error, _ = await sse_refused(
        await open_sse(a, "cat", tenant, "chat.five", "chat.six", "chat.seven")
    )
    assert (status, error) == (429, "too many requests (tenant_subscriptions)")
    assert a.node.limiter.held("tenant-subscription", tenant) == 1  # ann's chat.one only
    assert (await ann.request("subscribe", channel="chat.five"))["type"] == "ack"
    assert (await ann.request("subscribe", channel="chat.six"))["type"] == "ack"


async def shared_subscriptions(gw: Gateway, tenant: str) -> int:
    """The tenant's subscription leases in the shared Redis (every process's)."""
    store = gw.node.limiter._redis  # noqa: SLF001 - read the real shared count
    assert store is not None
    return int(await store.client.zcard(store.key("tenant-subscription", tenant)))


async def test_stomp_connections_count_against_the_tenant_connections_cap(
    two_gateways: Pair,
    connect_client: Any,
    client_ssl: ssl.SSLContext,
    make_token: Any,
    open_sse: SseFn,
    open_stomp: StompFn,
) -> None:
    a, b, tenant = await two_gateways({"connections": 2})
    ann = await stomp_connected(open_stomp, a, "ann", tenant)
    await connect_client("bob", gw=b, tenant=tenant)
    for gw in (a, b):
        refused = await open_stomp(gw, "cat", tenant)
        error = await refused.recv()
        assert error.command == "ERROR" and error.headers["message"] == "forbidden"
        assert error.text == "too many connections"
        assert await refused.closed() == 1008
    # The STOMP conversation holds a lease that the other transports see too.
    status, error_text, _ = await sse_refused(await open_sse(b, "dan", tenant, "chat.one"))
    assert (status, error_text) == (429, "too many requests (tenant_connections)")
    code, _ = await closed_with(a, client_ssl, make_token("dan", tenant=tenant))
    assert code == 1008
    await stomp_connected(open_stomp, a, "eve", "another-tenant")  # other tenants unaffected
    await ann.send(frame("DISCONNECT", receipt="bye"))
    assert (await ann.recv()).headers["receipt-id"] == "bye"
    assert await ann.closed() == 1000

    async def admitted() -> bool:
        wire = await open_stomp(b, "cat", tenant)
        answer = await wire.recv()
        await wire.ws.close()
        return answer.command == "CONNECTED"

    await eventually(admitted, "the STOMP conversation's lease to come back")


async def test_stomp_subscriptions_count_against_the_tenant_subscriptions_cap(
    two_gateways: Pair, connect_client: Any, open_stomp: StompFn
) -> None:
    a, b, tenant = await two_gateways({"subscriptions": 2})
    ann = await stomp_connected(open_stomp, a, "ann", tenant)
    await ann.send(frame("SUBSCRIBE", id="s-1", destination="/topic/chat.one", receipt="r1"))
    assert (await ann.recv()).headers["receipt-id"] == "r1"
    # A second id on the same channel is the same subscription of the gateway.
    await ann.send(frame("SUBSCRIBE", id="s-2", destination="/topic/chat.one", receipt="r2"))
    assert (await ann.recv()).headers["receipt-id"] == "r2"
    assert a.node.limiter.held("tenant-subscription", tenant) == 1
    bob = await connect_client("bob", gw=b, tenant=tenant)
    assert (await bob.request("subscribe", channel="chat.two"))["type"] == "ack"
    await ann.send(frame("SUBSCRIBE", id="s-3", destination="/topic/chat.three", receipt="r3"))
    error = await ann.recv()
    assert error.command == "ERROR" and error.headers["message"] == "rate_limited"
    assert error.headers["receipt-id"] == "r3"
    assert float(error.headers["retry-after"]) > 0
    assert "tenant_subscriptions" in error.text
    assert await ann.closed() == 1008

    # The closed conversation gave its lease back: chat.one's is free again.
    async def given_back() -> bool:  # a release reaches Redis in the background
        return await shared_subscriptions(a, tenant) == 1  # bob's chat.two

    await eventually(given_back, "the STOMP subscription lease to come back")
    assert (await bob.request("subscribe", channel="chat.three"))["type"] == "ack"
    refused = await bob.request("subscribe", channel="chat.four")
    assert refused["type"] == "error" and refused["code"] == "rate_limited"


async def test_stomp_sends_share_the_tenant_publish_bucket(
    two_gateways: Pair, connect_client: Any, open_stomp: StompFn
) -> None:
    a, b, tenant = await two_gateways({"publish": "1/minute", "burst": 3})
    watcher = await connect_client("watcher", gw=b, tenant="another-tenant")
    assert (await watcher.request("subscribe", channel="chat.room"))["type"] == "ack"
    ann = await stomp_connected(open_stomp, a, "ann", tenant)
    bob = await connect_client("bob", gw=b, tenant=tenant)
    for n in range(2):
        body = orjson.dumps({"n": n})
        await ann.send(
            frame(
                "SEND",
                body,
                destination="/topic/chat.room",
                content_type="application/json",
                receipt=f"s{n}",
            )
        )
        assert (await ann.recv()).headers["receipt-id"] == f"s{n}"
    assert (await bob.request("publish", channel="chat.room", data={"n": 2}))["type"] == "ack"
    await ann.send(
        frame(
            "SEND",
            orjson.dumps({"n": 3}),
            destination="/topic/chat.room",
            content_type="application/json",
            receipt="s3",
        )
    )
    error = await ann.recv()
    assert error.command == "ERROR" and error.headers["message"] == "rate_limited"
    assert error.headers["receipt-id"] == "s3" and float(error.headers["retry-after"]) > 0
    assert await ann.closed() == 1008
    # Nothing of the refused SEND reached RabbitMQ: a marker from another tenant
    # (its own bucket) comes right after the three that were taken.
    marker = await watcher.request("publish", channel="chat.room", data={"marker": True})
    assert marker["type"] == "ack"
    seen = [m["data"] for m in await watcher.messages_until(4)]
    assert seen == [{"n": 0}, {"n": 1}, {"n": 2}, {"marker": True}]


async def test_stomp_sends_count_in_the_tenant_messages_per_day(
    two_gateways: Pair, connect_client: Any, open_stomp: StompFn
) -> None:
    a, b, tenant = await two_gateways({"messages_per_day": 2})
    try:
        bob = await connect_client("bob", gw=b, tenant=tenant)
        assert (await bob.request("publish", channel="chat.room", data={"n": 0}))["type"] == "ack"
        ann = await stomp_connected(open_stomp, a, "ann", tenant)
        await ann.send(frame("SEND", "one", destination="/topic/chat.room", receipt="s1"))
        assert (await ann.recv()).headers["receipt-id"] == "s1"
        await ann.send(frame("SEND", "two", destination="/topic/chat.room", receipt="s2"))
        error = await ann.recv()
        assert error.command == "ERROR" and error.headers["message"] == "rate_limited"
        assert 1 <= float(error.headers["retry-after"]) <= 3600
        assert "tenant_messages_per_day" in error.text
        assert await ann.closed() == 1008
    finally:
        daily = a.node.limiter._daily  # noqa: SLF001 - the test's own window, cleared
        assert daily is not None
        await daily.clear(tenant, 2)
