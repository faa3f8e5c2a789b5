"""The admin listener on a real gateway: /metrics moving with real traffic,
/healthz, /readyz through a broker outage."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.app import Gateway
from gateway.config import Settings
from gateway.policy.rules import PolicySet, load_policy_set

pytestmark = pytest.mark.integration


async def admin_get(gateway: Gateway, path: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{gateway.admin_port}{path}") as response:
            return response.status, response.content_type, await response.text()


async def scrape(gateway: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, _, text = await admin_get(gateway, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until(check: Callable[[], Any], what: str, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def refused(gateway: Gateway, client_ssl: Any, token: str) -> None:
    with pytest.raises(InvalidStatus) as caught:
        await connect(
            f"wss://localhost:{gateway.port}/ws",
            ssl=client_ssl,
            additional_headers={"Authorization": f"Bearer {token}"},
        )
    assert caught.value.response.status_code == 401


async def test_metrics_follow_real_traffic(
    gateway: Gateway,
    connect_client: Any,
    make_token: Callable[..., str],
    client_ssl: Any,
    exchange_prefix: str,
) -> None:
    chat = f"{exchange_prefix}.chat"
    before = await scrape(gateway)
    assert value(before, "rabbitgate_broker_connected") == 1
    digest = gateway.node.policies.digest
    assert value(before, "rabbitgate_policy_set_info", digest=digest) == 1

    alice = await connect_client("alice")
    bob = await connect_client("bob")
    await alice.request("subscribe", channel="chat.metrics")
    for i in range(3):
        assert (await bob.request("publish", channel="chat.metrics", data=i))["type"] == "ack"
    assert [m["data"] for m in await alice.messages_until(3)] == [0, 1, 2]
    denied = await alice.request("publish", channel="user.bob.inbox", data="x")
    assert denied["code"] == "forbidden"
    hit = gateway.node.policies.rule_for("user.bob.inbox")
    assert hit is not None
    rule = hit[0]
    await refused(gateway, client_ssl, make_token("mallory") + "x")  # bad signature
    await refused(gateway, client_ssl, make_token("mallory", ttl=-60))  # expired

    after = await scrape(gateway)
    assert value(after, "rabbitgate_connections_open", transport="websocket") == 2
    opened = "rabbitgate_connections_opened_total"
    assert (
        value(after, opened, transport="websocket") - value(before, opened, transport="websocket")
        == 4
    )
    failures = "rabbitgate_auth_failures_total"
    assert value(after, failures, reason="bad_signature") == 1
    assert value(after, failures, reason="expired") == 1
    denials = "rabbitgate_authorization_denials_total"
    assert value(after, denials, action="publish", rule=rule.label) == 1
    assert value(after, "rabbitgate_messages_in_total", exchange=chat) == 3
    assert value(after, "rabbitgate_messages_out_total", exchange=chat) == 3
    assert value(after, "rabbitgate_publish_confirm_seconds_count") == 3
    assert value(after, "rabbitgate_delivery_latency_seconds_count") == 3
    assert value(after, "rabbitgate_subscriptions") == 1
    assert value(after, "rabbitgate_send_buffer_bytes_bucket", le="+Inf") == 2

    await bob.close()

    async def bob_counted() -> bool:
        samples = await scrape(gateway)
        return value(samples, "rabbitgate_connections_closed_total", code="1000") == 1

    await until(bob_counted, "the closed connection to be counted")
    final = await scrape(gateway)
    assert value(final, "rabbitgate_connections_open", transport="websocket") == 1


async def test_alerts_and_policy_reloads_are_exposed(gateway: Gateway) -> None:
    gateway.metrics.alerts_total.labels(severity="high").inc()
    assert await gateway.reloader.reload("test") is True
    samples = await scrape(gateway)
    assert value(samples, "rabbitgate_alerts_total", severity="high") == 1
    assert value(samples, "rabbitgate_policy_reloads_total", result="ok") == 1
    assert value(samples, "rabbitgate_policy_last_reload_failed") == 0


async def test_healthz_answers_while_the_process_lives(gateway: Gateway) -> None:
    status, content_type, body = await admin_get(gateway, "/healthz")
    assert (status, content_type) == (200, "application/json")
    assert body == '{"status": "ok"}'


async def test_readyz_is_503_while_the_broker_connection_is_down(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    status, _, body = await admin_get(gateway, "/readyz")
    assert status == 200 and gateway.node.policies.digest in body

    broker = gateway.node.broker
    real_url = broker._url
    # Reconnects go nowhere until the URL is given back: the outage lasts.
    monkeypatch.setattr(broker, "_url", "amqp://guest:guest@127.0.0.1:9/")
    assert broker._connection is not None
    await broker._connection.close()
    status, content_type, body = await admin_get(gateway, "/readyz")
    assert (status, content_type) == (503, "application/json")
    assert body == '{"status": "unavailable", "reason": "broker not connected"}'
    assert value(await scrape(gateway), "rabbitgate_broker_connected") == 0
    await asyncio.sleep(1.5)  # failed reconnects meanwhile change nothing
    assert (await admin_get(gateway, "/readyz"))[0] == 503

    monkeypatch.setattr(broker, "_url", real_url)

    async def ready() -> bool:
        return (await admin_get(gateway, "/readyz"))[0] == 200

    await until(ready, "readiness after the broker came back", timeout=30)
    assert value(await scrape(gateway), "rabbitgate_broker_connected") == 1


async def test_readyz_is_503_without_policy_rules(settings: Settings) -> None:
    empty = Gateway(settings, PolicySet([]))
    await empty.start()
    try:
        status, _, body = await admin_get(empty, "/readyz")
        assert status == 503 and "no policy rules loaded" in body
    finally:
        await empty.stop()


async def test_each_gateway_has_its_own_port_registry_and_extra_routes(
    gateway: Gateway, connect_client: Any, settings: Settings
) -> None:
    other = Gateway(
        dataclasses.replace(settings, sse_port=None), load_policy_set(settings.policies_dir)
    )

    async def review(request: web.Request) -> web.Response:
        return web.Response(text="review page")

    other.admin_app.router.add_get("/review", review)  # as the alert-review page will
    await other.start()
    try:
        assert other.admin_port != gateway.admin_port and other.sse_port is None
        await connect_client("alice")
        assert value(await scrape(gateway), "rabbitgate_connections_open", transport="websocket")
        assert not value(await scrape(other), "rabbitgate_connections_open", transport="websocket")
        assert await admin_get(other, "/review") == (200, "text/plain", "review page")
        assert (await admin_get(gateway, "/review"))[0] == 404
    finally:
        await other.stop()
