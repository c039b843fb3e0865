"""Helpers shared by the tests of keyproxy.tokens."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from keyproxy import config as config_module
from keyproxy.config import Grant
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.outgoing import BODILESS
from keyproxy.tokens import TaskTokens
from keyproxy.vault import Vault
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import (
    bearer,
    token_config,
)

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT = "urn:ietf:params:oauth:token-type:jwt"


async def exchange(
    http: aiohttp.ClientSession, base: str, identity_token: str, **body: Any
) -> tuple[int, dict[str, Any]]:
    body.setdefault("scope", {"r": {"methods": ["POST"], "paths": ["/v1/chat/completions"]}})
    body.setdefault("task", "test-task")
    async with http.post(f"{base}/token", json=body, headers=bearer(identity_token)) as response:
        answer: dict[str, Any] = await response.json()
        if response.status == 200:
            CANARIES.add(answer["access_token"])
        return response.status, answer


async def form_exchange(
    http: aiohttp.ClientSession, base: str, subject_token: str, **fields: str
) -> tuple[int, dict[str, Any]]:
    """The RFC 8693 form exchange of `subject_token`: a workload identity for a task token,
    or a task token for a child (`delegate`)."""
    form = {
        "grant_type": EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": JWT,
        **fields,
    }
    if "actor_token" in fields:
        form["actor_token_type"] = JWT
    async with http.post(f"{base}/token", data=form) as response:
        answer: dict[str, Any] = await response.json()
        if response.status == 200:
            CANARIES.add(answer["access_token"])
        return response.status, answer


delegate = form_exchange  # a task token as the subject: a child for a sub-agent


async def status(http: aiohttp.ClientSession, method: str, url: str, token: str) -> int:
    """The status of a `method` request to `url` with `token`: a chat body for a method that
    takes one (a GET's would be refused: keyproxy.outgoing.BODILESS)."""
    body = (
        None
        if method in BODILESS
        else {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    )
    async with http.request(method, url, headers=bearer(token), json=body) as response:
        await response.read()
        return response.status


async def refused(
    http: aiohttp.ClientSession, method: str, url: str, token: str, what: str, **wait: float
) -> None:
    """Until `token` is answered 401 at `url`; `wait` bounds it (`eventually`'s keywords)."""
    await eventually(lambda: status(http, method, url, token), what, until=(401).__eq__, **wait)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


SCOPE = {"r": (Grant(frozenset({"POST"}), (("v1", "chat", "completions"),)),)}


@contextlib.asynccontextmanager
async def replicas_of_own_list(
    openbao: OpenBaoDevServer,
    name: str,
    count: int = 2,
    vault_addr: str | None = None,
    clock: Callable[[], float] = time.time,
    **tokens: str,
) -> AsyncIterator[tuple[list[TaskTokens], list[Vault]]]:
    """`count` in-process token services with a revocation list of their own (a
    `tokens.state_path` no other test writes) on `clock`, reaching Vault at `vault_addr` if
    given. They
    re-read the list only when a test has them do it, unless `tokens` (settings of the
    `tokens` section) says how stale it may grow."""
    own = openbao.add_agent(name)
    raw = token_config(openbao, own, "http://127.0.0.1:1")
    raw["tokens"]["state_path"] = f"keyproxy/state/tokens/{name}-{uuid.uuid4().hex[:8]}"
    raw["tokens"] |= {"revocation_max_staleness": "1h"} | tokens
    if vault_addr is not None:
        raw["vault"]["addr"] = vault_addr
    cfg = config_module.parse(json.dumps(raw), {})
    vaults = [Vault(cfg.vault) for _ in range(count)]
    try:
        for vault in vaults:
            await vault.login()
        yield [TaskTokens(cfg, vault, clock) for vault in vaults], vaults
    finally:
        for vault in vaults:
            vault.close()
