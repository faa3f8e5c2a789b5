"""Tenant quotas (gateway/limits/tenants.py): the settings and the pure decisions."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.limits.tenants import TenantQuota, TenantSettings, parse_tenant_settings


def test_no_section_means_no_tenant_quotas() -> None:
    settings = parse_tenant_settings(None)
    assert settings.claim is None
    assert settings.tenant_of({"sub": "a", "tenant": "acme"}) is None


def test_default_and_overrides() -> None:
    settings = parse_tenant_settings(
        {
            "claim": "tenant",
            "default": {"connections": 100, "publish": "50/second", "messages_per_day": 10_000},
            "overrides": {"acme": {"connections": 1000, "subscriptions": 5000}},
        }
    )
    assert settings.quota_for("globex") == TenantQuota(
        connections=100, publish_per_second=50.0, burst=50, messages_per_day=10_000
    )
    assert settings.quota_for("acme") == TenantQuota(connections=1000, subscriptions=5000)


@pytest.mark.parametrize(
    ("claims", "tenant"),
    [
        ({"tenant": "acme"}, "acme"),
        ({}, None),
        ({"tenant": ""}, None),
        ({"tenant": 7}, None),  # not a string: no tenant, never str(7)
        ({"tenant": "a" * 65}, None),
        ({"tenant": "acme\nevil"}, None),  # would break a metric label or a key
        ({"tenant": "<script>"}, None),
    ],
)
def test_tenant_of_takes_only_plain_values(claims: dict[str, Any], tenant: str | None) -> None:
    settings = TenantSettings(claim="tenant")
    assert settings.tenant_of(claims) == tenant


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "tenants: must be a mapping"),
        ({"claim": ""}, "tenants.claim"),
        ({"clam": "tenant"}, "tenants.clam: not a known field"),
        ({"claim": "t", "warn_ratio": 0}, "tenants.warn_ratio"),
        ({"claim": "t", "warn_ratio": True}, "tenants.warn_ratio"),
        ({"claim": "t", "default": {"connections": 0}}, "tenants.default.connections"),
        ({"claim": "t", "default": {"connections": "10"}}, "tenants.default.connections"),
        ({"claim": "t", "default": {"publish": "fast"}}, "tenants.default.publish"),
        ({"claim": "t", "default": {"burst": 5}}, "tenants.default.burst: needs"),
        ({"claim": "t", "default": {"per_day": 5}}, "tenants.default.per_day"),
        ({"claim": "t", "overrides": {"a b": {}}}, "tenants.overrides"),
        ({"claim": "t", "overrides": ["acme"]}, "tenants.overrides"),
    ],
)
def test_bad_settings_name_the_field(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        parse_tenant_settings(raw)


@pytest.mark.parametrize(
    ("used", "cap", "near"),
    [(0, 10, False), (7, 10, False), (8, 10, True), (10, 10, True), (5, None, False)],
)
def test_near_cap_at_the_warn_ratio(used: int, cap: int | None, near: bool) -> None:
    assert TenantSettings(claim="t", warn_ratio=0.8).near_cap(used, cap) is near
