"""A task token's lifecycle across replicas: two `keyproxy serve` processes sharing one
OpenBao and one Valkey/Redis (heartbeat leases and use counters live there, revocations in
Vault). A lease that stops being renewed, and a revoked root, reach both within the bounds
docs/tokens.md promises.

The replicas are started once for the module (they are slow to start); each test uses
tokens of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import redis.asyncio
import yaml
from structlog.testing import capture_logs

from keyproxy import config as config_module
from keyproxy.caller import Identity
from keyproxy.config import RedisSettings
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.errors import Unauthenticated
from keyproxy.state.redis import RedisStore
from keyproxy.tokens import LEEWAY, TaskTokens
from keyproxy.vault import Vault
from tests.helpers.cli import clean_env, keyproxy, ready, serve_replicas, started
from tests.helpers.events import read_events
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import bearer, free_port, new_key, token_config
from tests.helpers.tokens import SCOPE, delegate, exchange, refused, status
from tests.state.servers import RedisServer

# The upstream is unreachable: 502 means "authorised", 401 refused.
ECHO = "/r/other/echo"
ANY = {"other": {"methods": ["GET"], "paths": ["/echo"]}}


class Replicas:
    """The two replicas' base URLs and output files (their audit events), and the
    configuration they serve."""

    def __init__(self, bases: list[str], outs: list[Path], config: Path) -> None:
        self.bases, self.outs, self.config = bases, outs, config

    def events(self) -> list[dict[str, Any]]:
        return [event for out in self.outs for event in read_events(out)]


@pytest.fixture(scope="module")
def replicas(
    openbao: OpenBaoDevServer,
    agent: Agent,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
    log_dir: Path,
) -> Iterator[Replicas]:
    openbao.put_key("keyproxy/keys/tokens-test", new_key())
    cfg = token_config(openbao, agent, "http://127.0.0.1:9")
    cfg["tokens"]["revocation_poll_interval"] = "1s"  # the default
    cfg["state"] = {"url": redis_server.url, "prefix": uuid.uuid4().hex, "timeout": "1s"}
    path = tmp_path_factory.mktemp("lifecycle") / "k.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with contextlib.ExitStack() as stack:
        replicas = serve_replicas(stack, path, log_dir, "lifecycle")
        yield Replicas([base for base, _ in replicas], [out for _, out in replicas], path)


async def _both_accept(http: aiohttp.ClientSession, bases: list[str], token: str) -> None:
    for base in bases:
        assert await status(http, "GET", base + ECHO, token) == 502


async def _both_refuse(
    http: aiohttp.ClientSession, bases: list[str], token: str, within: float
) -> None:
    for base in bases:
        await refused(http, "GET", base + ECHO, token, f"{base} still accepts", within=within)


async def test_a_lease_lives_while_beaten_on_either_replica_and_dies_on_both(
    replicas: Replicas, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """An idle_ttl 3s token heartbeaten through either replica in turn outlives several
    idle_ttls on both; once the heartbeats stop both refuse it within idle_ttl + 2 s."""
    a, b = replicas.bases
    for base in (a, b):
        await ready(http, base)
    code, answer = await exchange(http, a, identity_token, scope=ANY, ttl="2m", idle_ttl="3s")
    assert code == 200, answer
    token = answer["access_token"]
    started_at = time.monotonic()
    beats = 0
    while time.monotonic() - started_at < 10.0:  # more than three idle_ttls
        async with http.post(f"{(a, b)[beats % 2]}/token/heartbeat", headers=bearer(token)) as r:
            assert r.status == 200, await r.text()
        beats += 1
        await _both_accept(http, replicas.bases, token)
        await asyncio.sleep(1.0)  # the holder's pace, as a heartbeating client keeps it
    last_beat = time.monotonic()
    await _both_refuse(http, replicas.bases, token, within=3.0 + 2.0)
    assert time.monotonic() - last_beat < 3.0 + 2.0


async def test_revoking_the_root_kills_a_depth_3_chain_on_both_replicas(
    replicas: Replicas,
    openbao: OpenBaoDevServer,
    identity_token: str,
    http: aiohttp.ClientSession,
) -> None:
    """root (through a) -> child (through b, acting for a sub-agent) -> grandchild (through
    a): every link works on both replicas, the grandchild's audit events name all three
    links, and revoking the root through b kills the chain on both within 2 s."""
    a, b = replicas.bases
    for base in (a, b):
        await ready(http, base)
    actor_token = openbao.agent_token(openbao.add_agent("lifecycle-sub-agent"))
    CANARIES.add(actor_token)
    code, root = await exchange(http, a, identity_token, scope=ANY, ttl="2m", max_uses=50)
    assert code == 200, root
    code, child = await delegate(http, b, root["access_token"], actor_token=actor_token)
    assert code == 200, child
    code, grandchild = await delegate(http, a, child["access_token"], max_uses="10")
    assert code == 200, grandchild
    ids = [root["token_id"], child["token_id"], grandchild["token_id"]]
    for token in (root, child, grandchild):
        await _both_accept(http, replicas.bases, token["access_token"])

    def grandchilds() -> list[dict[str, Any]]:
        return [
            e
            for e in replicas.events()
            if e.get("event") == "request" and e.get("token_id") == ids[2]
        ]

    events = await eventually(grandchilds, "no request events of the grandchild", until=len)
    assert {e["chain"] for e in events} == {",".join(ids)}

    async with http.post(f"{b}/token/revoke", headers=bearer(root["access_token"])) as response:
        assert response.status == 200
    revoked = time.monotonic()
    for token in (child, grandchild):
        await _both_refuse(http, replicas.bases, token["access_token"], within=2.0)
    assert time.monotonic() - revoked < 2.0


async def test_a_lapsed_lease_is_recorded_when_its_issuing_replica_is_gone(
    replicas: Replicas, identity_token: str, http: aiohttp.ClientSession, log_dir: Path
) -> None:
    """A token issued by a replica that has stopped since: when its lease lapses, one of the
    replicas left records its end (heartbeat_lost) in the audit log, once."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ("serve", "-c", str(replicas.config), "--port", str(port), "--admin-port", "0")
    with started(*args, out=log_dir / "lifecycle-replica-gone.out"):
        await ready(http, base)
        code, answer = await exchange(http, base, identity_token, scope=ANY, idle_ttl="3s")
        assert code == 200, answer
    token_id = answer["token_id"]
    stopped = time.monotonic()

    def ended() -> list[dict[str, Any]]:
        return [
            e
            for e in replicas.events()
            if e.get("event") == "token.revoked" and e.get("token_id") == token_id
        ]

    (event,) = await eventually(ended, "no replica recorded the end", within=3.0 + 5.0)
    assert event["reason"] == "heartbeat_lost", event
    assert time.monotonic() - stopped < 3.0 + 5.0
    # Not waiting for a state: two more sweeps of each replica, in which a second report of
    # the same end would show.
    await asyncio.sleep(2.5)
    assert len(ended()) == 1
    await _both_refuse(http, replicas.bases, answer["access_token"], within=2.0)


async def test_an_operator_revoking_a_token_id_ends_its_lease(
    replicas: Replicas,
    openbao: OpenBaoDevServer,
    identity_token: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """`keyproxy token revoke --id` with the replicas' configuration (a shared store) ends
    the token's heartbeat lease as it records the revocation."""
    a, _ = replicas.bases
    await ready(http, a)
    code, answer = await exchange(http, a, identity_token, scope=ANY, ttl="2m", idle_ttl="30s")
    assert code == 200, answer
    CANARIES.add(answer["access_token"])
    state = yaml.safe_load(replicas.config.read_text())["state"]
    lease = f"{{{state['prefix']}}}:l:lease:{answer['token_id']}"
    client = redis.asyncio.from_url(state["url"])
    try:
        assert await client.exists(lease)
        env = clean_env(tmp_path, VAULT_TOKEN=openbao.root_token)
        args = ("token", "revoke", "-c", str(replicas.config), "--as-operator")
        done = await asyncio.to_thread(keyproxy, *args, "--id", answer["token_id"], env=env)
        assert done.returncode == 0, done.stderr
        assert not await client.exists(lease)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _tokens_on(
    openbao: OpenBaoDevServer,
    redis_server: RedisServer,
    prefix: str,
    replicas: int = 1,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[list[TaskTokens]]:
    """`replicas` task-token services of an agent of their own, in process, each with its own
    Vault and Valkey/Redis clients on the shared servers (one store prefix), on `clock`."""
    own = openbao.add_agent(f"sweep-{prefix[:8]}")
    doc = token_config(openbao, own, "http://127.0.0.1:1")
    # These replicas re-read the revocation list only when a test has them do it (a task
    # token's check re-reads a list older than revocation_max_staleness).
    doc["tokens"]["revocation_max_staleness"] = "1h"
    cfg = config_module.parse(json.dumps(doc), {})
    vaults = [Vault(cfg.vault) for _ in range(replicas)]
    settings = RedisSettings(url=redis_server.url, prefix=prefix, timeout=2.0)
    stores = [RedisStore(settings) for _ in range(replicas)]
    try:
        for vault in vaults:
            await vault.login()
        yield [TaskTokens(cfg, v, clock, store=s) for v, s in zip(vaults, stores, strict=True)]
    finally:
        for store in stores:
            await store.close()
        for vault in vaults:
            vault.close()


async def test_racing_ends_of_one_token_are_reported_once(
    openbao: OpenBaoDevServer, redis_server: RedisServer
) -> None:
    """The same token ended on two replicas at once (a holder's revoke and another
    replica's heartbeat after the lapse, say) is revoked, and reported by one of them."""
    async with _tokens_on(openbao, redis_server, uuid.uuid4().hex, replicas=2) as (a, b):
        issued = await a.issue(Identity("openbao", "racer", {}), SCOPE, ttl=60, idle_ttl=30)
        CANARIES.add(issued.token)
        token = await a.verify(issued.token)
        with capture_logs() as logs:
            await asyncio.gather(a.revoke_held(token, "completed"), b.revoke_held(token, "failed"))
        reports = [e for e in logs if e["event"] == "token.revoked"]
        assert len(reports) == 1, reports
        assert issued.token_id in (await b.revocation_list()).ids


async def test_an_ended_token_s_lease_ends_for_every_replica_at_once(
    openbao: OpenBaoDevServer, redis_server: RedisServer
) -> None:
    """A leased token ended through one replica (by its holder, or by an operator's
    revocation of its id) has no live lease left for another replica to find while that
    one's revocation list is not re-read yet: the lease the proxy's limit step checks (for
    the token and all delegated from it) refuses it everywhere at once."""
    async with _tokens_on(openbao, redis_server, uuid.uuid4().hex, replicas=2) as (a, b):
        who = Identity("openbao", "ender", {})
        parent = await a.issue(who, SCOPE, ttl=60, idle_ttl=30)
        verified = await a.verify(parent.token)
        child = await a.issue(who, SCOPE, ttl=60, parent=verified)
        CANARIES.update((parent.token, child.token))
        for token in (parent.token, child.token):
            await b.check_leases(await b.verify(token))  # b has read the list before the end
        await a.revoke_held(verified, "completed")
        # b's list is not re-read: the verification passes, the lease refuses them.
        with pytest.raises(Unauthenticated, match="lease lapsed"):
            await b.check_leases(await b.verify(parent.token))
        with pytest.raises(Unauthenticated, match="delegated from lost"):
            await b.check_leases(await b.verify(child.token))
        assert parent.token_id in (await b.revocation_list()).ids
        # An operator's revocation of a token id ends its lease too.
        other = await a.issue(who, SCOPE, ttl=60, idle_ttl=30)
        CANARIES.add(other.token)
        await b.check_leases(await b.verify(other.token))
        await a.revoke(token_id=other.token_id, expires_at=other.expires_at)
        with pytest.raises(Unauthenticated, match="lease lapsed"):
            await b.check_leases(await b.verify(other.token))


async def test_a_revocation_whose_caller_went_away_is_reported(
    openbao: OpenBaoDevServer, redis_server: RedisServer
) -> None:
    """A holder's revocation cancelled while its write is under way (the client went away)
    is still written, and still reported and counted."""
    async with _tokens_on(openbao, redis_server, uuid.uuid4().hex) as (tasks,):
        issued = await tasks.issue(Identity("openbao", "walker", {}), SCOPE, ttl=60)
        CANARIES.add(issued.token)
        token = await tasks.verify(issued.token)
        ended: list[str] = []
        tasks.on_end = ended.append
        written = tasks.vault.write_kv
        began, go_on = asyncio.Event(), asyncio.Event()

        async def held_write(*args: Any, **kwargs: Any) -> int:
            began.set()
            await go_on.wait()  # the real write, once the caller has gone
            return await written(*args, **kwargs)

        tasks.vault.write_kv = held_write  # type: ignore[method-assign]
        with capture_logs() as logs:
            asking = asyncio.create_task(tasks.revoke_held(token, "completed"))
            await eventually(began.is_set, "no write began", until=bool)
            asking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asking
            assert asking.cancelled()
            go_on.set()
            await eventually(lambda: ended, "the end was not counted", until=bool)
        assert ended == ["completed"]
        assert [e["token_id"] for e in logs if e["event"] == "token.revoked"] == [issued.token_id]
        assert issued.token_id in (await tasks.revocation_list()).ids


async def test_a_lease_record_is_kept_while_the_keys_are_too_old_to_check_it(
    openbao: OpenBaoDevServer, redis_server: RedisServer
) -> None:
    """A lapsed lease whose record cannot be checked now (the signing keys are older than
    key_max_staleness) is neither recorded nor dropped: it stays listed for a later sweep."""
    prefix, ahead = uuid.uuid4().hex, [0.0]
    async with _tokens_on(openbao, redis_server, prefix, clock=lambda: time.time() + ahead[0]) as (
        tasks,
    ):
        issued = await tasks.issue(Identity("openbao", "stale-keys", {}), SCOPE, ttl=60, idle_ttl=1)
        CANARIES.add(issued.token)
        ahead[0] = tasks.cfg.key_max_staleness + 1
        client = redis.asyncio.from_url(redis_server.url)
        records = f"{{{prefix}}}:w:records"
        try:
            refusals = tasks.stale_refusals

            async def looked_at() -> bool:
                await tasks.sweep_leases()
                return tasks.stale_refusals > refusals

            with capture_logs() as logs:
                await eventually(looked_at, "the lapsed lease never reached the sweep", until=bool)
            assert not [e for e in logs if e["event"] == "token.end_not_recorded"]
            assert await client.hexists(records, f"lease:{issued.token_id}")
        finally:
            await client.aclose()
        ahead[0] = 0.0
        assert issued.token_id not in (await tasks.revocation_list()).ids


async def test_a_lease_record_of_a_key_version_not_read_yet_is_kept(
    openbao: OpenBaoDevServer, redis_server: RedisServer
) -> None:
    """A lapsed lease whose record names a signing key version newer than this replica has
    read (a rotation it has not seen) is neither recorded nor dropped: it stays listed to be
    tried again; one naming an older version it does not hold is dropped."""
    prefix = uuid.uuid4().hex
    async with _tokens_on(openbao, redis_server, prefix) as (tasks,):
        issued = await tasks.issue(Identity("openbao", "new-key", {}), SCOPE, ttl=60, idle_ttl=1)
        CANARIES.add(issued.token)
        records, kept, due = (f"{{{prefix}}}:w:{name}" for name in ("records", "kept", "due"))
        newest = max(tasks._keys)
        client = redis.asyncio.from_url(redis_server.url)
        try:
            written = await client.hget(records, f"lease:{issued.token_id}")
            assert written is not None
            real = json.loads(written)
            for member, version in (("lease:newer", newest + 1), ("lease:older", 0)):
                kid = real["kid"].rsplit(":v", 1)[0] + f":v{version}"
                await client.hset(records, member, json.dumps(real | {"kid": kid}))
                await client.zadd(kept, {member: 4e12})
                await client.zadd(due, {member: 0})

            async def older_dropped() -> bool:
                await tasks.sweep_leases()
                return not await client.hexists(records, "lease:older")

            with capture_logs() as logs:
                await eventually(older_dropped, "the older record is still listed", until=bool)
            dropped = [e for e in logs if e["event"] == "token.end_not_recorded"]
            assert [e["reason"] for e in dropped] == ["unknown_kid"], dropped
            assert await client.hexists(records, "lease:newer")
        finally:
            await client.aclose()


async def test_a_lapsed_lease_signed_before_a_shorter_max_ttl_is_kept_no_longer(
    openbao: OpenBaoDevServer, redis_server: RedisServer
) -> None:
    """A token issued for 10 minutes whose lease lapses after a reload cut the longest token
    life to 1 minute is recorded as ended, its entry kept no longer than a token issued now
    could live."""
    async with _tokens_on(openbao, redis_server, uuid.uuid4().hex) as (tasks,):
        issued = await tasks.issue(Identity("openbao", "shortened", {}), SCOPE, ttl=600, idle_ttl=1)
        CANARIES.add(issued.token)
        raw = token_config(openbao, openbao.add_agent("shortened"), "http://127.0.0.1:1")
        raw["tokens"] |= {"max_ttl": "1m", "default_ttl": "1m", "exception_max_ttl": "1m"}
        tasks.reconfigure(config_module.parse(json.dumps(raw), {}))

        async def ended() -> bool:
            await tasks.sweep_leases()
            return issued.token_id in (await tasks.revocation_list()).ids

        await eventually(ended, "the lapsed lease was not recorded", until=bool, within=10.0)
        kept = (await tasks.revocation_list()).ids[issued.token_id]
        assert kept <= time.time() + 60 + LEEWAY + 1
        assert issued.expires_at > kept  # cut short: the token's own exp is 10 minutes away


async def test_a_planted_lease_record_is_never_recorded_as_an_end(
    openbao: OpenBaoDevServer, redis_server: RedisServer
) -> None:
    """Records in the store's lease list that keyproxy did not sign for that lease are
    dropped with a warning and end no token: bytes that are not UTF-8 or not JSON, a token no
    configuration issues, the claims of a live token copied out of it (also as they were,
    for years, or under the signature of another token's record), and a genuine record
    copied under another lease. The real lapsed lease beside them is still recorded as
    ended, and none of them stops the sweep."""
    prefix = uuid.uuid4().hex
    async with _tokens_on(openbao, redis_server, prefix) as (tasks,):
        identity = Identity("openbao", "sweep-subject", {})
        issued = await tasks.issue(identity, SCOPE, ttl=60, idle_ttl=1)
        live = await tasks.issue(identity, SCOPE, ttl=60)  # no lease: only a revocation ends it
        beating = await tasks.issue(identity, SCOPE, ttl=60, idle_ttl=30)  # its lease is alive
        CANARIES.update((issued.token, live.token, beating.token))
        records, kept, due = (f"{{{prefix}}}:w:{name}" for name in ("records", "kept", "due"))
        client = redis.asyncio.from_url(redis_server.url)
        try:
            written = await client.hget(records, f"lease:{issued.token_id}")
            assert written is not None
            real = json.loads(written)
            claims = jwt.decode(live.token, options={"verify_signature": False})
            years = claims | {"exp": claims["exp"] + 10 * 365 * 86400}

            def signed_as_real(text: str) -> bytes:
                return json.dumps(real | {"claims": text}).encode()

            planted = {
                "lease:not-utf8": b"\xff\xfe{",
                "lease:not-json": b"not json",
                "lease:not-a-token": b'{"jti": "x"}',
                "lease:bare-claims": json.dumps(claims).encode(),
                "lease:unsigned": json.dumps(
                    {"kid": real["kid"], "claims": json.dumps(claims)}
                ).encode(),
                "lease:other-signature": signed_as_real(json.dumps(claims)),
                "lease:for-years": signed_as_real(json.dumps(years)),
                # A live token's real record, copied whole under a lease that never was.
                "lease:copied": await client.hget(records, f"lease:{beating.token_id}") or b"",
            }
            for member, record in planted.items():
                await client.hset(records, member, record)
                await client.zadd(kept, {member: 4e12})
                await client.zadd(due, {member: 0})
        finally:
            await client.aclose()

        async def ended() -> bool:
            await tasks.sweep_leases()
            return issued.token_id in (await tasks.revocation_list()).ids

        with capture_logs() as logs:
            await eventually(ended, "the real lapsed lease recorded", until=bool, within=10.0)
        revoked = (await tasks.revocation_list()).ids
        assert "x" not in revoked
        assert live.token_id not in revoked
        assert beating.token_id not in revoked
        assert await tasks.verify(live.token)  # still good
        dropped = [e for e in logs if e["event"] == "token.end_not_recorded"]
        assert len(dropped) == len(planted), dropped
        client = redis.asyncio.from_url(redis_server.url)
        try:  # and the records are gone from the list, not handed out again and again

            async def forgotten() -> bool:
                await tasks.sweep_leases()
                return await client.hmget(records, list(planted)) == [None] * len(planted)

            await eventually(forgotten, "planted records still listed", until=bool)
        finally:
            await client.aclose()
