"""keyproxy.tokens.signing end to end: Transit key rotation and the public keys kept fresh.

Real OpenBao, a real upstream, the real proxy and real clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import jwt
import pytest
from yarl import URL

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


class VaultRelay:
    """A TCP relay on 127.0.0.1 in front of OpenBao that can hold requests (a stalled Vault)
    or drop connections (Vault down), and records the requests it held."""

    def __init__(self, target: str) -> None:
        url = URL(target)
        self.target = (url.host or "127.0.0.1", url.port or 8200)
        self.gate = asyncio.Event()
        self.gate.set()
        self.down = False
        self.held: list[bytes] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        self.gate.set()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        for pump in (
            self._pump(reader, up_writer, requests=True),
            self._pump(up_reader, writer, requests=False),
        ):
            task = asyncio.create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, requests: bool
    ) -> None:
        try:
            while chunk := await reader.read(65536):
                if requests and self.down:
                    break
                if requests and not self.gate.is_set():
                    self.held.append(chunk)
                    await self.gate.wait()
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def relay(openbao: OpenBaoDevServer) -> AsyncIterator[VaultRelay]:
    value = VaultRelay(openbao.addr)
    await value.start()
    yield value
    await value.close()


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
    last good read; then task tokens get 503 token_keys_stale (counted) until a read
    succeeds again."""
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
            assert (caught.value.reason, caught.value.status) == ("token_keys_stale", 503)
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
