"""The MCP step of a request to a `kind: mcp` route (docs/mcp.md).

    McpPlan.of(route, policies, seal)           one route's grants, prepared once
    McpPlan.grant(policy, task) -> mcp.Grant    the caller's effective grant
    check_endpoint(route, path)                 404 off the route's MCP endpoint
    await decided(request, route, plan, facts) -> McpStep
                                                the session opened, a POST read and decided
    McpPlan.outgoing(step, url, headers, forwarder) -> Outgoing    the upstream request
    McpStep.reshape(upstream) -> AnswerFilter | None     the answer's filter, if it needs one

After authentication and the policy decision, a POST body is read whole (within the route's
size limit), parsed strictly with the protocol version of its `MCP-Protocol-Version` header,
and decided against the caller's grant: the policy's grant, narrowed by the task token's
scope. A refused body raises `McpRefused` carrying the JSON-RPC error answer (never
forwarded); an allowed one is forwarded as it was read. The answer is filtered before the
key scrubber sees it: list answers keep only granted items (JSON or SSE), and a server
stream (SSE, also a GET's) withholds the server-to-client requests the route does not allow
(a JSON answer holding one is refused: keyproxy.mcpanswer).
DELETE (ending a session) passes through.

A session is bound to the caller that opened it (keyproxy.tokens.sessionseal): the server's
`Mcp-Session-Id` reaches the caller sealed with a MAC of the route and the caller's
identity, and a request naming a session goes on only if its seal opens for that caller
(else 404 mcp_session_unknown, as for a session the server ended), with the server's own id.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import aiohttp
import structlog
from aiohttp import web
from aiohttp.helpers import parse_mimetype
from multidict import CIMultiDict
from yarl import URL

from keyproxy import audit, capped, mcp
from keyproxy import scope as scopes
from keyproxy.caller import Identity
from keyproxy.config import McpGrant, Policy, Route
from keyproxy.errors import McpRefused, McpUnreadable, NotFound, Unavailable
from keyproxy.forward import Forwarder, Outgoing
from keyproxy.mcpanswer import AnswerFilter, Reply, answer_filter, bad_answer, utf8_charset
from keyproxy.outgoing import read_body
from keyproxy.pool import Answer
from keyproxy.tokens import TaskToken, chain_fields
from keyproxy.tokens.sessionseal import SessionSeal, binding

log = structlog.get_logger("keyproxy.mcproute")

SESSION_HEADER: Final = "Mcp-Session-Id"
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
    seal: SessionSeal | None = None  # binds sessions to their caller (None: no MCP request)

    @classmethod
    def of(
        cls, route: Route, policies: Sequence[Policy], seal: SessionSeal | None = None
    ) -> McpPlan:
        grants = {}
        for policy in policies:
            granted = policy.allow.get(route.name)
            if granted is not None and granted.mcp is not None:
                grants[policy.name] = granted.mcp
        return cls(route, grants, seal=seal)

    def grant(self, policy: str | None, task: TaskToken | None) -> mcp.Grant:
        """What the caller may use: the allowing policy's grant, narrowed by the task token's
        scope (an exception token's scope is its grant). Anything unknown grants nothing."""
        allowed = self.by_policy.get(policy, _NOTHING) if policy is not None else _NOTHING
        if task is not None:
            scoped = scopes.mcp_grant(task.scope, self.route.name) or _NOTHING
            allowed = scoped if task.exception_owner is not None else _narrowed(allowed, scoped)
        return _compiled(allowed, self.route.server_requests)

    def outgoing(
        self, step: McpStep, url: URL, headers: CIMultiDict[str], forwarder: Forwarder
    ) -> Outgoing:
        """The upstream request of an MCP step: the server's own session id in place of the
        sealed one, the answer filtered, and the session id of its answer sealed for the
        caller (whatever its status: a server may name a session in any)."""
        if step.session is not None:
            headers[SESSION_HEADER] = step.session
        reply = self.replier(forwarder.session, url, headers, forwarder.read_timeout)
        sealed = functools.partial(_sealed, self.sealer(), step.bound)
        return Outgoing(url, headers, step.body, step._replace(reply=reply).reshape, sealed)

    def sealer(self) -> SessionSeal:
        """The seal of this route's sessions, its key read; else a 503, and no MCP request
        goes upstream (its server would open a session that could not be given back)."""
        if self.seal is None:  # a proxy made without task tokens: sessions cannot be bound
            raise Unavailable("mcp_session_key_unavailable", "MCP sessions cannot be bound here")
        self.seal.held()
        return self.seal

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


class McpStep(NamedTuple):
    """What the MCP step produced: the grant and protocol version the answer is filtered
    with, the body read (None: not a POST), the audit facts of its requests, the list
    requests it sent, the server's id of the session it names (None: none), what its
    sessions are bound to, and how to answer the server a request withheld from the caller
    (None: not answered)."""

    grant: mcp.Grant
    version: str
    body: bytes | None
    calls: tuple[mcp.Call, ...]
    pending: mcp.Pending
    session: str | None
    bound: bytes
    reply: Reply | None = None

    def reshape(self, upstream: Answer) -> AnswerFilter | None:
        """The filter the upstream's answer passes through (keyproxy.mcpanswer), or None
        when it passes as sent."""
        return answer_filter(
            upstream,
            self.grant,
            self.version,
            self.pending,
            requests=bool(self.calls),
            reply=self.reply,
        )


def check_endpoint(route: Route, path: str) -> None:
    """404 not_mcp_endpoint unless `path` (after /r/<route>, as sent upstream) is the MCP
    route's endpoint. SECURITY: the key goes only there, not to every path of the server's
    origin (a REST API beside it), where no grant says what a caller may do."""
    if route.mcp_endpoint is not None and path != route.mcp_endpoint:
        raise NotFound("not_mcp_endpoint", f"this route serves MCP at {route.mcp_endpoint} only")


async def inspect(
    request: web.Request, route: Route, grant: mcp.Grant, session: str | None, bound: bytes
) -> McpStep:
    """The MCP step of a request in `session` (the server's id, opened): a POST's body read
    and decided (raising `McpRefused` for a refused one); a GET or DELETE with its protocol
    version."""
    try:
        version = mcp.protocol_version(_one(request, VERSION_HEADER))
    except mcp.MessageError as exc:
        raise _unreadable(exc) from None
    if request.method != "POST":
        return McpStep(grant, version, None, (), mcp.Pending(), session, bound)
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
    return McpStep(grant, version, data, decision.calls, mcp.Pending.of(body), session, bound)


def _session(request: web.Request, plan: McpPlan, bound: bytes) -> str | None:
    """The server's id of the session the request names (None: it names none), if the
    caller was given it; else 404 mcp_session_unknown. SECURITY: every caller of the route
    reaches the server with the same key, so without the seal a caller who learnt another's
    session id would read its stream, act in it or end it."""
    seal = plan.sealer()
    try:
        presented = _one(request, SESSION_HEADER)
    except mcp.MessageError as exc:
        raise _unreadable(exc) from None
    return None if presented is None else seal.open(presented, bound)


def _sealed(
    seal: SessionSeal, bound: bytes, headers: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """An answer's headers for the caller, its session id sealed for it. SECURITY
    (invariant 12): a server naming two sessions, or an empty one, is not guessed at."""
    named = [v for k, v in headers if k.lower() == SESSION_HEADER.lower()]
    if not named:
        return headers
    if len(named) > 1 or not named[0]:
        raise bad_answer("the answer names no session, or several, in Mcp-Session-Id")
    given = seal.seal(named[0], bound)
    return [(k, given if k.lower() == SESSION_HEADER.lower() else v) for k, v in headers]


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
    return set(kind.parameters) <= {"charset"} and utf8_charset(kind)


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
    key_version: int  # the key injected: its version and fingerprint (keyproxy.vault.KeyVersion)
    key_fingerprint: str


async def decided(
    request: web.Request,
    route: Route,
    plan: McpPlan,
    facts: CallFacts,
) -> McpStep:
    """An MCP route's step: the session opened for the caller, the body read and decided
    against the caller's grant (the allowing policy's, narrowed by the task token's scope),
    each JSON-RPC request an `mcp.call` audit event whatever the decision."""
    task = facts.task
    bound = binding(route.name, facts.identity, task)
    session = _session(request, plan, bound)
    fields = {
        "request_id": facts.request_id,
        "route": route.name,
        "issuer": facts.identity.issuer,
        "subject": facts.identity.subject,
        "token_id": facts.token_id,
        "task": task.task if task is not None else None,
        "exception_owner": task.exception_owner if task is not None else None,
        "policy": facts.policy,
        "key_version": facts.key_version,
        "key_fingerprint": facts.key_fingerprint,
        "mcp_session": mcp.session_label(session or ""),
    }
    if task is not None:  # a delegated token names its whole chain, as its request events do
        fields |= chain_fields(task)
    try:
        step = await inspect(request, route, plan.grant(facts.policy, task), session, bound)
    except McpRefused as exc:  # nothing sent upstream: no key
        audit.emit_calls(
            exc.calls, fields | {"key_version": None, "key_fingerprint": None}, exc.reason
        )
        raise
    audit.emit_calls(step.calls, fields, "")
    return step


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
