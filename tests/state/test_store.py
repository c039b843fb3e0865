"""Every store behaviour, against the in-process store and a real Valkey/Redis alike."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from keyproxy.state.memory import MemoryStore
from keyproxy.state.store import (
    Concurrency,
    Counter,
    Decision,
    Lease,
    Limit,
    Rate,
    Slot,
    StateStore,
    StoreUnavailable,
    _to_its_end,
    hold,
)
from tests.state.servers import until


async def _allowed(store: StateStore, limits: list[Limit], times: int) -> list[Decision]:
    decisions = await asyncio.gather(*(store.take(limits) for _ in range(times)))
    return [decision for decision in decisions if decision.allowed]


async def test_max_uses_is_exact_under_concurrent_takers(store: StateStore, unique: str) -> None:
    """200 concurrent decisions against a cap of 25 admit exactly 25."""
    uses = Counter(f"{unique}:token", cap=25, ttl=60)
    assert len(await _allowed(store, [uses], 200)) == 25
    assert await store.read(uses) == 25
    refused = await store.take([uses])
    assert not refused.allowed
    assert refused.refused_by is not None
    assert refused.refused_by.reason == "max_uses"
    assert 55 < refused.refused_by.retry_after <= 60


async def test_counter_reports_remaining(store: StateStore, unique: str) -> None:
    """Each admitted use lowers `remaining` by one, down to 0 at the cap."""
    uses = Counter(f"{unique}:token", cap=3, ttl=60)
    remaining = [(await store.take([uses])).outcomes[0].remaining for _ in range(3)]
    assert remaining == [2, 1, 0]


async def test_counter_expires_with_its_ttl(store: StateStore, unique: str) -> None:
    """A counter used up comes back empty once its ttl, set by the first use, has passed."""
    uses = Counter(f"{unique}:token", cap=1, ttl=0.3)
    assert (await store.take([uses])).allowed
    assert not (await store.take([uses])).allowed

    async def gone() -> bool:
        return await store.read(uses) == 0

    waited = await until(gone)
    assert waited < 1.5
    assert (await store.take([uses])).allowed


async def test_rate_admits_the_burst_then_refuses(store: StateStore, unique: str) -> None:
    """After a quiet spell a rate admits `burst` requests at once and refuses the rest."""
    rate = Rate(f"{unique}:id", limit=10, window=60, burst=3)
    decisions = [await store.take([rate]) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert [d.outcomes[0].remaining for d in decisions[:3]] == [2, 1, 0]
    refused = decisions[3]
    assert refused.refused_by is not None
    assert refused.refused_by.reason == "rate_limited"
    # The next unit drips in one interval (6 s) after the burst's first.
    assert 5.5 < refused.refused_by.retry_after <= 6.0
    assert refused.retry_after == 6


async def test_rate_admits_again_after_its_interval(store: StateStore, unique: str) -> None:
    """A refused rate admits again after about one interval (window / limit)."""
    rate = Rate(f"{unique}:id", limit=5, window=1.0, burst=1)
    assert (await store.take([rate])).allowed

    async def admitted() -> bool:
        return (await store.take([rate])).allowed

    waited = await until(admitted)
    assert 0.1 < waited < 0.6


async def test_rate_holds_over_a_window(store: StateStore, unique: str) -> None:
    """Requests hammering a 10-per-second rate with burst 2 get 10 to 12 through in 1 s."""
    rate = Rate(f"{unique}:id", limit=10, window=1.0, burst=2)
    admitted = 0
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        admitted += (await store.take([rate])).allowed
        await asyncio.sleep(0.005)
    assert 10 <= admitted <= 12


async def test_refused_limit_consumes_none_of_the_others(store: StateStore, unique: str) -> None:
    """A decision refused by one limit takes nothing from the others (all-or-nothing)."""
    uses = Counter(f"{unique}:token", cap=10, ttl=60)
    slots = Concurrency(f"{unique}:route", limit=1, lease=30)
    rate = Rate(f"{unique}:id", limit=1, window=60, burst=1)
    assert (await store.take([rate])).allowed
    for _ in range(5):
        decision = await store.take([uses, slots, rate])
        assert not decision.allowed
        assert [o.allowed for o in decision.outcomes] == [True, True, False]
        assert decision.slots == ()
    assert await store.read(uses) == 0
    held = await store.take([uses, slots])
    assert held.allowed
    assert await store.read(uses) == 1
    await store.release(held.slots)


async def test_concurrency_slots_are_released(store: StateStore, unique: str) -> None:
    """A cap of 2 refuses a third holder until one of the first two releases its slot."""
    cap = Concurrency(f"{unique}:id", limit=2, lease=30)
    first, second = await store.take([cap]), await store.take([cap])
    assert first.allowed
    assert second.allowed
    third = await store.take([cap])
    assert not third.allowed
    assert third.refused_by is not None
    assert third.refused_by.reason == "too_many_in_flight"
    await store.release(first.slots)
    again = await store.take([cap])
    assert again.allowed
    await store.release([*second.slots, *again.slots])
    assert (await store.take([cap])).outcomes[0].remaining == 1


async def test_slot_of_a_dead_holder_expires(store: StateStore, unique: str) -> None:
    """A slot never released nor refreshed frees itself after its lease."""
    cap = Concurrency(f"{unique}:id", limit=1, lease=0.3)
    held = await store.take([cap])
    assert held.allowed
    started = time.monotonic()
    assert not (await store.take([cap])).allowed

    async def free() -> bool:
        decision = await store.take([cap])
        return decision.allowed

    await until(free)
    assert 0.2 < time.monotonic() - started < 1.5
    assert await store.refresh(held.slots) == held.slots  # the expired slot is reported lost


async def test_a_lapsed_slot_of_a_request_still_running_is_counted_again(
    store: StateStore, unique: str
) -> None:
    """A slot that lapsed while its request ran (the store out of reach for longer than the
    lease) is taken again at the next refresh, reported lapsed: the request still runs, so
    a new one is refused until it ends, as the cap says."""
    cap = Concurrency(f"{unique}:id", limit=1, lease=0.3)
    held = await store.take([cap])
    assert held.allowed

    async def free() -> bool:
        decision = await store.take([cap])
        if decision.allowed:
            await store.release(decision.slots)
        return decision.allowed

    await until(free)  # lapsed: a new request would be let in
    assert await store.refresh(held.slots) == held.slots
    refused = await store.take([cap])
    assert not refused.allowed
    assert refused.refused_by is not None
    assert refused.refused_by.reason == "too_many_in_flight"
    assert await store.refresh(held.slots) == ()  # held again, and kept
    await store.release(held.slots)
    assert await free()


async def test_hold_keeps_the_slot_while_the_request_lives(store: StateStore, unique: str) -> None:
    """`hold` refreshes a slot past its lease while the body runs and releases it on exit."""
    cap = Concurrency(f"{unique}:id", limit=1, lease=0.3)
    held = await store.take([cap])
    async with hold(store, held):
        deadline = time.monotonic() + 1.0  # over three leases
        while time.monotonic() < deadline:
            assert not (await store.take([cap])).allowed
            await asyncio.sleep(0.05)
    after = await store.take([cap])
    assert after.allowed
    await store.release(after.slots)


async def test_hold_releases_when_the_request_fails(store: StateStore, unique: str) -> None:
    """A request that raises inside `hold` still gives its slot back."""
    cap = Concurrency(f"{unique}:id", limit=1, lease=30)
    held = await store.take([cap])
    with pytest.raises(ConnectionResetError):
        async with hold(store, held):
            raise ConnectionResetError
    assert (await store.take([cap])).allowed


async def test_hold_releases_when_the_request_is_cancelled_as_it_releases(
    store: StateStore, unique: str
) -> None:
    """A request cancelled while `hold` gives its slot back (its caller hung up on the
    answer's last byte) still gives it back, and then ends cancelled."""
    cap = Concurrency(f"{unique}:id", limit=1, lease=30)
    held = await store.take([cap])
    answered = asyncio.Event()

    async def request() -> None:
        async with hold(store, held):
            answered.set()
        # leaving: `hold` now waits on the store, where the cancellation lands

    task = asyncio.create_task(request())
    await answered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await store.take([cap])).allowed


async def test_a_release_run_to_its_end_raises_the_cancellation_not_its_error() -> None:
    """`hold`'s release runs to its end under a cancellation, and the caller then sees the
    cancellation even if the release failed (a store gone): the request was cancelled.
    Uncancelled, a failed release is the caller's error."""
    started = asyncio.Event()

    async def failing() -> None:
        started.set()
        await asyncio.sleep(0)
        raise StoreUnavailable("gone")

    task = asyncio.create_task(_to_its_end(failing()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(StoreUnavailable):
        await _to_its_end(failing())


async def test_heartbeat_lease_lives_while_beaten(store: StateStore, unique: str) -> None:
    """A lease is alive after a beat, dies after its ttl without one, and `drop` ends it."""
    key = f"{unique}:task"
    assert not await store.alive(key)
    await store.beat(key, 0.3)
    assert await store.alive(key)

    async def dead() -> bool:
        return not await store.alive(key)

    assert 0.1 < await until(dead) < 1.5
    await store.beat(key, 30)
    await store.drop(key)
    assert not await store.alive(key)


async def test_a_lapsed_lease_is_never_renewed(store: StateStore, unique: str) -> None:
    """`renew` extends a live lease and refuses to bring back one that lapsed or never was."""
    key = f"{unique}:renewed"
    assert not await store.renew(key, 30)
    assert not await store.alive(key)
    await store.beat(key, 0.3)
    assert await store.renew(key, 0.3)

    async def dead() -> bool:
        return not await store.alive(key)

    await until(dead)
    assert not await store.renew(key, 30)
    assert not await store.alive(key)


async def test_a_lapsed_lease_is_handed_to_one_sweeper(store: StateStore, unique: str) -> None:
    """`lapsed` hands out a watched lease's record once the lease lapsed, to one of several
    sweepers at once only, and again after the claim time unless it was unwatched by then; a
    lease alive (beaten for longer, or renewed) is not handed out, an unwatched one never,
    and a record kept past its time is dropped unseen."""
    gone, live, renewed, forgotten, old = (
        f"{unique}:{name}" for name in ("gone", "live", "renewed", "off", "old")
    )
    await store.beat(live, 30)
    await store.watch(live, f"record {live}", 60, 0.3)  # due, but alive: put back
    await store.beat(old, 30)
    await store.watch(old, f"record {old}", 0.01, 0.01)
    await store.drop(old)
    for key in (gone, renewed, forgotten):
        await store.beat(key, 0.3)
        await store.watch(key, f"record {key}", 60, 0.3)
    await store.unwatch(forgotten)
    assert await store.renew(renewed, 30)

    async def dead() -> bool:
        return not await store.alive(gone) and not await store.alive(forgotten)

    await until(dead)

    async def mine(claim: float = 30.0) -> list[str]:
        found = [(k, r) for k, r in await store.lapsed(1000, claim) if unique in k]
        assert all(r == f"record {k}" for k, r in found), found
        return [k for k, _ in found]

    sweeps = await asyncio.gather(*(mine(2.0) for _ in range(5)))
    assert sorted(k for sweep in sweeps for k in sweep) == [gone]
    assert await mine() == []  # taken: not handed out again at once

    async def again() -> bool:
        return await mine() == [gone]

    await until(again)  # its taker did not unwatch it within the claim time
    await store.unwatch(gone)
    # A renewal moved its lease's due time: dropped now, it is not due for 30 s.
    await store.drop(renewed)
    assert await mine() == []


async def test_a_decision_needs_its_leases_alive(store: StateStore, unique: str) -> None:
    """A decision naming a lapsed lease is refused (heartbeat_lost) and takes nothing from
    its other limits; with the lease alive it is allowed, and the lease is left as it was."""
    lease = Lease(f"{unique}:lease")
    uses = Counter(f"{unique}:uses", cap=5, ttl=60)
    refused = await store.take([uses, lease])
    assert not refused.allowed
    assert refused.refused_by is not None
    assert refused.refused_by.reason == "heartbeat_lost"
    assert await store.read(uses) == 0
    await store.beat(lease.key, 30)
    assert (await store.take([uses, lease])).allowed
    assert await store.read(uses) == 1
    assert await store.alive(lease.key)


async def test_check_and_stats(store: StateStore, unique: str) -> None:
    """A reachable store is ready, and counts its decisions and their latency."""
    assert (await store.check()).ok
    before = store.stats.decisions
    await store.take([Counter(f"{unique}:t", cap=1, ttl=60)])
    assert store.stats.decisions == before + 1
    assert store.stats.errors == 0
    assert store.stats.decision_seconds_total > 0
    assert 0 < store.stats.decision_seconds_max < 2.0


async def test_an_empty_decision_is_allowed(store: StateStore) -> None:
    """A request touching no limit is allowed without asking anything."""
    decision = await store.take([])
    assert decision.allowed
    assert decision.retry_after == 0


class _CancelTurnedIntoFault(MemoryStore):
    """An in-process store whose refresh, like some client libraries, turns a cancellation
    that lands inside the call into an error of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.refreshing = asyncio.Event()

    async def refresh(self, slots: Sequence[Slot]) -> tuple[Slot, ...]:
        self.refreshing.set()
        try:
            await asyncio.sleep(0.2)  # a call in flight
        except asyncio.CancelledError:
            raise StoreUnavailable("connection closed") from None
        return await super().refresh(slots)


async def test_hold_ends_even_if_a_refresh_swallows_the_cancellation(unique: str) -> None:
    """Leaving `hold` ends its refresher and frees the slot within one store call, even when
    the call in flight turned the cancellation into a store fault."""
    store = _CancelTurnedIntoFault()
    cap = Concurrency(f"{unique}:id", limit=1, lease=0.03)
    held = await store.take([cap])
    async with asyncio.timeout(5):
        async with hold(store, held):
            await store.refreshing.wait()
    assert (await store.take([cap])).allowed
