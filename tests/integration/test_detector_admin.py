"""The fleet detector's admin listener (anomaly/detector_admin.py) on real processes:
``rabbitgate detector`` on its own, with a configuration that has no ``jwt``
section, and the one ``serve --workers 2`` starts; a reviewer logs in and
acknowledges an alert there; its /metrics counts what it consumed and refused."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import yaml
from anomaly_fixtures import save_baseline_model

from anomaly.alerts import STORE_FILE, AlertStore, make_alert
from anomaly.features import FEATURES, SubjectWindow
from anomaly.fleet import encode_events
from anomaly.model import Reason
from anomaly.passwords import set_reviewer
from gateway.config import Settings
from gateway.telemetry.events import TrafficEvent

from .fleet import Fleet
from .processes import free_port

pytestmark = pytest.mark.integration
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PASSWORD = "correct horse battery staple"


@pytest.fixture
def anomaly_section(tmp_path: Path, exchange_prefix: str) -> Iterator[dict[str, Any]]:
    data_dir = tmp_path / "anomaly"
    data_dir.mkdir()
    save_baseline_model(data_dir)
    reviewers = tmp_path / "reviewers"
    set_reviewer(reviewers, "sam", PASSWORD)
    yield {
        "enabled": True,
        "data_dir": str(data_dir),
        "window_seconds": 1,
        "long_window_windows": 0,
        "retrain_interval_seconds": 0,
        "exchange": f"{exchange_prefix}.alerts",
        "traffic_exchange": f"{exchange_prefix}.traffic",
        "responses_exchange": f"{exchange_prefix}.responses",
        "detector_queue": f"{exchange_prefix}.detector",
        "reviewers_file": str(reviewers),
        "detector_admin_port": free_port(),
    }


@pytest.fixture
async def broker_cleanup(exchange_prefix: str) -> AsyncIterator[None]:
    yield
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(f"{exchange_prefix}.detector")
        for name in ("traffic", "responses", "alerts"):
            await channel.exchange_delete(f"{exchange_prefix}.{name}")


def stored_alert(data_dir: Path, user: str) -> str:
    """An alert in the detector's store, as the detector writes them; its id."""
    now = time.time()
    features = dict.fromkeys(FEATURES, 0.0)
    features["distinct_addresses"] = 4.0
    window = SubjectWindow("user", user, None, None, now - 60, now, features)
    reason = Reason("distinct_addresses", 4.0, 1.0, "one token from 4 addresses", 1.0)
    alert = make_alert(window, 0.9, "critical", [reason], now)
    store = AlertStore(data_dir / STORE_FILE)
    try:
        store.add(alert)
    finally:
        store.close()
    return str(alert["id"])


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def wait_ready(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 40
    while get(port, "/readyz")[0] != 200:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name} not in /metrics"
    return float(found.group(1))


async def review_an_alert(port: int, alert_id: str) -> str:
    """Log in as sam, open the alert, acknowledge it; the detail page after."""
    base = f"http://127.0.0.1:{port}/alerts/"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(base, allow_redirects=False) as page:
            assert page.status == 303 and page.headers["Location"] == "/alerts/login"
        for password, status in (("not it", 401), (PASSWORD, 303)):
            async with http.get(base + "login") as page:
                csrf = re.search(r'name="csrf" value="([^"]+)"', await page.text())
            assert csrf is not None
            form = {"csrf": csrf.group(1), "name": "sam", "password": password}
            async with http.post(base + "login", data=form, allow_redirects=False) as answer:
                assert answer.status == status
        async with http.get(base) as page:
            assert page.status == 200
            listing = await page.text()
        assert alert_id in listing and "sam" in listing
        async with http.get(base + alert_id) as page:
            detail = await page.text()
        token = re.search(r'name="csrf" value="([^"]+)"', detail)
        assert token is not None
        origin = {"Origin": f"http://127.0.0.1:{port}"}
        async with http.post(
            base + f"{alert_id}/ack", data={"csrf": token.group(1)}, headers=origin
        ) as page:
            assert page.status == 200
            return await page.text()


async def test_the_detector_process_serves_the_review_page_and_metrics_without_a_jwt_section(
    tmp_path: Path, anomaly_section: dict[str, Any], broker_cleanup: None
) -> None:
    port = anomaly_section["detector_admin_port"]
    alert_id = stored_alert(Path(anomaly_section["data_dir"]), "mallory")
    config = tmp_path / "detector.yaml"
    # No jwt section at all: the detector verifies no token.
    config.write_text(
        yaml.safe_dump({"amqp_url": AMQP_URL, "log_format": "json", "anomaly": anomaly_section})
    )
    log = tmp_path / "detector.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITGATE_")}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "detector", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_ready(port, process, log)
        assert get(port, "/healthz")[0] == 200
        page = await review_an_alert(port, alert_id)
        assert "acknowledged" in page
        store = AlertStore(Path(anomaly_section["data_dir"]) / STORE_FILE)
        try:
            reviewed = store.get(alert_id)
        finally:
            store.close()
        assert reviewed["status"] == "acknowledged" and reviewed["reviewer"] == "sam"

        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.get_exchange(anomaly_section["traffic_exchange"])
            for body in (b"not json", b'[["exec", 1]]'):
                await exchange.publish(aio_pika.Message(body), routing_key="traffic.t")
            good = [TrafficEvent("connect", "127.0.6.9", at=time.time())] * 3
            await exchange.publish(aio_pika.Message(encode_events(good)), routing_key="traffic.t")
        deadline = time.monotonic() + 10
        while True:
            _, text = get(port, "/metrics")
            if "rabbitgate_detector_events_received_total 3.0" in text:
                break
            assert time.monotonic() < deadline, text
            await asyncio.sleep(0.1)
        assert metric(text, "rabbitgate_detector_batches_refused_total") == 2.0
        assert metric(text, "rabbitgate_detector_events_dropped_total") == 0.0
        assert metric(text, "rabbitgate_detector_broker_connected") == 1.0
        assert "# HELP rabbitgate_detector_batches_refused_total Traffic batches dropped" in text
        assert "# TYPE rabbitgate_detector_events_received_total counter" in text
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert "Traceback" not in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_a_detector_that_cannot_listen_or_has_no_store_says_so_in_one_line(
    tmp_path: Path, anomaly_section: dict[str, Any], broker_cleanup: None
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITGATE_")}

    def run(section: dict[str, Any]) -> str:
        config = tmp_path / "detector.yaml"
        raw = {"amqp_url": "amqp://guest:guest@127.0.0.1:5672/", "anomaly": section}
        config.write_text(yaml.safe_dump(raw))
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "detector", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert result.returncode == 1, result
        assert "Traceback" not in result.stderr, result.stderr
        lines = [x for x in result.stderr.splitlines() if x.startswith("rabbitgate: error:")]
        assert len(lines) == 1, result.stderr
        return lines[0]

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        line = run({**anomaly_section, "detector_admin_port": busy})
    assert "cannot listen" in line and str(busy) in line and "detector_admin_port" in line
    line = run({**anomaly_section, "detector_admin_port": 70000})
    assert "detector_admin_port must be between 0 and 65535" in line
    not_a_store = tmp_path / "not-a-store"
    not_a_store.mkdir()
    (not_a_store / STORE_FILE).write_text("this is not SQLite " * 100)
    line = run({**anomaly_section, "data_dir": str(not_a_store)})
    assert "cannot be used" in line


async def test_with_workers_the_review_page_is_on_the_detector_admin_port(
    settings: Settings,
    tmp_path: Path,
    anomaly_section: dict[str, Any],
    broker_cleanup: None,
    cleanup_broker: None,
) -> None:
    port = anomaly_section["detector_admin_port"]
    alert_id = stored_alert(Path(anomaly_section["data_dir"]), "eve")
    fleet = Fleet(settings, tmp_path, anomaly=anomaly_section).start()
    try:
        assert fleet.process is not None
        wait_ready(port, fleet.process, fleet.log)
        page = await review_an_alert(port, alert_id)
        assert "acknowledged" in page
        # The supervisor's own admin port does not serve it.
        assert fleet.get("/alerts/")[0] == 404
    finally:
        fleet.stop()
