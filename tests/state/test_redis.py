"""The Valkey/Redis store's own behaviours: across processes, outages, AUTH, lost scripts."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from keyproxy.state.redis import RedisSettings, RedisStore
from keyproxy.state.store import Counter, Decision, Health, OnStoreError, StoreUnavailable
from tests.state.servers import RedisServer, Relay, until

# Run by each of two OS processes: 100 concurrent decisions, then the number admitted.
_TAKER = """
import asyncio, sys
from keyproxy.state.redis import RedisSettings, RedisStore
from keyproxy.state.store import Counter

async def main() -> None:
    store = RedisStore(RedisSettings(url=sys.argv[1], timeout=5.0))
    uses = Counter(sys.argv[2], cap=25, ttl=60)
    decisions = await asyncio.gather(*(store.take([uses]) for _ in range(100)))
    await store.close()
    print(sum(d.allowed for d in decisions))

asyncio.run(main())
"""


def test_max_uses_is_exact_across_processes(redis_server: RedisServer, unique: str) -> None:
    """Two OS processes taking 100 each against a cap of 25 get exactly 25 between them."""
    takers = [
        subprocess.Popen(
            [sys.executable, "-c", _TAKER, redis_server.url, f"{unique}:token"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    admitted = [int(taker.communicate(timeout=60)[0]) for taker in takers]
    assert [taker.returncode for taker in takers] == [0, 0]
    assert sum(admitted) == 25


async def test_outage_fails_closed_or_allows_then_recovers(
    own_redis: RedisServer, unique: str
) -> None:
    """With the store stopped, fail-closed limits refuse and `allow` ones pass, quickly;
    after a restart on the same port the same store object decides again."""
    store = RedisStore(RedisSettings(url=own_redis.url, timeout=0.25))
    closed = Counter(f"{unique}:closed", cap=100, ttl=60)
    open_ = Counter(f"{unique}:open", cap=100, ttl=60, on_store_error=OnStoreError.ALLOW)
    assert (await store.take([closed, open_])).allowed

    own_redis.stop()
    started = time.monotonic()
    refused = await store.take([closed])
    assert not refused.allowed
    assert refused.refused_by is not None
    assert refused.refused_by.store_error
    assert refused.refused_by.reason == "state_store_unavailable"
    assert refused.retry_after >= 1
    bypassed = await store.take([open_])
    assert bypassed.allowed
    assert bypassed.outcomes[0].reason == "state_store_bypassed"
    assert not (await store.take([closed, open_])).allowed
    for _ in range(20):
        await store.take([closed])
    assert time.monotonic() - started < 3.0  # bounded, never hanging on the dead server
    assert store.stats.errors >= 23
    health = await store.check()
    assert not health.ok
    assert "unreachable" in health.detail
    with pytest.raises(StoreUnavailable):
        await store.read(closed)

    own_redis.start()

    async def decides() -> bool:
        return (await store.take([closed])).allowed

    await until(decides, within=10)
    assert (await store.check()).ok
    await store.close()


async def test_acl_user_and_password_file(
    redis_server: RedisServer, unique: str, tmp_path: Path
) -> None:
    """An ACL user limited to keyproxy's keys works with its password read from a file;
    a wrong password is a store error (fail closed), never an exception."""
    user = f"kp-{unique}"
    admin = redis_server.client()
    admin.acl_setuser(
        user, enabled=True, passwords=["+right-pass"], keys=["{keyproxy}:*"], categories=["+@all"]
    )
    try:
        right = tmp_path / "right"
        right.write_text("right-pass\n", encoding="utf-8")
        wrong = tmp_path / "wrong"
        wrong.write_text("wrong-pass\n", encoding="utf-8")
        uses = Counter(f"{unique}:token", cap=5, ttl=60)
        settings = RedisSettings(url=redis_server.url, username=user, timeout=2.0)

        good = RedisStore(replace(settings, password_file=right))
        assert (await good.take([uses])).allowed
        assert await good.read(uses) == 1
        assert (await good.check()).ok
        await good.close()

        in_url = redis_server.url.replace("redis://", f"redis://{user}:right-pass@")
        assert (await _take_once(RedisSettings(url=in_url, timeout=2.0), uses)).allowed

        bad = RedisStore(replace(settings, password_file=wrong))
        refused = await bad.take([uses])
        assert not refused.allowed
        assert refused.outcomes[0].store_error
        assert not (await bad.check()).ok
        await bad.close()
    finally:
        admin.acl_deluser(user)
        admin.close()


async def test_a_rotated_password_is_read_at_reconnect(
    redis_server: RedisServer, unique: str, tmp_path: Path
) -> None:
    """After the ACL password and its file change, the store logs in with the new one as
    soon as its old connections are gone, without being made again."""
    user = f"kp-{unique}"
    password = tmp_path / "password"
    password.write_text("first-pass\n", encoding="utf-8")
    admin = redis_server.client()
    admin.acl_setuser(
        user, enabled=True, passwords=["+first-pass"], keys=["{keyproxy}:*"], categories=["+@all"]
    )
    try:
        store = RedisStore(
            RedisSettings(url=redis_server.url, username=user, password_file=password)
        )
        uses = Counter(f"{unique}:token", cap=5, ttl=60)
        assert (await store.take([uses])).allowed
        admin.acl_setuser(user, enabled=True, reset_passwords=True, passwords=["+second-pass"])
        password.write_text("second-pass\n", encoding="utf-8")
        admin.client_kill_filter(user=user)

        async def decides() -> bool:
            return (await store.take([uses])).allowed

        await until(decides, within=10)
        assert await store.read(uses) == 2
        await store.close()
    finally:
        admin.acl_deluser(user)
        admin.close()


async def test_lost_scripts_are_loaded_again(redis_server: RedisServer, unique: str) -> None:
    """After SCRIPT FLUSH (a restarted or failed-over server) decisions load the script again."""
    store = RedisStore(RedisSettings(url=redis_server.url, timeout=2.0))
    uses = Counter(f"{unique}:token", cap=5, ttl=60)
    assert (await store.take([uses])).allowed
    with redis_server.client() as admin:
        admin.script_flush()
    assert (await store.take([uses])).allowed
    assert await store.read(uses) == 2
    await store.close()


async def test_keys_share_one_hash_slot(redis_server: RedisServer, unique: str) -> None:
    """Every key a decision writes carries the `{prefix}` hash tag (one Cluster slot)."""
    store = RedisStore(RedisSettings(url=redis_server.url, timeout=2.0, prefix=f"kp-{unique}"))
    assert (await store.take([Counter("a", cap=1, ttl=60), Counter("b", cap=1, ttl=60)])).allowed
    with redis_server.client() as admin:
        keys = sorted(admin.scan_iter(match=f"{{kp-{unique}}}:*"))
    assert keys == [f"{{kp-{unique}}}:c:a".encode(), f"{{kp-{unique}}}:c:b".encode()]
    await store.close()


async def _take_once(settings: RedisSettings, uses: Counter) -> Decision:
    store = RedisStore(settings)
    try:
        return await asyncio.wait_for(store.take([uses]), timeout=10)
    finally:
        await store.close()


async def test_a_stalled_server_costs_a_bounded_wait(own_redis: RedisServer, unique: str) -> None:
    """A server that accepts but never answers (stopped with SIGSTOP) refuses fail-closed
    limits within the deadline, and answers again once it resumes."""
    store = RedisStore(RedisSettings(url=own_redis.url, timeout=0.25))
    uses = Counter(f"{unique}:token", cap=100, ttl=60)
    assert (await store.take([uses])).allowed
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        decision = await store.take([uses])
        assert time.monotonic() - started < 1.0  # 3 x the 250 ms timeout, plus slack
        assert not decision.allowed
        assert decision.outcomes[0].store_error
    finally:
        own_redis.process.send_signal(signal.SIGCONT)

    async def decides() -> bool:
        return (await store.take([uses])).allowed

    await until(decides, within=10)
    await store.close()


@pytest.mark.parametrize("call", ["take", "beat"])
async def test_a_failover_behind_one_address_is_followed(
    call: str, tmp_path: Path, unique: str
) -> None:
    """After a failover behind the store's address (the old primary now a replica, answering
    READONLY on connections still open to it), the store reaches the new primary: a connection
    that met READONLY, in a decision (a shared round trip) or another call, is not used again."""
    old, new = RedisServer(tmp_path / "old"), RedisServer(tmp_path / "new")
    old.start()
    new.start()
    try:
        relay = Relay(old.port)
        async with relay as url:
            store = RedisStore(RedisSettings(url=url, timeout=2.0))
            uses = Counter(f"{unique}:token", cap=100, ttl=60)

            async def answers() -> bool:
                if call == "take":
                    return (await store.take([uses])).allowed
                try:
                    await store.beat(f"{unique}:lease", 60)
                except StoreUnavailable:
                    return False
                return True

            try:
                assert await answers()
                with old.client() as admin:
                    admin.replicaof("127.0.0.1", new.port)
                relay.port = new.port
                await until(answers, within=10)
            finally:
                await store.close()
    finally:
        old.stop()
        new.stop()


@pytest.mark.parametrize("planted", [b"1.5", b"many", b"9" * 5000])
async def test_a_count_that_is_not_one_is_a_store_fault(
    redis_server: RedisServer, unique: str, planted: bytes
) -> None:
    """A counter holding what keyproxy never writes (a fraction, text, a number of thousands
    of digits) is a store fault to `read`, never an error of another kind, and a decision
    refuses it."""
    store = RedisStore(RedisSettings(url=redis_server.url, timeout=2.0))
    uses = Counter(f"{unique}:token", cap=5, ttl=60)
    with redis_server.client() as admin:
        admin.set(f"{{keyproxy}}:c:{uses.key}", planted, ex=60)
    try:
        with pytest.raises(StoreUnavailable, match="holds other than a count"):
            await store.read(uses)
        assert not (await store.take([uses])).allowed
    finally:
        await store.close()


async def test_readiness_names_why_a_store_that_answers_refuses_writes(
    own_redis: RedisServer, unique: str
) -> None:
    """A store that answers PING but refuses every write (out of memory, `noeviction`) fails
    decisions closed and is not reported ready, with the reason; both recover with it."""
    store = RedisStore(RedisSettings(url=own_redis.url, timeout=2.0))
    uses = Counter(f"{unique}:token", cap=5, ttl=60)
    with own_redis.client() as admin:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        try:
            refused = await store.take([uses])
            assert not refused.allowed
            assert refused.outcomes[0].store_error
            health = await store.check()
            assert not health.ok
            assert health.detail == "state store refuses writes: OutOfMemoryError"
        finally:
            admin.config_set("maxmemory", 0)

    async def decides() -> bool:
        return (await store.take([uses])).allowed

    try:
        await until(decides, within=10)
        assert await store.check() == Health(ok=True)
    finally:
        await store.close()
