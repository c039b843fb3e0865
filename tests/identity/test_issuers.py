"""keyproxy.identity.issuers against real loopback JWKS servers: keys kept fresh without
making requests wait, and refused once too stale."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import aiohttp
import pytest
from structlog.testing import capture_logs

from keyproxy.devserver import OpenBaoDevServer
from keyproxy.errors import RequestError, Unauthenticated, Unavailable
from keyproxy.identity import IdentityVerifier
from keyproxy.metrics import Metrics
from keyproxy.server.app import METRICS
from tests.helpers.events import read_events
from tests.helpers.identity import (
    AUD,
    CLUSTER,
    COOLDOWN,
    ISS,
    ISSUER_KEYS,
    ROTATED_KEY,
    RSA_KEY,
    SUB,
    TTL,
    VALID,
    Clock,
    IssuerServer,
    claims,
    make_issuer,
    public_jwk,
    reason_for,
    settled,
    sign,
    stack_config,
)
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import Upstream, bearer, running_proxy


async def test_unknown_kid_refetches_once_per_cooldown(
    verifier: IdentityVerifier, server: IssuerServer, clock: Clock
) -> None:
    """An unknown kid refetches the JWKS once; more unknown kids wait out the cooldown."""
    assert server.hits["jwks"] == 1
    assert await reason_for(verifier, sign(VALID, kid="first-unknown")) == "unknown_kid"
    assert server.hits["jwks"] == 2
    clock.now += COOLDOWN - 1
    assert await reason_for(verifier, sign(VALID, kid="second-unknown")) == "unknown_kid"
    assert server.hits["jwks"] == 2
    clock.now += 1
    assert await reason_for(verifier, sign(VALID, kid="third-unknown")) == "unknown_kid"
    assert server.hits["jwks"] == 3


async def test_rotated_key_is_picked_up(
    verifier: IdentityVerifier, server: IssuerServer, clock: Clock
) -> None:
    """A newly published issuer key verifies through the unknown-kid refetch."""
    server.keys = [public_jwk(ROTATED_KEY, "rsa-2")]
    identity = await verifier.verify(sign(claims(clock.now), ROTATED_KEY, kid="rsa-2"))
    assert identity.subject == SUB
    assert server.hits["jwks"] == 2
    # The retired key is gone with the set it belonged to.
    assert await reason_for(verifier, sign(claims(clock.now))) == "unknown_kid"


@pytest.mark.parametrize("cooldown", [COOLDOWN, 0.0])
async def test_concurrent_unknown_kids_share_one_fetch(
    new_verifier: Callable[..., IdentityVerifier],
    server: IssuerServer,
    clock: Clock,
    cooldown: float,
) -> None:
    """Concurrent verifications that miss the same kid wait on a single JWKS fetch."""
    verifier = new_verifier(jwks_refetch_cooldown=cooldown)
    await verifier.prefetch()
    server.keys = [*ISSUER_KEYS, public_jwk(ROTATED_KEY, "rsa-2")]
    server.gate = asyncio.Event()
    token = sign(claims(clock.now), ROTATED_KEY, kid="rsa-2")
    tasks = [asyncio.create_task(verifier.verify(token)) for _ in range(5)]
    try:
        await eventually(lambda: server.hits["jwks"] >= 2, "the refetch never arrived", within=5)
        server.gate.set()
        identities = await asyncio.gather(*tasks)
    finally:
        server.gate.set()
        for task in tasks:
            task.cancel()
    assert {i.subject for i in identities} == {SUB}
    assert server.hits["jwks"] == 2


async def test_cached_keys_survive_outage(
    verifier: IdentityVerifier, server: IssuerServer, clock: Clock
) -> None:
    """After the TTL a failed refetch keeps the old keys, and retries wait for the cooldown."""
    server.down = True
    clock.now += TTL + 1
    with capture_logs() as logs:
        assert (await verifier.verify(sign(claims(clock.now)))).subject == SUB
        await settled(verifier)
        assert server.hits["jwks"] == 2
        assert (await verifier.verify(sign(claims(clock.now)))).subject == SUB
        await settled(verifier)
        assert server.hits["jwks"] == 2
    assert logs[0]["event"] == "jwks_fetch_failed"
    assert logs[0]["serving_cached"] is True
    clock.now += COOLDOWN
    server.down = False
    server.keys = [public_jwk(ROTATED_KEY, "rsa-2")]
    assert (await verifier.verify(sign(claims(clock.now), ROTATED_KEY, kid="rsa-2"))).subject
    assert server.hits["jwks"] == 3


async def test_keys_are_cached_until_ttl(
    verifier: IdentityVerifier, server: IssuerServer, clock: Clock
) -> None:
    """Verifications within the TTL reuse the cached set; after it the set is refetched."""
    for _ in range(3):
        await verifier.verify(sign(claims(clock.now)))
    assert server.hits["jwks"] == 1
    clock.now += TTL
    await verifier.verify(sign(claims(clock.now)))
    await settled(verifier)
    assert server.hits["jwks"] == 2


async def test_cached_kid_is_answered_while_the_issuer_stalls(
    verifier: IdentityVerifier, server: IssuerServer, clock: Clock
) -> None:
    """Past jwks_cache_ttl a token with a cached kid is answered at once while the refresh
    is still waiting on the issuer; once it lands its new keys are used without a fetch."""
    remembered = sign(claims(clock.now, exp=int(clock.now + 10 * TTL)))
    await verifier.verify(remembered)
    server.gate = asyncio.Event()
    clock.now += TTL + 1
    fresh = sign(claims(clock.now, jti="never-seen"))
    answers = [asyncio.create_task(verifier.verify(t)) for t in (remembered, fresh)]
    try:
        await eventually(
            lambda: server.hits["jwks"] == 2, "the refresh never reached the issuer", within=5
        )
        assert all(a.done() for a in answers), "a request waited for the stalled issuer"
        assert [a.result().subject for a in answers] == [SUB, SUB]
        assert verifier.key_status()["k8s"]["fetching"]
        # More requests while it stalls: still answered, and no second fetch.
        assert (await verifier.verify(sign(claims(clock.now, jti="another")))).subject == SUB
        assert server.hits["jwks"] == 2
        server.keys = [*ISSUER_KEYS, public_jwk(ROTATED_KEY, "rsa-2")]
    finally:
        server.gate.set()
        for answer in answers:
            answer.cancel()
    await settled(verifier)
    rotated = sign(claims(clock.now), ROTATED_KEY, kid="rsa-2")
    assert (await verifier.verify(rotated)).subject == SUB
    assert server.hits["jwks"] == 2
    assert verifier.key_status()["k8s"]["age"] == 0.0


async def test_keys_past_max_staleness_are_refused(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer, clock: Clock
) -> None:
    """With the issuer down, cached keys serve until jwks_max_staleness after the last good
    fetch; then its tokens, remembered ones too, get 503 issuer_keys_stale, which is counted
    and logged with the issuer's name, until a fetch succeeds again."""
    verifier = new_verifier(jwks_max_staleness=3 * TTL)
    await verifier.prefetch()
    remembered = sign(claims(clock.now, exp=int(clock.now + 10 * TTL)))
    await verifier.verify(remembered)
    server.down = True
    clock.now += 3 * TTL  # exactly at the limit: still served
    assert (await verifier.verify(remembered)).subject == SUB
    await settled(verifier)
    clock.now += COOLDOWN + 1
    with capture_logs() as logs:
        for token in (remembered, sign(claims(clock.now, jti="new"))):
            with pytest.raises(Unavailable) as caught:
                await verifier.verify(token)
            assert (caught.value.reason, caught.value.status) == ("issuer_keys_stale", 503)
            assert "k8s" not in caught.value.message
            assert ISS not in caught.value.message
    failed = [e for e in logs if e["event"] == "jwks_fetch_failed"]
    assert len(failed) == 1  # one fetch per cooldown, however many requests
    assert (failed[0]["issuer"], failed[0]["serving_cached"]) == ("k8s", False)
    assert failed[0]["keys_age"] > 3 * TTL
    status = verifier.key_status()["k8s"]
    assert (status["stale"], status["stale_refusals"]) == (True, 2)
    metrics = Metrics(dict)
    metrics.watch_signing_keys(verifier.key_status, lambda: _NO_TASK_KEYS)
    exposition = metrics.exposition()[0].decode()
    assert 'keyproxy_identity_stale_refusals_total{issuer="k8s"} 2.0' in exposition
    assert 'keyproxy_identity_keys_stale{issuer="k8s"} 1.0' in exposition
    assert f'keyproxy_identity_keys_age_seconds{{issuer="k8s"}} {status["age"]}' in exposition
    server.down = False
    clock.now += COOLDOWN
    assert (await verifier.verify(remembered)).subject == SUB
    assert verifier.key_status()["k8s"]["stale"] is False


_NO_TASK_KEYS: dict[str, Any] = {"age": None, "stale": False, "stale_refusals": 0}


async def test_no_keys_yet_waits_for_the_fetch(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer, clock: Clock
) -> None:
    """Without any cached keys a request does wait for the fetch (there is nothing to
    answer with), and concurrent ones share it."""
    verifier = new_verifier()
    server.gate = asyncio.Event()
    answers = [asyncio.create_task(verifier.verify(sign(claims(clock.now)))) for _ in range(3)]
    try:
        await eventually(
            lambda: server.hits["jwks"] == 1, "the fetch never reached the issuer", within=5
        )
        assert not any(a.done() for a in answers)
        server.gate.set()
        assert [i.subject for i in await asyncio.gather(*answers)] == [SUB] * 3
    finally:
        server.gate.set()
        for answer in answers:
            answer.cancel()
    assert server.hits["jwks"] == 1


async def test_aclose_cancels_the_background_fetch(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer, clock: Clock
) -> None:
    """aclose() cancels a refresh stalled on the issuer and starts no new one after."""
    verifier = new_verifier()
    await verifier.prefetch()
    server.gate = asyncio.Event()
    clock.now += TTL
    try:
        assert (await verifier.verify(sign(claims(clock.now)))).subject == SUB
        await eventually(
            lambda: server.hits["jwks"] == 2, "the refresh never reached the issuer", within=5
        )
        await verifier.aclose()
        assert not verifier.key_status()["k8s"]["fetching"]
        clock.now += COOLDOWN
        assert (await verifier.verify(sign(claims(clock.now, jti="x")))).subject == SUB
        assert not verifier.key_status()["k8s"]["fetching"]
    finally:
        server.gate.set()
    assert server.hits["jwks"] == 2


async def test_stale_issuer_keys_are_503_and_audited(
    openbao: OpenBaoDevServer,
    server: IssuerServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    audit_log: Path,
) -> None:
    """Through the proxy: with the issuer down its cached keys keep serving, then past
    jwks_max_staleness requests get 503 issuer_keys_stale, audited with that reason and
    counted; once the issuer is back they work again."""
    issuer = {
        "name": CLUSTER,
        "issuer": ISS,
        "jwks_uri": f"{server.url}/jwks",
        "audiences": [AUD],
        "algorithms": ["RS256"],
        "jwks_cache_ttl": "200ms",
        "jwks_max_staleness": "1s",
        "jwks_refetch_cooldown": "100ms",
    }
    token = sign(claims(time.time(), jti="stale-keys"))
    CANARIES.add(token)
    url = "/r/r/echo"
    async with running_proxy(stack_config(openbao, upstream, [issuer])) as stack:

        async def call() -> tuple[int, dict[str, Any]]:
            async with http.get(stack.base + url, headers=bearer(token)) as response:
                return response.status, await response.json()

        assert (await call())[0] == 200
        server.down = True
        answer = await eventually(
            call, "stale keys were served forever", interval=0.05, until=lambda a: a[0] != 200
        )
        assert answer == (503, {"error": {"code": "issuer_keys_stale", "message": ANY}})
        assert CLUSTER not in json.dumps(answer)
        exposition = stack.app[METRICS].exposition()[0].decode()
        assert f'keyproxy_identity_keys_stale{{issuer="{CLUSTER}"}} 1.0' in exposition
        assert f'keyproxy_identity_stale_refusals_total{{issuer="{CLUSTER}"}}' in exposition
        server.down = False
        await eventually(
            call,
            "the issuer's return was never noticed",
            interval=0.05,
            until=lambda a: a[0] == 200,
        )
    stale = await eventually(
        lambda: [e for e in read_events(audit_log) if e.get("reason") == "issuer_keys_stale"],
        "no audit event for the stale keys",
    )
    assert {(e["status"], e["route"], e["path"]) for e in stale} == {(503, "r", "/echo")}


@pytest.mark.parametrize("removed", [False, True], ids=["changed", "removed"])
async def test_reload_during_a_key_fetch_answers_under_the_new_issuers(
    new_verifier: Callable[..., IdentityVerifier],
    server: IssuerServer,
    clock: Clock,
    removed: bool,
) -> None:
    """A verification waiting on its issuer's keys when a reload changes or removes that
    issuer is answered under the issuers now configured: not cut off as if its caller had
    gone, and nothing of the replaced issuer is remembered."""
    moved = IssuerServer([*ISSUER_KEYS, public_jwk(ROTATED_KEY, "rsa-2")])
    await moved.start()
    verifier = new_verifier()
    await verifier.prefetch()
    server.keys = [*ISSUER_KEYS, public_jwk(ROTATED_KEY, "rsa-2")]
    server.gate = asyncio.Event()
    waiting = asyncio.create_task(
        verifier.verify(sign(claims(clock.now), ROTATED_KEY, "RS256", "rsa-2"))
    )
    try:
        await eventually(lambda: server.hits["jwks"] == 2, "no refetch for the new kid", within=5)
        other = make_issuer(name="other", issuer="https://other.test", jwks_uri=f"{moved.url}/jwks")
        now = other if removed else make_issuer(jwks_uri=f"{moved.url}/jwks", audiences=(AUD,))
        await verifier.reconfigure([now])
        if removed:
            with pytest.raises(Unauthenticated) as caught:
                await waiting
            assert caught.value.reason == "unknown_issuer"
            assert len(verifier.cache) == 0
        else:
            assert (await waiting).subject == SUB
            assert moved.hits["jwks"] == 1  # the new issuer's keys, fetched by the reload
    finally:
        server.gate.set()
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, RequestError):
            await waiting
        await moved.close()


async def test_a_remembered_token_waiting_on_stale_keys_is_answered_after_a_reload(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer, clock: Clock
) -> None:
    """A token verified before, waiting on its issuer's keys (past jwks_max_staleness, so
    the fetch must land first) when a reload replaces that issuer, is verified under the new
    one, which the reload fetched: not refused as if the old fetch had failed."""
    moved = IssuerServer(list(ISSUER_KEYS))
    await moved.start()
    verifier = new_verifier(jwks_max_staleness=3 * TTL)
    await verifier.prefetch()
    remembered = sign(claims(clock.now, exp=int(clock.now + 10 * TTL)))
    await verifier.verify(remembered)
    clock.now += 3 * TTL + 1  # too old to serve: the use waits on the fetch it starts
    server.gate = asyncio.Event()
    waiting = asyncio.create_task(verifier.verify(remembered))
    try:
        await eventually(lambda: server.hits["jwks"] == 2, "no refetch of stale keys", within=5)
        fresh = make_issuer(jwks_uri=f"{moved.url}/jwks", jwks_max_staleness=3 * TTL)
        await verifier.reconfigure([fresh])
        assert (await waiting).subject == SUB
    finally:
        server.gate.set()
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, RequestError):
            await waiting
        await moved.close()


@pytest.mark.parametrize(
    "published",
    [[], [public_jwk(RSA_KEY, "rsa-1", alg="PS256")]],
    ids=["no-keys", "only-keys-of-another-algorithm"],
)
async def test_an_issuer_publishing_no_usable_key_has_withdrawn_the_cached_ones(
    verifier: IdentityVerifier, server: IssuerServer, clock: Clock, published: list[Any]
) -> None:
    """A JWKS the issuer answers with that holds no key keyproxy may use (emptied to
    withdraw a compromised key, or only keys of an algorithm not allowed) replaces the cached
    set, as one withdrawn key among several does: the old keys stop verifying once it has
    landed, rather than until jwks_max_staleness."""
    token = sign(claims(clock.now, exp=int(clock.now + 10 * TTL)))
    await verifier.verify(token)
    server.keys = published
    clock.now += TTL  # stale: this use is answered with the cached set and refreshes it
    assert (await verifier.verify(token)).subject == SUB
    with capture_logs() as logs:
        await settled(verifier)
    assert await reason_for(verifier, token) == "unknown_kid"
    assert server.hits["jwks"] == 3  # the refresh, then one forced by the kid now unknown
    assert [(e["event"], e["log_level"], e["keys"]) for e in logs if "keys" in e] == [
        ("jwks_fetched", "warning", 0)
    ]
    # Refused as a client's mistake (401), so an alert on 5xx never sees it: the gauge does.
    assert verifier.key_status()["k8s"]["keys"] == 0
    metrics = Metrics(dict)
    metrics.watch_signing_keys(verifier.key_status, lambda: _NO_TASK_KEYS)
    assert 'keyproxy_identity_keys{issuer="k8s"} 0.0' in metrics.exposition()[0].decode()
