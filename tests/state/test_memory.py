"""The in-process store under a clock the test moves: exact window bounds, no waiting."""

from __future__ import annotations

from keyproxy.state.memory import MemoryStore
from keyproxy.state.store import Concurrency, Counter, Rate


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_rate_bound_in_every_window() -> None:
    """50 per 10 s with burst 5, hammered every 10 ms for 60 s: every 10-s span admits
    50 to 55, the first one included."""
    clock = Clock()
    store = MemoryStore(clock)
    rate = Rate("id", limit=50, window=10, burst=5)
    admitted_at = []
    for step in range(6000):
        clock.now = 1000.0 + step * 0.01
        if (await store.take([rate])).allowed:
            admitted_at.append(clock.now)
    for start in (1000.0 + s * 0.5 for s in range(100)):
        in_window = sum(start <= t < start + 10 for t in admitted_at)
        assert 49 <= in_window <= 55, (start, in_window)
    assert sum(t < 1010.0 for t in admitted_at) >= 50


async def test_counter_and_slot_expire_on_the_clock() -> None:
    """A counter comes back after its ttl and a slot frees after its lease, by the clock."""
    clock = Clock()
    store = MemoryStore(clock)
    uses = Counter("token", cap=1, ttl=60)
    cap = Concurrency("route", limit=1, lease=30)
    assert (await store.take([uses, cap])).allowed
    clock.now += 29.9
    assert not (await store.take([cap])).allowed
    clock.now += 0.2
    assert (await store.take([cap])).allowed
    assert not (await store.take([uses])).allowed
    clock.now += 30
    assert await store.read(uses) == 0
    assert (await store.take([uses])).allowed
