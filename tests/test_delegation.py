"""keyproxy.delegation: a task token exchanged for a narrower one, on one replica.

Real OpenBao, a real upstream, the real proxy (in-process state store) and real clients.
Revoking a parent across two `keyproxy serve` replicas: tests/state/test_lifecycle.py."""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml

from keyproxy import scope as scopes
from keyproxy.caller import Identity
from keyproxy.cli import main
from keyproxy.config import Grant
from keyproxy.delegation import narrow
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.errors import Forbidden
from keyproxy.tokens import Link, TaskToken
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
from tests.helpers.tokens import delegate, exchange, refused, status
from tests.test_proxy import audit_events, new_request_id

CHAT = "/r/r/v1/chat/completions"
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "x"}]}


def test_a_child_is_narrowed_to_its_parent_or_refused() -> None:
    """No table row lets a child exceed its parent: a scope beyond it is refused naming
    what is not held, a longer TTL is cut to the parent's remaining life, more uses than
    are left are refused, and depth and exception tokens are bounded."""
    post = Grant(frozenset({"POST"}), (("v1", "chat", "completions"), ("v1", "models")))
    parent = TaskToken(
        "p", Identity("i", "s"), {"r": (post,)}, issued_at=900.0, expires_at=1100.0, max_uses=5
    )
    wider = {"r": (Grant(frozenset({"GET", "POST"}), (("v1", "models"),)),)}
    with pytest.raises(Forbidden) as refusal:
        narrow(parent, wider, None, None, default_ttl=60, max_depth=3, uses_left=5, now=1000)
    assert refusal.value.reason == "exceeds_parent_scope"
    assert "r GET /v1/models" in refusal.value.message
    other = {"other": (post,)}
    with pytest.raises(Forbidden):
        narrow(parent, other, None, None, default_ttl=60, max_depth=3, uses_left=5, now=1000)
    inside = {"r": (Grant(frozenset({"POST"}), (("v1", "models"),)),)}
    child = narrow(parent, inside, 3600, 2, default_ttl=60, max_depth=3, uses_left=2, now=1000)
    assert (child.ttl, child.max_uses, child.narrowed_ttl, child.scope) == (100, 2, True, inside)
    assert (
        narrow(parent, {}, None, None, default_ttl=60, max_depth=3, uses_left=2, now=1000).ttl == 60
    )
    with pytest.raises(Forbidden) as refusal:
        narrow(parent, inside, None, 3, default_ttl=60, max_depth=3, uses_left=2, now=1000)
    assert refusal.value.reason == "exceeds_parent_uses"
    deep = TaskToken(
        "d",
        Identity("i", "s"),
        {"r": (post,)},
        900.0,
        1100.0,
        ancestors=(Link("a", 1100.0), Link("b", 1100.0), Link("c", 1100.0)),
    )
    with pytest.raises(Forbidden) as refusal:
        narrow(deep, {}, None, None, default_ttl=60, max_depth=3, uses_left=None, now=1000)
    assert refusal.value.reason == "delegation_too_deep"
    exception = TaskToken("e", Identity("exception", "x"), {}, 900.0, 1100.0, exception_owner="o")
    with pytest.raises(Forbidden) as refusal:
        narrow(exception, {}, None, None, default_ttl=60, max_depth=3, uses_left=None, now=1000)
    assert refusal.value.reason == "not_delegable"
    assert scopes.outside(inside, parent.scope) == []


async def test_a_child_cannot_exceed_its_parent(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """Through the real broker: a child asking for more scope, a longer TTL or more uses
    than its parent is refused or narrowed, and its uses count against the parent's."""
    code, parent = await exchange(http, stack.base, identity_token, ttl="2m", max_uses=4)
    assert code == 200, parent
    token = parent["access_token"]
    assert await status(http, "POST", stack.base + CHAT, token) == 200  # 3 left
    code, answer = await delegate(http, stack.base, token, scope="r:GET:/v1/models")
    assert (code, answer["error"]["code"]) == (403, "exceeds_parent_scope"), answer
    code, answer = await delegate(http, stack.base, token, max_uses="4")
    assert (code, answer["error"]["code"]) == (403, "exceeds_parent_uses"), answer
    code, answer = await delegate(http, stack.base, token, task="another-task")
    assert (code, answer["error"]["code"]) == (400, "invalid_request"), answer
    # The JSON exchange takes the parent as its Bearer credential.
    code, json_child = await exchange(http, stack.base, token, ttl="30s")
    assert code == 200, json_child
    assert json_child["chain"] == [parent["token_id"], json_child["token_id"]]
    assert json_child["expires_in"] <= 30
    code, child = await delegate(http, stack.base, token, ttl="1h", max_uses="3")
    assert code == 200, child
    assert child["expires_at"] <= parent["expires_at"]
    assert child["expires_in"] <= 120
    assert child["chain"] == [parent["token_id"], child["token_id"]]
    assert child["scope"] == "r:POST:/v1/chat/completions"
    claims = jwt.decode(child["access_token"], options={"verify_signature": False})
    assert claims["sub"] == jwt.decode(token, options={"verify_signature": False})["sub"]
    assert claims["anc"][0]["jti"] == parent["token_id"]
    assert claims["task"] == "test-task"
    # Parent and child draw on the parent's 4 uses together.
    codes = [await status(http, "POST", stack.base + CHAT, child["access_token"]) for _ in range(2)]
    assert codes == [200, 200]
    assert await status(http, "POST", stack.base + CHAT, token) == 200  # the 4th of 4
    # The child has 1 of its own 3 left, but its parent has none.
    assert await status(http, "POST", stack.base + CHAT, child["access_token"]) == 401
    assert await status(http, "POST", stack.base + CHAT, token) == 401


async def test_a_parent_whose_routes_are_gone_is_refused_clearly(
    openbao: OpenBaoDevServer,
    agent: Agent,
    upstream: Upstream,
    identity_token: str,
    http: aiohttp.ClientSession,
    audit_log: Path,
) -> None:
    """A replica (or a reload) without any of the parent's routes answers a delegation
    asking for the parent's whole scope with 403 nothing_granted, audited as token.denied,
    not with a 500."""
    openbao.put_key("keyproxy/keys/tokens-test", new_key())
    cfg = token_config(openbao, agent, upstream.url)
    narrowed = copy.deepcopy(cfg)
    del narrowed["routes"]["other"]
    del narrowed["policies"][0]["allow"]["other"]
    async with running_proxy(cfg) as issuing, running_proxy(narrowed) as serving:
        scope = {"other": {"methods": ["GET"], "paths": ["/echo"]}}
        code, parent = await exchange(http, issuing.base, identity_token, scope=scope)
        assert code == 200, parent
        rid = new_request_id()
        headers = {**bearer(parent["access_token"]), "X-Request-Id": rid}
        async with http.post(f"{serving.base}/token", json={}, headers=headers) as response:
            answer = await response.json()
        assert (response.status, answer["error"]["code"]) == (403, "nothing_granted"), answer
    events = await audit_events(audit_log, rid)
    (event,) = [e for e in events if e["event"] == "token.denied"]
    assert (event["reason"], event["parent_token_id"]) == ("nothing_granted", parent["token_id"])


async def test_a_chain_names_every_link_and_dies_with_its_root(
    stack: Stack,
    openbao: OpenBaoDevServer,
    identity_token: str,
    http: aiohttp.ClientSession,
    audit_log: Path,
) -> None:
    """root -> child (actor: a sub-agent's identity) -> grandchild: the grandchild's claims
    nest both actors (RFC 8693 act), its audit events name all three links and both actors,
    the depth bound refuses one link too many, and revoking the root kills the chain."""
    helper = openbao.add_agent("delegation-sub-agent")
    actor_token = openbao.agent_token(helper)
    CANARIES.add(actor_token)
    code, root = await exchange(http, stack.base, identity_token, ttl="2m")
    assert code == 200, root
    code, child = await delegate(http, stack.base, root["access_token"], actor_token=actor_token)
    assert code == 200, child
    code, grandchild = await delegate(http, stack.base, child["access_token"])
    assert code == 200, grandchild
    ids = [root["token_id"], child["token_id"], grandchild["token_id"]]
    assert grandchild["chain"] == ids
    claims = jwt.decode(grandchild["access_token"], options={"verify_signature": False})
    assert claims["act"]["act"] == {"sub": helper.entity_id, "idp": "openbao"}
    assert [link["jti"] for link in claims["anc"]] == ids[:2]

    rid = new_request_id()
    headers = {**bearer(grandchild["access_token"]), "X-Request-Id": rid}
    async with http.post(stack.base + CHAT, json=CHAT_BODY, headers=headers) as response:
        assert response.status == 200

    (event,) = await audit_events(audit_log, rid)
    assert event["chain"] == ",".join(ids)
    assert event["actors"].split(",")[0] == f"openbao|{helper.entity_id}"
    assert event["token_id"] == ids[2]

    code, great = await delegate(http, stack.base, grandchild["access_token"])
    assert code == 200, great  # depth 3
    code, answer = await delegate(http, stack.base, great["access_token"])
    assert (code, answer["error"]["code"]) == (403, "delegation_too_deep")

    async with http.post(f"{stack.base}/token/revoke", headers=bearer(root["access_token"])):
        pass
    for token in (child, grandchild, great):
        await refused(http, "POST", stack.base + CHAT, token["access_token"], "chain alive")
    rid = new_request_id()
    headers = {**bearer(grandchild["access_token"]), "X-Request-Id": rid}
    async with http.post(stack.base + CHAT, json=CHAT_BODY, headers=headers) as response:
        assert (await response.json())["error"]["code"] == "parent_revoked"


async def test_a_child_dies_with_its_parents_heartbeat(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """A child of an idle_ttl parent works while the parent heartbeats, and is refused
    (parent_revoked) once the parent's lease lapses, as is its own heartbeat."""
    code, parent = await exchange(http, stack.base, identity_token, ttl="2m", idle_ttl="2s")
    assert code == 200, parent
    code, child = await delegate(http, stack.base, parent["access_token"], idle_ttl="30s")
    assert code == 200, child
    token = child["access_token"]
    started = time.monotonic()
    assert await status(http, "POST", stack.base + CHAT, token) == 200
    async with http.post(f"{stack.base}/token/heartbeat", headers=bearer(token)) as response:
        assert response.status == 200
    await refused(http, "POST", stack.base + CHAT, token, "the child outlived its parent")
    assert time.monotonic() - started < 2.0 + 2.0
    async with http.post(f"{stack.base}/token/heartbeat", headers=bearer(token)) as response:
        assert (await response.json())["error"]["code"] == "parent_revoked"


async def test_audit_and_token_list_show_the_tree(
    stack: Stack,
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    http: aiohttp.ClientSession,
    audit_log: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`keyproxy audit --task` answers everything done under a task, sub-agents included, as
    a tree with end reasons; `keyproxy token list --audit` shows the same tree with each
    token's state now (a revoked child's grandchild revoked with it)."""
    task = f"tree-{uuid.uuid4().hex}"
    code, root = await exchange(http, stack.base, identity_token, task=task)
    assert code == 200, root
    code, child = await delegate(http, stack.base, root["access_token"])
    assert code == 200, child
    code, grandchild = await delegate(http, stack.base, child["access_token"])
    assert code == 200, grandchild
    rid = new_request_id()
    headers = {**bearer(grandchild["access_token"]), "X-Request-Id": rid}
    async with http.post(stack.base + CHAT, json=CHAT_BODY, headers=headers) as response:
        assert response.status == 200
    async with http.post(
        f"{stack.base}/token/revoke",
        json={"reason": "failed"},
        headers=bearer(child["access_token"]),
    ) as response:
        assert response.status == 200
    await audit_events(audit_log, rid)

    def revoked() -> list[dict[str, Any]]:
        return [
            e
            for e in read_events(audit_log)
            if e.get("event") == "token.revoked" and e.get("token_id") == child["token_id"]
        ]

    await eventually(revoked, "no token.revoked event")
    query = ["audit", str(audit_log), "--task", task]
    assert await asyncio.to_thread(main, [*query, "-o", "json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    (tree,) = answer["tokens"]
    assert tree["token_id"] == root["token_id"]
    (below,) = tree["children"]
    assert (below["token_id"], below["ended"]) == (child["token_id"], "failed")
    (last,) = below["children"]
    assert (last["token_id"], last["requests"]) == (grandchild["token_id"], 1)
    assert await asyncio.to_thread(main, query) == 0
    text = capsys.readouterr().out
    assert "ended: failed" in text
    assert "ended: parent_revoked" in text

    path = tmp_path / "k.yaml"
    cfg = token_config(openbao, agent, "http://127.0.0.1:1")
    cfg["vault"]["auth"] = {"method": "token"}
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("BAO_TOKEN", openbao.root_token)
    argv = ["token", "list", "-c", str(path), "--audit", str(audit_log), "--task", task]
    assert await asyncio.to_thread(main, [*argv, "-o", "json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    states = [
        listed["state"],
        listed["children"][0]["state"],
        listed["children"][0]["children"][0]["state"],
    ]
    assert states == ["active", "revoked (failed)", "revoked (parent_revoked)"]


async def test_revoking_an_actor_ends_its_heartbeats_too(
    stack: Stack,
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    audit_log: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A child a sub-agent acts with (actor_token), with a lease: once the sub-agent's
    identity is revoked as a subject, the child is refused and so is its heartbeat (it
    could otherwise keep a lease alive for a token that no longer works); `token list
    --audit` shows it revoked for that reason, its parent active."""
    helper = openbao.add_agent("revoked-actor")
    actor_token = openbao.agent_token(helper)
    CANARIES.add(actor_token)
    code, root = await exchange(http, stack.base, identity_token, ttl="2m")
    assert code == 200, root
    code, child = await delegate(
        http, stack.base, root["access_token"], actor_token=actor_token, idle_ttl="30s"
    )
    assert code == 200, child
    token = child["access_token"]
    async with http.post(f"{stack.base}/token/heartbeat", headers=bearer(token)) as response:
        assert response.status == 200
    path = tmp_path / "k.yaml"
    cfg = token_config(openbao, agent, "http://127.0.0.1:1")
    cfg["vault"]["auth"] = {"method": "token"}
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("BAO_TOKEN", openbao.root_token)
    revoke = ["token", "revoke", "-c", str(path), "--issuer", "openbao"]
    assert await asyncio.to_thread(main, [*revoke, "--subject", helper.entity_id]) == 0
    await refused(http, "POST", stack.base + CHAT, token, "the actor's revocation missed")

    async def heartbeat() -> int:
        async with http.post(f"{stack.base}/token/heartbeat", headers=bearer(token)) as answer:
            return answer.status

    await eventually(heartbeat, "the heartbeat outlived the actor", until=(401).__eq__)
    assert await status(http, "POST", stack.base + CHAT, root["access_token"]) == 200

    def seen() -> bool:  # the child's refused request, which names its actors
        return any(e.get("token_id") == child["token_id"] for e in read_events(audit_log))

    await eventually(seen, "no audit event of the child")
    listing = ["token", "list", "-c", str(path), "--audit", str(audit_log), "-o", "json"]
    capsys.readouterr()
    assert await asyncio.to_thread(main, listing) == 0
    (listed,) = [
        t for t in json.loads(capsys.readouterr().out) if t["token_id"] == root["token_id"]
    ]
    (below,) = listed["children"]
    assert (listed["state"], below["token_id"]) == ("active", child["token_id"])
    assert below["state"] == "revoked (actor_revoked)"


async def test_a_chain_shares_its_per_token_rate(
    openbao: OpenBaoDevServer,
    agent: Agent,
    upstream: Upstream,
    identity_token: str,
    http: aiohttp.ClientSession,
) -> None:
    """A policy's `per: token` rate counts a delegation chain as one token (its root's):
    parent and child together get the burst of 3, not 3 each, so delegating multiplies
    nothing (invariant 10)."""
    openbao.put_key("keyproxy/keys/tokens-test", new_key())
    cfg = token_config(openbao, agent, upstream.url)
    rate = {"per": "token", "requests": 3, "window": "1h", "burst": 3}  # 3 at once, then none
    cfg["policies"][0]["limits"] = {"rate": [rate]}
    async with running_proxy(cfg) as stack:
        code, parent = await exchange(http, stack.base, identity_token)
        assert code == 200, parent
        code, child = await delegate(http, stack.base, parent["access_token"])
        assert code == 200, child
        tokens = [parent["access_token"], child["access_token"]] * 2
        codes = [await status(http, "POST", stack.base + CHAT, token) for token in tokens]
    assert codes == [200, 200, 200, 429]
