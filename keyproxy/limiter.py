"""The proxy's limit step: every limit one request touches, taken at once in the state store.

`Limiter.admit` takes one unit of each limit the request touches (the task token's
`max_uses` and heartbeat lease, and those of the tokens it was delegated from; the route's
limits, the allowing policy's) in one decision of the state store (keyproxy.state: in
process, or one round trip to Valkey/Redis), or stops the request:

    token_exhausted               401   the token's max_uses are spent (it never works again)
    heartbeat_lost                401   its idle_ttl lease lapsed (it never works again)
    parent_revoked                401   the lease of a token it was delegated from lapsed
    rate_limited, too_many_...    429   with Retry-After, RateLimit and RateLimit-Policy
    state_store_unavailable       503   a fail-closed limit the store could not decide
    max_uses_needs_shared_store   503   a max_uses token (or one delegated from such) on one
                                        of several workers counting in their own memory
    idle_ttl_needs_shared_store   503   the same for a chain with leases and no max_uses
                                        (docs/security.md)

`Limiter.held(admitted)` holds the decision's concurrency slots while the answer is sent,
released however the request ends.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Final

from keyproxy import state
from keyproxy.caller import Identity
from keyproxy.config import Config
from keyproxy.errors import RequestError, TooManyRequests, Unauthenticated, Unavailable
from keyproxy.state.limits import RequestLimits, lease_key, limit_name, token_limits
from keyproxy.state.limits import headers as ratelimit_headers
from keyproxy.state.memory import MemoryStore
from keyproxy.tokens import LEEWAY, TaskToken, needs_shared_store

_UNLIMITED: Final = state.Decision(())  # a request that touches no limit
_NOTHING_HELD: Final = contextlib.nullcontext()


class Limiter:
    """The limits of one configuration, counted in `store`."""

    def __init__(
        self, config: Config, store: state.StateStore | None = None, *, exact_uses: bool = True
    ) -> None:
        self.store = store if store is not None else MemoryStore()
        # False when this process is one of several counting in its own memory: a token's
        # max_uses would be multiplied, so such tokens are refused (docs/security.md).
        self.exact_uses = exact_uses
        self.limits = RequestLimits(config)

    def held(self, admitted: state.Decision) -> contextlib.AbstractAsyncContextManager[object]:
        """The decision's concurrency slots, held until the answer has ended, however it
        ends (the body of the `async with`)."""
        return state.hold(self.store, admitted) if admitted.slots else _NOTHING_HELD

    async def admit(
        self,
        route: str,
        policy: str | None,
        identity: Identity,
        task: TaskToken | None,
        token_id: str | None,
    ) -> state.Decision:
        """One unit of every limit the request touches, or the error that stops it."""
        own: Sequence[state.Limit] = ()
        if task is not None and task.lifecycle:
            if not self.exact_uses:
                raise needs_shared_store(task.lifecycle)
            own = token_limits(task.lifecycle, time.time(), LEEWAY)
        elif not self.limits.limited(route, policy):
            return _UNLIMITED
        if task is not None and task.ancestors:
            token_id = task.ancestors[0].token_id  # the chain shares per-token limits
        limits = self.limits.of(
            route, policy, identity, task.task if task is not None else None, token_id, own
        )
        if not limits:
            return _UNLIMITED
        admitted = await self.store.take(limits)
        refused = admitted.refused_by
        if refused is None:
            return admitted
        if not refused.store_error and isinstance(refused.limit, state.Counter):
            name = limit_name(refused.limit)
            raise Unauthenticated("token_exhausted", "this token has no uses left", limit=name)
        if not refused.store_error and isinstance(refused.limit, state.Lease):
            assert task is not None  # only a task token's lifecycle names a lease
            if refused.limit.key == lease_key(task.token_id):
                raise Unauthenticated("heartbeat_lost", "the token's heartbeat lease lapsed")
            raise Unauthenticated("parent_revoked", "a token it was delegated from lost its lease")
        raise refusal(admitted)


def refusal(refused: state.Decision) -> RequestError:
    """The error answering a decision refused by a rate or a concurrency cap, or by a
    fail-closed limit the store could not decide: 429 or 503, with Retry-After."""
    by = refused.refused_by
    assert by is not None  # a refused decision names what refused it
    name = limit_name(by.limit)
    if by.store_error:
        return Unavailable(
            "state_store_unavailable",
            f"the limit {name} cannot be checked now: the state store is unavailable",
            retry_after=refused.retry_after,
            limit=name,
        )
    return TooManyRequests(
        by.reason,
        f"the limit {name} allows no more requests now",
        headers=ratelimit_headers(refused),
        limit=name,
    )
