"""Helpers shared by the tests of keyproxy.tokens."""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from keyproxy.config import Grant
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import (
    bearer,
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
    async with http.request(
        method,
        url,
        headers=bearer(token),
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
    ) as response:
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
