"""The parts of the upstream request taken from the caller's: its body and its URL.

    request_body(request, route, headers)
                                   what to send upstream: the caller's stream for a declared
                                   length (which goes in `headers`), the whole body for a
                                   chunked one, or None
    read_body(request, route)      the whole body, for a step that must read it first (MCP)
    upstream_url(...)              the route's origin and base path, the caller's path and
                                   query, and an injected query parameter

Either way the route's `max_body` is enforced before any upstream connection: a declared
oversize body is a 413 before a byte of it is read, and a chunked one is read up to the limit.
"""

from __future__ import annotations

import asyncio
from typing import Final
from urllib.parse import unquote_plus

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from keyproxy import capped
from keyproxy.config import Route
from keyproxy.errors import BadRequest, PayloadTooLarge, RequestTimeout
from keyproxy.inject import Injector, Rendered, read_as


async def request_body(
    request: web.Request, route: Route, headers: CIMultiDict[str]
) -> bytes | aiohttp.StreamReader | None:
    """The body to send upstream, with the route's size limit enforced before connecting,
    and its framing in the upstream request's `headers`.

    SECURITY: the upstream is told the length of exactly the body it gets. The caller's
    declared length goes with its stream only (aiohttp's parser ends the stream there); any
    other body's length aiohttp writes from the bytes sent, and no body gets none. A length
    copied onto another body (none, as an MCP GET sends, or a different one) would leave the
    upstream reading the next request on the connection as this one's body: the caller's
    bytes read as a request carrying the key."""
    length = request.content_length
    if length is not None:
        _within(length, route)
        if not length:
            return None
        _may_carry_one(request.method, route, headers)
        headers["Content-Length"] = str(length)
        return request.content
    if not request.body_exists:
        return None
    _may_carry_one(request.method, route, headers)
    # A chunked upload has no declared size: read it up to the limit so a 413 can still be
    # answered before any upstream connection.
    return await read_body(request, route)


async def read_body(request: web.Request, route: Route) -> bytes:
    """The whole body, within the route's size limit and its read timeout."""
    if request.content_length is not None:
        _within(request.content_length, route)
    body = await whole_body(request, route.max_body, route.read_timeout)
    if body is None:
        raise _too_large(route)
    return body


async def whole_body(request: web.Request, limit: int, within: float) -> bytes | None:
    """A request's whole body (None: longer than `limit`), sent within `within` seconds
    (else 408 body_timeout); one aiohttp could not read (the caller's connection lost, a
    payload error) is a 400 bad_body."""
    try:
        async with asyncio.timeout(within):
            return await capped.read_body(request.content, limit)
    except TimeoutError:
        raise RequestTimeout("body_timeout", "the request body did not arrive in time") from None
    except (web.RequestPayloadError, ConnectionResetError):
        raise BadRequest("bad_body", "the request body could not be read") from None


# Methods whose request bodies have no defined meaning (RFC 9110 9.3).
BODILESS: Final = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})


def _may_carry_one(method: str, route: Route, headers: CIMultiDict[str]) -> None:
    """SECURITY (invariant 12): a body on a method whose bodies mean nothing (a GET's) is
    refused (400 body_not_allowed) unless the route takes one (`bodies_on`). Many servers
    leave such a body unread and read it as the next request on their connection: one the
    caller wrote, run with the key, answered to whoever sends next. One the route takes goes
    with `Connection: close`, on an upstream connection never pooled (keyproxy.upstream);
    the servers behind the upstream's front may still share theirs, hence the refusal."""
    if method in BODILESS:
        if method not in route.bodies_on:
            raise BadRequest("body_not_allowed", f"a {method} request carries no body here")
        headers["Connection"] = "close"


def _within(length: int, route: Route) -> None:
    if length > route.max_body:
        raise _too_large(route)


def _too_large(route: Route) -> PayloadTooLarge:
    return PayloadTooLarge("body_too_large", f"the limit is {route.max_body} bytes")


def upstream_url(
    route: Route,
    encoded_path: str,
    raw_query: str,
    rendered: Rendered,
    injector: Injector,
) -> URL:
    path = route.upstream.base_path + encoded_path
    query = raw_query
    lowered = query.lower()
    if "ethod" in lowered or "%" in lowered:  # as the upstream decodes it too
        _refuse_method_override(query)
    if rendered.query:
        query = "&".join([*_without_injected(raw_query, injector.query_names), rendered.query])
    text = f"{route.upstream.origin}{path}" + (f"?{query}" if query else "")
    return URL(text, encoded=True)


# Query parameters that make some servers run another method than the one policy checked
# (Express's method-override, Laravel, Symfony), by their `read_as` names.
METHOD_OVERRIDES: Final = frozenset(
    {"method", "httpmethod", "xhttpmethod", "xhttpmethodoverride", "xmethodoverride"}
)


def _refuse_method_override(raw_query: str) -> None:
    """SECURITY: a method override in the query is refused (400 method_override), as its
    header forms are dropped: policy allowed the method it saw, not the one the upstream
    would run. A parameter plainly named `method` is data, not an override."""
    for part in raw_query.replace(";", "&").split("&"):
        name = part.partition("=")[0]
        if read_as(name) in METHOD_OVERRIDES and unquote_plus(name).strip().lower() != "method":
            raise BadRequest("method_override", "the query asks the upstream for another method")


def _without_injected(raw_query: str, injected: frozenset[str]) -> list[str]:
    """The caller's query parameters but any copy of an injected one, which would override
    or accompany the key: a name any server may read as an injected name (`read_as`: another
    case, spaces, `key[]`) is dropped. SECURITY (invariant 12): one that only a server
    splitting on `;` too would see (`a=1;key=x`) cannot be dropped without changing what
    others read: the request is refused."""
    kept = []
    for part in raw_query.split("&"):
        if not part or read_as(part.partition("=")[0]) in injected:
            continue
        if ";" in part and any(
            read_as(piece.partition("=")[0]) in injected for piece in part.split(";")
        ):
            raise BadRequest(
                "ambiguous_query", "the query holds a parameter the upstream could read as its key"
            )
        kept.append(part)
    return kept
