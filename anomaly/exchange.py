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
from aio_pika.abc import AbstractConnection, AbstractExchange

from anomaly.alerts import AlertStore
from gateway.amqp_urls import connect_order, redacted
from gateway.config import split_urls

log = logging.getLogger("rabbitgate.anomaly")

PUBLISH_TIMEOUT_SECONDS = 5.0


class AlertPublisher:
    """One AMQP connection of its own; ``close`` when done.

    ``amqp_url`` may list a cluster's nodes (comma-separated, as the gateway's
    setting): a publish that fails drops the connection, and the next one
    connects to a node that answers, tried in random order (the outbox sends
    what was not confirmed again).
    """

    def __init__(self, amqp_url: str, exchange: str, connect_timeout: float = 10.0) -> None:
        self._urls = split_urls(amqp_url) or (amqp_url,)
        self._url = self._urls[0]
        self.exchange_name = exchange
        self._connect_timeout = connect_timeout
        self._connection: AbstractConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> AbstractExchange:
        async with self._lock:
            if self._exchange is None:
                if self._connection is None or self._connection.is_closed:
                    self._connection = await self._connect()
                channel = await self._connection.channel(publisher_confirms=True)
                self._exchange = await channel.declare_exchange(
                    self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
                )
            return self._exchange

    async def _connect(self) -> AbstractConnection:
        failure: Exception | None = None
        for url in connect_order(self._urls, self._url):
            try:
                connection = await aio_pika.connect(url, timeout=self._connect_timeout)
            except Exception as exc:
                log.warning("alerts: RabbitMQ node %s did not answer: %s", redacted(url), exc)
                failure = exc
                continue
            self._url = url
            return connection
        assert failure is not None
        raise failure

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
