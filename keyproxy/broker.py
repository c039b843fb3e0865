"""The token broker: exchange a workload identity for a task token, and revoke it.

    POST /token                   JSON, or the RFC 8693 token-exchange form
    POST /token/heartbeat         the holder keeps an idle_ttl token alive (keyproxy.lifecycle)
    POST /token/revoke            the holder ends its own task token (keyproxy.lifecycle)
    GET  /.well-known/jwks.json   the task-token public keys

JSON request (workload token in `Authorization: Bearer`):

    {"scope": {"openai": {"methods": ["POST"], "paths": ["/v1/chat/completions"]}},
     "task": "summarise-ticket-4711", "intent": "summarise one ticket",
     "ttl": "5m", "idle_ttl": "60s", "max_uses": 20, "bind_source": true}

`idle_ttl` (at least 2 s, less than the TTL) makes the token valid only while its holder
heartbeats (keyproxy.lifecycle); the lease starts at issue.

RFC 8693 form: grant_type=urn:ietf:params:oauth:grant-type:token-exchange, subject_token,
subject_token_type (jwt or id_token), scope ("route:METHODS:/path" items), resource or
audience (route names, asked for in full), and the extensions task, intent, ttl, idle_ttl,
max_uses.

Policy decides the most that may be granted; the grant is the intersection of that and the
request, never more. Every outcome is an audit event: token.issued or token.denied.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any, Final
from urllib.parse import parse_qsl

import structlog
from aiohttp import web

from keyproxy import policy
from keyproxy import scope as scopes
from keyproxy.answers import REQUEST_ID_KEY
from keyproxy.config import Config, parse_duration
from keyproxy.errors import (
    BadRequest,
    ConfigError,
    Forbidden,
    RequestError,
    Unauthenticated,
    Unavailable,
    VaultError,
)
from keyproxy.headers import REQUEST_ID, request_id
from keyproxy.identity import IdentityVerifier
from keyproxy.lifecycle import Lifecycle
from keyproxy.metrics import Metrics
from keyproxy.mtls import client_chain
from keyproxy.spiffe import thumbprint
from keyproxy.tls import ServerTLS
from keyproxy.tokens import TaskTokens, is_task_token

GRANT_TYPE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPES: Final = frozenset(
    {"urn:ietf:params:oauth:token-type:jwt", "urn:ietf:params:oauth:token-type:id_token"}
)
ISSUED_TYPE: Final = "urn:ietf:params:oauth:token-type:jwt"
MAX_TEXT: Final = 1024
MAX_BODY: Final = 64 * 1024
MAX_USES: Final = 1_000_000
MIN_IDLE_TTL: Final = 2.0

log = structlog.get_logger("keyproxy.audit")


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
    ) -> None:
        self.config = config
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
                log.warning("token.denied", reason=exc.reason, **event)
                self._count("denied")
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
        fields = await _fields(request, form)
        subject_token = _subject_token(request, fields, form)
        if is_task_token(subject_token):
            raise Unauthenticated("wrong_token_type", "exchange a workload identity token")
        identity = await self.verifier.verify(subject_token)
        event |= {"issuer": identity.issuer, "subject": identity.subject}
        routes = list(self.config.routes)
        try:
            requested = (
                scopes.parse_rfc8693(str(fields.get("scope", "")), _resources(fields), routes)
                if form
                else scopes.parse(
                    fields.get("scope"), routes, mcp=scopes.mcp_routes(self.config.routes)
                )
            )
            task, intent = _text(fields, "task"), _text(fields, "intent")
            max_uses = _max_uses(fields.get("max_uses"))
            asked_ttl = _ttl(fields.get("ttl"))
            idle_ttl = _idle_ttl(fields.get("idle_ttl"))
        except ValueError as exc:
            raise BadRequest("invalid_request", str(exc)) from None
        for name, asked in (("max_uses", max_uses), ("idle_ttl", idle_ttl)):
            if asked is not None and not self.exact_uses:
                raise Unavailable(
                    f"{name}_needs_shared_store",
                    f"tokens with {name} need a shared state store (state.url) with --workers",
                )
        event |= {"task": task, "intent": intent, "requested": scopes.to_claim(requested)}
        granted, contributing = scopes.grant(self.config.policies, identity, source, requested)
        if not granted:
            raise Forbidden("nothing_granted", "policy allows none of the requested scope")
        # Capped by tokens.max_ttl and by the max_ttl of every policy that granted something.
        caps = [p.max_ttl for p in contributing if p.max_ttl is not None]
        ttl = min([asked_ttl or self.config.tokens.default_ttl, self.config.tokens.max_ttl, *caps])
        if idle_ttl is not None:
            idle_ttl = math.ceil(idle_ttl)  # whole seconds, as the claim holds it
            if idle_ttl >= ttl:
                raise BadRequest(
                    "invalid_request", f"idle_ttl must be less than the ttl ({ttl:.0f}s)"
                )
        bind = fields.get("bind_source") in (True, "true", "1")
        # Requested over mutual TLS: bound to the certificate the handshake verified (RFC 8705),
        # or to the one a trusted front proxy forwarded, once verified like a direct one.
        chain, forwarded = client_chain(request, self.config.server, self.tls)
        if forwarded:
            assert self.tls is not None  # only a listener with TLS reads the header
            self.tls.verifier.verify(chain, dt.datetime.now(dt.UTC))
        certificate = chain[0] if chain else None
        issued = await self.tasks.issue(
            identity,
            granted,
            ttl=ttl,
            task=task,
            intent=intent,
            max_uses=max_uses,
            source=str(source) if bind else None,
            certificate=thumbprint(certificate) if certificate is not None else None,
            idle_ttl=idle_ttl,
        )
        event |= {
            "token_id": issued.token_id,
            "expires_at": issued.expires_at,
            "bound_certificate": certificate is not None,
        }
        if idle_ttl is not None:
            event["idle_ttl"] = idle_ttl
        log.info("token.issued", scope=scopes.to_claim(granted), ttl=ttl, **event)
        self._count("issued")
        body: dict[str, Any] = {
            "access_token": issued.token,
            "token_type": "Bearer",
            "issued_token_type": ISSUED_TYPE,
            "expires_in": int(ttl),
            "token_id": issued.token_id,
            "expires_at": issued.expires_at,
            "scope": scopes.describe(granted) if form else scopes.to_claim(granted),
        }
        if idle_ttl is not None:
            body["idle_ttl"] = idle_ttl
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    async def jwks(self, _: web.Request) -> web.Response:
        if not self.tasks.jwks()["keys"]:
            try:
                await self.tasks.refresh_keys()
            except VaultError:
                raise Unavailable("vault_unavailable", "no signing keys yet") from None
        return web.json_response(self.tasks.jwks(), headers={"Cache-Control": "max-age=60"})


async def _fields(request: web.Request, form: bool) -> dict[str, Any]:
    # Counted on the bytes read, so a chunked body cannot exceed it either.
    raw = await request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise BadRequest("invalid_request", f"request body above {MAX_BODY} bytes")
    try:
        if form:
            pairs = parse_qsl(raw.decode(), keep_blank_values=True, strict_parsing=False)
            return dict(pairs)
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("invalid_request", "the body is not valid JSON or form data") from None
    if not isinstance(body, dict):
        raise BadRequest("invalid_request", "the body must be a JSON object")
    return body


def _subject_token(request: web.Request, fields: dict[str, Any], form: bool) -> str:
    if form:
        if fields.get("grant_type") != GRANT_TYPE:
            raise BadRequest("unsupported_grant_type", f"grant_type must be {GRANT_TYPE}")
        if fields.get("subject_token_type") not in JWT_TYPES:
            raise BadRequest("invalid_request", "subject_token_type must be a JWT type")
        token = str(fields.get("subject_token", "")).strip()
    else:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
    if not token:
        raise Unauthenticated("no_credential", "send the workload identity token")
    return token


def _resources(fields: dict[str, Any]) -> list[str]:
    names = []
    for key in ("resource", "audience"):
        value = fields.get(key)
        if isinstance(value, str) and value:
            names.extend(value.split())
    return names


def _text(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT or any(ord(c) < 0x20 for c in value):
        raise ValueError(f"{name}: text of at most {MAX_TEXT} characters")
    return value


def _max_uses(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        uses = int(value)
    except (TypeError, ValueError):
        raise ValueError("max_uses: a positive integer") from None
    if isinstance(value, bool) or not 0 < uses <= MAX_USES:
        raise ValueError(f"max_uses: a positive integer up to {MAX_USES}")
    return uses


def _idle_ttl(value: Any) -> float | None:
    idle_ttl = _ttl(value, "idle_ttl")
    if idle_ttl is not None and idle_ttl < MIN_IDLE_TTL:
        raise ValueError(f"idle_ttl: at least {MIN_IDLE_TTL:.0f}s")
    return idle_ttl


def _ttl(value: Any, name: str = "ttl") -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    try:
        # The same duration syntax as the configuration file.
        return parse_duration(value, name)
    except ConfigError:
        raise ValueError(f"{name}: a positive duration such as 300 or 5m") from None
