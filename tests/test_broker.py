"""keyproxy.broker: `tokens.exchange_limit`, token exchanges per workload identity.

Real OpenBao, the real broker over HTTP, the in-process state store, a real Valkey/Redis
shared by two replicas, and a dead address for the store's failures. Exchanges themselves:
tests/test_lifecycle.py, tests/test_delegation.py and tests/tokens/."""

from __future__ import annotations

import copy
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from keyproxy.devserver import Agent, OpenBaoDevServer
from tests.helpers.logscan import CANARIES
from tests.helpers.servers import Stack, Upstream, bearer, new_key, running_proxy, token_config
from tests.helpers.tokens import EXCHANGE, JWT
from tests.state.servers import RedisServer
from tests.test_proxy import audit_events, new_request_id

SCOPE = {"r": {"methods": ["POST"], "paths": ["/v1/chat/completions"]}}
# Two exchanges at once, then one every 30 s.
LIMIT = {"requests": 2, "window": "1m", "burst": 2}


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def code(self) -> str | None:
        return self.body["error"]["code"] if self.status != 200 else None


async def _answer(response: aiohttp.ClientResponse) -> Answer:
    body: dict[str, Any] = await response.json()
    if response.status == 200:
        CANARIES.add(body["access_token"])
    return Answer(response.status, dict(response.headers), body)


async def _exchange(
    http: aiohttp.ClientSession, base: str, token: str, request_id: str | None = None
) -> Answer:
    """A JSON exchange of `token` (an identity token, or a task token: a delegation)."""
    headers = bearer(token) | ({"X-Request-Id": request_id} if request_id else {})
    body = {"scope": SCOPE, "task": "test-task"}
    async with http.post(f"{base}/token", json=body, headers=headers) as response:
        return await _answer(response)


async def _delegate(http: aiohttp.ClientSession, base: str, token: str, actor: str) -> Answer:
    """A form delegation of the task token `token` to the sub-agent `actor`."""
    form = {
        "grant_type": EXCHANGE,
        "subject_token": token,
        "subject_token_type": JWT,
        "actor_token": actor,
        "actor_token_type": JWT,
    }
    async with http.post(f"{base}/token", data=form) as response:
        return await _answer(response)


@pytest.fixture(scope="module")
def other_agent(openbao: OpenBaoDevServer) -> Agent:
    """A second workload identity, allowed the same as `agent`."""
    return openbao.add_agent("broker-other-agent")


@pytest.fixture(scope="module")
def other_token(openbao: OpenBaoDevServer, other_agent: Agent) -> str:
    value = openbao.agent_token(other_agent)
    CANARIES.add(value)
    return value


def _config(
    openbao: OpenBaoDevServer, agent: Agent, other: Agent, upstream: Upstream, **tokens: Any
) -> dict[str, Any]:
    cfg = copy.deepcopy(token_config(openbao, agent, upstream.url))
    cfg["tokens"] |= tokens
    cfg["policies"][0]["subjects"].append(other.entity_id)
    return cfg


@pytest.fixture
async def limited(
    openbao: OpenBaoDevServer, agent: Agent, other_agent: Agent, upstream: Upstream
) -> AsyncIterator[Stack]:
    """The broker with `exchange_limit: LIMIT`."""
    openbao.put_key("keyproxy/keys/tokens-test", new_key())
    cfg = _config(openbao, agent, other_agent, upstream, exchange_limit=LIMIT)
    async with running_proxy(cfg) as value:
        yield value


async def test_exchanges_beyond_the_limit_are_refused_per_identity(
    limited: Stack,
    agent: Agent,
    identity_token: str,
    other_token: str,
    http: aiohttp.ClientSession,
    audit_log: Path,
) -> None:
    """Two exchanges at once pass; the third of the same identity gets 429 rate_limited
    with Retry-After (the 30 s to the next one) and its RateLimit fields, is audited as
    token.denied naming the limit and counted as denied and as a limit's refusal; another
    identity is unaffected."""
    for _ in range(2):
        assert (await _exchange(http, limited.base, identity_token)).status == 200
    rid = new_request_id()
    refused = await _exchange(http, limited.base, identity_token, rid)
    assert (refused.status, refused.code) == (429, "rate_limited"), refused.body
    assert 29 <= int(refused.headers["Retry-After"]) <= 30
    assert refused.headers["RateLimit-Policy"] == '"tokens.exchange";q=2;w=60'
    assert refused.headers["RateLimit"].startswith('"tokens.exchange";r=0;')
    (event,) = [e for e in await audit_events(audit_log, rid) if e["event"] == "token.denied"]
    assert (event["reason"], event["limit"]) == ("rate_limited", "tokens.exchange")
    assert (event["subject"], event.get("token_id")) == (agent.entity_id, None)
    for _ in range(2):
        assert (await _exchange(http, limited.base, other_token)).status == 200
    async with http.get(f"{limited.admin}/metrics") as response:
        text = await response.text()
    assert 'keyproxy_tokens_total{event="denied"} 1.0' in text
    assert 'keyproxy_tokens_total{event="issued"} 4.0' in text
    # Counted with the requests limits refused, under no route.
    assert 'keyproxy_limit_refusals_total{limit="tokens.exchange",route="-"} 1.0' in text


async def test_a_delegation_counts_against_its_root_identity(
    limited: Stack, identity_token: str, other_token: str, http: aiohttp.ClientSession
) -> None:
    """A child asked for with another identity as its actor counts against the identity the
    chain was issued to: that identity's next delegation and exchange are refused, while
    the actor's own exchanges are untouched."""
    parent = await _exchange(http, limited.base, identity_token)
    assert parent.status == 200, parent.body
    token = parent.body["access_token"]
    child = await _delegate(http, limited.base, token, other_token)
    assert child.status == 200, child.body
    refused = await _delegate(http, limited.base, token, other_token)
    assert (refused.status, refused.code) == (429, "rate_limited"), refused.body
    child_token = child.body["access_token"]
    assert (await _exchange(http, limited.base, child_token)).code == "rate_limited"
    assert (await _exchange(http, limited.base, identity_token)).code == "rate_limited"
    for _ in range(2):
        assert (await _exchange(http, limited.base, other_token)).status == 200


async def test_without_the_setting_exchanges_are_not_limited(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """Without `exchange_limit` an identity may exchange as often as it asks."""
    for _ in range(5):
        answer = await _exchange(http, stack.base, identity_token)
        assert answer.status == 200, answer.body
        assert "RateLimit" not in answer.headers


@pytest.mark.parametrize(("on_store_error", "status"), [("deny", 503), ("allow", 200)])
async def test_a_store_failure_follows_on_store_error(
    openbao: OpenBaoDevServer,
    agent: Agent,
    other_agent: Agent,
    upstream: Upstream,
    identity_token: str,
    http: aiohttp.ClientSession,
    on_store_error: str,
    status: int,
) -> None:
    """With the state store out of reach, an exchange is refused with 503
    state_store_unavailable (on_store_error: deny, the default) or issued (allow)."""
    openbao.put_key("keyproxy/keys/tokens-test", new_key())
    limit = LIMIT | {"on_store_error": on_store_error}
    cfg = _config(openbao, agent, other_agent, upstream, exchange_limit=limit)
    cfg["state"] = {"url": "redis://127.0.0.1:1/0", "timeout": "500ms"}  # nothing listens
    async with running_proxy(cfg) as stack:
        answer = await _exchange(http, stack.base, identity_token)
    assert answer.status == status, answer.body
    if status == 503:
        assert answer.code == "state_store_unavailable"
        assert int(answer.headers["Retry-After"]) >= 1


async def test_the_limit_holds_across_replicas_sharing_the_store(
    openbao: OpenBaoDevServer,
    agent: Agent,
    other_agent: Agent,
    upstream: Upstream,
    identity_token: str,
    redis_server: RedisServer,
    http: aiohttp.ClientSession,
) -> None:
    """Two replicas counting in one Valkey/Redis share an identity's allowance: two
    exchanges at one, then the next at the other is refused."""
    openbao.put_key("keyproxy/keys/tokens-test", new_key())
    cfg = _config(openbao, agent, other_agent, upstream, exchange_limit=LIMIT)
    cfg["state"] = {"url": redis_server.url, "timeout": "2s", "prefix": f"t{uuid.uuid4().hex}"}
    async with running_proxy(cfg) as one, running_proxy(cfg) as two:
        for _ in range(2):
            assert (await _exchange(http, one.base, identity_token)).status == 200
        refused = await _exchange(http, two.base, identity_token)
    assert (refused.status, refused.code) == (429, "rate_limited"), refused.body


async def test_a_token_too_long_to_send_is_not_issued(
    stack: Stack,
    upstream: Upstream,
    identity_token: str,
    http: aiohttp.ClientSession,
    audit_log: Path,
) -> None:
    """A grant whose token would not fit the listener's header field (64 long paths: its
    holder could neither use it nor revoke it) is refused, 400 token_too_large, audited as
    token.denied; one of 16 such paths is issued and works."""
    paths = [f"/v1/{i:02d}-" + "x" * 480 for i in range(64)]
    scope = {"r": [{"methods": ["POST"], "paths": paths[n : n + 32]} for n in (0, 32)]}
    rid = new_request_id()
    headers = bearer(identity_token) | {"X-Request-Id": rid}
    async with http.post(f"{stack.base}/token", json={"scope": scope}, headers=headers) as response:
        refused = await _answer(response)
    assert (refused.status, refused.code) == (400, "token_too_large"), refused.body
    (event,) = [e for e in await audit_events(audit_log, rid) if e["event"] == "token.denied"]
    assert event["reason"] == "token_too_large"
    scope = {"r": [{"methods": ["POST"], "paths": paths[:16]}]}
    async with http.post(
        f"{stack.base}/token", json={"scope": scope}, headers=bearer(identity_token)
    ) as response:
        issued = await _answer(response)
    assert issued.status == 200, issued.body
    token = issued.body["access_token"]
    async with http.post(f"{stack.base}/r/r{paths[15]}", headers=bearer(token)) as response:
        await response.read()
    assert [seen.path for seen in upstream.requests] == [paths[15]]  # forwarded
