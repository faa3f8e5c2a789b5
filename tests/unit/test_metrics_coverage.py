"""Every metric the gateway exports is on the Grafana dashboard, and every
labelled counter has its known series from the start (at 0)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import Counter

from anomaly.settings import SEVERITIES
from gateway.auth.principal import AUTH_REASONS
from gateway.telemetry import metrics as gateway_metrics
from gateway.telemetry.events import TRANSPORT_KINDS
from gateway.telemetry.metrics import Metrics

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
# Where metrics are defined: a metric's name is a literal passed to one of these.
DEFINITION = re.compile(
    r"(?:Counter|Gauge|Histogram|Summary|MetricFamily)\(\s*\"(rabbitgate_[a-z_]+)\""
)


# The fleet detector's own /metrics (anomaly/detector_admin.py) is another
# process's registry, not the gateway's: tests/integration/test_detector_admin.py
# reads those series from a running detector.
DETECTOR_ONLY = {ROOT / "anomaly" / "detector_admin.py"}


def sources() -> list[Path]:
    found = [*ROOT.glob("gateway/**/*.py"), *ROOT.glob("anomaly/**/*.py")]
    return sorted(path for path in found if path not in DETECTOR_ONLY)


def everything_on() -> Metrics:
    """Metrics of a gateway with every optional part on (reloader, Redis limits)."""
    metrics = Metrics()
    node = SimpleNamespace(
        sessions=[],
        hub=[],
        broker=SimpleNamespace(connected=True),
        dropped_messages=0,
        policies=SimpleNamespace(digest="d", rules=[], exchanges=lambda: frozenset({"chat"})),
        limiter=SimpleNamespace(
            redis_url="redis://x",
            redis_healthy=True,
            redis_failures=0,
            tenant_gauges=lambda: [("acme", "connections", 1, 10)],
            tenant_usage={("acme", "messages_per_day"): 0.5},
            tenant_refusals={("acme", "publish"): 0},
        ),
    )
    reloader = SimpleNamespace(reloads_ok=0, reloads_failed=0, last_error=None, loaded_at=1.0)
    metrics.watch(SimpleNamespace(node=node, reloader=reloader))
    return metrics


def exported() -> set[str]:
    return {family.name for family in everything_on().registry.collect()}


def test_the_collection_here_holds_every_metric_defined_in_the_code() -> None:
    defined = {name for path in sources() for name in DEFINITION.findall(path.read_text())}
    assert len(defined) >= 25
    # prometheus_client drops _total from a counter's family name.
    names = {name.removesuffix("_total") for name in exported()}
    assert defined <= names, defined - names


def test_every_exported_metric_is_on_the_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    )
    used = set(re.findall(r"rabbitgate_[a-z_]+", exprs))
    bases = {re.sub(r"_(total|bucket|count|sum|gcount|gsum)$", "", name) for name in used} | used
    missing = sorted(name for name in exported() if name not in bases)
    assert not missing, f"not on deploy/grafana-dashboard.json: {missing}"


def series(metrics: Metrics, name: str) -> set[tuple[tuple[str, str], ...]]:
    return {
        tuple(sorted(sample.labels.items()))
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    }


def label_values(metrics: Metrics, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for labels in series(metrics, name)}


def test_labelled_counters_start_with_their_known_series_at_zero() -> None:
    metrics = everything_on()
    assert label_values(metrics, "rabbitgate_connections_opened_total", "transport") == set(
        TRANSPORT_KINDS
    )
    assert label_values(metrics, "rabbitgate_auth_failures_total", "reason") == AUTH_REASONS
    assert label_values(metrics, "rabbitgate_alerts_total", "severity") == set(SEVERITIES)
    assert "4409" in label_values(metrics, "rabbitgate_connections_closed_total", "code")
    assert label_values(metrics, "rabbitgate_malformed_frames_total", "code") == {
        "bad_request",
        "too_large",
    }
    assert label_values(metrics, "rabbitgate_rate_limited_total", "limit") >= {"frames", "publish"}
    assert series(metrics, "rabbitgate_authorization_denials_total") == {
        (("action", "publish"), ("rule", "none")),
        (("action", "subscribe"), ("rule", "none")),
    }
    for name in ("messages_in", "messages_out", "publish_failures"):
        assert label_values(metrics, f"rabbitgate_{name}_total", "exchange") == {"chat"}
    assert label_values(metrics, "rabbitgate_policy_reloads_total", "result") == {"ok", "failed"}
    for family in metrics.registry.collect():
        if family.type == "counter":
            assert all(s.value == 0 for s in family.samples if s.name.endswith("_total"))


def test_no_labelled_counter_is_left_without_initial_series() -> None:
    metrics = everything_on()
    labelled = [
        value
        for value in vars(metrics).values()
        if isinstance(value, Counter) and value._labelnames
    ]
    assert len(labelled) >= 9
    for counter in labelled:
        assert series(metrics, f"{counter._name}_total"), counter._name


def test_the_known_label_values_are_the_ones_the_code_emits() -> None:
    """The lists in gateway/metrics.py against the literals of the code."""
    text = "\n".join(path.read_text() for path in sources())
    limits = set(re.findall(r"(?:_refusal|Refusal)\(\s*\"([a-z_]+)\"", text))
    limits |= set(re.findall(r"\"(connections_per_[a-z]+)\"", text))
    limits |= set(re.findall(r"\"rate_limited\"[^)]*detail=\"([a-z_]+)\"", text))
    assert limits <= set(gateway_metrics.RATE_LIMITS), limits - set(gateway_metrics.RATE_LIMITS)
    assert {"frames", "publish", "connects"} <= limits
    codes = set(re.findall(r"^CLOSE_[A-Z_]+(?:: Final)? = (\d{4})\b", text, re.MULTILINE))
    assert codes <= set(gateway_metrics.CLOSE_CODES), codes - set(gateway_metrics.CLOSE_CODES)
    assert len(codes) >= 6
