"""The shared heartbeat schedule (gateway/transports/heartbeat.py), on a fake clock and link."""

from __future__ import annotations

import pytest

from gateway.transports.heartbeat import Heartbeat


class FakeLink:
    """Records pings; a connection answers each ping ``delay`` seconds after
    it (None: never)."""

    def __init__(self, delays: dict[str, float | None]) -> None:
        self.delays = delays
        self.now = 0.0
        self.pings: list[tuple[str, float]] = []
        self.expired: list[tuple[str, float]] = []
        self.closed: set[str] = set()
        self._sent: dict[tuple[str, bytes], float] = {}

    def ping(self, connection: str, payload: bytes) -> bool:
        if connection in self.closed:
            return False
        self.pings.append((connection, self.now))
        self._sent[(connection, payload)] = self.now
        return True

    def answered(self, connection: str, payload: bytes) -> bool:
        delay = self.delays[connection]
        return delay is not None and self._sent[(connection, payload)] + delay <= self.now

    def expire(self, connection: str) -> None:
        self.expired.append((connection, self.now))
        self.closed.add(connection)  # gone by its next beat


def drive(heartbeat: Heartbeat[str], link: FakeLink, until: float) -> None:
    """What ``run`` does, on a fake clock that moves one tick at a time."""
    steps = round(until / heartbeat.tick)
    for step in range(1, steps + 1):
        link.now = step * heartbeat.tick
        for beat in heartbeat.due(link.now):
            heartbeat.beat(beat, link.now, b"p%d" % step)


def times(link: FakeLink, connection: str) -> list[float]:
    return [round(at, 3) for name, at in link.pings if name == connection]


@pytest.mark.parametrize(
    ("interval", "timeout", "delay", "pings", "expired_at"),
    [
        # A peer that answers at once: a ping every interval, never closed.
        (20.0, 20.0, 0.01, [20.0, 40.0, 60.0, 80.0, 100.0], None),
        # Answers slower than the interval but within the timeout: pinged as
        # soon as the answer is seen, at the latest at ping + timeout.
        (10.0, 30.0, 15.0, [10.0, 40.0, 70.0, 100.0], None),
        # Timeout shorter than the interval: the check comes at ping + timeout.
        (20.0, 5.0, 1.0, [20.0, 40.0, 60.0, 80.0, 100.0], None),
        # Never answers: closed at first ping + timeout, pinged once.
        (20.0, 20.0, None, [20.0], 40.0),
        (20.0, 5.0, None, [20.0], 25.0),
        (10.0, 30.0, None, [10.0], 40.0),
        # Answers too late: closed at ping + timeout.
        (20.0, 5.0, 6.0, [20.0], 25.0),
    ],
)
def test_pings_and_closes_on_websockets_schedule(
    interval: float,
    timeout: float,
    delay: float | None,
    pings: list[float],
    expired_at: float | None,
) -> None:
    link = FakeLink({"c": delay})
    heartbeat = Heartbeat(link, interval, timeout, now=0.0)
    heartbeat.add("c", 0.0)
    drive(heartbeat, link, 105.0)
    assert times(link, "c") == pings
    if expired_at is None:
        assert link.expired == []
        assert len(heartbeat) == 1
    else:
        assert [(name, round(at, 3)) for name, at in link.expired] == [("c", expired_at)]
        assert len(heartbeat) == 0 and heartbeat.expired == 1


def test_a_discarded_connection_is_never_pinged_again() -> None:
    link = FakeLink({"a": 0.0, "b": 0.0})
    heartbeat = Heartbeat(link, 1.0, 1.0, now=0.0)
    heartbeat.add("a", 0.0)
    heartbeat.add("b", 0.0)
    drive(heartbeat, link, 1.5)
    heartbeat.discard("a")
    heartbeat.discard("a")  # twice is harmless
    drive(heartbeat, link, 5.0)
    assert times(link, "a") == [1.0]
    assert len(times(link, "b")) >= 4
    assert len(heartbeat) == 1


def test_a_connection_that_closed_by_itself_is_dropped_at_its_next_ping() -> None:
    link = FakeLink({"a": 0.0})
    heartbeat = Heartbeat(link, 1.0, 1.0, now=0.0)
    heartbeat.add("a", 0.0)
    link.closed.add("a")
    drive(heartbeat, link, 3.0)
    assert link.pings == [] and link.expired == [] and len(heartbeat) == 0


def test_connections_added_over_time_are_each_pinged_once_per_interval() -> None:
    names = [f"c{i}" for i in range(300)]
    link = FakeLink(dict.fromkeys(names, 0.0))
    heartbeat = Heartbeat(link, 20.0, 20.0, now=0.0)
    for i, name in enumerate(names):  # one connection every 0.1 s
        link.now = i * 0.1
        heartbeat.add(name, link.now)
        drive_to = link.now
        for beat in heartbeat.due(drive_to):
            heartbeat.beat(beat, drive_to, b"x")
    drive(heartbeat, link, 200.0)
    for i, name in enumerate(names):
        pinged = times(link, name)
        added = i * 0.1
        # First ping one interval after it came, then every interval (to a tick).
        assert pinged[0] == pytest.approx(added + 20.0, abs=heartbeat.tick + 1e-9)
        gaps = [b - a for a, b in zip(pinged, pinged[1:], strict=False)]
        assert all(abs(gap - 20.0) <= heartbeat.tick + 1e-9 for gap in gaps)
    # Spread as they came (10 a tick): no tick holds more than two ticks' worth.
    per_tick: dict[float, int] = {}
    for _, at in link.pings:
        per_tick[at] = per_tick.get(at, 0) + 1
    assert max(per_tick.values()) <= 2 * round(heartbeat.tick / 0.1) + 1


def test_the_tick_follows_the_shorter_setting() -> None:
    link = FakeLink({})
    assert Heartbeat(link, 20.0, 20.0, now=0.0).tick == 1.0
    assert Heartbeat(link, 0.2, 0.3, now=0.0).tick == pytest.approx(0.01)
    with pytest.raises(ValueError):
        Heartbeat(link, 0.0, 1.0, now=0.0)
