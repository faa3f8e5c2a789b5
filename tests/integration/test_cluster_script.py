"""scripts/cluster start: a healthy cluster is reused, a broken one is made again.

The chaos tests (test_cluster.py) kill and stop nodes; a run that crashes half
way leaves a cluster with a node down or out of the cluster, and the next
run's ``start`` must not build on it. Run under flock /tmp/rabbitgate-cluster.lock.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_cluster import CLUSTER_URL, ROOT, streams_work

pytestmark = [pytest.mark.integration, pytest.mark.cluster]
BASE = Path(os.environ.get("RABBITGATE_CLUSTER_DIR", "/tmp/rabbitgate-cluster"))
NODE_NAMES = [f"rgc{n}@localhost" for n in (1, 2, 3)]


def script(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / "cluster"), *command],
        capture_output=True,
        text=True,
        timeout=300,
    )


def ctl(node: str, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rabbitmqctl", "-q", "-n", node, *command], capture_output=True, text=True, timeout=60
    )


def assert_healthy() -> None:
    for node in NODE_NAMES:
        check = subprocess.run(
            ["rabbitmq-diagnostics", "-q", "-n", node, "check_running"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, f"{node}: {check.stdout} {check.stderr}"
    status = ctl(NODE_NAMES[0], "cluster_status", "--formatter", "json").stdout
    running = status.split('"running_nodes":[', 1)[1].split("]", 1)[0]
    assert all(node in running for node in NODE_NAMES), running


@pytest.fixture
def cluster_up() -> Iterator[None]:
    started = script("start")
    assert started.returncode == 0, started.stderr
    yield
    script("stop")


def test_start_reuses_a_healthy_cluster_and_recreates_a_broken_one(cluster_up: None) -> None:
    assert_healthy()
    marker = BASE / "marker"  # gone once the data directories are wiped
    marker.write_text("the cluster this test started\n")

    again = script("start")
    assert again.returncode == 0, again.stderr
    assert "recreating" not in again.stderr
    assert marker.exists()  # healthy: reused as it was

    # A node whose app is stopped (what a chaos run leaves when it dies after stop_app).
    assert ctl("rgc2@localhost", "stop_app").returncode == 0
    fixed = script("start")
    assert fixed.returncode == 0, fixed.stderr
    assert "rgc2@localhost is down or its app is stopped: recreating it" in fixed.stderr
    assert not marker.exists()
    assert_healthy()

    # A node that left the cluster (reset on its own) is not reused either.
    marker.write_text("second\n")
    for command in (("stop_app",), ("reset",), ("start_app",)):
        assert ctl("rgc3@localhost", *command).returncode == 0
    fixed = script("start")
    assert fixed.returncode == 0, fixed.stderr
    assert "rgc3@localhost is not clustered with rgc1@localhost: recreating it" in fixed.stderr
    assert not marker.exists()
    assert_healthy()
    # And the new cluster replicates streams.
    asyncio.run(streams_work(CLUSTER_URL.split(",")[0]))
