"""keyproxy.tokens.signing end to end: Transit key rotation and the public keys kept fresh.

Real OpenBao, a real upstream, the real proxy and real clients."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets

import aiohttp
import jwt
import pytest

from keyproxy import config as config_module
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.errors import Unavailable, VaultError
from keyproxy.identity import Identity
from keyproxy.metrics import Metrics
from keyproxy.tokens import TaskTokens
from keyproxy.vault import Vault
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import (
    Stack,
    token_config,
)
from tests.helpers.tokens import SCOPE, Clock, exchange, status
from tests.helpers.vault import VaultRelay


async def test_transit_rotation_keeps_old_tokens_valid(
    stack: Stack, openbao: OpenBaoDevServer, identity_token: str, http: aiohttp.ClientSession
) -> None:
    """After the Transit key rotates, old tokens keep working and new ones name the new
    version; the JWKS endpoint publishes both."""
    _, first = await exchange(http, stack.base, identity_token)
    await asyncio.to_thread(openbao.bao, "write", "-f", "transit/keys/keyproxy-tokens/rotate")
    _, second = await exchange(http, stack.base, identity_token)
    old_kid = jwt.get_unverified_header(first["access_token"])["kid"]
    new_kid = jwt.get_unverified_header(second["access_token"])["kid"]
    assert int(new_kid.rsplit(":v", 1)[1]) == int(old_kid.rsplit(":v", 1)[1]) + 1
    url = f"{stack.base}/r/r/v1/chat/completions"
    assert await status(http, "POST", url, first["access_token"]) == 200
    assert await status(http, "POST", url, second["access_token"]) == 200
    async with http.get(f"{stack.base}/.well-known/jwks.json") as response:
        kids = {k["kid"] for k in (await response.json())["keys"]}
    assert {old_kid, new_kid} <= kids


async def _tokens_via(
    relay: VaultRelay, openbao: OpenBaoDevServer, agent: Agent, clock: Clock, **tokens: str
) -> tuple[TaskTokens, Vault]:
    cfg_doc = token_config(openbao, agent, "http://127.0.0.1:1")
    cfg_doc["vault"]["addr"] = relay.url
    cfg_doc["tokens"] |= tokens
    cfg = config_module.parse(json.dumps(cfg_doc), {})
    vault = Vault(cfg.vault)
    await vault.login()
    tasks = TaskTokens(cfg, vault, clock=clock)
    await tasks.refresh_keys(force=True)
    return tasks, vault


async def test_known_key_never_waits_for_a_stalled_vault(
    relay: VaultRelay, openbao: OpenBaoDevServer, agent: Agent
) -> None:
    """The public keys are re-read in the background; while that read is stalled in Vault a
    token with a known key verifies at once, and a version added meanwhile is known as soon
    as the read lands."""
    tasks, vault = await _tokens_via(
        relay, openbao, agent, Clock(), key_refresh_interval="200ms", key_max_staleness="1h"
    )
    identity = Identity("openbao", agent.entity_id, {})
    issued = await tasks.issue(identity, SCOPE, ttl=120)
    CANARIES.add(issued.token)
    before = tasks.key_status()["versions"]
    relay.gate.clear()
    runner = asyncio.create_task(tasks.run())
    try:
        await eventually(
            lambda: any(b"/transit/keys/keyproxy-tokens" in h for h in relay.held),
            "the background key read never reached Vault",
            interval=0.02,
        )
        verified = await tasks.verify(issued.token)  # never seen: a full signature check
        assert verified.token_id == issued.token_id
        assert not relay.gate.is_set()  # the key read is still waiting in Vault
        await asyncio.to_thread(openbao.bao, "write", "-f", "transit/keys/keyproxy-tokens/rotate")
        relay.gate.set()
        await eventually(
            lambda: tasks.key_status()["versions"] == [*before, max(before) + 1],
            "the background read never brought the new version",
            interval=0.02,
        )
        assert tasks.key_status()["age"] < 5
    finally:
        relay.gate.set()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        vault.close()


async def test_keys_past_max_staleness_refuse_task_tokens(
    relay: VaultRelay, openbao: OpenBaoDevServer, agent: Agent
) -> None:
    """With Vault down the known public keys verify until tokens.key_max_staleness after the
    last good read; then task tokens get 503 token_keys_stale (counted, with Retry-After
    the next read) until a read succeeds again."""
    clock = Clock()
    tasks, vault = await _tokens_via(
        relay, openbao, agent, clock, key_refresh_interval="1m", key_max_staleness="2m"
    )
    try:
        identity = Identity("openbao", agent.entity_id, {})
        remembered = await tasks.issue(identity, SCOPE, ttl=600)
        fresh = await tasks.issue(identity, SCOPE, ttl=600)
        CANARIES.update({remembered.token, fresh.token})
        await tasks.verify(remembered.token)
        relay.down = True
        with pytest.raises(VaultError):
            await tasks.refresh_keys(force=True)
        clock.now += 120  # at the limit: still trusted
        assert (await tasks.verify(remembered.token)).token_id == remembered.token_id
        clock.now += 1
        for token in (remembered.token, fresh.token):
            with pytest.raises(Unavailable) as caught:
                await tasks.verify(token)
            refusal = caught.value
            assert (refusal.reason, refusal.status, refusal.retry_after) == (
                "token_keys_stale",
                503,
                60,  # key_refresh_interval: the next read
            )
        assert tasks.key_status() | {"versions": None} == {
            "age": pytest.approx(121, abs=1),
            "stale": True,
            "versions": None,
            "stale_refusals": 2,
        }
        metrics = Metrics(dict)
        metrics.watch_signing_keys(dict, tasks.key_status)
        exposition = metrics.exposition()[0].decode()
        assert "keyproxy_token_keys_stale 1.0" in exposition
        assert "keyproxy_token_keys_stale_refusals_total 2.0" in exposition
        relay.down = False
        await tasks.refresh_keys(force=True)
        assert (await tasks.verify(fresh.token)).token_id == fresh.token_id
        assert tasks.key_status()["stale"] is False
    finally:
        vault.close()


async def test_a_reload_naming_another_transit_key_verifies_its_tokens_at_once(
    openbao: OpenBaoDevServer, agent: Agent
) -> None:
    """After a reload names another Transit key, a replica verifies the tokens another one
    signs with it at once: the versions it knew are the old key's, under the same numbers,
    and are not taken for the new key's until the next key refresh."""
    key = f"keyproxy-tokens-next-{secrets.token_hex(4)}"
    await asyncio.to_thread(openbao.bao, "write", "-f", f"transit/keys/{key}", "type=ed25519")
    doc = token_config(openbao, agent, "http://127.0.0.1:1")
    cfg = dataclasses.replace(
        config_module.parse(json.dumps(doc), {}), vault=openbao.root_vault_config()
    )
    moved = dataclasses.replace(cfg, tokens=dataclasses.replace(cfg.tokens, transit_key=key))
    replicas = []
    try:
        for _ in range(2):
            vault = Vault(cfg.vault)
            await vault.login()
            tasks = TaskTokens(cfg, vault)
            await tasks.refresh_keys(force=True)
            replicas.append((tasks, vault))
        (here, _), (there, _) = replicas
        assert here.key_status()["versions"]  # the old key's
        here.reconfigure(moved)
        there.reconfigure(moved)
        issued = await there.issue(Identity("openbao", agent.entity_id, {}), SCOPE, ttl=120)
        CANARIES.add(issued.token)
        assert jwt.get_unverified_header(issued.token)["kid"].startswith(f"{key}:v")
        assert (await here.verify(issued.token)).token_id == issued.token_id
        assert (await there.verify(issued.token)).token_id == issued.token_id
    finally:
        for tasks, vault in replicas:
            await tasks.aclose()
            vault.close()
