"""Helpers for the anomaly integration tests: a baseline model, clients from chosen addresses."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from anomaly.features import FEATURES
from anomaly.model import MODEL_FILE, AnomalyModel
from anomaly.traffic import model_key

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
    AnomalyModel.fit(keys, contamination=0.005).save(data_dir / MODEL_FILE)


async def open_ws(
    port: int, client_ssl: ssl.SSLContext, token: str, address: str
) -> ClientConnection:
    """A WebSocket from ``address`` (any 127.x.y.z) authenticated with a header."""
    return await connect(
        f"wss://localhost:{port}/ws",
        ssl=client_ssl,
        additional_headers={"Authorization": f"Bearer {token}"},
        subprotocols=["rabbitgate.v1"],  # type: ignore[list-item]
        local_addr=(address, 0),
        max_queue=None,
    )


async def welcome(ws: ClientConnection) -> dict[str, Any]:
    frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert frame["type"] == "welcome", frame
    return dict(frame)


async def scan_channels(ws: ClientConnection, count: int) -> None:
    """Subscribe to other people's inboxes (each one refused), waiting for every answer."""
    for n in range(count):
        await ws.send(json.dumps({"type": "subscribe", "id": n, "channel": f"user.u{n}.inbox"}))
    answered = 0
    while answered < count:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if frame.get("type") == "error" and frame.get("code") == "forbidden":
            answered += 1


async def closed_with(ws: ClientConnection, timeout: float = 5) -> int | None:
    async def drain() -> None:
        try:
            async for _ in ws:
                pass
        except Exception:
            pass

    await asyncio.wait_for(drain(), timeout)
    return ws.close_code
