"""Limits through the whole stack: real OpenBao, a real Valkey/Redis, the real proxy.

The proxy's limit step takes one unit of every limit a request touches in the store; these
tests hold what a caller sees (429 with RateLimit fields, 401 for spent uses, 503 when a
fail-closed limit cannot be checked), what the audit log and metrics say, and that
concurrency slots are given back however a request ends.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from keyproxy import config
from keyproxy.caller import Identity
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.server import listen
from keyproxy.server.app import build_app
from keyproxy.state import Concurrency, Counter, Limit, OnStoreError, Outcome, Rate
from keyproxy.state import Decision as StoreDecision
from keyproxy.state.limits import RequestLimits, limit_name, token_limits
from keyproxy.state.limits import headers as ratelimit_headers
from keyproxy.tokens import Link
from tests.helpers.configs import CONFIG_SECTIONS
from tests.helpers.logscan import CANARIES
from tests.helpers.servers import GatedStream, Stack, Upstream, bearer, new_key, running_proxy
from tests.state.servers import RedisServer, until
from tests.test_proxy import audit_events, new_request_id

ANY = {"methods": ["GET", "POST"], "paths": ["/**"]}


@pytest.fixture(scope="module")
def agent(openbao: OpenBaoDevServer) -> Agent:
    openbao.put_key("keyproxy/keys/limits-test", new_key())
    return openbao.add_agent("limits-agent")


@pytest.fixture
def identity_token(openbao: OpenBaoDevServer, agent: Agent) -> str:
    value = openbao.agent_token(agent)
    CANARIES.add(value)
    return value


def _route(upstream: str, limits: dict[str, Any] | None = None) -> dict[str, Any]:
    route: dict[str, Any] = {
        "upstream": upstream,
        "secret": {"path": "keyproxy/keys/limits-test"},
        "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
        "egress": {"allow_cidrs": ["127.0.0.0/8"]},
        "allow_http": True,
    }
    if limits is not None:
        route["limits"] = limits
    return route


def _config(
    bao: OpenBaoDevServer, agent: Agent, routes: dict[str, Any], state: dict[str, Any]
) -> dict[str, Any]:
    return {
        "vault": bao.vault_yaml(refresh_interval="500ms", max_staleness="60s"),
        "identity": {"issuers": [bao.issuer_yaml("openbao")]},
        "routes": routes,
        "policies": [
            {
                "name": "agent",
                "issuers": ["openbao"],
                "subjects": [agent.entity_id],
                "allow": dict.fromkeys(routes, ANY),
            }
        ],
        # A prefix of its own: tests share the server, never their counters.
        "state": {"prefix": uuid.uuid4().hex, "timeout": "250ms", **state},
    }


async def _get(
    http: aiohttp.ClientSession, url: str, token: str, rid: str = ""
) -> tuple[int, dict[str, str], bytes]:
    headers = bearer(token) | ({"X-Request-Id": rid} if rid else {})
    async with http.get(url, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def test_rate_limit_answers_429_with_ratelimit_fields(
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    upstream: Upstream,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    audit_log: Path,
) -> None:
    """A per-identity rate limit of 3 a minute (burst 3) admits three, then answers 429
    with Retry-After, RateLimit and RateLimit-Policy; the audit event and the metrics name
    the limit, and the counters are in Valkey/Redis."""
    limits = {"rate": [{"per": "identity", "requests": 3, "window": "60s", "burst": 3}]}
    routes = {"limited": _route(upstream.url, limits)}
    cfg = _config(openbao, agent, routes, {"url": redis_server.url})
    async with running_proxy(cfg) as stack:
        url = f"{stack.base}/r/limited/echo"
        assert [(await _get(http, url, identity_token))[0] for _ in range(3)] == [200] * 3
        rid = new_request_id()
        status, headers, body = await _get(http, url, identity_token, rid)
        assert status == 429, body
        assert b'"code":"rate_limited"' in body.replace(b" ", b"")
        assert 1 <= int(headers["Retry-After"]) <= 20
        name = "route.limited.rate.identity"
        assert headers["RateLimit-Policy"] == f'"{name}";q=3;w=60'
        assert headers["RateLimit"].startswith(f'"{name}";r=0;t=')
        (event,) = await audit_events(audit_log, rid)
        assert (event["status"], event["reason"], event["limit"]) == (429, "rate_limited", name)
        async with http.get(f"{stack.admin}/metrics") as response:
            metrics = await response.text()
        assert f'keyproxy_limit_refusals_total{{limit="{name}",route="limited"}} 1.0' in metrics
        assert "keyproxy_state_store_decisions_total 4.0" in metrics
        assert "keyproxy_state_store_errors_total 0.0" in metrics
        assert "keyproxy_state_store_decision_seconds_count 4.0" in metrics
        prefix = stack.config.state.prefix if stack.config.state else ""
        with redis_server.client() as client:
            assert client.keys(f"{{{prefix}}}:r:{name}:*")


async def _task_token(
    http: aiohttp.ClientSession, stack: Stack, identity_token: str, **body: Any
) -> dict[str, Any]:
    body.setdefault("scope", {"limited": ANY})
    async with http.post(
        f"{stack.base}/token", json=body, headers=bearer(identity_token)
    ) as response:
        answer: dict[str, Any] = await response.json()
        assert response.status == 200, answer
    CANARIES.add(answer["access_token"])
    return answer


async def test_max_uses_is_counted_in_the_store(
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    upstream: Upstream,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
    audit_log: Path,
) -> None:
    """A task token with max_uses 3 works three times, then gets 401 token_exhausted; its
    counter lives in Valkey/Redis and expires with the token."""
    routes = {"limited": _route(upstream.url)}
    cfg = _config(openbao, agent, routes, {"url": redis_server.url})
    async with running_proxy(cfg) as stack:
        answer = await _task_token(http, stack, identity_token, max_uses=3, ttl="2m")
        token = answer["access_token"]
        url = f"{stack.base}/r/limited/echo"
        assert [(await _get(http, url, token))[0] for _ in range(3)] == [200] * 3
        rid = new_request_id()
        status, _, body = await _get(http, url, token, rid)
        assert status == 401, body
        (event,) = await audit_events(audit_log, rid)
        assert (event["reason"], event["limit"]) == ("token_exhausted", "max_uses")
        prefix = stack.config.state.prefix if stack.config.state else ""
        with redis_server.client() as client:
            key = f"{{{prefix}}}:c:max_uses:{answer['token_id']}"
            assert client.get(key) == b"3"
            assert 0 < client.pttl(key) <= (120 + 6) * 1000


async def _open_stream(
    http: aiohttp.ClientSession, url: str, token: str
) -> tuple[int, aiohttp.ClientResponse]:
    response = await http.get(url, headers=bearer(token))
    if response.status == 200:
        assert await response.content.readuntil(b"\n\n") == b"data: first\n\n"
    return response.status, response


async def test_concurrency_cap_holds_while_streams_are_open(
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    gated: GatedStream,
    redis_server: RedisServer,
    audit_log: Path,
) -> None:
    """A cap of 2 in flight on a route holds while two SSE streams are open (the third gets
    429 too_many_in_flight), and a caller that disconnects gives its slot back."""
    limits = {"concurrency": [{"per": "route", "max": 2, "lease": "3s"}]}
    routes = {"streams": _route(f"http://127.0.0.1:{gated.port}", limits)}
    cfg = _config(openbao, agent, routes, {"url": redis_server.url})
    async with running_proxy(cfg) as stack, aiohttp.ClientSession() as http:
        url = f"{stack.base}/r/streams/stream"
        first = await _open_stream(http, url, identity_token)
        second = await _open_stream(http, url, identity_token)
        assert (first[0], second[0]) == (200, 200)
        status, third = await _open_stream(http, url, identity_token)
        assert status == 429
        assert b"too_many_in_flight" in await third.read()
        assert third.headers["RateLimit-Policy"] == (
            '"route.streams.concurrency.route";q=2;qu="concurrent-requests"'
        )
        # Held past several lease refreshes: the cap still holds.
        await asyncio.sleep(4)  # longer than the lease, to prove the slots are refreshed
        status, again = await _open_stream(http, url, identity_token)
        again.close()
        assert status == 429
        first[1].close()  # the caller goes away mid-stream

        async def admitted() -> bool:
            status, response = await _open_stream(http, url, identity_token)
            response.close()
            return status == 200

        await until(admitted, within=10)
        second[1].close()
        gated.gate.set()


async def _get_and_hang_up(port: int, path: str, token: str, rid: str) -> int:
    """One request on a connection of its own, closed on the answer's last byte (as curl
    and most one-shot clients do): its status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"X-Request-Id: {rid}\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        return int(head.split(b" ", 2)[1])
    finally:
        writer.transport.abort()  # at once, while the proxy may still be giving slots back


async def test_a_caller_hanging_up_on_the_last_byte_gives_its_slot_back(
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    upstream: Upstream,
    redis_server: RedisServer,
    audit_log: Path,
) -> None:
    """Callers that close their connection as soon as the answer is in, one after another
    under a cap of 2 in flight: every one is admitted (none holds a slot once answered,
    though the hang-up lands while the proxy gives its slot back to Valkey/Redis), and the
    audit says 200, not 499 client_disconnected."""
    limits = {"concurrency": [{"per": "route", "max": 2, "lease": "60s"}]}
    routes = {"capped": _route(upstream.url, limits)}
    cfg = _config(openbao, agent, routes, {"url": redis_server.url})
    async with running_proxy(cfg) as stack:
        port = int(stack.base.rsplit(":", 1)[1])
        rids = [new_request_id() for _ in range(30)]
        statuses = [
            await _get_and_hang_up(port, "/r/capped/echo", identity_token, rid) for rid in rids
        ]
        assert statuses == [200] * len(rids)
        events = [(await audit_events(audit_log, rid))[0] for rid in rids]
        assert {(e["status"], e["reason"]) for e in events} == {(200, "allowed")}
        prefix = stack.config.state.prefix if stack.config.state else ""
        with redis_server.client() as client:
            held = client.keys(f"{{{prefix}}}:s:*")  # a set of slots goes once empty
            assert [client.zcard(slots) for slots in held] == [0] * len(held)


async def test_store_outage_fails_closed_allows_and_recovers(
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    upstream: Upstream,
    own_redis: RedisServer,
    http: aiohttp.ClientSession,
    audit_log: Path,
) -> None:
    """With the store stopped, a fail-closed limit answers 503 state_store_unavailable at
    once, an `allow` limit and an unlimited route keep serving, readiness reports the store
    but stays ready; after a restart the limits count again, with no restart of keyproxy."""
    # Far from its end, and kept in the store for 3.6 s after each request.
    generous = {"per": "route", "requests": 1000, "window": "1h", "burst": 1000}
    routes = {
        "closed": _route(upstream.url, {"rate": [generous]}),
        "open": _route(upstream.url, {"on_store_error": "allow", "rate": [generous]}),
        "free": _route(upstream.url),
    }
    cfg = _config(openbao, agent, routes, {"url": own_redis.url})
    async with running_proxy(cfg) as stack:
        for route in routes:
            assert (await _get(http, f"{stack.base}/r/{route}/echo", identity_token))[0] == 200
        own_redis.stop()
        started = time.monotonic()
        rid = new_request_id()
        status, headers, body = await _get(http, f"{stack.base}/r/closed/echo", identity_token, rid)
        assert status == 503, body
        assert b"state_store_unavailable" in body
        assert headers["Retry-After"] == "1"
        assert (await _get(http, f"{stack.base}/r/open/echo", identity_token))[0] == 200
        assert (await _get(http, f"{stack.base}/r/free/echo", identity_token))[0] == 200
        assert time.monotonic() - started < 5  # bounded: never waiting on the dead server
        (event,) = await audit_events(audit_log, rid)
        assert (event["reason"], event["limit"]) == (
            "state_store_unavailable",
            "route.closed.rate.route",
        )
        async with http.get(f"{stack.admin}/readyz") as response:
            ready = await response.json()
        assert response.status == 200
        assert ready["state_store"]["ok"] is False
        assert "unreachable" in ready["state_store"]["detail"]

        own_redis.start()

        async def counted() -> bool:
            status, _, _ = await _get(http, f"{stack.base}/r/closed/echo", identity_token)
            return status == 200

        await until(counted, within=15)
        with own_redis.client() as client:
            assert client.keys("*:r:route.closed.rate.route:*")
        async with http.get(f"{stack.admin}/readyz") as response:
            assert (await response.json())["state_store"] == {"ok": True, "detail": ""}


async def test_one_of_several_workers_without_a_store_refuses_max_uses(
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    audit_log: Path,
) -> None:
    """A worker of `--workers 2` with no state.url issues no task token with max_uses, and
    refuses one issued elsewhere (503 max_uses_needs_shared_store) rather than count its
    uses alone; a token without max_uses still works."""
    cfg = _config(openbao, agent, {"limited": _route(upstream.url)}, {})
    del cfg["state"]
    compiled = config.parse(json.dumps(cfg), {})
    app = build_app(compiled, processes=2)
    runner, port = await listen.start(app, "127.0.0.1", 0, listen.Limits.of(compiled.server))
    single = build_app(compiled)  # a process serving alone issues it (the same signing key)
    issuer, issuer_port = await listen.start(
        single, "127.0.0.1", 0, listen.Limits.of(compiled.server)
    )
    try:
        stack = Stack(f"http://127.0.0.1:{port}", compiled, app)
        url = f"{stack.base}/r/limited/echo"
        async with http.post(
            f"{stack.base}/token",
            json={"scope": {"limited": ANY}, "max_uses": 5},
            headers=bearer(identity_token),
        ) as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "max_uses_needs_shared_store"
        elsewhere = Stack(f"http://127.0.0.1:{issuer_port}", compiled, single)
        metered = await _task_token(http, elsewhere, identity_token, max_uses=5)
        rid = new_request_id()
        status, _, body = await _get(http, url, metered["access_token"], rid)
        assert status == 503, body
        assert b"max_uses_needs_shared_store" in body
        (event,) = await audit_events(audit_log, rid)
        assert event["limit"] == "max_uses"
        plain = await _task_token(http, stack, identity_token)
        assert (await _get(http, url, plain["access_token"]))[0] == 200
    finally:
        await issuer.cleanup()
        await runner.cleanup()


# ----------------------------------------------------------------- which limits, no network

_LIMITED = {
    **CONFIG_SECTIONS,
    "routes": {
        "api": {
            "upstream": "https://api.example.com",
            "secret": {"path": "k"},
            "inject": [{"header": "X-Key"}],
            "limits": {"rate": [{"per": "route", "requests": 10, "window": "1s"}]},
        },
        "other": {
            "upstream": "https://other.example.com",
            "secret": {"path": "k"},
            "inject": [{"header": "X-Key"}],
        },
    },
    "policies": [
        {
            "name": "agents",
            "subjects": ["*"],
            "allow": {"api": ANY, "other": ANY},
            "limits": {
                "rate": [
                    {"per": "identity", "requests": 5, "window": "1s"},
                    {"per": "task", "requests": 2, "window": "1s"},
                    {"per": "token", "requests": 3, "window": "1s"},
                ],
                "concurrency": [{"per": "identity", "max": 2, "on_store_error": "allow"}],
            },
        }
    ],
}
_ALICE = Identity("k8s", "alice")


def _limits(route: str, policy: str | None, **kwargs: Any) -> tuple[Limit, ...]:
    request_limits = RequestLimits(config.parse(json.dumps(_LIMITED), {}))
    return request_limits.of(
        route,
        policy,
        kwargs.get("identity", _ALICE),
        kwargs.get("task"),
        kwargs.get("token_id"),
        kwargs.get("own", ()),
    )


def test_a_request_touches_its_routes_and_its_policys_limits() -> None:
    """The route's limits and the allowing policy's, per-task ones only with a task, a
    token's max_uses first; an exception token (no policy) meets the route's alone."""
    names = [limit_name(limit) for limit in _limits("api", "agents", token_id="t1")]
    assert names == [
        "route.api.rate.route",
        "policy.agents.rate.identity",
        "policy.agents.rate.token",
        "policy.agents.concurrency.identity",
    ]
    own = token_limits([Link("t1", 1060.0, max_uses=25)], 1000.0, 0.0)
    with_task = _limits("api", "agents", task="report", token_id="t1", own=own)
    assert isinstance(with_task[0], Counter)
    assert (with_task[0].key, with_task[0].cap, with_task[0].ttl) == ("max_uses:t1", 25, 60.0)
    assert "policy.agents.rate.task" in [limit_name(limit) for limit in with_task]
    assert [limit_name(limit) for limit in _limits("api", None)] == ["route.api.rate.route"]
    assert _limits("other", None) == ()
    concurrency = _limits("other", "agents")[-1]
    assert isinstance(concurrency, Concurrency)
    assert concurrency.on_store_error is OnStoreError.ALLOW


def test_a_tokens_lifecycle_names_its_ancestors_counters_and_leases() -> None:
    """A delegated token's own limits: each link's max_uses counter (expiring with that
    link) and each leased link's heartbeat lease, root first."""
    links = [Link("root", 1100.0, max_uses=10, idle_ttl=30.0), Link("child", 1050.0, 3)]
    found = token_limits(links, 1000.0, 5.0)
    assert [(type(limit).__name__, limit.key) for limit in found] == [
        ("Counter", "max_uses:root"),
        ("Lease", "lease:root"),
        ("Counter", "max_uses:child"),
    ]
    assert isinstance(found[0], Counter)
    assert found[0].ttl == 105.0
    rate = Outcome(Rate("burst:x", 50, 10.0, 5), True, 4, 0.3, 0.0)
    lease = Outcome(found[1], True, 0, 0.0, 0.0)
    assert ratelimit_headers(StoreDecision((rate, lease))) == {
        "RateLimit-Policy": '"burst";q=50;w=10',
        "RateLimit": '"burst";r=4;t=1',
    }


def test_keys_count_whom_the_limit_names() -> None:
    """Per identity: one key per issuer and subject whatever the token; per route: one key
    for everyone; per token without an id: the identity's; no key holds the identity's text."""
    alice = _limits("api", "agents", token_id="t1")
    alice_other_token = _limits("api", "agents", token_id="t2")
    bob = _limits("api", "agents", identity=Identity("k8s", "bob"), token_id="t1")
    assert alice[0].key == bob[0].key  # per route
    assert alice[1].key == alice_other_token[1].key != bob[1].key  # per identity
    assert alice[2].key != alice_other_token[2].key  # per token
    no_id = _limits("api", "agents")
    assert no_id[2].key.split(":")[1] == no_id[1].key.split(":")[1]
    assert all("alice" not in limit.key and "{" not in limit.key for limit in alice)


def test_limits_kept_ready_are_those_named_afresh() -> None:
    """Asked again, in any order, one configuration's limits for each caller are what a
    fresh reading names; a token's max_uses counter is made anew, with its own ttl."""
    kept = RequestLimits(config.parse(json.dumps(_LIMITED), {}))
    bob = Identity("k8s", "bob")
    asks: list[tuple[str, str | None, Identity, str | None, str | None]] = [
        ("api", "agents", _ALICE, None, "t1"),
        ("api", "agents", bob, "report", "t1"),
        ("api", "agents", _ALICE, "report", "t2"),
        ("other", None, _ALICE, None, "t3"),
    ]
    for ttl in [None, 60.0, 10.0]:
        own = [] if ttl is None else token_limits([Link("t1", 1000.0 + ttl, 25)], 1000.0, 0.0)
        for ask in [*asks, *reversed(asks)]:
            fresh = RequestLimits(config.parse(json.dumps(_LIMITED), {}))
            assert kept.of(*ask, own) == fresh.of(*ask, own)
    own = token_limits([Link("t1", 1010.0, 25)], 1000.0, 0.0)
    counter = kept.of(*asks[1], own)[0]
    assert isinstance(counter, Counter)
    assert counter.ttl == 10.0


def test_ratelimit_fields_follow_the_draft() -> None:
    """RateLimit-Policy names each limit's quota and window (concurrency in its own unit),
    RateLimit its remaining units and reset; Retry-After only on a refusal."""
    rate, cap = Rate("burst:x", 50, 10.0, 5), Concurrency("streams:y", 3)
    allowed = StoreDecision((Outcome(rate, True, 4, 0.3, 0.0), Outcome(cap, True, 2, 0.0, 0.0)))
    assert ratelimit_headers(allowed) == {
        "RateLimit-Policy": '"burst";q=50;w=10, "streams";q=3;qu="concurrent-requests"',
        "RateLimit": '"burst";r=4;t=1, "streams";r=2;t=0',
    }
    refused = StoreDecision((Outcome(rate, False, 0, 1.2, 0.2),))
    assert ratelimit_headers(refused)["Retry-After"] == "1"
