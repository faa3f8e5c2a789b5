"""`rabbitgate serve --workers 2`: one supervisor, two workers on one port,
the real RabbitMQ and Redis. Connections land on either worker (the kernel
spreads them, SO_REUSEPORT), so the tests open enough of them that both
workers get some, and check per worker through the supervisor's /metrics."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import yaml
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.config import Settings
from rabbitgate_client import Message, RabbitgateClient

from .conftest import Client
from .fleet import Fleet, fleet_config

pytestmark = pytest.mark.integration

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


async def open_raw(port: int, token: str, tls: ssl.SSLContext) -> tuple[Client, dict[str, Any]]:
    ws = await connect(
        f"wss://localhost:{port}/ws",
        ssl=tls,
        additional_headers={"Authorization": f"Bearer {token}"},
        max_queue=None,
    )
    client = Client(ws)
    return client, await client.recv()


async def open_client(port: int, token: str, tls: ssl.SSLContext) -> Client:
    client, welcome = await open_raw(port, token, tls)
    assert welcome["type"] == "welcome", welcome
    return client


@pytest.fixture
def fleet_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "fleet"
    folder.mkdir()
    return folder


async def test_two_workers_share_one_port_and_deliver_each_others_messages(
    settings: Settings,
    fleet_dir: Path,
    make_token: Any,
    client_ssl: ssl.SSLContext,
    cleanup_broker: None,
) -> None:
    fleet = Fleet(settings, fleet_dir).start()
    try:
        status, body = fleet.ready()
        assert (status, body["workers"]) == (200, 2)
        subscribers = [
            await open_client(fleet.port, make_token(f"sub{i}"), client_ssl) for i in range(16)
        ]
        for client in subscribers:
            assert (await client.request("subscribe", channel="chat.fleet"))["type"] == "ack"
        open_now = fleet.metric("rabbitgate_connections_open", transport="websocket")
        assert set(open_now) == {"0", "1"}, open_now
        assert sum(open_now.values()) == 16
        assert min(open_now.values()) >= 1, "the kernel gave every connection to one worker"
        publisher = await open_client(fleet.port, make_token("pub"), client_ssl)
        for i in range(5):
            assert (await publisher.request("publish", channel="chat.fleet", data=i))[
                "type"
            ] == "ack"
        for client in subscribers:
            assert [m["data"] for m in await client.messages_until(5)] == [0, 1, 2, 3, 4]
        _, text = fleet.get("/metrics")
        assert 'rabbitgate_broker_connected{worker="0"} 1.0' in text
        assert 'rabbitgate_broker_connected{worker="1"} 1.0' in text
        assert "rabbitgate_worker_restarts_total" in text
        assert settings.amqp_url not in text and (settings.jwt.secret or "x") not in text
    finally:
        fleet.stop()


LIMITED_POLICY = """
version: 1
rules:
  - channel: "chat.{{room}}"
    exchange: {p}.chat
    subscribe: [role:member]
    publish: [role:member]
    limits: {{publish: 1/hour, burst: 5}}
"""


async def test_caps_and_rate_limits_hold_across_workers(
    settings: Settings,
    fleet_dir: Path,
    exchange_prefix: str,
    make_token: Any,
    client_ssl: ssl.SSLContext,
    cleanup_broker: None,
) -> None:
    policies = fleet_dir / "policies"
    policies.mkdir()
    (policies / "10-limited.yaml").write_text(LIMITED_POLICY.format(p=exchange_prefix))
    fleet = Fleet(
        settings,
        fleet_dir,
        policies_dir=str(policies),
        limits={"max_connections_per_user": 4, "auth_timeout_seconds": 2},
    ).start()
    user = f"capped-{uuid.uuid4().hex[:8]}"
    admitted: list[Client] = []
    refusals: list[int | None] = []
    try:
        # Without the shared store each worker would admit 4 (8 in all).
        for _ in range(16):
            client, refused_with = await open_counting(fleet.port, make_token(user), client_ssl)
            if client is None:
                refusals.append(refused_with)
            else:
                admitted.append(client)
        assert len(admitted) == 4
        assert refusals == [1008] * 12
        tried = fleet.metric("rabbitgate_connections_opened_total", transport="websocket")
        assert set(tried) == {"0", "1"} and min(tried.values()) >= 1, tried
        # One bucket of 5 publishes for the user on this rule, whichever worker asks.
        answers = []
        for _ in range(3):
            for client in admitted:
                answers.append(await client.request("publish", channel="chat.capped", data=1))
        kinds = [a["type"] if a["type"] == "ack" else a["code"] for a in answers]
        assert kinds.count("ack") == 5, kinds
        assert kinds.count("rate_limited") == 7, kinds
    finally:
        fleet.stop()


async def open_counting(
    port: int, token: str, tls: ssl.SSLContext
) -> tuple[Client | None, int | None]:
    """A connection and None, or None and the close code it was refused with."""
    ws = await connect(
        f"wss://localhost:{port}/ws",
        ssl=tls,
        additional_headers={"Authorization": f"Bearer {token}"},
        max_queue=None,
    )
    client = Client(ws)
    try:
        first = await client.recv()
    except ConnectionClosed:
        return None, ws.close_code
    assert first["type"] == "welcome", first
    return client, None


def digests(fleet: Fleet) -> dict[str, str]:
    _, text = fleet.get("/metrics")
    found = {}
    for line in text.splitlines():
        if line.startswith("rabbitgate_policy_set_info{"):
            labels = dict(
                part.split("=", 1)
                for part in line[line.index("{") + 1 : line.index("}")].split(",")
            )
            found[labels["worker"].strip('"')] = labels["digest"].strip('"')
    return found


async def test_sighup_reloads_every_worker_and_sigterm_drains_them_all(
    settings: Settings,
    fleet_dir: Path,
    exchange_prefix: str,
    make_token: Any,
    client_ssl: ssl.SSLContext,
    cleanup_broker: None,
) -> None:
    fleet = Fleet(settings, fleet_dir, shutdown_delay_seconds=1).start()
    try:
        before = digests(fleet)
        assert set(before) == {"0", "1"} and len(set(before.values())) == 1, before
        extra = Path(settings.policies_dir) / "20-more.yaml"
        extra.write_text(
            'version: 1\nrules:\n  - channel: "more.{x}"\n'
            f"    exchange: {exchange_prefix}.news\n    subscribe: [anyone]\n"
        )
        fleet.signal(signal.SIGHUP)
        deadline = time.monotonic() + 15
        while True:
            after = digests(fleet)
            if set(after.values()) != set(before.values()) and len(set(after.values())) == 1:
                break
            assert time.monotonic() < deadline, after
            await asyncio.sleep(0.2)
        assert set(after) == {"0", "1"}
        clients = [await open_client(fleet.port, make_token(f"u{i}"), client_ssl) for i in range(6)]
        pids = fleet.worker_pids()
        assert set(pids) == {0, 1}
        fleet.signal(signal.SIGTERM)
        # Draining: not ready at once, still serving for shutdown_delay_seconds.
        status, body = fleet.ready()
        assert status == 503 and body["reason"] == "shutting down", body
        for client in clients:
            with pytest.raises(ConnectionClosed):
                while True:
                    await client.recv(timeout=15)
            assert client.ws.close_code == 1001
        assert await asyncio.to_thread(fleet.wait, 30) == 0
        for pid in pids.values():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        fleet.stop()


async def test_a_killed_worker_is_restarted_and_its_clients_recover_on_the_others(
    settings: Settings,
    fleet_dir: Path,
    exchange_prefix: str,
    make_token: Any,
    client_ssl: ssl.SSLContext,
    cleanup_broker: None,
) -> None:
    fleet = Fleet(settings, fleet_dir).start()
    exchange = f"{exchange_prefix}.chat"
    received: dict[int, list[Any]] = {}
    lost: list[str] = []
    clients: list[RabbitgateClient] = []
    try:
        for i in range(10):
            got = received.setdefault(i, [])

            def keep(message: Message, got: list[Any] = got) -> None:
                got.append(message.data)

            client = RabbitgateClient(
                f"wss://localhost:{fleet.port}/ws",
                token=make_token(f"r{i}"),
                ssl=client_ssl,
                on_message=keep,
                on_recovery_lost=lost.append,
                backoff_base=0.1,
                backoff_cap=1.0,
            )
            await client.connect()
            await client.subscribe("chat.workerkill")
            clients.append(client)
        on_worker = fleet.metric("rabbitgate_connections_open", transport="websocket")
        assert min(on_worker.values(), default=0) >= 1 and len(on_worker) == 2, on_worker
        # Published straight to RabbitMQ with confirms: what is acked is known exactly.
        connection = await aio_pika.connect(AMQP_URL)
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        acked: list[int] = []

        async def publish(values: range) -> None:
            for value in values:
                body = json.dumps(value).encode()
                await target.publish(aio_pika.Message(body), routing_key="chat.workerkill")
                acked.append(value)
                await asyncio.sleep(0.005)

        publishing = asyncio.create_task(publish(range(600)))
        await asyncio.sleep(0.8)
        victim = fleet.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        await publishing
        await connection.close()
        deadline = time.monotonic() + 30
        while any(len(got) < len(acked) for got in received.values()):
            assert time.monotonic() < deadline, {i: len(g) for i, g in received.items()}
            await asyncio.sleep(0.1)
        assert not lost, f"recovery lost on {lost}"
        for got in received.values():
            assert got == acked, "a message is missing, doubled or out of order"
        assert sum(client.connections for client in clients) > len(clients), "nobody reconnected"
        fleet.wait_ready()
        assert fleet.metric("rabbitgate_worker_restarts_total") == {"0": 1.0, "1": 0.0}
        assert fleet.worker_pids()[0] != victim
    finally:
        for client in clients:
            await client.close()
        fleet.stop()


def run_serve(
    directory: Path, raw: dict[str, Any], secret: str
) -> subprocess.CompletedProcess[str]:
    path = directory / "refused.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITGATE_")}
    env["RABBITGATE_JWT_SECRET"] = secret
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("rabbitgate: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_fleet_set_ups_that_cannot_work_are_refused_with_one_line(
    settings: Settings, fleet_dir: Path
) -> None:
    secret = settings.jwt.secret or ""
    raw = fleet_config(settings)
    del raw["redis_url"]
    assert "needs redis_url" in one_error_line(run_serve(fleet_dir, raw, secret))
    raw = fleet_config(settings, amqp_url=[AMQP_URL, "http://guest:hunter2@127.0.0.1:5682/"])
    line = one_error_line(run_serve(fleet_dir, raw, secret))
    assert "amqp_url entry 2" in line and "hunter2" not in line
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        raw = fleet_config(settings, port=taken.getsockname()[1])
        line = one_error_line(run_serve(fleet_dir, raw, secret))
        assert "cannot listen" in line and str(taken.getsockname()[1]) in line


def test_a_fleet_whose_workers_cannot_start_ends_with_exit_1(
    settings: Settings, fleet_dir: Path
) -> None:
    raw = fleet_config(
        settings,
        amqp_url="amqp://guest:hunter2@127.0.0.1:1/",
        broker_connect_timeout_seconds=1,
    )
    result = run_serve(fleet_dir, raw, settings.jwt.secret or "")
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert "cannot reach RabbitMQ" in result.stderr
    assert "could not start" in result.stderr


async def test_with_anomaly_detection_the_fleet_runs_one_detector_not_one_per_worker(
    settings: Settings, fleet_dir: Path, exchange_prefix: str, cleanup_broker: None
) -> None:
    anomaly = {
        "enabled": True,
        "data_dir": str(fleet_dir / "anomaly"),
        "traffic_exchange": f"{exchange_prefix}.traffic",
        "responses_exchange": f"{exchange_prefix}.responses",
        "detector_queue": f"{exchange_prefix}.detector",
        "exchange": f"{exchange_prefix}.alerts",
    }
    fleet = Fleet(settings, fleet_dir, anomaly=anomaly).start()
    try:
        assert fleet.process is not None
        pid = fleet.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        commands = [Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0") for child in children]
        detectors = [argv for argv in commands if b"detector" in argv]
        assert len(detectors) == 1, commands
        assert len(fleet.worker_pids()) == 2
        deadline = time.monotonic() + 30
        while "anomaly detector consuming" not in fleet.log.read_text():
            assert time.monotonic() < deadline, fleet.tail()
            await asyncio.sleep(0.2)
    finally:
        fleet.stop()
        connection = await aio_pika.connect(AMQP_URL)
        channel = await connection.channel()
        for name in ("traffic", "responses", "alerts"):
            await channel.exchange_delete(f"{exchange_prefix}.{name}")
        await channel.queue_delete(f"{exchange_prefix}.detector")
        await connection.close()
