"""deploy/grafana-dashboard.json queries only metrics the gateway exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from gateway.telemetry.metrics import Metrics

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana-dashboard.json"
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
}


def exported_names() -> set[str]:
    metrics = Metrics()
    node = SimpleNamespace(
        sessions=[],
        hub=[],
        broker=SimpleNamespace(connected=True),
        dropped_messages=0,
        policies=SimpleNamespace(digest="d", rules=[]),
        # Redis-shared limits on: their two metrics exist only then.
        limiter=SimpleNamespace(
            redis_url="redis://x",
            redis_healthy=True,
            redis_failures=0,
            tenant_gauges=lambda: [("acme", "connections", 1, 10)],
            tenant_usage={("acme", "messages_per_day"): 0.5},
            tenant_refusals={("acme", "publish"): 1},
        ),
    )
    reloader = SimpleNamespace(reloads_ok=0, reloads_failed=0, last_error=None, loaded_at=1.0)
    metrics.watch(SimpleNamespace(node=node, reloader=reloader))
    names = set()
    for family in metrics.registry.collect():
        for suffix in SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def test_every_dashboard_query_names_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {name for expr in exprs for name in re.findall(r"rabbitgate_[a-z_]+", expr)}
    assert len(used) >= 15
    assert used <= exported_names(), used - exported_names()
