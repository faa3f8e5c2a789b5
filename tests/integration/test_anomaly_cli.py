"""``rabbitgate alerts list|show|ack|close`` and ``rabbitgate anomaly train``, run as
the operator runs them (a subprocess), on a real store and the real RabbitMQ."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml

from anomaly.alerts import STORE_FILE, AlertStore, make_alert
from anomaly.features import FEATURES, SubjectWindow
from anomaly.model import MODEL_FILE, AnomalyModel, Reason
from anomaly.passwords import set_reviewer
from anomaly.traffic import write_events
from gateway.telemetry.events import TrafficEvent

from .anomaly_helpers import next_alert

pytestmark = pytest.mark.integration

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def write_config(path: Path, data_dir: Path, exchange: str, amqp_url: str = AMQP_URL) -> Path:
    # `alerts ack/close --reviewer` take only names of the reviewers file.
    reviewers = path.parent / "reviewers"
    set_reviewer(reviewers, "sam", secrets.token_urlsafe(16))
    config = {
        "amqp_url": amqp_url,
        "jwt": {"secret": secrets.token_hex(32)},
        "anomaly": {
            "data_dir": str(data_dir),
            "exchange": exchange,
            "window_seconds": 5,
            "reviewers_file": str(reviewers),
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def rabbitgate(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def seeded_alert(data_dir: Path) -> dict[str, Any]:
    features = dict.fromkeys(FEATURES, 0.0)
    features["auth_failures"] = 37.0
    window = SubjectWindow(
        "address", None, "198.51.100.7", None, 1795000000.0, 1795000060.0, features
    )
    reason = Reason(
        "auth_failures",
        37.0,
        0.0,
        "authentication failures 37, above 99% of normal windows (0)",
        100.0,
    )
    alert = make_alert(window, 0.93, "critical", [reason])
    alert["actions"] = ["recorded"]
    store = AlertStore(data_dir / STORE_FILE)
    store.add(alert)
    store.mark_published(alert["id"], 1)
    store.close()
    return alert


@pytest.fixture
async def consumer(exchange_prefix: str) -> AsyncIterator[tuple[str, Any]]:
    exchange_name = f"{exchange_prefix}.alerts"
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, "alert.#")
    yield exchange_name, queue
    await channel.exchange_delete(exchange_name)
    await connection.close()


async def test_list_show_ack_close_from_the_terminal(
    tmp_path: Path, consumer: tuple[str, Any]
) -> None:
    exchange, queue = consumer
    data_dir = tmp_path / "anomaly"
    config = write_config(tmp_path / "config.yaml", data_dir, exchange)
    alert = seeded_alert(data_dir)
    c = ("--config", str(config))

    code, out, _ = await rabbitgate("alerts", "list", *c)
    assert code == 0
    assert alert["id"] in out and "address:198.51.100.7" in out and "critical" in out
    assert "authentication failures 37" in out

    code, out, _ = await rabbitgate("alerts", "show", alert["id"], *c)
    assert code == 0
    assert "why\n  - authentication failures 37, above 99% of normal windows (0)" in out
    assert "auth_failures" in out and "recorded" in out

    code, out, _ = await rabbitgate("alerts", "ack", alert["id"], "--reviewer", "sam", *c)
    assert (code, out.splitlines()[0]) == (0, f"{alert['id']} is acknowledged")
    routing_key, body = await next_alert(queue)
    assert routing_key == "alert.critical"
    assert (body["id"], body["status"], body["reviewer"], body["version"]) == (
        alert["id"],
        "acknowledged",
        "sam",
        2,
    )

    code, _, err = await rabbitgate("alerts", "ack", alert["id"], "--reviewer", "sam", *c)
    assert code == 1 and "is acknowledged: cannot acknowledge it" in err

    code, _, err = await rabbitgate(
        "alerts", "close", alert["id"], "--resolution", "true_positive", "--reviewer", "sam", *c
    )
    assert code == 2 and "--note" in err  # a closing note is required

    code, out, _ = await rabbitgate(
        "alerts",
        "close",
        alert["id"],
        "--resolution",
        "true_positive",
        "--reviewer",
        "sam",
        "--note",
        "stuffing from a known botnet range; blocked at the edge",
        *c,
    )
    assert code == 0 and "is closed" in out
    _, body = await next_alert(queue)
    assert (body["status"], body["resolution"], body["note"]) == (
        "closed",
        "true_positive",
        "stuffing from a known botnet range; blocked at the edge",
    )

    code, out, _ = await rabbitgate("alerts", "list", *c)
    assert out.strip() == "no alerts"  # the default lists open and acknowledged ones
    code, out, _ = await rabbitgate("alerts", "list", "--status", "all", "--json", *c)
    assert [json.loads(line)["status"] for line in out.splitlines()] == ["closed"]

    code, _, err = await rabbitgate("alerts", "show", "a-00000000000-00000000", *c)
    assert code == 1 and "no alert a-00000000000-00000000" in err


async def test_a_review_is_kept_for_the_gateway_when_rabbitmq_does_not_answer(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "anomaly"
    dead = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens there
    config = write_config(tmp_path / "config.yaml", data_dir, "nowhere.alerts", dead)
    alert = seeded_alert(data_dir)
    code, out, _ = await rabbitgate(
        "alerts", "ack", alert["id"], "--reviewer", "sam", "--config", str(config)
    )
    assert code == 0 and "RabbitMQ did not answer" in out
    store = AlertStore(data_dir / STORE_FILE)
    assert [(a["id"], a["status"]) for a in store.unpublished()] == [(alert["id"], "acknowledged")]
    store.close()


async def test_train_from_recorded_traffic(tmp_path: Path) -> None:
    rng = random.Random(3)
    events = []
    for second in range(300):
        for n in range(30):
            if rng.random() < 0.3:
                user, address = f"person{n}", f"10.0.0.{n}"
                events.append(
                    TrafficEvent(
                        "publish",
                        address,
                        user,
                        f"s{n}",
                        channel="chat.lobby",
                        size=rng.randint(5, 300),
                        at=1795000000.0 + second + rng.random(),
                    )
                )
    events.sort(key=lambda e: e.at)
    traffic = tmp_path / "traffic.jsonl"
    write_events(traffic, events)
    data_dir = tmp_path / "anomaly"
    config = write_config(tmp_path / "config.yaml", data_dir, "x.alerts")
    code, out, err = await rabbitgate(
        "anomaly", "train", "--traffic", str(traffic), "--config", str(config)
    )
    assert code == 0, err
    assert "user@5s" in out and "address@5s" in out and "model saved" in out
    model = AnomalyModel.load(data_dir / MODEL_FILE)
    assert {"user@5s", "address@5s"} <= set(model.keys)

    traffic.write_text('{"kind": "publish", "token": "secret"}\n')
    code, _, err = await rabbitgate(
        "anomaly", "train", "--traffic", str(traffic), "--config", str(config)
    )
    assert code == 1 and "traffic.jsonl:1" in err
