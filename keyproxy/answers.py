"""The one place an error becomes an HTTP answer: `answering`, through `error_response`.

Handlers (the proxy's, the broker's, the admin endpoints') raise; each is registered wrapped
in `answering`, which answers. (It does what an aiohttp middleware would, without aiohttp's
machinery around one: a middleware cost 11,500 instructions per request, 1.4%, where this
wrapper's cost does not show; bench/instructions.py --compare, docs/performance.md.) A
`RequestError` is answered with its status, every other exception (a bug) with a 500
`internal_error` and no details, its traceback kept in the scrubbed log. aiohttp's own
`HTTPException`s (an unknown path, a method not allowed) stay aiohttp's.

Every error body is `{"error": {"code": reason, "message": message}}` (an `McpRefused`'s is
the JSON-RPC error response it carries); a 401 names the Bearer scheme, a retryable error its
`Retry-After`, a refusal by a limit its `RateLimit` fields (the error's `headers`), and a
request with an id (`REQUEST_ID_KEY`, set by its handler) that id.
"""

from __future__ import annotations

from typing import Final

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from keyproxy.errors import InternalError, McpRefused, RequestError
from keyproxy.headers import REQUEST_ID, SERVER_NAME

# The request's id, as its handler chose it: the error's answer repeats it.
REQUEST_ID_KEY: Final = web.RequestKey("request_id", str)

log = structlog.get_logger("keyproxy.answers")


def error_response(exc: RequestError, request_id: str | None = None) -> web.Response:
    """`exc` as an HTTP answer; `request_id` is the request's."""
    headers: dict[str, str] = dict(exc.headers) if exc.headers else {}
    headers["Server"] = SERVER_NAME
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="keyproxy"'
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if request_id is not None:
        headers[REQUEST_ID] = request_id
    if isinstance(exc, McpRefused):  # a JSON-RPC error, as an MCP client reads one
        return web.Response(
            body=exc.body, status=exc.status, content_type="application/json", headers=headers
        )
    return web.json_response(
        {"error": {"code": exc.reason, "message": exc.message}},
        status=exc.status,
        headers=headers,
    )


def answering(handler: Handler) -> Handler:
    """`handler`, with every error it raises answered."""

    async def answered(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except RequestError as exc:
            return error_response(exc, request.get(REQUEST_ID_KEY))
        except web.HTTPException:
            # aiohttp's own answer (a 404 of the router). Nothing on the proxy's path raises
            # one: its answers, which skip the router's Server hook, name keyproxy themselves.
            raise
        except Exception:
            # A bug, not a decision: answer without details (they could name a secret) and
            # keep the traceback in our scrubbed log rather than aiohttp's. The path is
            # without its query, which can carry a credential.
            log.exception("request_failed", path=request.raw_path.partition("?")[0])
            internal = InternalError("internal_error", "internal error")
            return error_response(internal, request.get(REQUEST_ID_KEY))

    return answered
