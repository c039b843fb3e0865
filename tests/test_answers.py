"""The one error path: keyproxy.answers.answering answers whatever a handler raises."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from keyproxy import answers
from keyproxy.errors import Forbidden, Unauthenticated, Unavailable
from tests.helpers.polling import eventually
from tests.helpers.servers import serve


async def _refused(request: web.Request) -> web.StreamResponse:
    request[answers.REQUEST_ID_KEY] = "req-refused-1"
    raise Forbidden("no_policy", "no policy allows this request")


async def _unauthenticated(_: web.Request) -> web.StreamResponse:
    raise Unauthenticated("no_credential", "send a token")


async def _unavailable(_: web.Request) -> web.StreamResponse:
    raise Unavailable("key_stale", "try later", retry_after=7)


async def _bug(request: web.Request) -> web.StreamResponse:
    request[answers.REQUEST_ID_KEY] = "req-bug-1"
    raise ZeroDivisionError("a detail the caller must not see")


async def _missing(_: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound


@pytest.fixture
async def base() -> AsyncIterator[str]:
    app = web.Application()
    for path, handler in [
        ("/refused", _refused),
        ("/unauthenticated", _unauthenticated),
        ("/unavailable", _unavailable),
        ("/bug", _bug),
        ("/missing", _missing),
    ]:
        app.router.add_get(path, answers.answering(handler))
    runner, port = await serve(app)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("path", "status", "code", "headers"),
    [
        ("/refused", 403, "no_policy", {"X-Request-Id": "req-refused-1"}),
        ("/unauthenticated", 401, "no_credential", {"WWW-Authenticate": 'Bearer realm="keyproxy"'}),
        ("/unavailable", 503, "key_stale", {"Retry-After": "7"}),
    ],
)
async def test_a_request_error_is_answered_with_its_status_and_reason(
    base: str, path: str, status: int, code: str, headers: dict[str, str]
) -> None:
    """A raised RequestError becomes its status, its reason code and its headers."""
    async with aiohttp.ClientSession() as http, http.get(base + path) as response:
        assert response.status == status
        assert (await response.json())["error"]["code"] == code
        for name, value in headers.items():
            assert response.headers[name] == value


async def test_a_bug_is_a_500_without_details_and_its_traceback_is_logged(
    base: str, audit_log: Path
) -> None:
    """An unexpected exception is answered 500 internal_error with no detail, and logged
    with its traceback (the path, never the query)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{base}/bug?token=never-logged") as response,
    ):
        assert response.status == 500
        assert response.headers["X-Request-Id"] == "req-bug-1"
        body = await response.text()
    assert json.loads(body) == {"error": {"code": "internal_error", "message": "internal error"}}
    assert "detail" not in body
    failed = await eventually(
        lambda: [
            e
            for e in map(json.loads, audit_log.read_text().splitlines())
            if e.get("event") == "request_failed" and e.get("path") == "/bug"
        ],
        "no request_failed event",
        within=5,
    )
    assert "ZeroDivisionError" in failed[-1]["exception"]
    assert "never-logged" not in json.dumps(failed[-1])


async def test_aiohttp_http_exceptions_stay_aiohttp_s(base: str) -> None:
    """An aiohttp HTTPException (a 404 of the router, or raised) is not turned into a 500."""
    async with aiohttp.ClientSession() as http:
        for path in ("/missing", "/no-such-path"):
            async with http.get(base + path) as response:
                assert response.status == 404
