"""The evaluation pipeline end to end, small: real gateway, real clients in their
own process, warm-up on normal traffic, then attacks. It asserts the blatant
kinds are detected and explained; the full evaluation (README table) is
``rabbitgate anomaly evaluate``."""

from __future__ import annotations

import pytest

from evaluation.live import ScenarioConfig, label_of, metrics, run_scenario

pytestmark = pytest.mark.integration

BLATANT = ("credential_stuffing", "channel_scanning", "large_payloads", "token_many_addresses")


async def test_the_detector_finds_the_blatant_attacks_of_a_small_scenario() -> None:
    config = ScenarioConfig(
        window_seconds=2.0,
        # One attacker per kind is the slowest of each (0.7 stuffing attempts, one
        # scanning subscribe a second): 1-2 events in a 2 s window, which is what
        # the long window is for. (Without it, those two kinds were missed in most
        # windows; their refusals were all counted, the windows were too short.)
        long_window_windows=3,
        warmup_windows=12,
        attack_windows=6,
        normal_users=14,
        attackers_per_kind=1,
        kinds=BLATANT,
        seed=3,
    )
    result = await run_scenario(config)
    rows = {row.kind: row for row in metrics(result.decisions, result.labels, "@2s")}
    assert set(rows) == {*BLATANT, "normal"}
    for kind in BLATANT:
        row = rows[kind]
        assert row.windows >= 3, row
        assert row.recall is not None and row.recall >= 0.6, rows
    assert rows["normal"].windows >= 20
    # Flagged windows became alerts that say why.
    attacked = {
        (d.window.subject_kind, d.window.key)
        for d in result.decisions
        if d.flagged and label_of(d, result.labels) in BLATANT
    }
    alerted = {
        (a["subject"]["kind"], a["subject"].get(a["subject"]["kind"])) for a in result.alerts
    }
    assert attacked <= alerted
    assert all(a["reasons"] and a["reasons"][0]["text"] for a in result.alerts)
