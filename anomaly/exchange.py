"""Publish alerts to the RabbitMQ topic exchange ``rabbitgate.alerts``.

Routing key ``alert.<severity>``, body the alert's JSON, persistent, with
publisher confirms. ``AlertOutbox.flush`` sends every alert version the store
has not yet seen confirmed, so an alert raised while RabbitMQ was down, or
reviewed from the CLI, goes out as soon as a publisher can reach it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractRobustConnection

from anomaly.alerts import AlertStore

log = logging.getLogger("rabbitgate.anomaly")

PUBLISH_TIMEOUT_SECONDS = 5.0


class AlertPublisher:
    """One robust AMQP connection of its own; ``close`` when done."""

    def __init__(self, amqp_url: str, exchange: str, connect_timeout: float = 10.0) -> None:
        self._url = amqp_url
        self.exchange_name = exchange
        self._connect_timeout = connect_timeout
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> AbstractExchange:
        async with self._lock:
            if self._exchange is None:
                if self._connection is None:
                    self._connection = await aio_pika.connect_robust(
                        self._url, timeout=self._connect_timeout
                    )
                channel = await self._connection.channel(publisher_confirms=True)
                self._exchange = await channel.declare_exchange(
                    self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
                )
            return self._exchange

    async def publish(self, alert: dict[str, Any]) -> None:
        """Publish and wait for the broker's confirm; raises on any failure."""
        exchange = await self._ready()
        message = aio_pika.Message(
            json.dumps(alert).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=f"{alert['id']}.{alert.get('version', 1)}",
            type="rabbitgate.alert",
        )
        try:
            await exchange.publish(
                message, routing_key=f"alert.{alert['severity']}", timeout=PUBLISH_TIMEOUT_SECONDS
            )
        except Exception:
            self._exchange = None  # declare again on a fresh channel next time
            raise

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
        self._connection = None
        self._exchange = None


class AlertOutbox:
    """The store's unpublished alert versions, sent through a publisher."""

    def __init__(self, store: AlertStore, publisher: AlertPublisher) -> None:
        self.store = store
        self.publisher = publisher
        self.failures = 0
        self._flushing = asyncio.Lock()

    async def flush(self) -> int:
        """Publish what is pending; returns how many were confirmed (stops at a failure)."""
        sent = 0
        async with self._flushing:
            while True:
                pending = await asyncio.to_thread(self.store.unpublished)
                if not pending:
                    return sent
                for alert in pending:
                    try:
                        await self.publisher.publish(alert)
                    except Exception as exc:
                        self.failures += 1
                        log.warning(
                            "alert %s not published yet (%s); it stays in the outbox",
                            alert["id"],
                            type(exc).__name__,
                        )
                        return sent
                    await asyncio.to_thread(
                        self.store.mark_published, alert["id"], int(alert["version"])
                    )
                    sent += 1
