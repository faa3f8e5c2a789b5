"""The alert budget (anomaly/budget.py), the fleet-event rule (anomaly/population.py),
rare-but-normal windows of the baseline, and a small offline evaluation."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from anomaly.budget import per_window, persistence_rate, tail_quantile, thresholds
from anomaly.features import WindowAggregator, subject_windows
from anomaly.population import MassReconnect
from anomaly.settings import AnomalySettings
from anomaly.worker import Worker
from evaluation.offline import BASELINE, START, OfflineConfig, Population, report, run
from gateway.telemetry.events import TrafficEvent


def test_the_budget_per_window_follows_windows_an_hour_and_lengths() -> None:
    assert per_window(1.0, 3600.0) == pytest.approx(1e-4)
    assert per_window(1.0, 60.0) == pytest.approx(1e-4 / 60)
    assert per_window(1.0, 60.0, lengths=2) == pytest.approx(1e-4 / 120)
    assert persistence_rate(1e-6, 1, 1) == 1e-6
    assert persistence_rate(2e-6, 2, 3) == pytest.approx(1e-3)  # 2 * p^2 = 2e-6


def test_tail_quantile_is_empirical_when_it_can_be_and_never_below_the_max_otherwise() -> None:
    scores = np.random.default_rng(1).beta(20, 20, 50_000)
    assert tail_quantile(scores, 0.01) == pytest.approx(np.quantile(scores, 0.99))
    far = tail_quantile(scores, 1e-7)
    assert far >= scores.max()
    assert far > tail_quantile(scores, 1e-5) >= tail_quantile(scores, 1e-4)


def test_persistence_gets_a_lower_threshold_than_a_single_window() -> None:
    scores = np.random.default_rng(2).beta(20, 20, 20_000)
    single, persist = thresholds(scores, 1.0, 60.0, k=2, n=3)
    assert persist < single
    assert thresholds(scores, 1.0, 60.0, k=1, n=1)[0] == thresholds(scores, 1.0, 60.0, k=1, n=1)[1]


def _windows(events: list[TrafficEvent], start: float, end: float) -> list:
    aggregator = WindowAggregator(start=start)
    for event in events:
        aggregator.add(event)
    return subject_windows(aggregator.swap(end), end - start)


def test_a_fleet_wide_reconnect_is_told_from_ordinary_windows() -> None:
    rule = MassReconnect(min_subjects=20)
    rng = random.Random(3)
    t = START
    for _ in range(10):
        events = [
            TrafficEvent("publish", f"10.0.0.{n}", f"u{n}", channel="c", size=10, at=t + 1)
            for n in range(100)
        ]
        events += [TrafficEvent("auth_ok", f"10.0.0.{n}", f"u{n}", at=t + 2) for n in range(5)]
        assert not rule.observe(_windows(events, t, t + 60))
        t += 60
    restart = [
        TrafficEvent("auth_ok", f"10.0.0.{n}", f"u{n}", at=t + rng.uniform(0, 15))
        for n in range(100)
    ]
    assert rule.observe(_windows(restart, t, t + 60))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Worker:
    """A worker that warmed up on 40 minutes of 800 users of the offline population."""
    settings = AnomalySettings(
        enabled=True,
        data_dir=Path(tmp_path_factory.mktemp("anomaly")),
        window_seconds=60.0,
        long_window_windows=0,
        warmup_windows=40,
        retrain_interval_seconds=0,
    )
    worker = Worker(settings)
    population = Population(800, random.Random(4))
    aggregator = WindowAggregator(start=START)
    t = START
    for _ in range(40):
        out: list[TrafficEvent] = []
        population.window(t, t + 60, BASELINE, out)
        for event in sorted(out, key=lambda e: e.at):
            aggregator.add(event)
        worker.process(aggregator.swap(t + 60), False)
        t += 60
    assert worker.model is not None
    return worker


def _session_start(t: float) -> list[TrafficEvent]:
    events = [
        TrafficEvent("connect", "10.5.0.1", at=t + 1),
        TrafficEvent("auth_ok", "10.5.0.1", "newcomer", "s1", at=t + 1.1),
    ]
    events += [
        TrafficEvent("subscribe", "10.5.0.1", "newcomer", "s1", f"chat.room{n}", at=t + 1.2)
        for n in range(3)
    ]
    return events + [
        TrafficEvent("subscribe", "10.5.0.1", "newcomer", "s1", "user.newcomer.inbox", at=t + 1.3)
    ]


def _one_malformed_frame(t: float) -> list[TrafficEvent]:
    return [
        TrafficEvent("publish", "10.5.0.2", "typo", "s2", "chat.room1", 80, at=t + 5),
        TrafficEvent("malformed", "10.5.0.2", "typo", "s2", detail="bad_request", at=t + 9),
        TrafficEvent("publish", "10.5.0.2", "typo", "s2", "chat.room1", 120, at=t + 30),
    ]


def _two_devices(t: float) -> list[TrafficEvent]:
    return [
        TrafficEvent("publish", "10.5.0.3", "phone", "s3", "chat.room2", 60, at=t + 3),
        TrafficEvent("publish", "10.6.0.3", "phone", "s4", "chat.room2", 90, at=t + 40),
    ]


@pytest.mark.parametrize("make", [_session_start, _one_malformed_frame, _two_devices])
def test_rare_but_normal_windows_of_the_baseline_raise_no_alert(trained: Worker, make) -> None:
    t = START + 40 * 60
    windows = _windows(make(t), t, t + 60)
    for key in ("user@60s", "address@60s"):
        members = [w for w in windows if f"{w.subject_kind}@60s" == key]
        decisions = trained._score(key, members, keep_all=True)
        assert decisions and not any(d.flagged for d in decisions), [
            (d.window.key, d.score, d.threshold) for d in decisions
        ]


def test_a_small_offline_evaluation_finds_every_attack_without_false_alerts() -> None:
    result = run(OfflineConfig(users=1000, baseline_hours=0.5, hours=0.5, attackers_per_kind=2))
    last = report(result).splitlines()[-1]
    assert last.startswith("false_alerts_per_10k_subject_hours=")
    assert " min_recall=" in last and " max_detect_windows=" in last
    assert result.min_recall >= 0.9
    assert result.max_detect_windows <= 3
    assert len(result.false_alerts) <= 1


def test_a_users_addresses_are_counted_over_its_last_windows() -> None:
    from anomaly.spread import AddressSpread

    spread = AddressSpread(windows=3)
    t = START
    counts = []
    for addresses in (["10.0.0.1", "10.0.0.2"], ["10.0.0.3"], ["10.0.0.4"], ["10.0.0.4"], []):
        events = [
            TrafficEvent("publish", a, "thief", channel="c", size=10, at=t + 1) for a in addresses
        ]
        aggregator = WindowAggregator(start=t)
        for event in events:
            aggregator.add(event)
        counts.append(spread.observe(aggregator.swap(t + 60).users).get("thief"))
        t += 60
    # 2, then 3, then 4 within three windows; then the first window drops out; quiet: none.
    assert counts == [2, 3, 4, 2, None]
