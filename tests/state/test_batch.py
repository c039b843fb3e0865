"""Decisions of one event-loop turn share a round trip, and each keeps its own answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from keyproxy.state.redis import RedisSettings, RedisStore
from keyproxy.state.store import Concurrency, Counter, Rate
from tests.state.servers import RedisServer


@pytest.fixture
async def redis_store(redis_server: RedisServer, unique: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(RedisSettings(url=redis_server.url, timeout=2.0, prefix=f"kp-{unique}"))
    try:
        yield store
    finally:
        await store.close()


def _connections(server: RedisServer) -> int:
    with server.client() as admin:
        return len(admin.client_list()) - 1  # less this one


async def test_one_turns_decisions_share_one_connection_and_stay_exact(
    own_redis: RedisServer, unique: str
) -> None:
    """200 decisions started in one loop turn go out on one pooled connection, and a
    counter capped at 25 among them admits exactly 25."""
    store = RedisStore(RedisSettings(url=own_redis.url, timeout=2.0))
    uses = Counter(f"{unique}:token", cap=25, ttl=60)
    rate = Rate(f"{unique}:identity", limit=10**6, window=1.0, burst=10**6)
    try:
        decisions = await asyncio.gather(*(store.take([rate, uses]) for _ in range(200)))
        assert _connections(own_redis) == 1  # a server of its own: the store's one connection
        assert await store.read(uses) == 25
    finally:
        await store.close()
    assert sum(decision.allowed for decision in decisions) == 25
    assert not any(outcome.store_error for d in decisions for outcome in d.outcomes)
    refused = [d.refused_by for d in decisions if not d.allowed]
    assert all(outcome is not None and outcome.reason == "max_uses" for outcome in refused)


async def test_an_error_reply_is_its_own_decisions_only(
    redis_store: RedisStore, redis_server: RedisServer, unique: str
) -> None:
    """A decision whose script fails (a key of the wrong type) refuses fail-closed on its
    own; the decisions sent with it in the same round trip are answered as usual."""
    with redis_server.client() as admin:
        admin.hset(f"{{kp-{unique}}}:c:{unique}:broken", "not", "a counter")
    broken = Counter(f"{unique}:broken", cap=10, ttl=60)
    fine = Counter(f"{unique}:fine", cap=10, ttl=60)
    first, *others = await asyncio.gather(
        redis_store.take([broken]), *(redis_store.take([fine]) for _ in range(5))
    )
    assert not first.allowed
    assert first.outcomes[0].store_error
    assert first.outcomes[0].reason == "state_store_unavailable"
    assert all(decision.allowed for decision in others)
    assert [decision.outcomes[0].remaining for decision in others] == [9, 8, 7, 6, 5]


async def test_lost_scripts_are_loaded_again_for_a_whole_turn(
    redis_store: RedisStore, redis_server: RedisServer, unique: str
) -> None:
    """After SCRIPT FLUSH, the 30 decisions of one turn that all meet NOSCRIPT are sent
    again once the script is loaded, each counted exactly once."""
    uses = Counter(f"{unique}:token", cap=100, ttl=60)
    assert (await redis_store.take([uses])).allowed
    with redis_server.client() as admin:
        admin.script_flush()
    decisions = await asyncio.gather(*(redis_store.take([uses]) for _ in range(30)))
    assert all(decision.allowed for decision in decisions)
    assert await redis_store.read(uses) == 31


async def test_a_decision_cancelled_before_its_turn_ends_is_not_sent(
    redis_store: RedisStore, unique: str
) -> None:
    """A caller that goes away before its decision was sent consumes nothing."""
    uses = Counter(f"{unique}:token", cap=10, ttl=60)
    gone = asyncio.create_task(redis_store.take([uses]))
    await asyncio.sleep(0)  # one loop turn: the call is queued, not yet sent
    gone.cancel()
    assert (await redis_store.take([uses])).allowed
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert await redis_store.read(uses) == 1


async def test_slots_released_in_one_turn_are_all_free_again(
    redis_store: RedisStore, unique: str
) -> None:
    """Five slots released together (one round trip) are all free for the next five."""
    cap = Concurrency(f"{unique}:streams", limit=5, lease=30)
    held = await asyncio.gather(*(redis_store.take([cap]) for _ in range(5)))
    assert all(decision.allowed for decision in held)
    assert not (await redis_store.take([cap])).allowed
    await asyncio.gather(*(redis_store.release(decision.slots) for decision in held))
    again = await asyncio.gather(*(redis_store.take([cap]) for _ in range(6)))
    assert sum(decision.allowed for decision in again) == 5
