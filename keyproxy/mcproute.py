"""The MCP step of a request to a `kind: mcp` route (docs/mcp.md).

    McpPlan.of(route, policies)                 one route's grants, prepared once
    McpPlan.grant(policy, task) -> mcp.Grant    the caller's effective grant
    check_endpoint(route, path)                 404 off the route's MCP endpoint
    await inspect(request, route, grant) -> McpStep    POST: read, parse, decide
    McpStep.reshape(upstream) -> AnswerFilter | None     the answer's filter, if it needs one

After authentication and the policy decision, a POST body is read whole (within the route's
size limit), parsed strictly with the protocol version of its `MCP-Protocol-Version` header,
and decided against the caller's grant: the policy's grant, narrowed by the task token's
scope. A refused body raises `McpRefused` carrying the JSON-RPC error answer (never
forwarded); an allowed one is forwarded as it was read. The answer is filtered before the
key scrubber sees it: list answers keep only granted items (JSON or SSE), and a server
stream (SSE, also a GET's) withholds the server-to-client requests the route does not allow
(a JSON answer holding one is refused).
DELETE (ending a session) passes through.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import aiohttp
import structlog
from aiohttp import web
from aiohttp.helpers import MimeType, parse_mimetype
from multidict import CIMultiDict
from yarl import URL

from keyproxy import audit, capped, mcp
from keyproxy import scope as scopes
from keyproxy.caller import Identity
from keyproxy.config import McpGrant, Policy, Route
from keyproxy.errors import (
    BadGateway,
    McpRefused,
    McpUnreadable,
    NotFound,
)
from keyproxy.outgoing import read_body
from keyproxy.pool import Answer
from keyproxy.tokens import TaskToken, chain_fields

log = structlog.get_logger("keyproxy.mcproute")

SESSION_HEADER: Final = "Mcp-Session-Id"
_JSON: Final = "application/json"
_SSE: Final = "text/event-stream"
VERSION_HEADER: Final = "MCP-Protocol-Version"
ENCODING_HEADER: Final = "Content-Encoding"
_NOTHING: Final = McpGrant()
# Answers to withheld server requests in flight per route; beyond, one is not sent (the
# server waits for it until its own timeout).
MAX_REPLIES: Final = 64


@dataclass(frozen=True, eq=False)
class McpPlan:
    """One MCP route's grants by policy name, prepared once."""

    route: Route
    by_policy: Mapping[str, McpGrant] = field(default_factory=dict)
    # The answers to withheld server requests still being sent, cancelled by `close` when
    # the proxy that made this plan closes (shutdown, or its configuration retired).
    replies: set[asyncio.Task[None]] = field(default_factory=set)

    @classmethod
    def of(cls, route: Route, policies: Sequence[Policy]) -> McpPlan:
        grants = {}
        for policy in policies:
            granted = policy.allow.get(route.name)
            if granted is not None and granted.mcp is not None:
                grants[policy.name] = granted.mcp
        return cls(route, grants)

    def grant(self, policy: str | None, task: TaskToken | None) -> mcp.Grant:
        """What the caller may use: the allowing policy's grant, narrowed by the task token's
        scope (an exception token's scope is its grant). Anything unknown grants nothing."""
        allowed = self.by_policy.get(policy, _NOTHING) if policy is not None else _NOTHING
        if task is not None:
            scoped = scopes.mcp_grant(task.scope, self.route.name) or _NOTHING
            allowed = scoped if task.exception_owner is not None else _narrowed(allowed, scoped)
        return _compiled(allowed, self.route.server_requests)

    def replier(
        self, session: aiohttp.ClientSession, url: URL, headers: CIMultiDict[str], timeout: float
    ) -> Reply:
        """A `Reply` that POSTs each answer to the server's MCP endpoint in the background,
        with the headers of the request whose answer withheld it (the key, the session)."""
        sent = CIMultiDict(headers)
        sent["Content-Type"] = "application/json"
        sent["Accept"] = "application/json, text/event-stream"
        limit = aiohttp.ClientTimeout(total=timeout)

        dropped = False

        def reply(body: bytes) -> None:
            nonlocal dropped
            if len(self.replies) >= MAX_REPLIES:
                # SECURITY: a server streaming requests it knows are withheld would otherwise
                # have keyproxy hold a task (and wait for a connection) for each, unbounded.
                if not dropped:  # once per answer: the stream may bring millions
                    log.warning("mcp_reply_dropped", route=self.route.name, limit=MAX_REPLIES)
                dropped = True
                return
            task = asyncio.get_running_loop().create_task(_post(session, url, sent, body, limit))
            self.replies.add(task)  # owned: the loop holds tasks weakly
            task.add_done_callback(self.replies.discard)

        return reply

    def close(self) -> None:
        """Cancel the answers to withheld server requests not sent yet."""
        for task in self.replies:
            task.cancel()


@functools.lru_cache(maxsize=1024)
def _narrowed(policy: McpGrant, scoped: McpGrant) -> McpGrant:
    return scopes.intersect_mcp(policy, scoped)


@functools.lru_cache(maxsize=1024)
def _compiled(grant: McpGrant, server_requests: frozenset[str]) -> mcp.Grant:
    return mcp.Grant(
        tools=grant.tools,
        prompts=grant.prompts,
        resources=tuple(mcp.ResourceRule(text) for text in grant.resources),
        methods=grant.methods,
        server_requests=server_requests,
    )


# Sends the server the error answer to a server request withheld from the caller.
Reply = Callable[[bytes], None]


class McpStep(NamedTuple):
    """What the MCP step produced: the grant and protocol version the answer is filtered
    with, the body read (None: not a POST), the audit facts of its requests, the list
    requests it sent, the session it belongs to, and how to answer the server a request
    withheld from the caller (None: not answered)."""

    grant: mcp.Grant
    version: str
    body: bytes | None
    calls: tuple[mcp.Call, ...]
    pending: mcp.Pending
    session: str
    reply: Reply | None = None

    def reshape(self, upstream: Answer) -> AnswerFilter | None:
        """The filter the upstream's answer passes through, or None when it passes as sent
        (not a 2xx with a body, not an MCP body).

        SECURITY: an answer is judged as the MCP SDKs' clients read it, so that none they
        would read escapes its filter: any 2xx but a 202 (whose body they ignore), its media
        type by prefix, JSON first (Python's); one that the TypeScript client, finding either
        type anywhere in the header, would read another way is refused."""
        if not 200 <= upstream.status < 300 or upstream.status == 202:
            return None
        kind = upstream.content_type
        declared = ", ".join(upstream.headers.getall("Content-Type", ())).lower()
        if (_SSE in declared and not kind.startswith(_SSE)) or (
            _JSON in declared and not kind.startswith((_JSON, _SSE))
        ):
            # SECURITY: the TypeScript SDK's client finds either media type anywhere in the
            # header (event streams first), the Python one by prefix (JSON first): where
            # they read it differently, some client would read what no filter read.
            raise _bad_answer("the Content-Type names JSON or an event stream ambiguously")
        if kind.startswith(_JSON):
            # SECURITY: read whatever request it answers: it may hold a server request to
            # withhold. The answer to a body of no request, which no client reads, is not.
            return _Json(self.grant, self.version, self.pending) if self.calls else None
        if kind.startswith(_SSE):
            if not _utf8(upstream.headers.getall("Content-Type")):
                # SECURITY: the SDK's client (httpx) decodes a stream by its charset, the
                # filter as UTF-8: in UTF-16, bytes it reads as no event are a client's events.
                raise _bad_answer("the event stream's charset is not UTF-8")
            return _Stream(mcp.StreamFilter(self.grant, self.version, self.pending), self.reply)
        return None


def check_endpoint(route: Route, path: str) -> None:
    """404 not_mcp_endpoint unless `path` (after /r/<route>, as sent upstream) is the MCP
    route's endpoint. SECURITY: the key goes only there, not to every path of the server's
    origin (a REST API beside it), where no grant says what a caller may do."""
    if route.mcp_endpoint is not None and path != route.mcp_endpoint:
        raise NotFound("not_mcp_endpoint", f"this route serves MCP at {route.mcp_endpoint} only")


async def inspect(request: web.Request, route: Route, grant: mcp.Grant) -> McpStep:
    """The MCP step: a POST's body read and decided (raising `McpRefused` for a refused one);
    a GET or DELETE with its protocol version and session."""
    try:
        session = _one(request, SESSION_HEADER) or ""
        version = mcp.protocol_version(_one(request, VERSION_HEADER))
    except mcp.MessageError as exc:
        raise _unreadable(exc) from None
    if request.method != "POST":
        return McpStep(grant, version, None, (), mcp.Pending(), session)
    if not _utf8_json(request.headers.getall("Content-Type", [])):
        unread = "the body must be sent as Content-Type: application/json (UTF-8)"
        raise _unreadable(mcp.MessageError(unread))
    if any(c.strip().lower() != "identity" for c in request.headers.getall(ENCODING_HEADER, [])):
        # SECURITY (invariant 12): the header goes upstream, and a server (Express's body
        # parser) decompresses the body by it: what keyproxy read as JSON is not what it reads.
        raise _unreadable(mcp.MessageError("the body must not be compressed (Content-Encoding)"))
    data = await read_body(request, route)
    try:
        body = mcp.parse_body(data, version=version, max_bytes=route.max_body)
    except mcp.MessageError as exc:
        raise _unreadable(exc) from None
    decision = mcp.decide(body, grant, version)
    if not decision.allowed:
        first = decision.refusals[0]
        refused = McpRefused if any(r.id is not None for r in decision.refusals) else McpUnreadable
        raise refused("mcp_refused", first.message, decision.answer(), decision.calls)
    return McpStep(grant, version, data, decision.calls, mcp.Pending.of(body), session)


def _one(request: web.Request, name: str) -> str | None:
    """The request's `name` header, or None. SECURITY (invariant 12): sent twice, it is
    refused, not read as one of its values: both go upstream, where a server may read the
    other (or both joined), so the filter would judge by a version or session the server
    does not use."""
    values = request.headers.getall(name, [])
    if len(values) > 1:
        raise mcp.MessageError(f"{name} is sent more than once")
    return values[0] if values else None


def _utf8_json(content_types: list[str]) -> bool:
    """Whether a POST's Content-Type says exactly what keyproxy reads the body as: JSON in
    UTF-8. SECURITY: the caller's Content-Type goes upstream, and a server decodes the body
    by its charset. Read as UTF-8 here and as UTF-7 there, `+ACI-` is a quote, and a body
    that names an allowed tool here names another there (invariant 12)."""
    if len(content_types) != 1:
        return False
    kind = parse_mimetype(content_types[0])
    if (kind.type, kind.subtype, kind.suffix) != ("application", "json", ""):
        return False
    return set(kind.parameters) <= {"charset"} and _utf8_charset(kind)


def _utf8(content_types: list[str]) -> bool:
    """Whether a message's one Content-Type names no charset but UTF-8 (a reader decoding
    by it reads what keyproxy read)."""
    return len(content_types) == 1 and _utf8_charset(parse_mimetype(content_types[0]))


def _utf8_charset(kind: MimeType) -> bool:
    charsets = kind.parameters.getall("charset", [])
    return [c.lower() for c in charsets] in ([], ["utf-8"], ["utf8"])  # both UTF-8's names


def _unreadable(exc: mcp.MessageError) -> McpUnreadable:
    answer = mcp.Decision((), (mcp.Refusal.from_error(exc),), batch=False).answer()
    return McpUnreadable("mcp_unreadable", exc.message, answer)


class CallFacts(NamedTuple):
    """Who makes an MCP route's calls, as the proxy's steps found it."""

    request_id: str
    identity: Identity
    task: TaskToken | None
    token_id: str | None
    policy: str | None


async def decided(
    request: web.Request,
    route: Route,
    plan: McpPlan,
    facts: CallFacts,
    key_version: int,
) -> McpStep:
    """An MCP route's step: the body read and decided against the caller's grant (the
    allowing policy's, narrowed by the task token's scope), each JSON-RPC request an
    `mcp.call` audit event whatever the decision."""
    task = facts.task
    fields = {
        "request_id": facts.request_id,
        "route": route.name,
        "issuer": facts.identity.issuer,
        "subject": facts.identity.subject,
        "token_id": facts.token_id,
        "task": task.task if task is not None else None,
        "exception_owner": task.exception_owner if task is not None else None,
        "policy": facts.policy,
        "key_version": key_version,
        "mcp_session": mcp.session_label(request.headers.get(SESSION_HEADER, "")),
    }
    if task is not None:  # a delegated token names its whole chain, as its request events do
        fields |= chain_fields(task)
    try:
        step = await inspect(request, route, plan.grant(facts.policy, task))
    except McpRefused as exc:
        audit.emit_calls(exc.calls, fields, exc.reason)
        raise
    audit.emit_calls(step.calls, fields, "")
    return step


def _bad_answer(why: str) -> BadGateway:
    """The 502 for an answer the filter refuses; why, for the operator, in the log (the
    caller is told only that it could not be read: `why` may quote the server)."""
    log.warning("mcp_bad_answer", why=why)
    return BadGateway("mcp_bad_answer", "the MCP server's answer could not be read")


class AnswerFilter:
    """An answer's bytes in, the bytes for the caller out (before the key scrubber)."""

    def feed(self, chunk: bytes) -> bytes:
        raise NotImplementedError

    def close(self) -> bytes:
        raise NotImplementedError


class _Stream(AnswerFilter):
    """An SSE stream, filtered event by event; each server request withheld from the caller
    is answered to the server (`reply`) with its error, so the server does not wait."""

    def __init__(self, stream: mcp.StreamFilter, reply: Reply | None) -> None:
        self._stream = stream
        self._reply = reply

    def feed(self, chunk: bytes) -> bytes:
        try:
            return self._sent(self._stream.feed(chunk))
        except mcp.MessageError as exc:
            raise _bad_answer(exc.message) from None

    def close(self) -> bytes:
        try:
            return self._sent(self._stream.close())
        except mcp.MessageError as exc:
            raise _bad_answer(exc.message) from None

    def _sent(self, out: mcp.Output) -> bytes:
        if self._reply is not None:
            for refusal in out.withheld:
                self._reply(json.dumps(refusal.response(), separators=(",", ":")).encode())
        return out.data


async def _post(
    session: aiohttp.ClientSession,
    url: URL,
    headers: CIMultiDict[str],
    body: bytes,
    limit: aiohttp.ClientTimeout,
) -> None:
    try:
        async with session.post(
            url,
            data=body,
            headers=headers,
            allow_redirects=False,
            timeout=limit,
        ) as answer:
            # Of no use, read only so the connection can serve again: never past a message's
            # limit (a longer one closes the connection).
            await capped.read_body(answer.content, mcp.DEFAULT_MAX_BYTES)
    except (aiohttp.ClientError, TimeoutError):
        log.warning("mcp_reply_failed", url=str(url.with_query(None)))


class _Json(AnswerFilter):
    """A JSON answer, read whole (within the message limit) and filtered."""

    def __init__(self, grant: mcp.Grant, version: str, pending: mcp.Pending) -> None:
        self._grant = grant
        self._version = version
        self._pending = pending
        self._data = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        self._data += chunk
        if len(self._data) > mcp.DEFAULT_MAX_BYTES:
            raise _bad_answer(f"JSON answer larger than {mcp.DEFAULT_MAX_BYTES} bytes")
        return b""

    def close(self) -> bytes:
        try:
            return mcp.filter_json_answer(
                bytes(self._data), self._pending, self._grant, self._version
            )
        except mcp.MessageError as exc:
            raise _bad_answer(exc.message) from None
