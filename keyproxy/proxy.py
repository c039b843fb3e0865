"""The request pipeline: authenticate, decide, fetch the key, inject, forward, audit.

`Proxy.handle` serves `/r/<route>/<path>`. Each step uses only what the previous one produced
and stops the request by raising a `RequestError`; `keyproxy.answers.error_response` is the
one place those become HTTP answers, and every request, allowed or not, ends in exactly one
audit event.
Nothing is sent upstream until every check has passed.
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
from keyproxy.addresses import IPAddress
from keyproxy.answers import error_response
from keyproxy.config import Config, Route
from keyproxy.deadline import ReadDeadlines, Watch
from keyproxy.errors import (
    BadGateway,
    BadRequest,
    EgressDenied,
    Forbidden,
    GatewayTimeout,
    InternalError,
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
from keyproxy.tokens import TaskToken, TaskTokens, is_task_token
from keyproxy.upstream import UpstreamSessions
from keyproxy.vault import KeyCache

log = structlog.get_logger("keyproxy.proxy")

ROUTE_PREFIX: Final = "/r/"
# Response encodings aiohttp decodes, so the scrubber sees clear text. We ask for identity;
# anything else the upstream sends anyway is refused rather than passed through unscrubbed.
DECODED_ENCODINGS: Final = frozenset({"", "gzip", "deflate"})  # "identity" is read as ""
CHUNK: Final = 64 * 1024

# Answers with a declared length up to this size are scrubbed and sent whole.
WHOLE_BODY: Final = 64 * 1024


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
        self.deadlines = ReadDeadlines(granularity=min(1.0, max(0.01, shortest / 10)))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        raw_path, _, raw_query = request.raw_path.partition("?")
        record = audit.RequestRecord(
            method=request.method,
            path=raw_path,
            source=request.remote or "",
            request_id=request_id(request.headers),
        )
        response: web.StreamResponse | None = None
        self._in_flight += 1
        try:
            response = await self._serve(request, raw_path, raw_query, record)
        except RequestError as exc:
            record.reason = exc.reason
            response = error_response(exc, record.request_id)
        except asyncio.CancelledError:
            record.reason = "client_disconnected"
            raise
        except Exception:
            # A bug, not a decision: answer without details (they could name a secret) and
            # keep the traceback in our scrubbed log rather than aiohttp's.
            log.exception("request_failed", route=record.route, path=record.path)
            record.reason = "internal_error"
            response = error_response(
                InternalError("internal_error", "internal error"), record.request_id
            )
        finally:
            self._in_flight -= 1
            elapsed = time.monotonic() - started
            record.duration_ms = int(elapsed * 1e6) / 1000  # whole microseconds
            record.status = response.status if response is not None else 499
            if response is not None and not response.prepared:
                # aiohttp sends a returned answer after this step: the caller does not wait
                # for its own audit event (call_soon keeps this request's log context).
                asyncio.get_running_loop().call_soon(self._account, record, elapsed)
            else:
                self._account(record, elapsed)  # the answer is out already
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

    async def _serve(
        self, request: web.Request, raw_path: str, raw_query: str, record: audit.RequestRecord
    ) -> web.StreamResponse:
        route, tail = self._route(raw_path)
        record.route = route.name
        segments, encoded = paths.normalise_encoded(tail)
        record.path = encoded
        # A peer with no address (a Unix socket) matches no CIDR.
        peer = request.remote or "0.0.0.0"  # noqa: S104
        trusted = self.config.server.trusted_proxies
        if trusted:
            forwarded = request.headers.getall("X-Forwarded-For", [])
            source = policy.client_address(peer, forwarded, trusted)
            record.source = str(source)
        else:  # the peer is the caller
            source, record.source = policy.peer_address(peer)

        plan = self.plans[route.name]
        credential = caller_token(
            request.headers, raw_query, route.caller_credential, plan.other_credentials
        )
        identity, task = await self._authenticate(credential, source, record)
        self._authorize(identity, task, route, request.method, segments, source, record)

        try:
            key = self.keys.get(route.name)
        except Unavailable as exc:
            raise Unavailable(exc.reason, exc.message, retry_after=self.retry_after) from None
        record.key_version = key.version
        rendered = plan.injector.render(key.secret, key.version)
        body = await _request_body(request, route)
        url = _upstream_url(route, encoded, raw_query, rendered, plan.injector)
        headers = upstream_headers(request.headers, plan.forwards, rendered, record.request_id)
        return await self._forward(
            request,
            route,
            plan,
            url=url,
            headers=headers,
            body=body,
            rendered=rendered,
            record=record,
        )

    async def _authenticate(
        self, credential: str, source: IPAddress, record: audit.RequestRecord
    ) -> tuple[Identity, TaskToken | None]:
        """A task token, or else a workload identity token."""
        task: TaskToken | None = None
        if self.tasks is not None and is_task_token(credential):
            task = await self.tasks.verify(credential)
            identity = task.identity
            record.token_id, record.task = task.token_id, task.task
            record.exception_owner = task.exception_owner
            if task.source is not None and task.source != str(source):
                raise Unauthenticated("wrong_source", "this token is bound to another address")
        else:
            identity = await self.verifier.verify(credential)
            jti = identity.claims.get("jti")
            record.token_id = jti if isinstance(jti, str) else None
        record.issuer, record.subject = identity.issuer, identity.subject
        return identity, task

    def _authorize(  # noqa: PLR0917  # the request's facts, in the order they were learnt
        self,
        identity: Identity,
        task: TaskToken | None,
        route: Route,
        method: str,
        segments: tuple[str, ...],
        source: IPAddress,
        record: audit.RequestRecord,
    ) -> None:
        """Current policy decides; a task token further narrows it to its own scope."""
        if task is not None and not scopes.allows(task.scope, route.name, method, segments):
            record.reason = "outside_token_scope"
            raise Forbidden("outside_token_scope", "the token's scope does not include this")
        if task is not None and task.exception_owner is not None:
            # Exception tokens stand for no workload identity: their scope is their grant.
            record.policy, record.reason = None, "exception_token"
        else:
            decision = self.policies.decide(identity, route.name, method, segments, source)
            record.policy, record.reason = decision.policy, decision.reason
            if not decision.allowed:
                raise Forbidden(decision.reason, "no policy allows this request")
        if task is not None and self.tasks is not None and not self.tasks.use(task):
            record.reason = "token_exhausted"
            raise Unauthenticated("token_exhausted", "this token has no uses left")
        record.decision = "allow"

    def _route(self, raw_path: str) -> tuple[Route, str]:
        rest = raw_path[len(ROUTE_PREFIX) :]
        name, slash, tail = rest.partition("/")
        route = self.config.routes.get(name)
        if route is None:
            raise NotFound("unknown_route", "no such route")
        return route, slash + tail

    async def _forward(
        self,
        request: web.Request,
        route: Route,
        plan: _Plan,
        *,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | aiohttp.StreamReader | None,
        rendered: Rendered,
        record: audit.RequestRecord,
    ) -> web.StreamResponse:
        # aiohttp skips the resolver (and so the fence) for IP literals: those were checked
        # once, when the configuration was loaded.
        if plan.literal_denial is not None:
            raise EgressDenied(plan.literal_denial.reason, plan.literal_denial.message)
        # Until the answer starts: connecting (if a new connection is needed) and waiting.
        watch = Watch(self.deadlines, route.read_timeout, plan.first_read)
        try:
            with watch:
                async with plan.session.request(
                    request.method,
                    url,
                    headers=headers,
                    # The caller's pace while uploading is not the upstream's silence.
                    data=_uploaded(body, watch) if isinstance(body, aiohttp.StreamReader) else body,
                    allow_redirects=False,  # SECURITY: a redirect goes back to the caller
                    timeout=plan.timeout,
                ) as upstream:
                    watch.heard()
                    record.upstream_status = upstream.status
                    if upstream.status < 200:
                        # SECURITY: a 101 relayed would tell a front proxy to tunnel the
                        # caller's bytes. Until WebSockets are supported on purpose, a 502;
                        # the connection is closed already (_UpstreamResponse).
                        raise BadGateway(
                            "upstream_protocol_switch", "the upstream tried to switch protocols"
                        )
                    return await _stream_back(request, upstream, rendered, record, watch)
        except RequestError:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            if isinstance(watch.answer, web.StreamResponse):
                _abort(request, record)  # the status line is gone: cut the answer short
                record.reason = "upstream_timeout"
                return watch.answer
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


def _literal_denial(route: Route) -> EgressDenied | None:
    """The egress fence's verdict on an IP-literal upstream (a name is checked when resolved)."""
    try:
        netguard.check_host(route.upstream.host, route.egress_allow)
    except EgressDenied as exc:
        return exc
    return None


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


async def _stream_back(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    rendered: Rendered,
    record: audit.RequestRecord,
    watch: Watch,
) -> web.StreamResponse:
    encoding = _content_coding(upstream.headers.get("Content-Encoding", ""))
    if encoding not in DECODED_ENCODINGS:
        raise BadGateway("unsupported_encoding", "the upstream answer could not be checked")
    headers = response_headers(upstream.headers, rendered, record.request_id)
    # The upstream's reason phrase is not forwarded: it is free text that could echo the key.
    length = upstream.content_length
    response: web.StreamResponse
    if length is not None and length <= WHOLE_BODY and not encoding and request.method != "HEAD":
        # A short answer of declared length (and not compressed, which could make it large)
        # is read, scrubbed and sent whole: one write to the caller instead of headers, chunk
        # and end, and a cut-short body is still a 502.
        content = upstream.content
        # Usually it all came with the headers: take it without waiting.
        body = content.read_nowait() if content.is_eof() else await _read_whole(content, watch)
        watch.pause()  # the rest is the caller's turn
        response = web.Response(
            status=upstream.status, body=scrub_bytes(body, rendered.byte_forms), headers=headers
        )
        try:  # sent here, so the audit event knows whether it reached the caller
            await response.prepare(request)
            await response.write_eof()
        except Exception:  # noqa: BLE001  # whatever broke the write, the answer is the same
            _abort(request, record)
        return response
    response = web.StreamResponse(status=upstream.status, headers=headers)
    watch.pause()
    await response.prepare(request)
    watch.answer = response
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
        _abort(request, record)
    return response


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


def _abort(request: web.Request, record: audit.RequestRecord) -> None:
    """The status line is gone already: cut the connection, so a truncated body can never
    look complete to the caller."""
    record.reason = "stream_aborted"
    if request.transport is not None:
        request.transport.abort()
