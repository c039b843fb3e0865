"""The one place a `RequestError` becomes an HTTP answer: `error_response`.

Every error body is `{"error": {"code": reason, "message": message}}`; a 401 names the Bearer
scheme, a retryable error its `Retry-After`, and a proxied request its request id.
"""

from __future__ import annotations

from aiohttp import web

from keyproxy.errors import RequestError
from keyproxy.headers import REQUEST_ID


def error_response(exc: RequestError, request_id: str | None = None) -> web.Response:
    """The one place a pipeline error becomes an HTTP answer; `request_id` is the proxied
    request's."""
    headers: dict[str, str] = {}
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="keyproxy"'
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    if request_id is not None:
        headers[REQUEST_ID] = request_id
    return web.json_response(
        {"error": {"code": exc.reason, "message": exc.message}},
        status=exc.status,
        headers=headers,
    )
