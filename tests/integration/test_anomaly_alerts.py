"""The anomaly detector on a real gateway: alerts on the real RabbitMQ with the
contract's body, durable across a restart, and each response (ban, throttle)
enforced on live connections."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from typing import Any

import aio_pika
import pytest
from websockets.exceptions import InvalidStatus

from gateway.config import Settings

from .anomaly_helpers import (
    closed_with,
    next_alert,
    open_ws,
    scan_channels,
    user_alert_for,
    welcome,
)

pytestmark = pytest.mark.integration

SPEC_KEYS = {
    "id",
    "created_at",
    "severity",
    "score",
    "subject",
    "window",
    "features",
    "reasons",
    "status",
    "resolution",
    "reviewer",
    "note",
    "actions",
}


async def test_an_alert_reaches_a_consumer_with_the_contract_body_and_again_on_review(
    anomaly_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], Any],
    alert_queue: aio_pika.abc.AbstractQueue,
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> None:
    gateway = await start_gateway(anomaly_settings())
    ws = await open_ws(gateway.port, client_ssl, make_token("mallory"), "127.0.5.1")
    await welcome(ws)
    await scan_channels(ws, 40)
    decisions = await gateway.anomaly.detector.tick()
    flagged = {(d.window.subject_kind, d.window.key) for d in decisions if d.flagged}
    assert ("user", "mallory") in flagged and ("address", "127.0.5.1") in flagged

    published: dict[str, tuple[str, dict]] = {}
    for _ in range(2):
        routing_key, body = await next_alert(alert_queue)
        published[body["subject"]["kind"]] = (routing_key, body)
    routing_key, body = published["user"]
    assert set(body) >= SPEC_KEYS
    assert routing_key == f"alert.{body['severity']}"
    assert body["severity"] in ("low", "medium", "high", "critical")
    assert 0 < body["score"] <= 1
    assert body["subject"]["user"] == "mallory" and body["subject"]["address"] == "127.0.5.1"
    assert body["features"]["denials"] == 40
    assert body["reasons"][0]["feature"] in ("denials", "distinct_channels")
    assert "above 99% of normal windows" in body["reasons"][0]["text"]
    assert {"feature", "value", "baseline_p99", "text"} <= set(body["reasons"][0])
    assert (body["status"], body["resolution"], body["reviewer"], body["note"]) == (
        "open",
        None,
        None,
        None,
    )
    assert body["actions"] == ["recorded"]
    assert body["window"]["start"] < body["window"]["end"]

    detector = gateway.anomaly.detector
    await asyncio.to_thread(detector.store.review, body["id"], "acknowledge", "sam")
    await detector.outbox.flush()
    _, again = await next_alert(alert_queue)
    assert (again["id"], again["status"], again["reviewer"]) == (body["id"], "acknowledged", "sam")
    await asyncio.to_thread(
        detector.store.review,
        body["id"],
        "close",
        "sam",
        resolution="true_positive",
        note="scanning inboxes",
    )
    await detector.outbox.flush()
    _, closed = await next_alert(alert_queue)
    assert (closed["status"], closed["resolution"], closed["note"]) == (
        "closed",
        "true_positive",
        "scanning inboxes",
    )
    await ws.close()


async def test_alerts_and_the_model_survive_a_gateway_restart(
    anomaly_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], Any],
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> None:
    settings = anomaly_settings()
    gateway = await start_gateway(settings)
    ws = await open_ws(gateway.port, client_ssl, make_token("mallory"), "127.0.5.1")
    await welcome(ws)
    await scan_channels(ws, 40)
    await gateway.anomaly.detector.tick()
    before = await user_alert_for(gateway, "mallory")
    await ws.close()
    await gateway.stop()

    again = await start_gateway(settings)
    detector = again.anomaly.detector
    assert not detector.learning  # the saved model was loaded, no new warm-up
    after = await user_alert_for(again, "mallory")
    assert after == before


async def test_ban_closes_live_connections_with_4403_and_refuses_new_ones(
    anomaly_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], Any],
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> None:
    ban = {f"response_{s}": "ban" for s in ("low", "medium", "high", "critical")}
    gateway = await start_gateway(anomaly_settings(**ban))
    token = make_token("mallory")
    scanner = await open_ws(gateway.port, client_ssl, token, "127.0.6.1")
    other_device = await open_ws(gateway.port, client_ssl, token, "127.0.6.2")
    bystander = await open_ws(gateway.port, client_ssl, make_token("alice"), "127.0.6.3")
    for ws in (scanner, other_device, bystander):
        await welcome(ws)
    await scan_channels(scanner, 40)
    await gateway.anomaly.detector.tick()

    assert await closed_with(scanner) == 4403
    assert await closed_with(other_device) == 4403  # every connection of the user
    alert = await user_alert_for(gateway, "mallory")
    assert alert["actions"][:2] == ["recorded", "banned user mallory for 3600 s"]
    # The address's alert and the user's each close what the other has not closed
    # already (which comes first depends on their scores): two connections in all.
    store = gateway.anomaly.detector.store
    about_address = await asyncio.to_thread(store.find, subject="127.0.6.1")
    closed = [
        action
        for found in (alert, *(a for a in about_address if a["subject"]["kind"] == "address"))
        for action in found["actions"]
        if action.startswith("closed ")
    ]
    assert sorted(closed) in (
        ["closed 0 connections with 4403", "closed 2 connections with 4403"],
        ["closed 1 connection with 4403", "closed 1 connection with 4403"],
    )
    # The user, from a fresh address: authenticated, then closed with 4403.
    retry = await open_ws(gateway.port, client_ssl, token, "127.0.6.9")
    assert await closed_with(retry) == 4403
    # The scanning address, whoever connects from it: refused with HTTP 403.
    with pytest.raises(InvalidStatus) as refused:
        await open_ws(gateway.port, client_ssl, make_token("carol"), "127.0.6.1")
    assert refused.value.response.status_code == 403
    # Nobody else is affected.
    await bystander.send(json.dumps({"type": "ping", "id": 1}))
    assert json.loads(await asyncio.wait_for(bystander.recv(), 5))["type"] == "pong"

    # Closing the alert as a false positive lifts the ban.
    detector = gateway.anomaly.detector
    await asyncio.to_thread(
        detector.store.review,
        alert["id"],
        "close",
        "sam",
        resolution="false_positive",
        note="pen test, agreed",
    )
    await detector.sync_restrictions()
    back = await open_ws(gateway.port, client_ssl, token, "127.0.6.9")
    await welcome(back)
    await back.close()
    await bystander.close()


async def test_throttle_makes_the_subjects_publishes_rate_limited(
    anomaly_settings: Callable[..., Settings],
    start_gateway: Callable[[Settings], Any],
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> None:
    throttle = {f"response_{s}": "throttle" for s in ("low", "medium", "high", "critical")}
    gateway = await start_gateway(anomaly_settings(throttle_per_second=1.0, **throttle))
    ws = await open_ws(gateway.port, client_ssl, make_token("mallory"), "127.0.7.1")
    await welcome(ws)
    await scan_channels(ws, 40)
    await gateway.anomaly.detector.tick()
    alert = await user_alert_for(gateway, "mallory")
    assert alert["actions"][1] == "throttled user mallory to 1 requests/s for 600 s"
    for n in range(3):
        await ws.send(
            json.dumps({"type": "publish", "id": f"p{n}", "channel": "chat.lobby", "data": n})
        )
    answers = {}
    while len(answers) < 3:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if str(frame.get("id", "")).startswith("p"):
            answers[frame["id"]] = frame
    assert answers["p0"]["type"] == "ack"
    assert answers["p1"]["code"] == "rate_limited" and answers["p2"]["code"] == "rate_limited"
    await ws.close()
