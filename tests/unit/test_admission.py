"""RefusalMemory: which addresses are closed before TLS (gateway/transports/admission.py)."""

from __future__ import annotations

from gateway.transports.admission import RefusalMemory


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_address_is_dropped_only_after_ignoring_retry_after_more_than_the_tolerance() -> None:
    clock = Clock()
    memory = RefusalMemory(tolerance=2, max_addresses=10, clock=clock)
    memory.refused("10.0.0.1", 5.0)  # told to wait 5 s
    assert not memory.drop("10.0.0.1")
    clock.now += 1
    memory.refused("10.0.0.1", 5.0)  # came back after 1 s: ignored once
    assert not memory.drop("10.0.0.1")
    memory.refused("10.0.0.1", 5.0)  # twice
    assert memory.drop("10.0.0.1")
    assert not memory.drop("10.0.0.2")


def test_the_drop_ends_with_the_latest_retry_after() -> None:
    clock = Clock()
    memory = RefusalMemory(tolerance=1, max_addresses=10, clock=clock)
    memory.refused("a", 2.0)
    clock.now += 1.5
    memory.refused("a", 2.0)  # ignored: the wait now ends at +3.5
    clock.now += 1.9
    assert memory.drop("a")
    clock.now += 0.1
    assert not memory.drop("a")
    assert len(memory) == 0  # forgotten once over


def test_a_client_that_waits_as_told_starts_over() -> None:
    clock = Clock()
    memory = RefusalMemory(tolerance=1, max_addresses=10, clock=clock)
    for _ in range(5):
        memory.refused("a", 2.0)
        clock.now += 2.0  # honours Retry-After every time
        assert not memory.drop("a")


def test_tolerance_zero_never_drops_and_unknown_addresses_are_let_through() -> None:
    memory = RefusalMemory(tolerance=0, max_addresses=10, clock=Clock())
    for _ in range(10):
        memory.refused("a", 60.0)
    assert not memory.drop("a")
    assert not memory.drop(None)
    memory.refused(None, 60.0)
    assert len(memory) == 0


def test_memory_is_bounded_and_forgets_the_least_recently_refused() -> None:
    clock = Clock()
    memory = RefusalMemory(tolerance=1, max_addresses=3, clock=clock)
    for address in ("a", "b", "c"):
        memory.refused(address, 60.0)
        memory.refused(address, 60.0)
    memory.refused("a", 60.0)  # a is the most recent now
    memory.refused("d", 60.0)  # evicts b
    assert len(memory) == 3
    assert memory.drop("a") and memory.drop("c")
    assert not memory.drop("b")
