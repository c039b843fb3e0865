"""The request pipeline: route, authenticate, decide, key, build, forward, audit.

`Proxy.handle` serves `/r/<route>/<path>` as a row of steps, each taking what the ones before
produced and returning its own result, or stopping the request by raising a `RequestError`:

    _route ─> normalise ─> _source ─> _authenticate ─> _decide ─> _spend ─> _key
      Route, tail   segments   address    Caller          Decision            KeyVersion
    ─> _outgoing ─> _Exchange.send ─> Outcome
       Outgoing      (read deadline)

Nothing is sent upstream until every check has passed. The request's one audit event is built
once, at the end, from those results and how the request ended (`Outcome`, or the error's
reason and status); the error itself becomes its answer in `keyproxy.answers.middleware`.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_plus

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from keyproxy import audit, netguard, paths, policy
from keyproxy import scope as scopes
from keyproxy.answers import REQUEST_ID_KEY
from keyproxy.config import Config, Route
from keyproxy.deadline import ReadDeadlines, Watch
from keyproxy.errors import (
    BadGateway,
    BadRequest,
    EgressDenied,
    Forbidden,
    GatewayTimeout,
    NotFound,
    PayloadTooLarge,
    RequestError,
    RequestTimeout,
    Unauthenticated,
    Unavailable,
)
from keyproxy.headers import (
    Verdicts,
    caller_token,
    other_credential_headers,
    request_id,
    request_verdicts,
    response_headers,
    upstream_headers,
)
from keyproxy.identity import Identity, IdentityVerifier
from keyproxy.inject import Injector, Rendered, Scrubber, scrub_bytes
from keyproxy.metrics import Metrics
from keyproxy.policy import IPAddress
from keyproxy.tokens import TaskToken, TaskTokens, is_task_token
from keyproxy.upstream import UpstreamSessions
from keyproxy.vault import KeyCache, KeyVersion

log = structlog.get_logger("keyproxy.proxy")

ROUTE_PREFIX: Final = "/r/"
# Response encodings aiohttp decodes, so the scrubber sees clear text. We ask for identity;
# anything else the upstream sends anyway is refused rather than passed through unscrubbed.
DECODED_ENCODINGS: Final = frozenset({"", "gzip", "deflate"})  # "identity" is read as ""
CHUNK: Final = 64 * 1024

# Answers with a declared length up to this size are scrubbed and sent whole.
WHOLE_BODY: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking (`_authenticate`'s result): a workload identity, and the task token it
    presented, if it presented one."""

    identity: Identity
    task: TaskToken | None
    token_id: str | None  # the task token's id, or the identity token's jti


@dataclass(frozen=True, slots=True)
class Decision:
    """Why the request may go on (`_decide`'s result): the policy that allows it (none for
    an exception token) and the reason code its audit event names."""

    policy: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Outgoing:
    """The upstream request (`_outgoing`'s result), the key injected."""

    url: URL
    headers: CIMultiDict[str]
    body: bytes | aiohttp.StreamReader | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the forwarding step ended: the answer the caller got, and why it was cut short
    ("" when it was not)."""

    response: web.StreamResponse
    cut: str = ""


@dataclass(frozen=True)
class _Plan:
    """What one route's requests need that does not change per request, prepared once."""

    injector: Injector
    session: aiohttp.ClientSession
    forwards: Verdicts  # caller's request header name as sent: forwarded on this route?
    other_credentials: tuple[str, ...]  # credential-carrying headers a caller must not add
    timeout: aiohttp.ClientTimeout
    first_read: float  # seconds to wait for the answer to start: connect + read
    literal_denial: EgressDenied | None  # the fence's verdict on an IP-literal upstream

    @classmethod
    def of(cls, route: Route, session: aiohttp.ClientSession) -> _Plan:
        injector = Injector(route)
        return cls(
            injector=injector,
            session=session,
            forwards=request_verdicts(route, injector.header_names),
            other_credentials=other_credential_headers(route.caller_credential),
            timeout=aiohttp.ClientTimeout(
                # The read timeout is keyproxy.deadline's: aiohttp's sock_read costs a new
                # loop timer per read.
                total=None,
                sock_connect=route.connect_timeout,
            ),
            first_read=route.connect_timeout + route.read_timeout,
            literal_denial=_literal_denial(route),
        )


class Proxy:
    """Serves /r/<route>/<path> for one compiled configuration."""

    def __init__(
        self,
        config: Config,
        verifier: IdentityVerifier,
        keys: KeyCache,
        sessions: UpstreamSessions,
        *,
        tasks: TaskTokens | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.verifier = verifier
        self.keys = keys
        self.sessions = sessions
        self.tasks = tasks
        self.metrics = metrics
        self.plans = {name: _Plan.of(r, sessions.get(name)) for name, r in config.routes.items()}
        self._in_flight = 0
        # A 503 for a key Vault could not give says when to try again: the next refresh.
        self.retry_after = max(1, math.ceil(config.vault.refresh_interval))
        # Indexed once: a decision reads only the policies naming the caller, however many
        # routes and policies the configuration has.
        self.policies = policy.compile(config.policies)
        # Read timeouts are enforced to within a tenth of the shortest (and a second), but
        # never swept more often than every 10 ms.
        shortest = min((r.read_timeout for r in config.routes.values()), default=10.0)
        self._deadlines = ReadDeadlines(granularity=min(1.0, max(0.01, shortest / 10)))

    def close(self) -> None:
        """Stop sweeping read deadlines (the app is shutting down)."""
        self._deadlines.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        raw_path, _, raw_query = request.raw_path.partition("?")
        rid = request[REQUEST_ID_KEY] = request_id(request.headers)  # for the error's answer
        # What the steps produced so far: an error names what was known when it stopped them.
        route: Route | None = None
        path, source_text = raw_path, request.remote or ""
        caller: Caller | None = None
        decision: Decision | None = None
        granted = False
        key: KeyVersion | None = None
        exchange: _Exchange | None = None
        self._in_flight += 1
        try:
            route, tail = self._route(raw_path)
            segments, path = paths.normalise_encoded(tail)
            source, source_text = self._source(request)
            plan = self.plans[route.name]
            credential = caller_token(
                request.headers, raw_query, route.caller_credential, plan.other_credentials
            )
            caller = await self._authenticate(credential)
            decision = self._decide(caller, route, request.method, segments, source)
            self._spend(caller)
            granted = True
            key = self._key(route)
            rendered = plan.injector.render(key.secret, key.version)
            outgoing = await _outgoing(request, route, plan, path, raw_query, rendered, rid)
            exchange = _Exchange(self._deadlines, route, plan)
            outcome = await exchange.send(request, plan, outgoing, rendered, rid)
        except RequestError as exc:
            ended = exc.reason, exc.status, False
            raise
        except asyncio.CancelledError:
            ended = "client_disconnected", 499, True  # no answer will be sent
            raise
        except Exception:  # a bug: the middleware answers it and logs the traceback
            ended = "internal_error", 500, False
            raise
        else:
            response = outcome.response
            ended = outcome.cut or decision.reason, response.status, True  # sent already
        finally:
            self._in_flight -= 1
            elapsed = time.monotonic() - started
            reason, status, sent = ended
            record = _record(
                request,
                path=path,
                source=source_text,
                request_id=rid,
                route=route,
                caller=caller,
                decision=decision,
                granted=granted,
                key=key,
                exchange=exchange,
                reason=reason,
                status=status,
                elapsed=elapsed,
            )
            if sent:
                self._account(record, elapsed)
            else:
                # The error's answer is sent after this step: the caller does not wait for
                # its own audit event (call_soon keeps this request's log context).
                asyncio.get_running_loop().call_soon(self._account, record, elapsed)
        return response

    def _account(self, record: audit.RequestRecord, elapsed: float) -> None:
        try:
            # With no request in flight the loop has nothing else to do: the line is written
            # now rather than on a timer that would fire in the middle of the next request.
            audit.emit(record, now=not self._in_flight)
        except Exception:
            # An event that cannot be written does not fail the request or the process.
            log.exception("audit_event_failed", route=record.route, path=record.path)
        if self.metrics is not None:
            self.metrics.request(record.route, record.status, record.decision, elapsed)

    def _route(self, raw_path: str) -> tuple[Route, str]:
        """The route named by the path's first segment, and the rest of the path."""
        rest = raw_path[len(ROUTE_PREFIX) :]
        name, slash, tail = rest.partition("/")
        route = self.config.routes.get(name)
        if route is None:
            raise NotFound("unknown_route", "no such route")
        return route, slash + tail

    def _source(self, request: web.Request) -> tuple[IPAddress, str]:
        """The caller's address, and as its audit event writes it."""
        # A peer with no address (a Unix socket) matches no CIDR.
        peer = request.remote or "0.0.0.0"  # noqa: S104
        trusted = self.config.server.trusted_proxies
        if trusted:
            forwarded = request.headers.getall("X-Forwarded-For", [])
            source = policy.client_address(peer, forwarded, trusted)
            return source, str(source)
        return policy.peer_address(peer)  # the peer is the caller

    async def _authenticate(self, credential: str) -> Caller:
        """A task token, or else a workload identity token."""
        if self.tasks is not None and is_task_token(credential):
            task = await self.tasks.verify(credential)
            return Caller(task.identity, task, task.token_id)
        identity = await self.verifier.verify(credential)
        jti = identity.claims.get("jti")
        return Caller(identity, None, jti if isinstance(jti, str) else None)

    def _decide(
        self,
        caller: Caller,
        route: Route,
        method: str,
        segments: tuple[str, ...],
        source: IPAddress,
    ) -> Decision:
        """Current policy decides; a task token further narrows it to its own address and
        scope."""
        task = caller.task
        if task is not None:
            if task.source is not None and task.source != str(source):
                raise Unauthenticated("wrong_source", "this token is bound to another address")
            if not scopes.allows(task.scope, route.name, method, segments):
                raise Forbidden("outside_token_scope", "the token's scope does not include this")
            if task.exception_owner is not None:
                # Exception tokens stand for no workload identity: their scope is their grant.
                return Decision(None, "exception_token")
        decided = self.policies.decide(caller.identity, route.name, method, segments, source)
        if not decided.allowed:
            raise Forbidden(decided.reason, "no policy allows this request")
        return Decision(decided.policy, decided.reason)

    def _spend(self, caller: Caller) -> None:
        """Count one of the task token's uses."""
        if caller.task is not None and self.tasks is not None and not self.tasks.use(caller.task):
            raise Unauthenticated("token_exhausted", "this token has no uses left")

    def _key(self, route: Route) -> KeyVersion:
        """The route's key, or a 503 that says when to try again."""
        try:
            return self.keys.get(route.name)
        except Unavailable as exc:
            raise Unavailable(exc.reason, exc.message, retry_after=self.retry_after) from None


class _Exchange:
    """The forwarding step of one request: send it upstream, stream the answer back, under
    the read deadline of its own `Watch`. What the upstream answered is kept from the moment
    it did (`upstream_status`), for the audit event even of a request that fails after."""

    __slots__ = ("_sent", "_watch", "upstream_status")

    def __init__(self, deadlines: ReadDeadlines, route: Route, plan: _Plan) -> None:
        # Until the answer starts: connecting (if a new connection is needed) and waiting.
        self._watch = Watch(deadlines, route.read_timeout, plan.first_read)
        self.upstream_status: int | None = None
        self._sent: web.StreamResponse | None = None  # once its status line went out

    async def send(
        self,
        request: web.Request,
        plan: _Plan,
        outgoing: Outgoing,
        rendered: Rendered,
        rid: str,
    ) -> Outcome:
        # aiohttp skips the resolver (and so the fence) for IP literals: those were checked
        # once, when the configuration was loaded.
        if plan.literal_denial is not None:
            raise EgressDenied(plan.literal_denial.reason, plan.literal_denial.message)
        watch = self._watch
        body = outgoing.body
        try:
            with watch:
                async with plan.session.request(
                    request.method,
                    outgoing.url,
                    headers=outgoing.headers,
                    # The caller's pace while uploading is not the upstream's silence.
                    data=_uploaded(body, watch) if isinstance(body, aiohttp.StreamReader) else body,
                    allow_redirects=False,  # SECURITY: a redirect goes back to the caller
                    timeout=plan.timeout,
                ) as upstream:
                    watch.heard()
                    self.upstream_status = upstream.status
                    if upstream.status < 200:
                        # SECURITY: a 101 relayed would tell a front proxy to tunnel the
                        # caller's bytes. Until WebSockets are supported on purpose, a 502;
                        # the connection is closed already (_UpstreamResponse).
                        raise BadGateway(
                            "upstream_protocol_switch", "the upstream tried to switch protocols"
                        )
                    return await self._stream_back(request, upstream, rendered, rid)
        except RequestError:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            if self._sent is not None:
                # The status line is gone: cut the answer short.
                return Outcome(self._sent, _abort(request, "upstream_timeout"))
            if watch.expired == "caller":
                raise RequestTimeout(
                    "body_timeout", "the request body did not arrive in time"
                ) from exc
            raise GatewayTimeout("upstream_timeout", "the upstream did not answer in time") from exc
        except aiohttp.ClientError as exc:
            denial = netguard.egress_denial(exc)
            if denial is not None:
                raise denial from None
            raise BadGateway("upstream_error", "the upstream could not be reached") from exc

    async def _stream_back(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        rendered: Rendered,
        rid: str,
    ) -> Outcome:
        encoding = _content_coding(upstream.headers.get("Content-Encoding", ""))
        if encoding not in DECODED_ENCODINGS:
            raise BadGateway("unsupported_encoding", "the upstream answer could not be checked")
        headers = response_headers(upstream.headers, rendered, rid)
        watch = self._watch
        # The upstream's reason phrase is not forwarded: it is free text that could echo the
        # key.
        length = upstream.content_length
        if (
            length is not None
            and length <= WHOLE_BODY
            and not encoding
            and request.method != "HEAD"
        ):
            # A short answer of declared length (and not compressed, which could make it
            # large) is read, scrubbed and sent whole: one write to the caller instead of
            # headers, chunk and end, and a cut-short body is still a 502.
            content = upstream.content
            # Usually it all came with the headers: take it without waiting.
            body = content.read_nowait() if content.is_eof() else await _read_whole(content, watch)
            watch.pause()  # the rest is the caller's turn
            whole = web.Response(
                status=upstream.status, body=scrub_bytes(body, rendered.byte_forms), headers=headers
            )
            try:  # sent here, so the audit event knows whether it reached the caller
                await whole.prepare(request)
                await whole.write_eof()
            except Exception:  # noqa: BLE001  # whatever broke the write, the answer is the same
                return Outcome(whole, _abort(request))
            return Outcome(whole)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        watch.pause()
        await response.prepare(request)
        self._sent = response
        watch.heard()
        scrubber = Scrubber(rendered.byte_forms)
        try:
            async for chunk in upstream.content.iter_any():
                out = scrubber.feed(chunk)
                if out:
                    watch.pause()  # the caller's turn: a slow reader is not a silent upstream
                    await response.write(out)
                watch.heard()
            watch.pause()
            tail = scrubber.flush()
            if tail:
                await response.write(tail)
            await response.write_eof()
        except Exception:  # noqa: BLE001  # whatever broke the stream, the answer is the same
            return Outcome(response, _abort(request))
        return Outcome(response)


def _record(
    request: web.Request,
    *,
    path: str,
    source: str,
    request_id: str,
    route: Route | None,
    caller: Caller | None,
    decision: Decision | None,
    granted: bool,
    key: KeyVersion | None,
    exchange: _Exchange | None,
    reason: str,
    status: int,
    elapsed: float,
) -> audit.RequestRecord:
    """The request's audit event, from what its steps produced (None: not reached) and how
    it ended."""
    identity = caller.identity if caller is not None else None
    task = caller.task if caller is not None else None
    return audit.RequestRecord(
        method=request.method,
        path=path,
        source=source,
        request_id=request_id,
        route=route.name if route is not None else None,
        issuer=identity.issuer if identity is not None else None,
        subject=identity.subject if identity is not None else None,
        token_id=caller.token_id if caller is not None else None,
        task=task.task if task is not None else None,
        exception_owner=task.exception_owner if task is not None else None,
        policy=decision.policy if decision is not None else None,
        decision="allow" if granted else "deny",
        reason=reason,
        key_version=key.version if key is not None else None,
        status=status,
        upstream_status=exchange.upstream_status if exchange is not None else None,
        duration_ms=int(elapsed * 1e6) / 1000,  # whole microseconds
    )


def _literal_denial(route: Route) -> EgressDenied | None:
    """The egress fence's verdict on an IP-literal upstream (a name is checked when resolved)."""
    try:
        netguard.check_host(route.upstream.host, route.egress_allow)
    except EgressDenied as exc:
        return exc
    return None


async def _outgoing(  # noqa: PLR0917  # what the steps before produced
    request: web.Request,
    route: Route,
    plan: _Plan,
    path: str,
    raw_query: str,
    rendered: Rendered,
    rid: str,
) -> Outgoing:
    """The upstream request: the route's URL for `path`, the headers it forwards, the body."""
    body = await _request_body(request, route)
    url = _upstream_url(route, path, raw_query, rendered, plan.injector)
    return Outgoing(url, upstream_headers(request.headers, plan.forwards, rendered, rid), body)


async def _request_body(request: web.Request, route: Route) -> bytes | aiohttp.StreamReader | None:
    """The body to send upstream, with the route's size limit enforced before connecting."""
    length = request.content_length
    if length is not None:
        if length > route.max_body:
            raise PayloadTooLarge("body_too_large", f"the limit is {route.max_body} bytes")
        return request.content if length else None
    if not request.body_exists:
        return None
    # A chunked upload has no declared size: read it up to the limit so a 413 can still be
    # answered before any upstream connection.
    body = bytearray()
    try:
        async with asyncio.timeout(route.read_timeout):
            async for chunk in request.content.iter_chunked(CHUNK):
                body += chunk
                if len(body) > route.max_body:
                    raise PayloadTooLarge("body_too_large", f"the limit is {route.max_body} bytes")
    except TimeoutError:
        raise RequestTimeout("body_timeout", "the request body did not arrive in time") from None
    except aiohttp.ClientPayloadError:  # aiohttp's server raises this for a malformed body
        raise BadRequest("bad_body", "malformed request body") from None
    return bytes(body)


def _upstream_url(
    route: Route,
    encoded_path: str,
    raw_query: str,
    rendered: Rendered,
    injector: Injector,
) -> URL:
    path = route.upstream.base_path + encoded_path
    query = raw_query
    if rendered.query:
        # A caller-sent parameter of an injected name would override or accompany the key.
        kept = [
            part
            for part in raw_query.split("&")
            if part and unquote_plus(part.partition("=")[0]) not in injector.query_names
        ]
        query = "&".join([*kept, rendered.query])
    text = f"{route.upstream.origin}{path}" + (f"?{query}" if query else "")
    # Remembered only without a key in it: no key outlives its version in a cache.
    return URL(text, encoded=True) if rendered.query else _url(text)


@functools.lru_cache(maxsize=1024)
def _url(text: str) -> URL:
    return URL(text, encoded=True)


@functools.lru_cache(maxsize=64)
def _content_coding(value: str) -> str:
    """A Content-Encoding value as compared with DECODED_ENCODINGS."""
    coding = value.strip().lower()
    return "" if coding == "identity" else coding


async def _uploaded(content: aiohttp.StreamReader, watch: Watch) -> AsyncIterator[bytes]:
    """The caller's body as it arrives: the upstream is not waited on while the caller
    sends, and is again while it takes each part and once all is sent. A caller silent for
    the read timeout in the middle of its body times the request out (408)."""
    while True:
        watch.caller_turn()
        chunk = await content.readany()
        watch.heard()
        if not chunk:
            return
        yield chunk


async def _read_whole(content: aiohttp.StreamReader, watch: Watch) -> bytes:
    """A short body that did not come with the headers, read as it arrives."""
    parts = []
    while not content.at_eof():
        parts.append(await content.readany())
        watch.heard()
    return b"".join(parts)


def _abort(request: web.Request, reason: str = "stream_aborted") -> str:
    """The status line is gone already: cut the connection, so a truncated body can never
    look complete to the caller. Returns `reason`, the audit event's."""
    if request.transport is not None:
        request.transport.abort()
    return reason
