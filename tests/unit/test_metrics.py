"""Metrics from traffic events and the message-path hooks, without a gateway."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest

from gateway.telemetry.events import TrafficEvent
from gateway.telemetry.metrics import Metrics


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_events_move_their_counters() -> None:
    m = Metrics()
    for event in (
        TrafficEvent("connect", "a"),
        TrafficEvent("connect", "a", detail="sse"),
        TrafficEvent("auth_failed", "a", detail="expired"),
        TrafficEvent("auth_failed", "a", detail="expired"),
        TrafficEvent("denied", "a", "u", channel="x.y", detail="publish", rule="2"),
        TrafficEvent("denied", "a", "u", channel="nope", detail="subscribe"),
        TrafficEvent("rate_limited", "a", "u", detail="frames"),
        TrafficEvent("banned", "a", "u", detail="4429"),
        TrafficEvent("malformed", "a", "u", detail="too_large"),
        TrafficEvent("closed", "a", "u", detail="4409"),
    ):
        m.sink(event)
    assert value(m, "rabbitgate_connections_opened_total", transport="websocket") == 1
    assert value(m, "rabbitgate_connections_opened_total", transport="sse") == 1
    assert value(m, "rabbitgate_auth_failures_total", reason="expired") == 2
    assert value(m, "rabbitgate_authorization_denials_total", action="publish", rule="2") == 1
    assert value(m, "rabbitgate_authorization_denials_total", action="subscribe", rule="none") == 1
    assert value(m, "rabbitgate_rate_limited_total", limit="frames") == 1
    assert value(m, "rabbitgate_bans_total") == 1
    assert value(m, "rabbitgate_malformed_frames_total", code="too_large") == 1
    assert value(m, "rabbitgate_connections_closed_total", code="4409") == 1


def test_message_hooks_count_per_exchange_and_time_once_per_message() -> None:
    m = Metrics()
    m.publish_confirmed("chat", 0.004)
    m.publish_confirmed("chat", 0.2)
    m.publish_failed("news")
    m.delivered("chat", 3, ts_ms=0)  # a very old timestamp: lands in +Inf
    assert value(m, "rabbitgate_messages_in_total", exchange="chat") == 2
    assert value(m, "rabbitgate_publish_failures_total", exchange="news") == 1
    assert value(m, "rabbitgate_messages_out_total", exchange="chat") == 3
    assert value(m, "rabbitgate_publish_confirm_seconds_count") == 2
    assert value(m, "rabbitgate_publish_confirm_seconds_bucket", le="0.005") == 1
    assert value(m, "rabbitgate_delivery_latency_seconds_count") == 1
    assert value(m, "rabbitgate_delivery_latency_seconds_bucket", le="10.0") == 0


def test_two_gateways_never_share_a_registry() -> None:
    first, second = Metrics(), Metrics()
    first.alerts_total.labels("high").inc()
    assert value(first, "rabbitgate_alerts_total", severity="high") == 1
    assert value(second, "rabbitgate_alerts_total", severity="high") == 0  # created at 0


class _Outbox:
    def __init__(self, size: int, frames: int) -> None:
        self._pending = (size, frames)

    def pending(self) -> tuple[int, int]:
        return self._pending


def _gateway(reloader: object = None) -> SimpleNamespace:
    sessions = [
        SimpleNamespace(outbox=_Outbox(0, 0), kind="websocket"),
        SimpleNamespace(outbox=_Outbox(20_000, 7), kind="websocket"),
        SimpleNamespace(outbox=_Outbox(900, 1), kind="sse"),
    ]
    node = SimpleNamespace(
        sessions=sessions,
        hub=[1, 2],
        broker=SimpleNamespace(connected=False),
        dropped_messages=4,
        limiter=SimpleNamespace(  # limits kept locally, no tenants
            redis_url=None, tenant_gauges=list, tenant_usage={}, tenant_refusals={}
        ),
        policies=SimpleNamespace(digest="abc123", rules=[1, 2, 3]),
    )
    return SimpleNamespace(node=node, reloader=reloader)


def test_live_state_is_read_at_scrape_time() -> None:
    m = Metrics()
    gateway = _gateway()
    m.watch(gateway)
    assert value(m, "rabbitgate_connections_open", transport="websocket") == 2
    assert value(m, "rabbitgate_connections_open", transport="sse") == 1
    assert value(m, "rabbitgate_broker_connected") == 0
    assert value(m, "rabbitgate_subscriptions") == 2
    assert value(m, "rabbitgate_messages_dropped_total") == 4
    assert value(m, "rabbitgate_policy_set_info", digest="abc123") == 1
    assert value(m, "rabbitgate_policy_rules") == 3
    assert value(m, "rabbitgate_send_buffer_bytes_bucket", le="1024") == 2
    assert value(m, "rabbitgate_send_buffer_bytes_bucket", le="+Inf") == 3
    assert value(m, "rabbitgate_send_buffer_max_bytes") == 20_000
    assert value(m, "rabbitgate_send_buffer_max_frames") == 7
    gateway.node.broker.connected = True
    assert value(m, "rabbitgate_broker_connected") == 1
    assert b"rabbitgate_send_buffer_bytes_gsum 20900.0" in generate_latest(m.registry)


def test_the_policy_reloader_is_reported_when_there_is_one() -> None:
    reloader = SimpleNamespace(reloads_ok=3, reloads_failed=1, last_error="bad", loaded_at=1e9)
    m = Metrics()
    m.watch(_gateway(reloader))
    assert value(m, "rabbitgate_policy_reloads_total", result="ok") == 3
    assert value(m, "rabbitgate_policy_reloads_total", result="failed") == 1
    assert value(m, "rabbitgate_policy_last_reload_failed") == 1
    assert value(m, "rabbitgate_policy_loaded_timestamp_seconds") == 1e9
