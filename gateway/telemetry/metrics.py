"""Prometheus metrics of one gateway, in a registry of its own.

Three sources feed them:

* the traffic event bus (``Metrics.sink``): connections, refused tokens,
  policy denials, rate-limit refusals, bans, malformed frames;
* two hooks on the message path, each O(1) per message:
  ``publish_confirmed``/``publish_failed`` (``Session._confirmed``) and
  ``delivered`` (``Node.deliver``, once per broker message, not per subscriber);
* a collector read at scrape time (``watch``): open connections, send buffers,
  subscriptions, the broker connection and the policy set in force.

``alerts_total`` (by severity) and ``anomaly_worker_restarts`` are for the
anomaly detector to increment.
The registry is per gateway, never the process-global one, so several
gateways (tests) can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sized
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)

from anomaly.settings import SEVERITIES
from gateway.auth.principal import AUTH_REASONS
from gateway.telemetry.events import TRANSPORT_KINDS, TrafficEvent

# The label values each labelled counter is created with, at 0, so that its
# series exist before the first event (Prometheus' instrumentation guide:
# rate() and alerts over a series that appears only on the first failure miss
# that failure). tests/unit/test_metrics_coverage.py checks these lists against
# the values the code emits.
TRANSPORTS = TRANSPORT_KINDS
# Why a control message between gateway processes was ignored
# (gateway/operations/control_messages.py).
CONTROL_IGNORED = ("malformed", "unsigned", "bad_signature", "stale")
# Close codes the gateway itself ends connections with, and 1006 (the client
# vanished without a close frame). Contract section 9.
# 1002, 1011 and 1013 close STOMP conversations after an ERROR (transports/stomp/).
CLOSE_CODES = (
    "1000",
    "1001",
    "1002",
    "1006",
    "1008",
    "1009",
    "1011",
    "1013",
    "4401",
    "4403",
    "4408",
    "4409",
    "4429",
)
# Refusal.limit values (gateway/limits/, transports/websocket.py).
RATE_LIMITS = (
    "frames",
    "subscribes",
    "publish",
    "connects",
    "auth_failures",
    "strikeouts",
    "connections_per_address",
    "connections_per_user",
    "ignored_retry_after",
    "anomaly_throttle",
    "replays",
    "replays_in_flight",
    "replay_budget",
    "presence",  # presence requests of one user (docs/presence.md)
    # Tenant quotas (gateway/limits/tenants.py)
    "tenant_connections",
    "tenant_subscriptions",
    "tenant_publish",
    "tenant_messages_per_day",
)
MALFORMED_CODES = ("bad_request", "too_large")
ACTIONS = ("subscribe", "publish")
RELOAD_RESULTS = ("ok", "failed")


# What the scrape-time collector reads: the parts of a gateway it reports on,
# described here by shape so that telemetry needs nothing from the layers above.


class _SendBuffer(Protocol):
    def pending(self) -> tuple[int, int]: ...


class _Connection(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def outbox(self) -> _SendBuffer: ...


class _Broker(Protocol):
    @property
    def connected(self) -> bool: ...


class _Limiter(Protocol):
    @property
    def redis_url(self) -> str | None: ...

    @property
    def redis_healthy(self) -> bool: ...

    @property
    def redis_failures(self) -> int: ...

    @property
    def tenant_refusals(self) -> Mapping[tuple[str, str], int]: ...

    @property
    def tenant_usage(self) -> Mapping[tuple[str, str], float]: ...

    def tenant_gauges(self) -> list[tuple[str, str, int, int | None]]: ...


class _Policies(Protocol):
    @property
    def digest(self) -> str: ...

    @property
    def rules(self) -> Sized: ...


class _Reloader(Protocol):
    @property
    def reloads_ok(self) -> int: ...

    @property
    def reloads_failed(self) -> int: ...

    @property
    def last_error(self) -> str | None: ...

    @property
    def loaded_at(self) -> float: ...


class LiveNode(Protocol):
    @property
    def sessions(self) -> Collection[_Connection]: ...

    @property
    def hub(self) -> Sized: ...

    @property
    def broker(self) -> _Broker: ...

    @property
    def dropped_messages(self) -> int: ...

    @property
    def limiter(self) -> _Limiter: ...

    @property
    def policies(self) -> _Policies: ...


class LiveGateway(Protocol):
    """What ``Metrics.watch`` reads at every scrape."""

    @property
    def node(self) -> LiveNode: ...

    @property
    def reloader(self) -> _Reloader | None: ...


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SEND_BUFFER_BUCKETS = (0, 1024, 16 * 1024, 64 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections_opened = Counter(
            "rabbitgate_connections_opened",
            "Connections that reached the gateway (before authentication), by transport.",
            ["transport"],
            registry=r,
        )
        self.connections_closed = Counter(
            "rabbitgate_connections_closed",
            "Authenticated connections that ended, by close code (SSE: the equivalent code).",
            ["code"],
            registry=r,
        )
        self.auth_failures = Counter(
            "rabbitgate_auth_failures", "Tokens refused, by reason.", ["reason"], registry=r
        )
        self.denials = Counter(
            "rabbitgate_authorization_denials",
            "Subscribes and publishes the policies refused, by action and rule (none: no rule).",
            ["action", "rule"],
            registry=r,
        )
        self.rate_limited = Counter(
            "rabbitgate_rate_limited",
            "Requests a rate limit refused, by limit.",
            ["limit"],
            registry=r,
        )
        self.bans = Counter(
            "rabbitgate_bans", "Connections the abuse protection banned.", registry=r
        )
        self.malformed = Counter(
            "rabbitgate_malformed_frames",
            "Frames refused as malformed, by error code.",
            ["code"],
            registry=r,
        )
        self.messages_in = Counter(
            "rabbitgate_messages_in",
            "Client publishes RabbitMQ confirmed, by exchange.",
            ["exchange"],
            registry=r,
        )
        self.publish_failures = Counter(
            "rabbitgate_publish_failures",
            "Client publishes RabbitMQ did not confirm (answered 'unavailable'), by exchange.",
            ["exchange"],
            registry=r,
        )
        self.messages_out = Counter(
            "rabbitgate_messages_out",
            "Messages written to subscribers (one per subscriber), by exchange.",
            ["exchange"],
            registry=r,
        )
        self.confirm_latency = Histogram(
            "rabbitgate_publish_confirm_seconds",
            "Time from writing a client publish to RabbitMQ to its confirm.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_latency = Histogram(
            "rabbitgate_delivery_latency_seconds",
            "Time from a message's timestamp to its fan-out here (one per broker message).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.alerts_total = Counter(
            "rabbitgate_alerts", "Anomaly alerts raised, by severity.", ["severity"], registry=r
        )
        self.anomaly_worker_restarts = Counter(
            "rabbitgate_anomaly_worker_restarts",
            "Times the anomaly detector's worker process ended and was started again.",
            registry=r,
        )
        self.control_ignored = Counter(
            "rabbitgate_control_messages_ignored",
            "Operator control messages from other processes ignored (forged, stale, malformed).",
            ["reason"],
            registry=r,
        )
        # Label children cached: the message path must not pay labels() each time.
        self._in: dict[str, Any] = {}
        self._out: dict[str, Any] = {}
        self._initialise_labels()

    def _initialise_labels(self) -> None:
        known: list[tuple[Counter, tuple[str, ...]]] = [
            (self.connections_opened, TRANSPORTS),
            (self.connections_closed, CLOSE_CODES),
            (self.auth_failures, tuple(sorted(AUTH_REASONS))),
            (self.rate_limited, RATE_LIMITS),
            (self.malformed, MALFORMED_CODES),
            (self.alerts_total, SEVERITIES),
            (self.control_ignored, CONTROL_IGNORED),
        ]
        for counter, values in known:
            for value in values:
                counter.labels(value)
        for action in ACTIONS:  # no rule decided: the one rule label known in advance
            self.denials.labels(action, "none")

    def watch(self, gateway: LiveGateway) -> None:
        """Report ``gateway``'s live state (sessions, broker, policies) at every scrape."""
        self.registry.register(_LiveCollector(gateway))
        policies: Any = getattr(getattr(gateway, "node", None), "policies", None)
        if hasattr(policies, "exchanges"):
            self.known_exchanges(policies.exchanges())

    def known_exchanges(self, exchanges: Iterable[str]) -> None:
        """Series at 0 for the exchanges of a policy set (at start, and after a reload)."""
        for exchange in sorted(exchanges):
            self._in.setdefault(exchange, self.messages_in.labels(exchange))
            self._out.setdefault(exchange, self.messages_out.labels(exchange))
            self.publish_failures.labels(exchange)

    # --- event bus sink -------------------------------------------------------

    def sink(self, event: TrafficEvent) -> None:
        match event.kind:
            case "connect":
                # The connect event's detail names the transport (none: WebSocket).
                kind = event.detail if event.detail in TRANSPORT_KINDS else "websocket"
                self.connections_opened.labels(kind).inc()
            case "closed":
                self.connections_closed.labels(event.detail or "unknown").inc()
            case "auth_failed":
                self.auth_failures.labels(event.detail or "unknown").inc()
            case "denied":
                self.denials.labels(event.detail or "unknown", event.rule or "none").inc()
            case "rate_limited":
                self.rate_limited.labels(event.detail or "unknown").inc()
            case "banned":
                self.bans.inc()
            case "malformed":
                self.malformed.labels(event.detail or "unknown").inc()

    # --- message path hooks -------------------------------------------------

    def publish_confirmed(self, exchange: str, seconds: float) -> None:
        child = self._in.get(exchange)
        if child is None:
            child = self._in[exchange] = self.messages_in.labels(exchange)
        child.inc()
        self.confirm_latency.observe(seconds)

    def publish_failed(self, exchange: str) -> None:
        self.publish_failures.labels(exchange).inc()

    def delivered(self, exchange: str, subscribers: int, ts_ms: int) -> None:
        """One broker message went to ``subscribers`` local subscribers."""
        child = self._out.get(exchange)
        if child is None:
            child = self._out[exchange] = self.messages_out.labels(exchange)
        child.inc(subscribers)
        self.delivery_latency.observe(max(0.0, time.time() - ts_ms / 1000))


class _LiveCollector:
    """What is true now, read from the gateway when Prometheus scrapes."""

    def __init__(self, gateway: LiveGateway) -> None:
        self._gateway = gateway

    def describe(self) -> list[Metric]:
        return []  # names are only known to collect(); nothing else registers them

    def collect(self) -> Iterator[Metric]:
        node = self._gateway.node
        sessions = list(node.sessions)
        open_ = GaugeMetricFamily(
            "rabbitgate_connections_open",
            "Authenticated connections now open, by transport.",
            labels=["transport"],
        )
        by_transport = {"websocket": 0, "sse": 0}
        for session in sessions:
            by_transport[session.kind] = by_transport.get(session.kind, 0) + 1
        for transport, count in sorted(by_transport.items()):
            open_.add_metric([transport], count)
        yield open_
        yield from _send_buffers(sessions)
        yield GaugeMetricFamily(
            "rabbitgate_subscriptions", "Channel subscriptions now held here.", value=len(node.hub)
        )
        yield GaugeMetricFamily(
            "rabbitgate_broker_connected",
            "1 while the RabbitMQ connection is up, else 0.",
            value=1 if node.broker.connected else 0,
        )
        yield CounterMetricFamily(
            "rabbitgate_messages_dropped",
            "Broker messages dropped because they cannot be framed for delivery: a body neither "
            "JSON nor UTF-8, or nested too deeply to serialize.",
            value=node.dropped_messages,
        )
        yield from _limits(node.limiter)
        yield from _tenants(node.limiter)
        yield from _policy(node.policies, self._gateway.reloader)


def _limits(limiter: _Limiter) -> Iterator[Metric]:
    """Whether the rate limits are shared through Redis (gateway/limits/limiter.py)."""
    if limiter.redis_url is None:
        return  # not configured: limits are local by design, nothing to watch
    yield GaugeMetricFamily(
        "rabbitgate_limits_redis_healthy",
        "1 while rate limits are shared through Redis, 0 while limited locally (Redis down).",
        value=1 if limiter.redis_healthy else 0,
    )
    yield CounterMetricFamily(
        "rabbitgate_limits_redis_failures",
        "Times Redis stopped answering and the limits fell back to this process.",
        value=limiter.redis_failures,
    )


def _tenants(limiter: _Limiter) -> Iterator[Metric]:
    """Tenant quotas (gateway/limits/tenants.py); label tenant = a configured tenant or "other".

    ``rabbitgate_tenant_used`` is what this process holds: summed over the
    processes it is the tenant's shared use, which the alert rule divides by
    ``rabbitgate_tenant_cap``.
    """
    rows = limiter.tenant_gauges()
    used = GaugeMetricFamily(
        "rabbitgate_tenant_used",
        "Connections or subscriptions of a tenant held by this process.",
        labels=["tenant", "quota"],
    )
    cap = GaugeMetricFamily(
        "rabbitgate_tenant_cap",
        "A configured tenant's cap on connections or subscriptions (all processes).",
        labels=["tenant", "quota"],
    )
    for tenant, quota, count, limit in rows:
        used.add_metric([tenant, quota], count)
        if limit is not None:
            cap.add_metric([tenant, quota], limit)
    yield used
    yield cap
    day = GaugeMetricFamily(
        "rabbitgate_tenant_day_ratio",
        "The last shared count of a tenant's messages today, as a fraction of its day quota.",
        labels=["tenant"],
    )
    for (tenant, _), ratio in sorted(limiter.tenant_usage.items()):
        day.add_metric([tenant], ratio)
    yield day
    refusals = CounterMetricFamily(
        "rabbitgate_tenant_refusals",
        "Requests refused by a tenant quota, by tenant and quota.",
        labels=["tenant", "quota"],
    )
    for (tenant, quota), count in sorted(limiter.tenant_refusals.items()):
        refusals.add_metric([tenant, quota], count)
    yield refusals


def _send_buffers(sessions: list[_Connection]) -> Iterator[Metric]:
    sizes = []
    frames_max = 0
    for session in sessions:
        size, frames = session.outbox.pending()
        sizes.append(size)
        frames_max = max(frames_max, frames)
    buckets = [(str(bound), sum(1 for s in sizes if s <= bound)) for bound in SEND_BUFFER_BUCKETS]
    buckets.append(("+Inf", len(sizes)))
    yield GaugeHistogramMetricFamily(
        "rabbitgate_send_buffer_bytes",
        "Bytes waiting in each connection's send buffer, sampled at scrape time.",
        buckets=buckets,
        gsum_value=sum(sizes),
    )
    yield GaugeMetricFamily(
        "rabbitgate_send_buffer_max_bytes",
        "The fullest send buffer now, in bytes (4409 closes it at the configured limit).",
        value=max(sizes, default=0),
    )
    yield GaugeMetricFamily(
        "rabbitgate_send_buffer_max_frames",
        "The fullest send buffer now, in frames.",
        value=frames_max,
    )


def _policy(policies: _Policies, reloader: _Reloader | None) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        "rabbitgate_policy_set_info", "The policy set in force (value 1).", labels=["digest"]
    )
    info.add_metric([policies.digest], 1)
    yield info
    yield GaugeMetricFamily(
        "rabbitgate_policy_rules", "Rules in the policy set in force.", value=len(policies.rules)
    )
    if reloader is None:
        return
    reloads = CounterMetricFamily(
        "rabbitgate_policy_reloads", "Policy reloads, by result.", labels=["result"]
    )
    for result in RELOAD_RESULTS:
        reloads.add_metric([result], float(getattr(reloader, f"reloads_{result}", 0) or 0))
    yield reloads
    yield GaugeMetricFamily(
        "rabbitgate_policy_last_reload_failed",
        "1 when the latest reload was rejected (the last good set stays in force).",
        value=1 if reloader.last_error else 0,
    )
    yield GaugeMetricFamily(
        "rabbitgate_policy_loaded_timestamp_seconds",
        "When the policy set in force was loaded (Unix time).",
        value=float(reloader.loaded_at),
    )
