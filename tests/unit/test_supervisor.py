"""The supervisor's decisions (restart, give up, readiness), its port
reservation and the merge of the workers' metrics."""

from __future__ import annotations

import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.operations.fleetmetrics import merge, render
from gateway.operations.supervisor import (
    Backoff,
    Expected,
    GiveUp,
    Restart,
    SupervisorError,
    fleet_readiness,
    on_exit,
    reserve_port,
)

B = Backoff(base_seconds=0.5, cap_seconds=8.0, stable_after_seconds=30.0)


@pytest.mark.parametrize(
    ("stopping", "fleet_started", "was_ready", "ran", "failures", "expected"),
    [
        # Asked to stop: every exit is expected, whatever else is true.
        (True, False, False, 0.1, 0, Expected()),
        (True, True, True, 100.0, 5, Expected()),
        # Never ready before the fleet ever was: it cannot start (bind, policies, broker).
        (False, False, False, 0.1, 0, GiveUp("could not start")),
        (False, False, False, 60.0, 0, GiveUp("could not start")),
        # It was ready once, even before the others: a crash, restart it.
        (False, False, True, 5.0, 0, Restart(1.0, 1)),
        # The fleet ran: restarts double with each quick death...
        (False, True, False, 0.2, 0, Restart(1.0, 1)),
        (False, True, True, 1.0, 1, Restart(2.0, 2)),
        (False, True, True, 1.0, 2, Restart(4.0, 3)),
        # ...up to the cap, never faster than that however many deaths...
        (False, True, True, 1.0, 3, Restart(8.0, 4)),
        (False, True, True, 1.0, 1000, Restart(8.0, 1001)),
        # ...and a worker that lived past stable_after starts over at the base delay.
        (False, True, True, 30.0, 7, Restart(0.5, 0)),
        (False, True, True, 3600.0, 0, Restart(0.5, 0)),
    ],
)
def test_what_the_supervisor_does_when_a_worker_ends(
    stopping: bool,
    fleet_started: bool,
    was_ready: bool,
    ran: float,
    failures: int,
    expected: object,
) -> None:
    decision = on_exit(
        stopping=stopping,
        fleet_started=fleet_started,
        was_ready=was_ready,
        ran_seconds=ran,
        quick_failures=failures,
        backoff=B,
    )
    assert decision == expected


def test_a_dying_worker_costs_at_most_one_start_per_cap_once_it_keeps_dying() -> None:
    failures, waited = 0, 0.0
    for _ in range(100):
        decision = on_exit(
            stopping=False,
            fleet_started=True,
            was_ready=False,
            ran_seconds=0.0,
            quick_failures=failures,
            backoff=B,
        )
        assert isinstance(decision, Restart)
        failures, waited = decision.quick_failures, waited + decision.delay
    assert waited >= 90 * B.cap_seconds  # 100 deaths in a row: no fork storm


@pytest.mark.parametrize(
    ("answers", "stopping", "reason"),
    [
        ([None, None], False, None),
        ([None], False, None),
        ([None, "broker not connected"], False, "worker 1: broker not connected"),
        (["not running", "not answering"], False, "worker 0: not running"),
        ([None, None], True, "shutting down"),
    ],
)
def test_the_fleet_is_ready_only_when_every_worker_is(
    answers: list[str | None], stopping: bool, reason: str | None
) -> None:
    assert fleet_readiness(answers, stopping) == reason


def test_a_port_another_process_listens_on_is_refused_even_if_it_shares_it() -> None:
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(SupervisorError, match=f"cannot listen on 127.0.0.1:{port}"):
            reserve_port("127.0.0.1", port)


def test_a_reserved_port_can_be_shared_by_workers_and_takes_no_connection() -> None:
    held = reserve_port("127.0.0.1", 0)
    try:
        port = held.getsockname()[1]
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
            worker.settimeout(5)
            for _ in range(20):  # every connection goes to the listening worker
                with socket.create_connection(("127.0.0.1", port), timeout=5):
                    accepted, _ = worker.accept()
                    accepted.close()
    finally:
        held.close()


WORKER = """# HELP rabbitgate_messages_in_total Publishes.
# TYPE rabbitgate_messages_in_total counter
rabbitgate_messages_in_total{exchange="chat"} 3.0
# HELP rabbitgate_connections_open Open.
# TYPE rabbitgate_connections_open gauge
rabbitgate_connections_open{transport="websocket"} %d
"""


def test_metrics_of_the_workers_become_one_family_each_labelled_by_worker() -> None:
    families = {f.name: f for f in merge({"0": WORKER % 5, "1": WORKER % 7})}
    opened = families["rabbitgate_connections_open"]
    assert sorted((s.labels["worker"], s.value) for s in opened.samples) == [("0", 5), ("1", 7)]
    assert {s.labels["exchange"] for s in families["rabbitgate_messages_in"].samples} == {"chat"}
    text = render(
        {"0": WORKER % 5, "1": WORKER % 7},
        "# TYPE rabbitgate_workers gauge\nrabbitgate_workers 2\n",
    )
    assert text.decode().count("# TYPE rabbitgate_connections_open gauge") == 1
    parsed = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert len(parsed["rabbitgate_messages_in"].samples) == 2
    assert parsed["rabbitgate_workers"].samples[0].value == 2
