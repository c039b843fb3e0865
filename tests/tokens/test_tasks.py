"""keyproxy.tokens.tasks end to end: the token exchange, its grants and answers, and use.

Real OpenBao (Transit signs, KV holds revocations), a real upstream, the real proxy and
real clients."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import aiohttp
import jwt
import openai
import pytest

from keyproxy.devserver import OpenBaoDevServer
from tests.helpers.events import read_events
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import (
    Stack,
    Upstream,
    bearer,
    new_key,
    running_proxy,
    token_config,
)
from tests.helpers.tokens import EXCHANGE, JWT, exchange, status


async def test_exchange_use_scope_and_revoke(
    stack: Stack, upstream: Upstream, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """An identity token becomes a task token that works inside its scope (also through the
    openai SDK), gets 403 outside it, and 401 once its holder revokes it."""
    code, answer = await exchange(http, stack.base, identity_token, intent="summarise", ttl="3m")
    assert code == 200, answer
    token = answer["access_token"]
    assert answer["scope"] == {"r": [{"methods": ["POST"], "paths": ["/v1/chat/completions"]}]}
    assert 170 <= answer["expires_in"] <= 180
    assert jwt.get_unverified_header(token)["typ"] == "keyproxy-task+jwt"

    client = openai.AsyncOpenAI(base_url=f"{stack.base}/r/r/v1", api_key=token, max_retries=0)
    try:
        chat = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "inside scope"}]
        )
    finally:
        await client.close()
    assert "inside scope" in (chat.choices[0].message.content or "")
    assert await status(http, "GET", f"{stack.base}/r/r/v1/models", token) == 403  # method
    assert await status(http, "POST", f"{stack.base}/r/r/v1/embeddings", token) == 403  # path
    assert await status(http, "POST", f"{stack.base}/r/other/echo", token) == 403  # route
    assert len(upstream.requests) == 1
    assert all(token not in v for v in upstream.requests[0].headers.values())

    async with http.post(f"{stack.base}/token/revoke", headers=bearer(token)) as response:
        assert response.status == 200
        assert (await response.json())["revoked"] == answer["token_id"]
    assert await status(http, "POST", f"{stack.base}/r/r/v1/chat/completions", token) == 401


async def test_grant_is_the_intersection_with_policy(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """Asking for more than policy allows yields the allowed part only; nothing allowed is
    403; a TTL above the policy's cap is clamped; max_uses is enforced."""
    code, answer = await exchange(
        http,
        stack.base,
        identity_token,
        ttl="1h",
        max_uses=2,
        scope={
            "r": {"methods": ["GET", "DELETE"], "paths": ["/v1/models", "/admin"]},
            "other": {"methods": ["GET", "POST"], "paths": ["/echo"]},
        },
    )
    assert code == 200, answer
    assert answer["scope"] == {
        "r": [{"methods": ["GET"], "paths": ["/v1/models"]}],
        "other": [{"methods": ["GET"], "paths": ["/echo"]}],
    }
    assert answer["expires_in"] == 300  # policy max_ttl 5m, below tokens.max_ttl 10m
    token = answer["access_token"]
    assert [await status(http, "GET", f"{stack.base}/r/r/v1/models", token) for _ in range(3)] == [
        200,
        200,
        401,
    ]
    code, answer = await exchange(
        http, stack.base, identity_token, scope={"r": {"methods": ["DELETE"], "paths": ["/x"]}}
    )
    assert code == 403
    assert answer["error"]["code"] == "nothing_granted"


async def test_rfc8693_token_exchange_form(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """A standard OAuth token-exchange request gets a Bearer token with the granted scope."""
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": identity_token,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "scope": "r:POST:/v1/chat/completions",
        "audience": "other",
        "task": "oauth-client",
    }
    async with http.post(f"{stack.base}/token", data=form) as response:
        answer = await response.json()
        assert response.status == 200, answer
    CANARIES.add(answer["access_token"])
    assert answer["token_type"] == "Bearer"
    assert answer["issued_token_type"] == "urn:ietf:params:oauth:token-type:jwt"
    assert answer["scope"] == "r:POST:/v1/chat/completions other:GET:/echo"
    assert await status(http, "GET", f"{stack.base}/r/other/echo", answer["access_token"]) == 200


async def test_vault_down_exchange_503_task_tokens_503_once_the_list_is_stale(
    fresh_openbao: OpenBaoDevServer, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    """With Vault stopped, the exchange answers 503; a task token is refused with 503
    revocations_unavailable (with Retry-After) once the revocation list is older than
    tokens.revocation_max_staleness, rather than judged by it; a workload identity goes on
    with the cached key."""
    bao = fresh_openbao
    bao.put_key("keyproxy/keys/tokens-test", new_key())
    agent = bao.add_agent("outage")
    identity_token = bao.agent_token(agent)
    CANARIES.add(identity_token)
    async with running_proxy(token_config(bao, agent, upstream.url)) as stack:
        code, answer = await exchange(http, stack.base, identity_token)
        assert code == 200
        bao.stop()
        code, failed = await exchange(http, stack.base, identity_token)
        assert code == 503, failed
        url = f"{stack.base}/r/r/v1/chat/completions"

        async def refused() -> tuple[int, str | None, str]:
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
            token = answer["access_token"]
            async with http.post(url, headers=bearer(token), json=body) as response:
                text = await response.text()
                return response.status, response.headers.get("Retry-After"), text

        code, retry_after, text = await eventually(
            refused, "a task token was judged by a stale list", until=lambda r: r[0] != 200
        )
        assert (code, retry_after) == (503, "1"), text
        assert "revocations_unavailable" in text
        assert await status(http, "POST", url, identity_token) == 200


async def test_broker_events_and_answers_carry_the_request_id(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession, audit_log: Path
) -> None:
    """An exchange, a refused exchange and a holder revocation each answer with the caller's
    X-Request-Id and write it into their events; the refusal is a warning."""
    scope = {"r": {"methods": ["POST"], "paths": ["/v1/chat/completions"]}}
    issued_headers = {**bearer(identity_token), "X-Request-Id": "broker-issue-1"}
    async with http.post(
        f"{stack.base}/token", json={"scope": scope, "task": "rid"}, headers=issued_headers
    ) as response:
        assert response.status == 200
        assert response.headers["X-Request-Id"] == "broker-issue-1"
        token = (await response.json())["access_token"]
        CANARIES.add(token)
    denied_headers = {**bearer(identity_token), "X-Request-Id": "broker-deny-1"}
    nothing = {"scope": {"other": {"methods": ["DELETE"], "paths": ["/x"]}}}
    async with http.post(f"{stack.base}/token", json=nothing, headers=denied_headers) as response:
        assert response.status == 403
        assert response.headers["X-Request-Id"] == "broker-deny-1"
    revoke_headers = {**bearer(token), "X-Request-Id": "broker-revoke-1"}
    async with http.post(f"{stack.base}/token/revoke", headers=revoke_headers) as response:
        assert response.status == 200
        assert response.headers["X-Request-Id"] == "broker-revoke-1"
    wanted = {
        "token.issued": "broker-issue-1",
        "token.denied": "broker-deny-1",
        "token.revoked": "broker-revoke-1",
    }
    found = await eventually(
        lambda: {
            e["event"]: e
            for e in read_events(audit_log)
            if e.get("request_id") in wanted.values() and e.get("event") in wanted
        },
        f"events missing of {sorted(wanted)}",
        until=lambda f: set(f) == set(wanted),
    )
    assert {name: e["request_id"] for name, e in found.items()} == wanted
    assert found["token.denied"]["level"] == "warning"


FORM = (
    f"grant_type={quote(EXCHANGE)}&subject_token_type={quote(JWT)}"
    "&scope=r:POST:/v1/chat/completions"
)
SCOPE_JSON = '"scope": {"r": {"methods": ["POST"], "paths": ["/v1/chat/completions"]}}'


@pytest.mark.parametrize(
    ("body", "query", "code"),
    [
        ("{form}&subject_token={token}&subject_token={token}", "", "ambiguous_credential"),
        ("{form}&subject_token=not-a-jwt&subject_token={token}", "", "ambiguous_credential"),
        (
            "{form}&subject_token={token}&actor_token={token}&actor_token={token}",
            "",
            "ambiguous_credential",
        ),
        ("{form}&subject_token={token}&bind_source=true&bind_source=false", "", None),
        ("{form}&subject_token={token}&task=a&task=b", "", None),
        ("{form}&subject_token={token}&task=%ff", "", None),
        ("{form}&subject_token={token}", "?access_token={token}", "ambiguous_credential"),
        ("{form}&subject_token={token}", "?x={token}", "ambiguous_credential"),
        ('{{{scope}, "max_uses": 1, "max_uses": 1000000}}', "", None),
        ('{{{scope}, "scope": {{"r": {{"methods": ["*"], "paths": ["/**"]}}}}}}', "", None),
        ('{{{scope}, "max_uses": Infinity}}', "", None),
        ('{{{scope}, "max_uses": NaN}}', "", None),
        ('{{{scope}, "max_uses": 1e999}}', "", None),
        ('{{{scope}, "max_uses": 1.5}}', "", None),
        ('{{{scope}, "idle_ttl": Infinity}}', "", None),
        ('{{{scope}, "ttl": -Infinity}}', "", None),
    ],
    ids=[
        "form-subject-token-twice",
        "form-subject-token-garbage-then-token",
        "form-actor-token-twice",
        "form-bind-source-twice",
        "form-task-twice",
        "form-not-utf8",
        "form-and-query-access-token",
        "form-and-token-in-query",
        "json-max-uses-twice",
        "json-scope-twice",
        "json-infinity",
        "json-nan",
        "json-beyond-float",
        "json-fraction",
        "json-idle-ttl-infinity",
        "json-ttl-minus-infinity",
    ],
)
async def test_an_exchange_asked_ambiguously_or_loosely_is_400(
    stack: Stack,
    identity_token: str,
    http: aiohttp.ClientSession,
    body: str,
    query: str,
    code: str | None,
) -> None:
    """A /token field given twice, a credential also in the query, a form that is not
    UTF-8, JSON outside the strict parser (a member twice, NaN, Infinity, a number beyond a
    float) or a count that is not a whole number: 400 (ambiguous_credential for a credential,
    else invalid_request), never the last value read, nor a 500; nothing is issued."""
    form = body.startswith("{form}")
    text = body.format(form=FORM, token=identity_token, scope=SCOPE_JSON)
    headers = {} if form else bearer(identity_token)
    kind = "application/x-www-form-urlencoded" if form else "application/json"
    async with http.post(
        f"{stack.base}/token{query.format(token=identity_token)}",
        data=text.encode(),
        headers={**headers, "Content-Type": kind},
    ) as response:
        answer = await response.json()
        assert response.status == 400, answer
    assert answer["error"]["code"] == (code or "invalid_request")
    assert "access_token" not in answer


async def test_a_revocation_whose_reason_is_given_twice_is_400_and_revokes_nothing(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """The holder's end reason given twice is refused (400), never read as its last value;
    the token is not revoked."""
    code, answer = await exchange(http, stack.base, identity_token)
    assert code == 200, answer
    token = answer["access_token"]
    twice = b'{"reason": "failed", "reason": "completed"}'
    async with http.post(
        f"{stack.base}/token/revoke",
        data=twice,
        headers={**bearer(token), "Content-Type": "application/json"},
    ) as response:
        assert response.status == 400, await response.text()
    assert await status(http, "POST", f"{stack.base}/r/r/v1/chat/completions", token) == 200
