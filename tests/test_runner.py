"""keyproxy.runner: `keyproxy run`'s side of the broker, against answers no broker gives."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from keyproxy.errors import RunError
from keyproxy.runner import Issued, exchange, revoke
from keyproxy.secret import Secret
from tests.helpers.servers import serve

GOOD = {"access_token": "eyJa.eyJb.c", "token_id": "t1", "scope": {"r": {}}, "expires_in": 60}


async def _answering(status: int, body: bytes) -> tuple[web.AppRunner, str]:
    async def token(_: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/token", token)
    runner, port = await serve(app)
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("status", "body", "said"),
    [
        (200, json.dumps(GOOD | {"access_token": 12345}).encode(), "not a token"),
        (200, json.dumps(GOOD | {"access_token": "eyJa\x00.b.c"}).encode(), "not a token"),
        (200, json.dumps(GOOD | {"token_id": "t\x1b[2J"}).encode(), "not an id"),
        (200, json.dumps(GOOD | {"scope": "r"}).encode(), "not routes"),
        (200, json.dumps(GOOD | {"scope": ["r"]}).encode(), "not routes"),
        (200, json.dumps(GOOD | {"idle_ttl": 0}).encode(), "not a lease"),
        (200, json.dumps(GOOD | {"idle_ttl": -5}).encode(), "not a lease"),
        (200, json.dumps(GOOD | {"idle_ttl": 0.001}).encode(), "not a lease"),
        (200, json.dumps(GOOD | {"idle_ttl": True}).encode(), "not a lease"),
        (200, json.dumps(GOOD | {"idle_ttl": "60"}).encode(), "not a lease"),
        (200, json.dumps(GOOD | {"idle_ttl": 10**400}).encode(), "too large"),
        (200, json.dumps(GOOD | {"expires_in": 10**400}).encode(), "too large"),
        (200, b"[" * 60_000, "nested too deep"),
        (200, b'{"access_token": "' + b"a" * 2_000_000 + b'"}', "over 64 KiB"),
        (403, b'{"error": {"code": "x", "message": "' + b"m" * 2_000_000 + b'"}}', "over 64 KiB"),
    ],
    ids=[
        "number",
        "nul",
        "control-id",
        "scope-text",
        "scope-list",
        "idle-zero",
        "idle-negative",
        "idle-tiny",
        "idle-bool",
        "idle-text",
        "idle-huge",
        "expiry-huge",
        "nested",
        "huge",
        "huge-refusal",
    ],
)
async def test_an_answer_no_broker_gives_is_one_clear_error(
    http: aiohttp.ClientSession, status: int, body: bytes, said: str
) -> None:
    """A token that is no text or holds a control character, an id a terminal would obey,
    a scope that is no routes, an idle_ttl that is no lease (none, negative, under a second,
    not a number: the heartbeats would spin), or an answer larger than any of the broker's:
    one RunError saying what, read no further than 64 KiB; never a traceback, never the
    command started."""
    runner, base = await _answering(status, body)
    try:
        with pytest.raises(RunError, match=said):
            await exchange(http, base, Secret("identity"), {"scope": {"r": {}}})
    finally:
        await runner.cleanup()


async def test_a_refusal_says_its_code_and_at_most_256_characters(
    http: aiohttp.ClientSession,
) -> None:
    """A refusal's code and message are shown, cut to 256 characters."""
    body: dict[str, Any] = {"error": {"code": "forbidden", "message": "m" * 10_000}}
    runner, base = await _answering(403, json.dumps(body).encode())
    try:
        with pytest.raises(RunError) as refused:
            await exchange(http, base, Secret("identity"), {"scope": {"r": {}}})
    finally:
        await runner.cleanup()
    assert str(refused.value).startswith("the exchange was refused: 403 forbidden: mmm")
    assert len(str(refused.value)) < 320


async def test_an_answer_in_pieces_is_read_whole(http: aiohttp.ClientSession) -> None:
    """An answer that arrives in several writes (a large scope, a network, an ingress that
    re-chunks it) is read to its end, not cut at the first piece."""
    body = json.dumps(GOOD | {"scope": {f"route-{i}": {} for i in range(100)}}).encode()

    async def token(request: web.Request) -> web.StreamResponse:
        answer = web.StreamResponse(headers={"Content-Type": "application/json"})
        await answer.prepare(request)
        for i in range(0, len(body), 500):
            await answer.write(body[i : i + 500])
            await asyncio.sleep(0.01)  # each piece on its own
        await answer.write_eof()
        return answer

    app = web.Application()
    app.router.add_post("/token", token)
    runner, port = await serve(app)
    try:
        issued = await exchange(
            http, f"http://127.0.0.1:{port}", Secret("identity"), {"scope": {"r": {}}}
        )
    finally:
        await runner.cleanup()
    assert len(issued.routes) == 100


async def test_a_redirect_is_never_followed(http: aiohttp.ClientSession) -> None:
    """A front that redirects the exchange or the revocation to another origin: neither is
    followed (the credential would be dropped on the way, and the other origin's 401 to a
    request without one taken for a revocation). The exchange fails; the revocation is said
    to have failed."""
    reached: list[str] = []

    async def elsewhere(request: web.Request) -> web.Response:
        reached.append(request.path)
        return web.json_response({"error": {"code": "no_credential"}}, status=401)

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect(f"http://127.0.0.1:{other_port}{request.path}")

    other, front = web.Application(), web.Application()
    other.router.add_post("/{tail:.*}", elsewhere)
    front.router.add_post("/{tail:.*}", redirect)
    other_runner, other_port = await serve(other)
    front_runner, front_port = await serve(front)
    base = f"http://127.0.0.1:{front_port}"
    issued = Issued(Secret("eyJa.eyJb.c"), "t1", 60.0, ("r",), None)
    try:
        assert not await revoke(http, base, issued, "completed")
        with pytest.raises(RunError):  # its page is no broker's answer
            await exchange(http, base, Secret("identity"), {"scope": {"r": {}}})
    finally:
        await front_runner.cleanup()
        await other_runner.cleanup()
    assert reached == []
