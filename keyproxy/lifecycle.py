"""A task token's holder keeps it alive and ends it: the broker's lifecycle endpoints.

    POST /token/heartbeat   Bearer task token, empty body: renew its heartbeat lease
                            -> {"token_id", "idle_expires_at"}
    POST /token/revoke      Bearer task token, optional body {"reason": "completed" |
                            "failed" | "timeout"} (no body: completed) -> {"revoked": id}

A heartbeat is cheap: the token is verified locally and the lease renewed in the state store,
with no Vault call. A heartbeat that finds the lease lapsed (`heartbeat_lost`), or a token it
was delegated from revoked (`parent_revoked`), is refused with 401 and records the token's end
with that reason: its `token.revoked` event, the `keyproxy_tokens_ended_total` metric, and the
revocation that every token delegated from it dies with.
"""

from __future__ import annotations

from typing import Final

import structlog
from aiohttp import web

from keyproxy import policy, strictjson
from keyproxy.answers import REQUEST_ID_KEY
from keyproxy.asked import read_body, refuse_unknown
from keyproxy.config import Config
from keyproxy.errors import (
    BadRequest,
    RequestError,
    Unauthenticated,
    VaultError,
)
from keyproxy.headers import REQUEST_ID, bearer_token, request_id
from keyproxy.metrics import Metrics
from keyproxy.mtls import check_binding, client_chain
from keyproxy.tls import ServerTLS
from keyproxy.tokens import (
    HOLDER_REASONS,
    TaskToken,
    TaskTokens,
    is_task_token,
    needs_shared_store,
)

MAX_REVOKE_BODY: Final = 1024
SERVER_ENDS: Final = frozenset({"heartbeat_lost", "parent_revoked"})

log = structlog.get_logger("keyproxy.audit")


class Lifecycle:
    """The heartbeat and revoke endpoints (the base of `keyproxy.broker.Broker`)."""

    config: Config
    tls: ServerTLS | None
    tasks: TaskTokens
    metrics: Metrics | None
    exact_uses: bool

    def _count(self, event: str) -> None:
        if self.metrics is not None:
            self.metrics.tokens.labels(event).inc()

    async def _held(self, request: web.Request) -> TaskToken:
        """The task token the request presents as its Bearer credential, verified (also when
        a token it was delegated from is revoked: the caller decides)."""
        token = bearer_token(request.headers, request.raw_path)  # once, in one place
        if not is_task_token(token):
            raise Unauthenticated("no_credential", "send the task token as a Bearer token")
        task = await self.tasks.verify(token, for_use=False)
        # SECURITY: bound as at the proxy. A bound token taken from its holder can neither
        # keep its lease alive nor end its task (and its sub-agents') from elsewhere.
        chain, _ = client_chain(request, self.config.server, self.tls)
        check_binding(task, chain, self.tls.verifier if self.tls is not None else None)
        if task.source is not None:
            source = policy.client_address(
                request.remote or "0.0.0.0",  # noqa: S104  # no address matches no CIDR
                request.headers.getall("X-Forwarded-For", []),
                self.config.server.trusted_proxies,
            )
            if task.source != str(source):
                raise Unauthenticated("wrong_source", "this token is bound to another address")
        return task

    async def heartbeat(self, request: web.Request) -> web.Response:
        """Renew the presented token's heartbeat lease."""
        rid = request[REQUEST_ID_KEY] = request_id(request.headers)
        with structlog.contextvars.bound_contextvars(request_id=rid):
            try:
                task = await self._held(request)
                if not self.exact_uses and task.idle_ttl is not None:
                    raise needs_shared_store(())  # a lease's renewal: idle_ttl's refusal
                idle_expires_at = await self._renew(task)
            except RequestError as exc:
                log.warning("token.heartbeat_denied", reason=exc.reason, source=request.remote)
                raise
        body = {"token_id": task.token_id, "idle_expires_at": idle_expires_at}
        return web.json_response(body, headers={REQUEST_ID: rid, "Cache-Control": "no-store"})

    async def _renew(self, task: TaskToken) -> float:
        try:
            return await self.tasks.heartbeat(task)
        except Unauthenticated as exc:
            if exc.reason in SERVER_ENDS:
                await self._record_end(task, exc.reason)
            raise

    async def _record_end(self, task: TaskToken, reason: str) -> None:
        """Revoke a token found ended, naming why; the refusal stands even if Vault is down
        (the token is dead either way: its lease lapsed, or its parent is revoked)."""
        try:
            await self.tasks.revoke_held(task, reason)
        except (RequestError, VaultError) as exc:
            log.warning("token.end_not_recorded", error=str(exc), token_id=task.token_id)

    async def revoke(self, request: web.Request) -> web.Response:
        """The holder ends its task: the token revokes itself, naming why."""
        rid = request[REQUEST_ID_KEY] = request_id(request.headers)
        with structlog.contextvars.bound_contextvars(request_id=rid):
            try:
                task = await self._held(request)
                reason = await _reason(request)
                await self.tasks.revoke_held(task, reason)  # writes the one token.revoked event
            except RequestError as exc:
                log.warning("token.revoke_denied", reason=exc.reason, source=request.remote)
                raise
        self._count("revoked")
        return web.json_response({"revoked": task.token_id}, headers={REQUEST_ID: rid})


async def _reason(request: web.Request) -> str:
    """The end reason the holder gives (no body: completed)."""
    raw = await read_body(request, MAX_REVOKE_BODY)
    if raw is not None and not raw.strip():
        return "completed"
    try:
        body = strictjson.loads(raw) if raw is not None else None  # invariant 12
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict):
        # SECURITY: as the exchange's fields: a misspelt `reson` would record the end as
        # completed, whatever its holder meant.
        refuse_unknown(body, ("reason",))
    reason = body.get("reason", "completed") if isinstance(body, dict) else None
    if reason not in HOLDER_REASONS:
        raise BadRequest(
            "invalid_request", f'the body is {{"reason": one of {", ".join(HOLDER_REASONS)}}}'
        )
    return str(reason)
