"""One detector for the fleet (anomaly/fleet.py) on the real RabbitMQ: two gateways
with ``anomaly.fleet: true`` ship their traffic to one detector, which sees a token
used from four addresses (each gateway sees only two), alerts, and bans the user on
both gateways through ``rabbitgate.responses``."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import aiohttp
import pytest

from anomaly.fleet import FleetDetector, decode_events, encode_events
from gateway.config import Settings
from gateway.telemetry.events import TrafficEvent

from .anomaly_helpers import closed_with, open_ws, welcome

pytestmark = pytest.mark.integration
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture
async def fleet_settings(
    anomaly_settings: Callable[..., Settings], exchange_prefix: str
) -> AsyncIterator[Settings]:
    names = {
        "fleet": True,
        "traffic_exchange": f"{exchange_prefix}.traffic",
        "responses_exchange": f"{exchange_prefix}.responses",
        "detector_queue": f"{exchange_prefix}.detector",
        "response_critical": "ban",
        "response_high": "ban",
        "response_medium": "ban",
        "response_low": "ban",
    }
    yield anomaly_settings(**names)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(names["detector_queue"])
        await channel.exchange_delete(names["traffic_exchange"])
        await channel.exchange_delete(names["responses_exchange"])


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for ``condition``; fail after ``timeout`` (a bound, not a speed claim)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_one_detector_sees_a_token_used_through_two_gateways_and_bans_it_on_both(
    fleet_settings: Settings,
    start_gateway: Callable[[Settings], Any],
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> None:
    first = await start_gateway(fleet_settings)
    second = await start_gateway(fleet_settings)
    assert first.anomaly.detector is None and first.anomaly.shipper is not None
    detector = FleetDetector(fleet_settings)
    await detector.start()
    try:
        token = make_token("mallory")
        sockets = []
        for gateway, address in (
            (first, "127.0.6.1"),
            (first, "127.0.6.2"),
            (second, "127.0.6.3"),
            (second, "127.0.6.4"),
        ):
            ws = await open_ws(gateway.port, client_ssl, token, address)
            await welcome(ws)
            await ws.send(json.dumps({"type": "subscribe", "id": 1, "channel": "chat.lobby"}))
            sockets.append(ws)
        # Every gateway's authentications reached the one detector.
        await until(lambda: detector.events_received >= 8)
        await asyncio.sleep(0.2)  # the detector's own 25 ms flush to its worker
        decisions = await detector.detector.tick()
        about = [d for d in decisions if d.window.key == "mallory" and d.flagged]
        assert about and about[0].window.features["distinct_addresses"] == 4
        assert about[0].reasons[0].feature == "distinct_addresses"
        # The ban reaches both gateways and closes all four connections with 4403.
        await until(
            lambda: (
                first.node.restrictions.banned("user", "mallory")
                and second.node.restrictions.banned("user", "mallory")
            )
        )
        for ws in sockets:
            assert await closed_with(ws) == 4403
        (alert,) = [a for a in detector.detector.store.find(subject="mallory")]
        assert any("banned user mallory" in action for action in alert["actions"])
    finally:
        await detector.stop()


async def test_a_batch_that_is_not_traffic_is_refused_and_counted(
    fleet_settings: Settings,
) -> None:
    detector = FleetDetector(fleet_settings)
    await detector.start()
    try:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(fleet_settings.anomaly.traffic_exchange)
            for body in (b"not json", b'{"a": 1}', b'[["publish", 1, 2]]'):
                await exchange.publish(aio_pika.Message(body), routing_key="traffic.x")
            good = [TrafficEvent("connect", "127.0.6.9", at=1.0)]
            await exchange.publish(aio_pika.Message(encode_events(good)), routing_key="traffic.x")
        await until(lambda: detector.events_received == 1)
        assert detector.batches_refused == 3
    finally:
        await detector.stop()


def test_the_wire_format_round_trips_and_refuses_what_is_not_an_event() -> None:
    events = [
        TrafficEvent("publish", "127.0.0.1", "u\u202e<b>", "s", "chat.a", 12, None, "r", 5.5),
        TrafficEvent("auth_failed", "127.0.0.2", detail="expired", at=6.0),
    ]
    assert decode_events(encode_events(events)) == events
    for bad in (
        b'[["exec", null, null, null, null, 0, null, null, 1.0]]',
        b'[["publish", null, null, null, null, -1, null, null, 1.0]]',
        b'[["publish", null, null, null, null, 0, null, null, "now"]]',
        b'[["publish", {"a": 1}, null, null, null, 0, null, null, 1.0]]',
    ):
        with pytest.raises(ValueError):
            decode_events(bad)


async def scrape(port: int) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as answer:
            return await answer.text()


def sample(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name} not in /metrics"
    return float(found.group(1))


async def test_the_shippers_sent_and_dropped_events_are_counters_in_the_gateways_metrics(
    fleet_settings: Settings,
    start_gateway: Callable[[Settings], Any],
    client_ssl: ssl.SSLContext,
    make_token: Callable[..., str],
) -> None:
    gateway = await start_gateway(fleet_settings)
    shipper = gateway.anomaly.shipper
    ws = await open_ws(gateway.port, client_ssl, make_token("alice"), "127.0.6.20")
    await welcome(ws)
    await until(lambda: shipper.events_sent >= 2)  # connect, auth_ok
    text = await scrape(gateway.admin_port)
    assert sample(text, "rabbitgate_anomaly_traffic_events_sent_total") == shipper.events_sent
    assert sample(text, "rabbitgate_anomaly_traffic_events_dropped_total") == 0.0
    assert "# HELP rabbitgate_anomaly_traffic_events_dropped_total Traffic events dropped" in text
    assert "# TYPE rabbitgate_anomaly_traffic_events_sent_total counter" in text
    await ws.close()
    # The shipper's broker connection gone: what the gateway sees is dropped, and counted.
    assert shipper._connection is not None
    await shipper._connection.close()
    sent = shipper.events_sent
    ws = await open_ws(gateway.port, client_ssl, make_token("bob"), "127.0.6.21")
    await welcome(ws)
    # Each of bob's events is dropped while the connection is gone, or sent once
    # the shipper has reconnected (under load CI saw the reconnect win the race):
    # either way it is counted once, and /metrics says what the shipper counted.
    await until(lambda: shipper.events_dropped + (shipper.events_sent - sent) >= 2)
    await ws.close()
    dropped, now_sent = shipper.events_dropped, shipper.events_sent
    text = await scrape(gateway.admin_port)
    assert sample(text, "rabbitgate_anomaly_traffic_events_dropped_total") >= dropped
    assert sample(text, "rabbitgate_anomaly_traffic_events_sent_total") >= now_sent


async def test_a_connection_lost_under_a_publish_in_flight_leaves_the_shipper_shipping(
    fleet_settings: Settings, start_gateway: Callable[[Settings], Any]
) -> None:
    """aio-pika cancels a publish in flight when its connection closes (a
    CancelledError, not an Exception): that must cost the chunk it carried,
    counted as dropped, and never the flush loop, or every later event would
    pile up in the gateway's memory, unsent and uncounted."""
    gateway = await start_gateway(fleet_settings)
    shipper = gateway.anomaly.shipper
    emitted = 0
    for _ in range(5):  # each round: a fresh broker connection, closed mid-flush
        await shipper.stop()
        await shipper.start()
        before = shipper.events_sent + shipper.events_dropped
        sent = shipper.events_sent
        for n in range(30_000):  # 30 chunks: the flush is publishing when the close comes
            gateway.node.events.emit(TrafficEvent("publish", "127.0.6.30", "u", "s", "c", n))
        emitted += 30_000
        await until(lambda sent=sent: shipper.events_sent > sent)
        assert shipper._connection is not None
        await shipper._connection.close()
        await until(
            lambda before=before: shipper.events_sent + shipper.events_dropped - before >= 30_000
        )
        (flusher,) = shipper._tasks
        assert not flusher.done(), flusher
    # Once the connection is gone, later events are counted dropped by the same loop.
    gateway.node.events.emit(TrafficEvent("publish", "127.0.6.30", "u", "s", "c", 1))
    await until(lambda: shipper.events_sent + shipper.events_dropped >= emitted + 1)
