"""Fixtures of the anomaly tests: a real gateway with the detector on a
baseline model, and a consumer bound to the alerts exchange."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import numpy as np
import pytest

from anomaly.features import FEATURES
from anomaly.model import MODEL_FILE, AnomalyModel
from anomaly.settings import AnomalySettings
from anomaly.traffic import model_key
from gateway.app import Gateway
from gateway.config import Settings
from gateway.policy.rules import load_policy_set

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
WINDOW = 3600.0  # the timer never fires in a test: windows close with detector.tick()


def normal_baseline(n: int = 400, seed: int = 0) -> np.ndarray:
    """Windows of quiet chat users: a few publishes, one or two channels, nothing refused."""
    rng = np.random.default_rng(seed)
    idx = {name: i for i, name in enumerate(FEATURES)}
    rows = np.zeros((n, len(FEATURES)))
    publishes = rng.poisson(2, n)
    rows[:, idx["publish_rate"]] = publishes / WINDOW
    rows[:, idx["mean_payload"]] = rng.lognormal(4, 0.5, n) * (publishes > 0)
    rows[:, idx["max_payload"]] = rows[:, idx["mean_payload"]] * rng.uniform(1, 1.5, n)
    rows[:, idx["bytes_rate"]] = rows[:, idx["publish_rate"]] * rows[:, idx["mean_payload"]]
    rows[:, idx["interarrival_mean"]] = rng.uniform(10, WINDOW, n)
    rows[:, idx["interarrival_cv"]] = 1.0
    rows[:, idx["distinct_channels"]] = rng.integers(1, 3, n)
    rows[:, idx["subscribe_ratio"]] = rng.uniform(0, 1, n)
    rows[:, idx["reconnects"]] = rng.integers(0, 2, n)
    rows[:, idx["distinct_addresses"]] = 1
    rows[:, idx["distinct_users"]] = 1
    rows[:, idx["payload_entropy"]] = np.log2(np.maximum(publishes, 1))
    return rows


def save_baseline_model(data_dir: Path) -> None:
    rows = normal_baseline()
    keys = {model_key("user", WINDOW): rows, model_key("address", WINDOW): rows}
    AnomalyModel.fit(keys).save(data_dir / MODEL_FILE)


@pytest.fixture
def alerts_exchange(exchange_prefix: str) -> str:
    return f"{exchange_prefix}.alerts"


@pytest.fixture
def anomaly_settings(
    settings: Settings, tmp_path: Path, alerts_exchange: str
) -> Callable[..., Settings]:
    def make(**anomaly: Any) -> Settings:
        data_dir = tmp_path / "anomaly"
        data_dir.mkdir(exist_ok=True)
        if not (data_dir / "model.npz").exists():
            save_baseline_model(data_dir)
        values: dict[str, Any] = {
            "enabled": True,
            "data_dir": data_dir,
            "window_seconds": WINDOW,
            "long_window_windows": 0,
            "retrain_interval_seconds": 0,
            "exchange": alerts_exchange,
        }
        values.update(anomaly)
        return dataclasses.replace(
            settings, anomaly=AnomalySettings(**values), admin_port=0, sse_port=None
        )

    return make


@pytest.fixture
async def start_gateway(
    cleanup_broker: None, alerts_exchange: str
) -> AsyncIterator[Callable[[Settings], Any]]:
    started: list[Gateway] = []

    async def start(settings: Settings) -> Gateway:
        gateway = Gateway(settings, load_policy_set(settings.policies_dir))
        await gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        if gateway._server is not None:
            await gateway.stop()
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.exchange_delete(alerts_exchange)


@pytest.fixture
async def alert_queue(alerts_exchange: str) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """A consumer's queue bound to every alert (``alert.#``), as another system would."""
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        alerts_exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, "alert.#")
    yield queue
    await connection.close()
