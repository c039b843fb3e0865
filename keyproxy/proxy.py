"""The request pipeline: route, authenticate, decide, limit, key, build, forward, audit.

`Proxy.handle` serves `/r/<route>/<path>` as a row of steps (drawn in docs/architecture.md),
each taking what the ones before produced and returning its own result, or stopping the
request by raising a `RequestError`; forwarding is `keyproxy.forward`'s. Nothing is sent
upstream until every check has passed. The caller is a task token, a workload identity JWT,
or an X.509-SVID over mutual TLS (`keyproxy.mtls`). The request's one audit event is built at
the end from those results and how the request ended (the forwarding step's `Outcome`, or
the error's reason and status); the error becomes its answer in `keyproxy.answers.answering`.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import structlog
from aiohttp import web

from keyproxy import audit, mcproute, paths, policy, state
from keyproxy import scope as scopes
from keyproxy.addresses import IPAddress
from keyproxy.answers import REQUEST_ID_KEY
from keyproxy.config import Config, Policy, Route
from keyproxy.deadline import ReadDeadlines
from keyproxy.errors import Forbidden, NotFound, RequestError, Unauthenticated, Unavailable
from keyproxy.forward import Exchange, Forwarder, Outgoing, read_deadlines
from keyproxy.headers import (
    Verdicts,
    other_credential_headers,
    request_id,
    request_verdicts,
    upstream_headers,
)
from keyproxy.identity import Identity, IdentityVerifier
from keyproxy.inject import Injector, Rendered
from keyproxy.limiter import Limiter
from keyproxy.metrics import Metrics
from keyproxy.mtls import bearer_or_certificate, check_binding, client_chain, svid_identity
from keyproxy.outgoing import request_body, upstream_url
from keyproxy.paths import ROUTE_PREFIX
from keyproxy.tls import ServerTLS
from keyproxy.tokens import TaskToken, TaskTokens, is_task_token
from keyproxy.tokens.inflight import InFlight
from keyproxy.tokens.sessionseal import SessionSeal
from keyproxy.upstream import UpstreamSessions
from keyproxy.vault import KeyCache, KeyVersion

log = structlog.get_logger("keyproxy.proxy")

# How a request ended: its audit reason, status, whether its answer was sent (or is an error's,
# sent after the event is built), and the limit that refused it.
_Ended = tuple[str, int, bool, str | None]


# The steps' results are named tuples: as immutable as frozen dataclasses, and built in half
# the time (a frozen dataclass sets each field through object.__setattr__), on every request.
class Caller(NamedTuple):
    """Who is asking (`_authenticate`'s result): a workload identity, and its task token."""

    identity: Identity
    task: TaskToken | None
    token_id: str | None  # the task token's id, or the identity token's jti


class Decision(NamedTuple):
    """Why the request may go on (`_decide`'s result): the policy that allows it (none for
    an exception token) and the reason code its audit event names."""

    policy: str | None
    reason: str


@dataclass(frozen=True)
class _Plan:
    """What one route's requests need that does not change per request, prepared once."""

    injector: Injector
    forwards: Verdicts  # caller's request header name as sent: forwarded on this route?
    other_credentials: tuple[str, ...]  # credential-carrying headers a caller must not add
    forwarder: Forwarder
    mcp: mcproute.McpPlan | None  # an MCP route's grants

    @classmethod
    def of(
        cls,
        route: Route,
        sessions: UpstreamSessions,
        deadlines: ReadDeadlines,
        policies: tuple[Policy, ...] = (),
        seal: SessionSeal | None = None,
    ) -> _Plan:
        injector = Injector(route)
        return cls(
            injector=injector,
            forwards=request_verdicts(route, injector.header_names),
            other_credentials=other_credential_headers(route.caller_credential),
            forwarder=Forwarder(
                route, sessions.get(route.name), sessions.pool(route.name), deadlines
            ),
            mcp=mcproute.McpPlan.of(route, policies, seal) if route.kind == "mcp" else None,
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
        config_hash: str | None = None,
        store: state.StateStore | None = None,
        exact_uses: bool = True,
        tls: ServerTLS | None = None,
    ) -> None:
        self.config = config
        self.tls = tls  # the listener's, for X.509-SVID callers and bound task tokens
        self.config_hash = config_hash  # named by each request's audit event
        self.verifier = verifier
        self.keys = keys
        self.sessions = sessions
        self.tasks = tasks
        self.inflight: InFlight | None = tasks.inflight if tasks is not None else None
        self.metrics = metrics
        self.limiter = Limiter(config, store, exact_uses=exact_uses)  # keyproxy.limiter
        # A 503 for a key Vault could not give says when to try again: the next refresh.
        self.retry_after = max(1, math.ceil(config.vault.refresh_interval))
        # Indexed once: a decision reads only the policies naming the caller, however many
        # routes and policies the configuration has.
        self.policies = policy.compile(config.policies)
        self._deadlines = read_deadlines(config.routes.values())
        seal = tasks.seal if tasks is not None else None  # binds MCP sessions to callers
        self.plans = {
            name: _Plan.of(r, sessions, self._deadlines, config.policies, seal)
            for name, r in config.routes.items()
        }

    def close(self) -> None:
        """Stop sweeping read deadlines and sending MCP replies (the app is shutting down,
        or this configuration is retired)."""
        self._deadlines.close()
        for plan in self.plans.values():
            if plan.mcp is not None:
                plan.mcp.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        raw_path, _, raw_query = request.raw_path.partition("?")
        rid = request_id(request.headers)
        # What the steps produced so far: an error names what was known when it stopped them.
        route: Route | None = None
        path, source_text = raw_path, request.remote or ""
        caller: Caller | None = None
        decision: Decision | None = None
        granted = False
        key: KeyVersion | None = None
        exchange: Exchange | None = None
        ended: _Ended
        done: _Ended | None = None  # how it ended, once its answer is sent
        try:
            route, tail = self._route(raw_path)
            segments, path = paths.normalise_encoded(tail)
            source, source_text = self._source(request)
            plan = self.plans[route.name]
            chain, _ = client_chain(request, self.config.server, self.tls)
            credential = bearer_or_certificate(
                request.headers,
                request.raw_path,
                route.caller_credential,
                plan.other_credentials,
                chain,
            )
            caller = await self._authenticate(credential, chain)
            decision = self._decide(caller, route, request.method, segments, source, path=path)
            admitted = await self.limiter.admit(
                route.name, decision.policy, caller.identity, caller.task, caller.token_id
            )
            async with self.limiter.held(admitted):
                granted = True
                key = self._key(route)
                rendered = plan.injector.render(key.secret, key.version)
                outgoing = await _outgoing(
                    request, route, plan, path, raw_query, rendered, rid, (caller, decision, key)
                )
                exchange = Exchange(plan.forwarder, caller.task, self.inflight)
                outcome = await exchange.send(request, outgoing, rendered, rid)
                # Sent: this is how it ended, even if its caller goes away from now on.
                ended = done = outcome.cut or decision.reason, outcome.response.status, True, None
        except RequestError as exc:
            ended = exc.reason, exc.status, False, exc.limit
            raise
        except asyncio.CancelledError:
            # The caller went away: before its answer was sent (none will be), or after, as
            # its slots were given back (the answer's own outcome stands).
            ended = done or ("client_disconnected", 499, True, None)
            raise
        except Exception:  # a bug: answers.answering answers it and logs the traceback
            ended = "internal_error", 500, False, None
            raise
        finally:
            elapsed = time.monotonic() - started
            reason, status, sent, limit = ended
            record = _record(
                request,
                path=path,
                source=source_text,
                request_id=rid,
                route=route,
                caller=caller,
                decision=decision,
                granted=granted,
                key=key if exchange is not None else None,  # sent with it
                exchange=exchange,
                reason=reason,
                status=status,
                elapsed=elapsed,
                config_hash=self.config_hash,
                limit=limit,
            )
            if sent:
                self._account(record, elapsed)
            else:
                # The error's answer (answers.answering's, with this id) is sent after this step:
                # the caller does not wait for its own audit event (call_soon keeps this
                # request's log context).
                request[REQUEST_ID_KEY] = rid
                asyncio.get_running_loop().call_soon(self._account, record, elapsed)
        return outcome.response

    def _account(self, record: audit.RequestRecord, elapsed: float) -> None:
        try:
            audit.emit(record)
        except Exception:
            # An event that cannot be written does not fail the request or the process.
            log.exception("audit_event_failed", route=record.route, path=record.path)
        if self.metrics is not None:
            self.metrics.request(record.route, record.status, record.decision, elapsed)
            if record.limit is not None:
                self.metrics.limit_refused(record.route, record.limit)

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
        trusted = self.config.server.trusted_proxies
        if not trusted:  # the peer is the caller
            parsed: tuple[IPAddress, str] | None = getattr(request.protocol, policy.PEER, None)
            if parsed is not None:
                return parsed
        peer = request.remote or "0.0.0.0"  # noqa: S104  # no address (Unix socket): no CIDR
        if trusted:
            forwarded = request.headers.getall("X-Forwarded-For", [])
            source = policy.client_address(peer, forwarded, trusted)
            return source, str(source)
        return policy.peer_address(peer)

    async def _authenticate(self, credential: str, chain: tuple[bytes, ...]) -> Caller:
        """A task token, or else a workload identity token; with no credential (`""`), the
        client certificate `chain` the handshake verified, as an X.509-SVID."""
        if not credential:
            # Only with a certificate chain, which only a listener with TLS has.
            assert self.tls is not None
            return Caller(svid_identity(self.tls, chain), None, None)
        if self.tasks is not None and is_task_token(credential):
            task = await self.tasks.verify(credential)
            check_binding(task, chain, self.tls.verifier if self.tls is not None else None)
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
        *,
        path: str,
    ) -> Decision:
        """Current policy decides; a task token further narrows it to its own address and
        scope. Off an MCP route's endpoint: 404, before any limit or the key."""
        if route.mcp_endpoint is not None:
            mcproute.check_endpoint(route, path)
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

    def _key(self, route: Route) -> KeyVersion:
        """The route's key, or a 503 that says when to try again."""
        try:
            # The key of this configuration's route, also after a reload changed it.
            return self.keys.key_of(route.secret)
        except Unavailable as exc:
            raise Unavailable(exc.reason, exc.message, retry_after=self.retry_after) from None


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
    exchange: Exchange | None,
    reason: str,
    status: int,
    elapsed: float,
    config_hash: str | None,
    limit: str | None,
) -> audit.RequestRecord:
    """The request's audit event, from what its steps produced (None: not reached) and how
    it ended."""
    identity = caller.identity if caller is not None else None
    task = caller.task if caller is not None else None
    # A delegated token names its whole chain; any other caller, nothing more.
    lineage = task.lineage() if task is not None else None
    chain, actors = lineage if lineage is not None else (None, None)
    # Positional, in the fields' order (each named): the keyword call costs three times as
    # much, on every request.
    return audit.RequestRecord(
        request.method,  # method
        path,
        source,
        request_id,
        route.name if route is not None else None,  # route
        identity.issuer if identity is not None else None,  # issuer
        identity.subject if identity is not None else None,  # subject
        caller.token_id if caller is not None else None,  # token_id
        task.task if task is not None else None,  # task
        task.exception_owner if task is not None else None,  # exception_owner
        decision.policy if decision is not None else None,  # policy
        "allow" if granted else "deny",  # decision
        reason,
        key.version if key is not None else None,  # key_version
        key.fingerprint if key is not None else None,  # key_fingerprint
        status,
        exchange.upstream_status if exchange is not None else None,  # upstream_status
        int(elapsed * 1e6) / 1000,  # duration_ms, in whole microseconds
        config_hash,  # config
        limit,
        chain,
        actors,
    )


async def _outgoing(  # noqa: PLR0917  # what the steps before produced
    request: web.Request,
    route: Route,
    plan: _Plan,
    path: str,
    raw_query: str,
    rendered: Rendered,
    rid: str,
    admitted: tuple[Caller, Decision, KeyVersion],
) -> Outgoing:
    """The upstream request: the route's URL for `path`, the headers it forwards, the body.
    On an MCP route the body is read and decided first (`mcproute.decided`), and the answer
    filtered."""
    url = upstream_url(route, path, raw_query, rendered, plan.injector)
    headers = upstream_headers(request.headers, plan.forwards, rendered, rid)
    if plan.mcp is not None:
        caller, decision, key = admitted
        who = rid, caller.identity, caller.task, caller.token_id, decision.policy
        facts = mcproute.CallFacts(*who, key.version, key.fingerprint)
        step = await mcproute.decided(request, route, plan.mcp, facts)
        return plan.mcp.outgoing(step, url, headers, plan.forwarder)
    return Outgoing(url, headers, await request_body(request, route, headers))
