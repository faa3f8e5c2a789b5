"""The detector's life on a stub node, windows closed by hand: warm-up, saved
model, scoring, alerts, overflow, scheduled retraining. Nothing runs: the alerts
exchange is unreachable, so alerts stay in the store's outbox."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from anomaly.alerts import iso
from anomaly.detector import Detector
from anomaly.model import MODEL_FILE
from anomaly.settings import AnomalySettings
from gateway.limits.restrictions import Restrictions
from gateway.telemetry.events import EventBus, TrafficEvent

START = 1_795_000_000.0
WINDOW = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def stub_gateway(tmp_path: Path, **anomaly: Any) -> Any:
    values: dict[str, Any] = {
        "enabled": True,
        "data_dir": tmp_path / "anomaly",
        "window_seconds": WINDOW,
        "warmup_windows": 6,
        "long_window_windows": 0,
        "retrain_interval_seconds": 0,
        "false_alerts_per_10k_subject_hours": 1.0,
    }
    values.update(anomaly)
    node = SimpleNamespace(events=EventBus(), restrictions=Restrictions(), sessions=set())
    settings = SimpleNamespace(
        anomaly=AnomalySettings(**values), amqp_url="amqp://guest:guest@127.0.0.1:1/"
    )
    return SimpleNamespace(node=node, settings=settings)


def chat(bus: EventBus, start: float, rng: random.Random, users: int = 40) -> None:
    """One window of people chatting, each from their own address."""
    events = []
    for n in range(users):
        for _ in range(rng.randint(0, 4)):
            at = start + rng.uniform(0, WINDOW)
            size = rng.randint(10, 400)
            events.append(
                TrafficEvent(
                    "publish", f"10.0.0.{n}", f"u{n}", f"s{n}", channel="chat.a", size=size, at=at
                )
            )
    for event in sorted(events, key=lambda e: e.at):
        bus.emit(event)


@pytest.fixture
async def detector(tmp_path: Path) -> Any:
    clock = Clock()
    found = Detector(stub_gateway(tmp_path), clock=clock)
    found.clock = clock  # type: ignore[attr-defined]
    await found.start()
    yield found
    await found.stop()


async def close_windows(detector: Any, count: int, rng: random.Random) -> list[Any]:
    decisions = []
    for _ in range(count):
        chat(detector.node.events, detector.clock.now, rng)
        detector.clock.now += WINDOW
        decisions = await detector.tick(detector.clock.now)
    return decisions


async def test_learns_during_warm_up_then_scores_and_alerts(detector: Any, tmp_path: Path) -> None:
    rng = random.Random(1)
    assert detector.learning
    await close_windows(detector, 6, rng)
    assert not detector.learning
    assert (tmp_path / "anomaly" / MODEL_FILE).exists()
    quiet = await close_windows(detector, 1, rng)
    assert quiet and sum(d.flagged for d in quiet) <= 2

    chat(detector.node.events, detector.clock.now, rng)
    for n in range(30):  # credential stuffing from one address
        detector.node.events.emit(
            TrafficEvent("connect", "198.51.100.7", at=detector.clock.now + n * 0.3)
        )
        detector.node.events.emit(
            TrafficEvent(
                "auth_failed",
                "198.51.100.7",
                detail="bad_signature",
                at=detector.clock.now + n * 0.3,
            )
        )
    detector.clock.now += WINDOW
    decisions = await detector.tick(detector.clock.now)
    flagged = [d for d in decisions if d.flagged and d.window.key == "198.51.100.7"]
    assert len(flagged) == 1
    assert flagged[0].reasons[0].feature in ("auth_failures", "reconnects")
    alerts = detector.store.find(subject="198.51.100.7")
    assert len(alerts) == 1 and alerts[0]["actions"] == ["recorded"]
    assert detector.store.unpublished()  # RabbitMQ unreachable: kept for later


async def test_subjects_beyond_the_cap_raise_one_overflow_alert(tmp_path: Path) -> None:
    clock = Clock()
    detector = Detector(stub_gateway(tmp_path, max_subjects=5), clock=clock)
    await detector.start()
    try:
        for n in range(50):
            detector.node.events.emit(TrafficEvent("auth_failed", f"203.0.113.{n}", at=START + 1))
        clock.now += WINDOW
        decisions = await detector.tick(clock.now)
        overflow = [d for d in decisions if d.window.overflow]
        assert len(overflow) == 1 and overflow[0].flagged and overflow[0].severity == "high"
        alerts = [a for a in detector.store.find() if a["subject"]["kind"] == "address"]
        assert (
            len(alerts) == 1 and "more than 5 distinct addresses" in alerts[0]["reasons"][0]["text"]
        )
        assert alerts[0]["subject"]["address"] == "*overflow*"
        assert alerts[0]["actions"] == ["recorded"]
    finally:
        await detector.stop()


async def test_scheduled_retraining_replaces_the_model(tmp_path: Path) -> None:
    clock = Clock()
    detector = Detector(stub_gateway(tmp_path, retrain_interval_seconds=1e-6), clock=clock)
    detector.clock = clock  # type: ignore[attr-defined]
    await detector.start()
    try:
        rng = random.Random(2)
        await close_windows(detector, 6, rng)
        first = detector.model
        assert first is not None
        await close_windows(detector, 1, rng)
        assert detector.model is not first
        assert detector.model.keys["user@10s"].trained_at >= first.keys["user@10s"].trained_at
    finally:
        await detector.stop()


async def test_a_saved_model_is_used_at_the_next_start(tmp_path: Path) -> None:
    clock = Clock()
    detector = Detector(stub_gateway(tmp_path), clock=clock)
    detector.clock = clock  # type: ignore[attr-defined]
    await detector.start()
    await close_windows(detector, 6, random.Random(3))
    await detector.stop()
    again = Detector(stub_gateway(tmp_path), clock=clock)
    await again.start()
    try:
        assert not again.learning and again.model is not None
    finally:
        await again.stop()


async def test_a_changed_window_length_means_learning_again(tmp_path: Path) -> None:
    clock = Clock()
    detector = Detector(stub_gateway(tmp_path), clock=clock)
    detector.clock = clock  # type: ignore[attr-defined]
    await detector.start()
    await close_windows(detector, 6, random.Random(3))
    await detector.stop()
    other = Detector(stub_gateway(tmp_path, window_seconds=30.0), clock=clock)
    await other.start()
    try:
        assert other.learning  # the saved forests are for 10 s windows
    finally:
        await other.stop()


async def test_an_alert_storm_is_capped_per_window(tmp_path: Path) -> None:
    clock = Clock()
    detector = Detector(stub_gateway(tmp_path, max_alerts_per_window=3), clock=clock)
    detector.clock = clock  # type: ignore[attr-defined]
    await detector.start()
    try:
        rng = random.Random(4)
        await close_windows(detector, 6, rng)
        chat(detector.node.events, clock.now, rng)
        for n in range(20):  # twenty stuffing addresses at once
            for k in range(20 + n):
                at = clock.now + k * 0.2
                detector.node.events.emit(TrafficEvent("connect", f"198.51.100.{n}", at=at))
                detector.node.events.emit(TrafficEvent("auth_failed", f"198.51.100.{n}", at=at))
        clock.now += WINDOW
        decisions = await detector.tick(clock.now)
        assert sum(d.flagged for d in decisions if d.window.key.startswith("198.51.")) == 20
        stored = detector.store.find(limit=100)
        assert len(stored) == 3
        # The highest scores were kept.
        top = sorted((d.score for d in decisions if d.flagged), reverse=True)[:3]
        assert sorted(a["score"] for a in stored) == sorted(round(s, 4) for s in top)
        assert detector.alerts_capped == 17 + sum(
            1 for d in decisions if d.flagged and not d.window.key.startswith("198.51.")
        )
    finally:
        await detector.stop()


class Connection:
    """A session of the node: a WebSocket or an SSE stream (both in node.sessions)."""

    def __init__(self, user: str, address: str) -> None:
        self.principal = SimpleNamespace(sub=user)
        self.address = address
        self.id = f"{user}@{address}"
        self.closes: list[int] = []

    def close(self, code: int, reason: str) -> None:
        self.closes.append(code)


async def test_a_ban_closes_each_connection_once_sse_streams_included(tmp_path: Path) -> None:
    gateway = stub_gateway(tmp_path)
    websocket, stream = Connection("mallory", "10.0.0.1"), Connection("mallory", "10.0.0.2")
    bystander = Connection("alice", "10.0.0.1")
    gateway.node.sessions.update({websocket, stream, bystander})
    gateway.ops = SimpleNamespace(sse=SimpleNamespace(streams={stream}))
    detector = Detector(gateway)
    assert detector.disconnect("user", "mallory") == 2
    assert websocket.closes == [4403] and stream.closes == [4403] and bystander.closes == []
    # An address ban next: mallory's connection from there is already closing.
    assert detector.disconnect("address", "10.0.0.1") == 1
    assert bystander.closes == [4403] and websocket.closes == [4403]


def stuffing(bus: EventBus, start: float, address: str = "198.51.100.7", count: int = 30) -> None:
    for n in range(count):
        bus.emit(TrafficEvent("connect", address, at=start + n * 0.3))
        bus.emit(TrafficEvent("auth_failed", address, detail="bad_signature", at=start + n * 0.3))


async def test_an_attack_over_several_windows_is_one_alert_updated(tmp_path: Path) -> None:
    clock = Clock()
    detector = Detector(stub_gateway(tmp_path), clock=clock)
    detector.clock = clock  # type: ignore[attr-defined]
    await detector.start()
    try:
        rng = random.Random(5)
        await close_windows(detector, 6, rng)
        for _ in range(3):
            chat(detector.node.events, clock.now, rng)
            stuffing(detector.node.events, clock.now)
            clock.now += WINDOW
            await detector.tick(clock.now)
        (alert,) = detector.store.find(subject="198.51.100.7")
        assert alert["windows"] == 3 and alert["version"] == 3
        assert alert["suppressed"] == 2  # windows 2 and 3 named no new reason
        assert alert["last_seen"] == iso(clock.now) and alert["ended_at"] is None
    finally:
        await detector.stop()
    # A restart keeps the open incident: the next window updates the same alert.
    again = Detector(stub_gateway(tmp_path), clock=clock)
    await again.start()
    try:
        stuffing(again.node.events, clock.now)
        clock.now += WINDOW
        await again.tick(clock.now)
        (alert,) = again.store.find(subject="198.51.100.7")
        assert alert["windows"] == 4
        # Quiet for incident_quiet_windows: the episode ends.
        for _ in range(again.settings.incident_quiet_windows):
            chat(again.node.events, clock.now, rng)
            clock.now += WINDOW
            await again.tick(clock.now)
        (alert,) = again.store.find(subject="198.51.100.7")
        assert alert["ended_at"] is not None and alert["status"] == "open"
    finally:
        await again.stop()


async def test_a_benign_close_suppresses_the_same_reason_and_counts_it(tmp_path: Path) -> None:
    clock = Clock()
    detector = Detector(stub_gateway(tmp_path), clock=clock)
    detector.clock = clock  # type: ignore[attr-defined]
    await detector.start()
    try:
        rng = random.Random(6)
        await close_windows(detector, 6, rng)
        stuffing(detector.node.events, clock.now)
        clock.now += WINDOW
        await detector.tick(clock.now)
        (alert,) = detector.store.find(subject="198.51.100.7")
        detector.store.review(
            alert["id"], "close", "sam", resolution="benign", note="our load test"
        )
        stuffing(detector.node.events, clock.now)
        clock.now += WINDOW
        await detector.tick(clock.now)
        (alert,) = detector.store.find(subject="198.51.100.7")  # still one alert
        assert alert["status"] == "closed" and alert["suppressed"] == 1
    finally:
        await detector.stop()


def test_a_damaged_alert_store_is_one_line_at_start_not_a_crash(tmp_path: Path) -> None:
    from anomaly.service import AnomalyService
    from gateway.config import ConfigError

    gateway = stub_gateway(tmp_path)
    store = tmp_path / "anomaly" / "alerts.sqlite3"
    store.parent.mkdir(parents=True)
    store.write_bytes(b"this is not a database" * 100)
    gateway.admin_app = None
    with pytest.raises(ConfigError) as caught:
        AnomalyService(gateway)
    assert "cannot be used" in str(caught.value) and "\n" not in str(caught.value)


async def test_a_damaged_model_is_logged_and_learnt_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "anomaly").mkdir()
    (tmp_path / "anomaly" / MODEL_FILE).write_bytes(b"PK\x03\x04 garbage")
    from anomaly.worker import Worker

    worker = Worker(stub_gateway(tmp_path).settings.anomaly)
    assert worker.load() is None  # learns again, no exception
    assert any("anomaly model not loaded" in r.getMessage() for r in caplog.records)
