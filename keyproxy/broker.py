"""The token broker: exchange a workload identity for a task token, or a task token for a
narrower one (delegation, keyproxy.delegation), and keep it alive and end it.

    POST /token                   JSON, or the RFC 8693 token-exchange form
    POST /token/heartbeat         the holder keeps an idle_ttl token alive (keyproxy.lifecycle)
    POST /token/revoke            the holder ends its own task token (keyproxy.lifecycle)
    GET  /.well-known/jwks.json   the task-token public keys

JSON request (workload token in `Authorization: Bearer`; over mutual TLS, without one, the
caller's X.509-SVID is the identity exchanged, as on the proxy):

    {"scope": {"openai": {"methods": ["POST"], "paths": ["/v1/chat/completions"]}},
     "task": "summarise-ticket-4711", "intent": "summarise one ticket",
     "ttl": "5m", "idle_ttl": "60s", "max_uses": 20, "bind_source": true}

`idle_ttl` (at least 2 s, less than the TTL) makes the token valid only while its holder
heartbeats (keyproxy.lifecycle); the lease starts at issue.

or the RFC 8693 token-exchange form (keyproxy.asked reads both). With a task token as the
subject (and optionally the sub-agent's identity as `actor_token`), the answer is a child
token within it (keyproxy.delegation); its answer adds `chain`, the token ids from the root.

Policy decides the most that may be granted; the grant is the intersection of that and the
request, never more. Every outcome is an audit event: token.issued or token.denied.

With `tokens.exchange_limit`, each exchange (a delegation too: as the identity its chain was
issued to) takes one unit of that identity's rate in the state store, once the identity is
verified and before any Vault work for the token: `rate_limited` (429, Retry-After) when
spent, `state_store_unavailable` (503) when the store cannot answer and the limit fails closed.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from typing import Any, Final, NamedTuple

import structlog
from aiohttp import web

from keyproxy import delegation, policy, state
from keyproxy import scope as scopes
from keyproxy.answers import REQUEST_ID_KEY
from keyproxy.asked import Asked, actor_token, fields_of, read_asked
from keyproxy.asked import subject_token as subject_token_of
from keyproxy.caller import Identity
from keyproxy.config import Config
from keyproxy.errors import (
    BadRequest,
    Forbidden,
    RequestError,
    Unauthenticated,
    Unavailable,
    VaultError,
)
from keyproxy.headers import REQUEST_ID, request_id
from keyproxy.identity import IdentityVerifier
from keyproxy.lifecycle import Lifecycle
from keyproxy.limiter import refusal
from keyproxy.metrics import Metrics
from keyproxy.mtls import binding, check_binding, client_chain, identity_of
from keyproxy.spiffe import Svid
from keyproxy.state.limits import identity_rate
from keyproxy.state.memory import MemoryStore
from keyproxy.tls import ServerTLS
from keyproxy.tokens import (
    CertificateBinding,
    TaskToken,
    TaskTokens,
    is_task_token,
    lineage,
    needs_shared_store,
)

ISSUED_TYPE: Final = "urn:ietf:params:oauth:token-type:jwt"

log = structlog.get_logger("keyproxy.audit")


class Grant(NamedTuple):
    """What a token is issued with."""

    identity: Identity
    scope: scopes.Scope
    ttl: float
    task: str | None
    intent: str | None
    max_uses: int | None


class Broker(Lifecycle):
    def __init__(
        self,
        config: Config,
        verifier: IdentityVerifier,
        tasks: TaskTokens,
        metrics: Metrics | None = None,
        tls: ServerTLS | None = None,
        *,
        exact_uses: bool = True,
        store: state.StateStore | None = None,
    ) -> None:
        self.config = config
        # Where tokens.exchange_limit is counted: the proxy's limits' store.
        self.store = store if store is not None else MemoryStore()
        self.tls = tls  # the listener's, to verify a certificate a front proxy forwarded
        self.verifier = verifier
        self.tasks = tasks
        self.metrics = metrics
        # False on one of several worker processes counting uses and heartbeats in their own
        # memory: the proxy would refuse every use of a max_uses or idle_ttl token
        # (keyproxy.limiter), so none is issued.
        self.exact_uses = exact_uses

    async def exchange(self, request: web.Request) -> web.Response:
        event: dict[str, Any] = {"source": request.remote}
        rid = request[REQUEST_ID_KEY] = request_id(request.headers)
        # Every event of this exchange (Vault, JWKS, the token's own) names the request.
        with structlog.contextvars.bound_contextvars(request_id=rid):
            try:
                response = await self._exchange(request, event)
            except RequestError as exc:
                limit = {"limit": exc.limit} if exc.limit is not None else {}
                log.warning("token.denied", reason=exc.reason, **event, **limit)
                self._count("denied")
                if exc.limit is not None and self.metrics is not None:
                    self.metrics.limit_refused(None, exc.limit)  # tokens.exchange_limit's
                raise
        response.headers[REQUEST_ID] = rid
        return response

    async def _exchange(self, request: web.Request, event: dict[str, Any]) -> web.Response:
        source = policy.client_address(
            request.remote or "0.0.0.0",  # noqa: S104  # no address matches no CIDR
            request.headers.getall("X-Forwarded-For", []),
            self.config.server.trusted_proxies,
        )
        event["source"] = str(source)
        form = request.content_type == "application/x-www-form-urlencoded"
        fields = await fields_of(request, form)
        # Over mutual TLS: the certificate the handshake verified, or the one a trusted front
        # proxy forwarded (verified below like a direct one).
        chain, forwarded = client_chain(request, self.config.server, self.tls)
        subject_token = subject_token_of(request, fields, form, svid=bool(chain))
        # Verified once: a forwarded chain must be a valid SVID, as must one that is the
        # caller's only credential; a direct one beside a token need only have passed the
        # handshake (it then binds exactly itself).
        svid = self._svid(chain, required=forwarded or not subject_token)
        # Requested over mutual TLS: bound to the certificate the handshake verified (RFC 8705),
        # or to the one a trusted front proxy forwarded, once verified like a direct one.
        certificate = binding(chain, svid) if chain else None
        if subject_token and is_task_token(subject_token):
            parent = await self._parent(subject_token, chain, str(source), event)
            return await self._delegate(
                parent, fields, form, certificate, event, source=str(source)
            )
        if subject_token:
            identity = await self.verifier.verify(subject_token)
        else:
            assert svid is not None  # required above
            identity = identity_of(svid)
        event |= {"issuer": identity.issuer, "subject": identity.subject}
        await self._take_exchange(identity)
        asked = self._asked(fields, form, delegated=False)
        event |= {"task": asked.task, "intent": asked.intent}
        event["requested"] = scopes.to_claim(asked.scope)
        granted, contributing = scopes.grant(self.config.policies, identity, source, asked.scope)
        if not granted:
            raise Forbidden("nothing_granted", "policy allows none of the requested scope")
        # Capped by tokens.max_ttl and by the max_ttl of every policy that granted something.
        caps = [p.max_ttl for p in contributing if p.max_ttl is not None]
        ttl = min([asked.ttl or self.config.tokens.default_ttl, self.config.tokens.max_ttl, *caps])
        grant = Grant(identity, granted, ttl, asked.task, asked.intent, asked.max_uses)
        bound = str(source) if asked.bind_source else None
        return await self._issue(grant, asked, form, certificate, event, bound)

    def _asked(self, fields: dict[str, Any], form: bool, *, delegated: bool) -> Asked:
        """What the request asks for (a delegation may leave the scope out: its parent's)."""
        asked = read_asked(fields, form, self.config.routes, delegated=delegated)
        for name, value in (("max_uses", asked.max_uses), ("idle_ttl", asked.idle_ttl)):
            if value is not None and not self.exact_uses:
                raise Unavailable(
                    f"{name}_needs_shared_store",
                    f"tokens with {name} need a shared state store (state.url) with --workers",
                )
        return asked

    async def _issue(  # noqa: PLR0917  # the grant, and what the request asked
        self,
        grant: Grant,
        asked: Asked,
        form: bool,
        certificate: CertificateBinding | None,
        event: dict[str, Any],
        bound: str | None,
        parent: TaskToken | None = None,
        actor: Identity | None = None,
    ) -> web.Response:
        """Issue the token `grant` describes (bound to the client certificate `certificate`
        and to the address `bound`, each if any; delegated: from `parent` by `actor`), and
        answer with it."""
        idle_ttl = None
        if asked.idle_ttl is not None:
            idle_ttl = math.ceil(asked.idle_ttl)  # whole seconds, as the claim holds it
            if idle_ttl >= grant.ttl:
                raise BadRequest(
                    "invalid_request", f"idle_ttl must be less than the ttl ({grant.ttl:.0f}s)"
                )
        issued = await self.tasks.issue(
            grant.identity,
            grant.scope,
            ttl=grant.ttl,
            task=grant.task,
            intent=grant.intent,
            max_uses=grant.max_uses,
            source=bound,
            certificate=certificate,
            idle_ttl=idle_ttl,
            parent=parent,
            actor=actor,
        )
        event |= {
            "token_id": issued.token_id,
            "expires_at": issued.expires_at,
            "bound_certificate": certificate is not None,
        }
        if idle_ttl is not None:
            event["idle_ttl"] = idle_ttl
        links = [*parent.chain, issued.token_id] if parent is not None else []
        if links:
            event["chain"] = ",".join(links)
        claim = scopes.to_claim(grant.scope)
        log.info("token.issued", scope=claim, ttl=issued.lifetime, **event)
        self._count("issued")
        body: dict[str, Any] = {
            "access_token": issued.token,
            "token_type": "Bearer",
            "issued_token_type": ISSUED_TYPE,
            "expires_in": issued.lifetime,
            "token_id": issued.token_id,
            "expires_at": issued.expires_at,
            "scope": scopes.describe(grant.scope) if form else claim,
        }
        if idle_ttl is not None:
            body["idle_ttl"] = idle_ttl
        if links:
            body["chain"] = links
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    def _svid(self, chain: tuple[bytes, ...], *, required: bool) -> Svid | None:
        """The client chain's X.509-SVID, verified; None without a chain, or, unless it is
        `required` (Unauthenticated then), for a certificate that is no valid SVID."""
        if not chain:
            return None
        assert self.tls is not None  # only a listener with TLS has a client chain
        try:
            return self.tls.verifier.verify(chain, dt.datetime.now(dt.UTC))
        except Unauthenticated:
            if required:
                raise
            return None

    async def _take_exchange(self, identity: Identity) -> None:
        """One exchange off `identity`'s tokens.exchange_limit, or the refusal (429, 503)."""
        configured = self.config.tokens.exchange_limit
        if configured is None:
            return
        decision = await self.store.take([identity_rate(configured, identity)])
        if not decision.allowed:
            raise refusal(decision)

    async def _parent(
        self, token: str, chain: tuple[bytes, ...], source: str, event: dict[str, Any]
    ) -> TaskToken:
        """The task token a delegation is asked with, verified and used as it would be at
        the proxy: bound to its address and certificate, its heartbeat leases alive; one
        exchange of its identity (the chain's root's) counted before the leases are read."""
        parent = await self.tasks.verify(token)
        check_binding(parent, chain, self.tls.verifier if self.tls is not None else None)
        if parent.source is not None and parent.source != source:
            raise Unauthenticated("wrong_source", "this token is bound to another address")
        identity = parent.identity  # a child is issued to its parent's: the root's
        event |= {"issuer": identity.issuer, "subject": identity.subject}
        event["parent_token_id"] = parent.token_id
        await self._take_exchange(identity)
        if parent.lifecycle and not self.exact_uses:
            raise needs_shared_store(parent.lifecycle)
        await self.tasks.check_leases(parent)
        return parent

    async def _delegate(
        self,
        parent: TaskToken,
        fields: dict[str, Any],
        form: bool,
        certificate: CertificateBinding | None,
        event: dict[str, Any],
        *,
        source: str,
    ) -> web.Response:
        """A narrower token for a sub-agent (keyproxy.delegation), asked for from `source`."""
        identity = parent.identity
        event["task"] = parent.task
        actor_text = actor_token(fields, form)
        actor = await self.verifier.verify(actor_text) if actor_text is not None else None
        acting = actor if actor is not None else identity  # the parent hands it on itself
        event["actors"] = ",".join([*parent.actors, lineage.actor_name(acting)])
        asked = self._asked(fields, form, delegated=True)
        delegation.same_task(parent, fields)
        # SECURITY: a child never sheds its parent's address binding (the delegator is at
        # that address: `_parent` checked it), asked for or not.
        bound = parent.source or (source if asked.bind_source else None)
        event["requested"] = scopes.to_claim(asked.scope)
        uses_left = await delegation.uses_left(parent, self.tasks.store, time.time())
        cfg = self.config.tokens
        child = delegation.narrow(
            parent,
            asked.scope,
            asked.ttl,
            asked.max_uses,
            default_ttl=cfg.default_ttl,
            max_depth=cfg.max_delegation_depth,
            uses_left=uses_left,
            now=time.time(),
        )
        intent = asked.intent or parent.intent
        event["intent"] = intent
        grant = Grant(identity, child.scope, child.ttl, parent.task, intent, child.max_uses)
        return await self._issue(grant, asked, form, certificate, event, bound, parent, actor)

    async def jwks(self, _: web.Request) -> web.Response:
        if not self.tasks.jwks()["keys"]:
            try:
                await self.tasks.refresh_keys()
            except VaultError:
                raise Unavailable("vault_unavailable", "no signing keys yet") from None
        return web.json_response(self.tasks.jwks(), headers={"Cache-Control": "max-age=60"})
