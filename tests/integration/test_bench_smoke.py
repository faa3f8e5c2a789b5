"""Smoke runs of the load tools in bench/: tiny parameters, real gateway, real
RabbitMQ (and Web-STOMP on it). They check that each tool runs to the end and
reports every figure; they never assert on a time, a rate or a ratio, which
depend on the machine."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_SECONDS = 240


def run_tool(module: str, *args: str) -> dict[str, Any]:
    """Run ``python -m bench.<module> ... --json``; its parsed report, or a failure
    that shows what the tool printed."""
    command = [sys.executable, "-m", f"bench.{module}", *args, "--json"]
    result = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        check=False,
    )
    assert result.returncode == 0, (
        f"{' '.join(command[1:])} exited with {result.returncode}:\n"
        f"{result.stderr[-3000:]}\n{result.stdout[-2000:]}"
    )
    report = json.loads(result.stdout)
    assert isinstance(report, dict)
    return report


def number(value: Any) -> float:
    assert isinstance(value, int | float) and not isinstance(value, bool), value
    assert math.isfinite(value), value
    return float(value)


def check_fan_out(result: dict[str, Any], subscribers: int) -> None:
    assert result["subscribers"] == subscribers
    assert number(result["delivered"]) > 0
    assert number(result["delivered_per_s"]) > 0
    for key in ("p50", "p99", "max"):
        assert number(result["latency_ms"][key]) >= 0
    for key in ("gateway", "broker", "server", "clients"):
        assert number(result["cpu_seconds"][key]) >= 0
    for key in ("gateway", "broker", "server", "server_above_idle"):
        assert number(result["cpu_us_per_delivery"][key]) >= 0


def test_load_against_gateway_and_webstomp() -> None:
    # The tool enables rabbitmq_web_stomp itself when it is off; when it cannot,
    # it exits non-zero with the reason, and this test fails with that message.
    report = run_tool(
        "load",
        "--subscribers", "5",
        "--seconds", "2",
        "--warmup", "1",
        "--rate", "50",
        "--idle-seconds", "0.5",
    )  # fmt: skip
    results = report["results"]
    assert set(results) == {"gateway", "webstomp"}
    check_fan_out(results["gateway"], 5)
    check_fan_out(results["webstomp"], 5)
    assert number(results["gateway"]["cpu_seconds"]["gateway"]) > 0
    for key in ("server_cpu_per_delivery", "p50_latency", "p99_latency", "delivered_per_s"):
        number(report["ratios"]["webstomp"][key])
    # Idle-deducted CPU can be zero on a 2-second run on a shared broker (it
    # burnt no more than at rest): the ratio is then undefined (NaN), not wrong.
    above_idle = report["ratios"]["webstomp"]["server_cpu_above_idle_per_delivery"]
    assert isinstance(above_idle, float) and (math.isnan(above_idle) or above_idle >= 0)


def test_load_against_socketio_floor_and_a_base_copy() -> None:
    """Socket.IO + Redis (npm packages installed by the tool when missing), the bare
    websockets floor, and an A/B 'base' target run from another copy of the code
    (here the same one), interleaved over two rounds with medians and ranges."""
    report = run_tool(
        "load",
        "--target", "gateway,base,socketio,floor",
        "--base-src", str(ROOT),
        "--subscribers", "4",
        "--seconds", "1.5",
        "--warmup", "0.5",
        "--rate", "40",
        "--size", "100",
        "--idle-seconds", "0.3",
        "--rounds", "2",
    )  # fmt: skip
    results = report["results"]
    assert set(results) == {"gateway", "base", "socketio", "floor"}
    for name in results:
        check_fan_out(results[name], 4)
        assert results[name]["errors"] == 0, results[name]["error_samples"]
    assert number(results["socketio"]["cpu_seconds"]["gateway"]) > 0  # node's CPU
    assert results["floor"]["cpu_seconds"]["broker"] == 0  # no backend at all
    assert set(report["ratios"]) == {"base", "socketio", "floor"}
    over = report["over_rounds"]
    for name in ("gateway", "socketio"):
        median, low, high = over["targets"][name]["server_us_per_delivery"]
        assert low <= median <= high
    median, low, high = over["ratios"]["socketio"]["p99_latency"]
    assert low <= median <= high


def test_pauses_with_churn_and_fan_out() -> None:
    report = run_tool(
        "pauses",
        "--connections", "40",
        "--subscribers", "4",
        "--churn", "10",
        "--rate", "20",
        "--seconds", "2",
        "--warmup", "0.5",
    )  # fmt: skip
    result = report["rounds"][0]["gateway"]
    assert result["tls"] is True
    assert result["connections"] == 40
    loop = result["loop"]
    for key in ("p99", "p999", "max"):
        assert number(loop["lag_ms"][key]) >= 0
    assert loop["lag_samples"] > 0
    number(loop["gc_pause_max_ms"])
    # The gateway froze what it held (gateway/operations/collector.py).
    assert loop["gc_frozen_objects"] > 0
    assert number(result["delivered_per_s"]) > 0
    assert number(result["churn"]["opened_per_s"]) > 0
    assert result["churn"]["failed"] == 0


def test_pauses_keeps_its_connections_past_the_idle_timeout() -> None:
    """The clients ping every `heartbeat` of their welcome, as a client that only
    listens must: with the idle timeout at 2 s and a 5 s window, none is closed."""
    report = run_tool(
        "pauses",
        "--connections", "20",
        "--subscribers", "2",
        "--churn", "0",
        "--rate", "10",
        "--seconds", "5",
        "--warmup", "0.5",
        "--env", "RABBITGATE_LIMITS_IDLE_TIMEOUT_SECONDS=2",
        "--env", "RABBITGATE_LIMITS_HEARTBEAT_SECONDS=0.5",
    )  # fmt: skip
    result = report["rounds"][0]["gateway"]
    assert result["open_at_end"] == result["connections"] == 20


def test_load_over_tls_flat_out() -> None:
    report = run_tool(
        "load",
        "--subscribers", "3",
        "--publishers", "2",
        "--rate", "0",
        "--seconds", "2",
        "--warmup", "0.5",
        "--tls",
        "--target", "gateway",
        "--idle-seconds", "0.5",
    )  # fmt: skip
    result = report["results"]["gateway"]
    assert result["tls"] is True
    check_fan_out(result, 3)
    assert report["ratios"] is None


def test_load_over_stomp_to_the_gateway() -> None:
    """The gateway's STOMP (the frames Web-STOMP takes, the JWT as passcode)."""
    report = run_tool(
        "load",
        "--subscribers", "3",
        "--seconds", "2",
        "--warmup", "0.5",
        "--rate", "50",
        "--tls",
        "--target", "gateway-stomp",
        "--idle-seconds", "0.5",
    )  # fmt: skip
    result = report["results"]["gateway-stomp"]
    assert result["tls"] is True and result["errors"] == 0, result["error_samples"]
    check_fan_out(result, 3)
    assert number(result["cpu_seconds"]["gateway"]) > 0


def test_publish_throughput() -> None:
    report = run_tool(
        "publish", "--connections", "2", "--window", "8", "--seconds", "2", "--warmup", "0.5"
    )
    assert number(report["gateway"]["confirmed_per_s"]) > 0
    assert number(report["bare_aio_pika"]["confirmed_per_s"]) > 0
    assert number(report["gateway"]["gateway_cpu_seconds"]) >= 0
    number(report["ratio"])


def test_connections() -> None:
    report = run_tool("connections", "--connections", "50", "--hold", "0.5")
    assert report["tls"] is True
    assert report["opened"] > 0
    number(report["connections_per_s"])
    number(report["rss_kib_per_connection"])
    assert number(report["rss_kib_after"]) > 0
    number(report["setup_ms"]["p99"])


def test_memory_floor_of_every_layer() -> None:
    report = run_tool("memfloor", "--connections", "40")
    layers = [result["layer"] for result in report["results"]]
    assert layers == ["tcp", "tls", "tls-layer", "ws", "wss"]
    for result in report["results"]:
        assert result["connections"] == 40, result
        number(result["kib_per_connection"])
        assert number(result["rss_kib_after"]) > 0


def test_connections_with_a_variant_in_rounds() -> None:
    report = run_tool(
        "connections",
        "--connections",
        "20",
        "--hold",
        "0.2",
        "--variant",
        "mmap,MALLOC_ARENA_MAX=2",
    )
    assert [run["target"] for run in report["runs"]] == ["gateway", "mmap"]
    for run in report["runs"]:
        assert run["opened"] > 0
        number(run["rss_kib_per_connection"])


def test_broker_cost_of_every_variant() -> None:
    variants = (
        "gateway,replica,write-only,no-confirm,default-exchange,prefetch-100,batch-2,"
        "classic-transient,classic-transient-ack,classic-durable,classic-maxlen,classic-lazy,no-history,bare-props"
    )
    report = run_tool(
        "brokercost",
        "--rate",
        "50",
        "--seconds",
        "0.4",
        "--idle-seconds",
        "0.2",
        "--variants",
        variants,
    )
    found = {r["variant"]: r for r in report["results"]}
    assert set(found) == set(variants.split(","))
    for name, r in found.items():
        assert r["published"] > 0
        # Every message published is delivered once, but for the variant that
        # consumes nothing.
        assert r["received"] == (0 if name == "write-only" else r["published"]), name
        number(r["broker_us_per_message"])
        number(r["broker_us_per_message_above_idle"])


def test_wakeup_prices_every_gap_on_one_core_and_two() -> None:
    report = run_tool("wakeup", "--trips", "20")
    rows = report["rows"]
    assert {(r["cores"], r["gap_ms"]) for r in rows} >= {("one", 0.0), ("one", 10.0)}
    for row in rows:
        assert number(row["parent_us_per_trip"]) > 0
        assert number(row["child_us_per_trip"]) >= 0
