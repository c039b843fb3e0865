"""keyproxy.lifecycle: heartbeat leases and a holder's end of its token, on one replica.

Real OpenBao, a real upstream, the real proxy (in-process state store) and real clients.
Across two `keyproxy serve` replicas sharing Valkey/Redis: tests/state/test_lifecycle.py."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp

from keyproxy import config
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.server import listen
from keyproxy.server.app import build_app
from tests.helpers.events import read_events
from tests.helpers.polling import eventually
from tests.helpers.servers import (
    Stack,
    Upstream,
    bearer,
    new_key,
    running_proxy,
    token_config,
)
from tests.helpers.tokens import exchange, form_exchange, refused, status

CHAT = "/r/r/v1/chat/completions"


async def _heartbeat(
    http: aiohttp.ClientSession, base: str, token: str
) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{base}/token/heartbeat", headers=bearer(token)) as response:
        return response.status, await response.json()


def _revoked(audit_log: Path, token_id: str) -> list[dict[str, Any]]:
    return [
        e
        for e in read_events(audit_log)
        if e.get("event") == "token.revoked" and e.get("token_id") == token_id
    ]


async def test_heartbeats_keep_an_idle_ttl_token_alive_and_their_end_kills_it(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession, audit_log: Path
) -> None:
    """An idle_ttl token works while heartbeats arrive, past several idle_ttls; once they
    stop it is refused within idle_ttl (+ margin), a late heartbeat is refused, and its end
    is recorded once, with reason heartbeat_lost."""
    code, answer = await exchange(http, stack.base, identity_token, idle_ttl="2s", ttl="1m")
    assert code == 200, answer
    assert answer["idle_ttl"] == 2
    token, url = answer["access_token"], f"{stack.base}/r/r/v1/chat/completions"
    until = time.monotonic() + 5.0  # 2.5 idle_ttls
    while time.monotonic() < until:
        code, beat = await _heartbeat(http, stack.base, token)
        assert code == 200, beat
        assert beat["token_id"] == answer["token_id"]
        assert 1.5 < beat["idle_expires_at"] - time.time() <= 2.0
        assert await status(http, "POST", url, token) == 200
        await asyncio.sleep(0.7)  # the holder's pace, as a heartbeating client keeps it
    stopped = time.monotonic()
    await refused(http, "POST", url, token, "the lapsed token still works", within=4.0)
    assert time.monotonic() - stopped < 2.0 + 1.0
    code, late = await _heartbeat(http, stack.base, token)
    # heartbeat_lost, or revoked if the lease sweep recorded the end first.
    assert (code, late["error"]["code"] in {"heartbeat_lost", "revoked"}) == (401, True)
    (event,) = await eventually(lambda: _revoked(audit_log, answer["token_id"]), "no event")
    assert (event["reason"], event["by"]) == ("heartbeat_lost", "server")


async def test_a_silent_holders_end_is_recorded_without_any_call(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession, audit_log: Path
) -> None:
    """A holder that never heartbeats nor calls again (crashed): the replica that issued
    its token records its end, heartbeat_lost, soon after the lease lapses, and counts it."""
    code, answer = await exchange(http, stack.base, identity_token, idle_ttl="2s", ttl="1m")
    assert code == 200, answer
    issued = time.monotonic()
    (event,) = await eventually(lambda: _revoked(audit_log, answer["token_id"]), "no event")
    assert (event["reason"], event["by"], event["task"]) == (
        "heartbeat_lost",
        "server",
        "test-task",
    )
    assert time.monotonic() - issued < 2.0 + 3.0
    async with http.get(f"{stack.admin}/metrics") as response:
        assert 'keyproxy_tokens_ended_total{reason="heartbeat_lost"} 1.0' in await response.text()


async def test_idle_ttl_is_bounded(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """idle_ttl below 2 s, or not below the token's TTL, is refused with a clear error; a
    token without idle_ttl has no heartbeat."""
    for idle, ttl in (("1s", "1m"), ("60s", "1m"), ("5m", "1m"), ("soon", "1m")):
        code, answer = await exchange(http, stack.base, identity_token, idle_ttl=idle, ttl=ttl)
        assert (code, answer["error"]["code"]) == (400, "invalid_request"), (idle, answer)
        assert "idle_ttl" in answer["error"]["message"]
    code, plain = await exchange(http, stack.base, identity_token)
    assert code == 200
    assert "idle_ttl" not in plain
    code, answer = await _heartbeat(http, stack.base, plain["access_token"])
    assert (code, answer["error"]["code"]) == (400, "no_idle_ttl")


async def test_idle_ttl_in_the_rfc8693_form(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """The token-exchange form takes idle_ttl too, and the answer names it."""
    code, answer = await form_exchange(
        http, stack.base, identity_token, scope="r:POST:/v1/chat/completions", idle_ttl="30s"
    )
    assert code == 200, answer
    assert answer["idle_ttl"] == 30
    assert (await _heartbeat(http, stack.base, answer["access_token"]))[0] == 200


async def test_the_holder_names_why_its_token_ended(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession, audit_log: Path
) -> None:
    """A revocation names its reason (no body: completed); an unknown or server-only reason
    is refused and the token lives on; the metric counts the ends by reason."""
    ids = {}
    for reason in (None, "failed", "timeout"):
        code, answer = await exchange(http, stack.base, identity_token)
        assert code == 200
        token = answer["access_token"]
        if reason == "timeout":
            for wrong in (b'{"reason": "operator"}', b'{"reason": 3}', b"[", b'"failed"'):
                async with http.post(
                    f"{stack.base}/token/revoke", data=wrong, headers=bearer(token)
                ) as response:
                    assert response.status == 400, wrong
            assert await status(http, "POST", f"{stack.base}/r/r/v1/chat/completions", token) == 200
        body = None if reason is None else json.dumps({"reason": reason})
        async with http.post(
            f"{stack.base}/token/revoke", data=body, headers=bearer(token)
        ) as response:
            assert response.status == 200
        ids[reason or "completed"] = answer["token_id"]
    for reason, token_id in ids.items():
        (event,) = await eventually(functools.partial(_revoked, audit_log, token_id), "no event")
        assert (event["reason"], event["by"]) == (reason, "holder")
    async with http.get(f"{stack.admin}/metrics") as response:
        text = await response.text()
    for reason in ids:
        assert f'keyproxy_tokens_ended_total{{reason="{reason}"}} 1.0' in text
    # The list those ends went into, as this process holds it (other tests' entries too).
    assert "keyproxy_revocation_list_read 1.0" in text
    held = re.search(r"^keyproxy_revocation_list_entries (\S+)$", text, re.MULTILINE)
    assert held is not None
    assert float(held[1]) >= len(ids)


async def test_a_revoke_naming_a_field_not_read_is_refused(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """A revoke body with a field keyproxy does not read (a misspelt `reson`, or one beside
    `reason`) is a 400 naming it, and the token lives on: never ended as `completed`."""
    code, answer = await exchange(http, stack.base, identity_token)
    assert code == 200, answer
    token = answer["access_token"]
    for wrong in ({"reson": "failed"}, {"reason": "failed", "detail": "x"}):
        async with http.post(
            f"{stack.base}/token/revoke", json=wrong, headers=bearer(token)
        ) as response:
            refusal = await response.json()
        assert (response.status, refusal["error"]["code"]) == (400, "invalid_request"), wrong
        assert repr(sorted(set(wrong) - {"reason"})[0]) in refusal["error"]["message"]
    assert await status(http, "POST", stack.base + CHAT, token) == 200


async def test_one_of_several_workers_without_a_store_refuses_idle_ttl(
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    upstream: Upstream,
    http: aiohttp.ClientSession,
) -> None:
    """A worker of `--workers 2` with no state.url issues no idle_ttl token, refuses a
    heartbeat and a proxied request with one, each with 503 idle_ttl_needs_shared_store: its
    lease would live in one worker's memory."""
    openbao.put_key("keyproxy/keys/tokens-test", new_key())
    compiled = config.parse(json.dumps(token_config(openbao, agent, upstream.url)), {})
    app = build_app(compiled, processes=2)
    runner, port = await listen.start(app, "127.0.0.1", 0, listen.Limits.of(compiled.server))
    try:
        base = f"http://127.0.0.1:{port}"
        code, answer = await exchange(http, base, identity_token, idle_ttl="10s")
        assert (code, answer["error"]["code"]) == (503, "idle_ttl_needs_shared_store")
        async with running_proxy(token_config(openbao, agent, upstream.url)) as single:
            code, leased = await exchange(http, single.base, identity_token, idle_ttl="10s")
            assert code == 200
        code, answer = await _heartbeat(http, base, leased["access_token"])
        assert (code, answer["error"]["code"]) == (503, "idle_ttl_needs_shared_store")
        async with http.post(base + CHAT, headers=bearer(leased["access_token"])) as response:
            refusal = (response.status, (await response.json())["error"]["code"])
        assert refusal == (503, "idle_ttl_needs_shared_store")  # and it is not used either
    finally:
        await runner.cleanup()


async def test_a_source_bound_token_is_kept_and_ended_only_from_its_address(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """A token bound to its holder's address, taken elsewhere: its heartbeat and its revocation
    from another address are refused (401 wrong_source), from its own they work; a child
    delegated from it is bound to the same address without asking."""
    code, issued = await exchange(
        http, stack.base, identity_token, ttl="1m", idle_ttl="10s", bind_source=True
    )
    assert code == 200, issued
    token = issued["access_token"]
    elsewhere = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=elsewhere) as thief:
        code, answer = await _heartbeat(thief, stack.base, token)
        assert (code, answer["error"]["code"]) == (401, "wrong_source"), answer
        async with thief.post(f"{stack.base}/token/revoke", headers=bearer(token)) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "wrong_source"
        code, child = await exchange(http, stack.base, token, ttl="30s")
        assert code == 200, child
        assert await status(thief, "POST", stack.base + CHAT, child["access_token"]) == 401
        assert await status(http, "POST", stack.base + CHAT, child["access_token"]) == 200
    code, answer = await _heartbeat(http, stack.base, token)
    assert code == 200, answer
    async with http.post(f"{stack.base}/token/revoke", headers=bearer(token)) as response:
        assert response.status == 200


async def test_a_child_can_ask_for_the_binding_its_parent_lacks(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """An unbound parent delegating with bind_source: the child works only from the address
    that asked for it, the parent still from anywhere."""
    code, parent = await exchange(http, stack.base, identity_token, ttl="1m")
    assert code == 200, parent
    code, child = await exchange(http, stack.base, parent["access_token"], bind_source=True)
    assert code == 200, child
    elsewhere = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=elsewhere) as thief:
        assert await status(thief, "POST", stack.base + CHAT, child["access_token"]) == 401
        assert await status(thief, "POST", stack.base + CHAT, parent["access_token"]) == 200
    assert await status(http, "POST", stack.base + CHAT, child["access_token"]) == 200


async def test_a_credential_sent_twice_is_refused_at_every_token_endpoint(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """`/token`, `/token/heartbeat` and `/token/revoke` refuse a credential sent twice or in
    two places (invariant 12) before verifying anything: two Authorization headers, an
    Authorization header beside another credential header, or (at `/token`) the form's
    subject_token beside an Authorization header. The token stays alive."""
    code, answer = await exchange(http, stack.base, identity_token, idle_ttl="60s")
    assert code == 200, answer
    task = answer["access_token"]
    twice = [
        [("Authorization", f"Bearer {task}"), ("Authorization", f"Bearer {identity_token}")],
        [("Authorization", f"Bearer {task}"), ("X-Api-Key", identity_token)],
    ]
    for path in ("/token/heartbeat", "/token/revoke"):
        for headers in twice:
            async with http.post(stack.base + path, headers=headers) as response:
                body = await response.json()
                assert (response.status, body["error"]["code"]) == (400, "ambiguous_credential")
    body_json = {"scope": {"r": {"methods": ["POST"], "paths": ["/v1/chat/completions"]}}}
    async with http.post(stack.base + "/token", headers=twice[0], json=body_json) as response:
        assert (response.status, (await response.json())["error"]["code"]) == (
            400,
            "ambiguous_credential",
        )
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "subject_token": identity_token,
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "scope": "r:POST:/v1/chat/completions",
    }
    async with http.post(
        stack.base + "/token", data=form, headers=bearer(identity_token)
    ) as response:
        assert (response.status, (await response.json())["error"]["code"]) == (
            400,
            "ambiguous_credential",
        )
    assert (await _heartbeat(http, stack.base, task))[0] == 200  # neither ended it
