"""Delegation: a task token exchanged for a narrower one, for a sub-agent (RFC 8693).

The parent task token is the `subject_token` (the form) or the Bearer credential (JSON); the
sub-agent's own workload identity may come as `actor_token` (with `actor_token_type`, a JWT
type, in the form). The child is never more than its parent:

    scope      within the parent's, or refused (403 exceeds_parent_scope, naming what is not);
               left out, the parent's (403 nothing_granted if none of its routes is left)
    TTL        narrowed to the parent's remaining life (the answer's expires_in says so)
    max_uses   at most what the parent has left (403 exceeds_parent_uses), and every use of
               the child counts against the parent's max_uses as well
    limits     the parent's: the child keeps its identity and task, and per-token limits count
               the whole chain as its root
    idle_ttl   its own if asked (below its TTL); it also dies with the parent's heartbeat
    depth      at most `tokens.max_delegation_depth` delegations from the root token
               (403 delegation_too_deep)

It keeps the parent's identity (`sub`, `idp`, `ctx`: current policy still decides each
request) and task; its `act` claim names the actor chain and `anc` its ancestors
(keyproxy.tokens.lineage). An exception token is not delegated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from keyproxy import scope as scopes
from keyproxy.errors import BadRequest, Forbidden, Unavailable
from keyproxy.state import Counter, StateStore, StoreUnavailable
from keyproxy.state.limits import token_limits
from keyproxy.tokens import LEEWAY, TaskToken


@dataclass(frozen=True)
class Child:
    """What a delegated token is issued with."""

    scope: scopes.Scope
    ttl: float
    max_uses: int | None
    narrowed_ttl: bool  # the TTL asked for was cut to the parent's remaining life


def narrow(  # what the request asked, and what the parent allows
    parent: TaskToken,
    requested: scopes.Scope,
    asked_ttl: float | None,
    max_uses: int | None,
    *,
    default_ttl: float,
    max_depth: int,
    uses_left: int | None,
    now: float,
) -> Child:
    """The child's grant from what was asked and what `parent` holds, or the error saying
    which bound was crossed. `uses_left` is the parent's max_uses minus its uses so far."""
    if parent.exception_owner is not None:
        raise Forbidden("not_delegable", "an exception token cannot be delegated")
    if len(parent.ancestors) + 1 > max_depth:
        raise Forbidden(
            "delegation_too_deep", f"a token may be delegated at most {max_depth} times over"
        )
    scope = requested or parent.scope
    if not scope:  # a reload, or a replica, with none of the parent's routes configured
        raise Forbidden("nothing_granted", "the parent token holds no route configured here")
    beyond = scopes.outside(scope, parent.scope)
    if beyond:
        raise Forbidden(
            "exceeds_parent_scope", "the parent token does not hold: " + ", ".join(beyond[:8])
        )
    remaining = parent.expires_at - now
    if remaining < 1:
        raise Forbidden("parent_expiring", "the parent token expires in less than a second")
    wanted = asked_ttl if asked_ttl is not None else min(default_ttl, remaining)
    if max_uses is not None and uses_left is not None and max_uses > uses_left:
        raise Forbidden(
            "exceeds_parent_uses", f"the parent token has {uses_left} uses left, not {max_uses}"
        )
    return Child(scope, min(wanted, remaining), max_uses, wanted > remaining)


async def uses_left(parent: TaskToken, store: StateStore | None, now: float) -> int | None:
    """How many uses the parent (and its ancestors) have left: the least of them; None when
    none has max_uses."""
    left: int | None = None
    for limit in token_limits(parent.lifecycle, now, LEEWAY):
        if not isinstance(limit, Counter):
            continue
        if store is None:
            raise Unavailable("state_store_unavailable", "this server counts no uses")
        try:
            used = await store.read(limit)
        except StoreUnavailable:
            raise Unavailable("state_store_unavailable", "cannot read the parent's uses") from None
        room = max(0, limit.cap - used)
        left = room if left is None else min(left, room)
    return left


def same_task(parent: TaskToken, fields: dict[str, Any]) -> None:
    """A child works on its parent's task: asking for another is refused."""
    task = fields.get("task")
    if task not in (None, "", parent.task):
        raise BadRequest("invalid_request", "a delegated token keeps its parent's task")
