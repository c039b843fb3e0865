"""Which limits one request touches, as the store's `Limit`s, and how they are named.

`RequestLimits` is prepared once per configuration. For a request it lists, for one `take`:

- the task token's lifecycle (`token_limits`): its `max_uses`, a `Counter` keyed by the token
  id that expires with the token, and its heartbeat lease (`idle_ttl`), a `Lease`; for a
  delegated token also those of every ancestor, so a child's use counts against its parent's
  `max_uses` and the child dies with its parent's heartbeat;
- the route's `limits`, and those of the policy that allowed the request (an exception
  token is allowed by no policy: only the route's apply).

A limit's store key is `<name>:<who>`: the configured limit's name (`limit_name` reads it
back, for the audit event and the metrics) and whom it counts, per `per`:

    identity   the workload identity: issuer and subject
    task       that identity's task (a task token's `task`); a request without one is not
               counted by a per-task limit (per-identity limits cover it)
    token      the token's id (a task token's, or an identity token's `jti`); without an id,
               the identity. A delegated token counts as its root: the whole chain shares it
    route      everyone on the route together (the upstream's own quota)

SECURITY: the `who` part is a digest of identifiers, never of a credential, and the keys are
readable by whoever reads the store.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from typing import Protocol

from keyproxy.caller import Identity
from keyproxy.config import MAX_USES, ConcurrencyLimit, Config, Limits, RateLimit
from keyproxy.state.store import Concurrency, Counter, Decision, Lease, Limit, OnStoreError, Rate

_KNOWN = 4096  # callers whose limits are kept ready (forgotten all at once when full)


def limit_name(limit: Limit) -> str:
    """The configured name of a limit the store answered for (`max_uses` for a token's)."""
    return limit.key.partition(":")[0]


class TokenLink(Protocol):
    """A task token as its limits see it (keyproxy.tokens.Link)."""

    @property
    def token_id(self) -> str: ...
    @property
    def expires_at(self) -> float: ...
    @property
    def max_uses(self) -> int | None: ...
    @property
    def idle_ttl(self) -> float | None: ...


def lease_key(token_id: str) -> str:
    """The store key of a task token's heartbeat lease (`StateStore.beat`)."""
    return f"lease:{token_id}"


def token_limits(links: Sequence[TokenLink], now: float, leeway: float) -> list[Limit]:
    """The limits a task token's lifecycle links impose (its ancestors' and its own): each
    one's `max_uses` counter, kept until that token's expiry plus `leeway`, and its
    heartbeat lease."""
    found: list[Limit] = []
    for link in links:
        if link.max_uses is not None:
            ttl = max(1.0, link.expires_at + leeway - now)
            found.append(Counter(f"{MAX_USES}:{link.token_id}", link.max_uses, ttl))
        if link.idle_ttl is not None:
            found.append(Lease(lease_key(link.token_id)))
    return found


def identity_rate(configured: RateLimit, identity: Identity) -> Limit:
    """The rate `configured` counted for one workload identity (`tokens.exchange_limit`)."""
    return _limit(configured, f"{configured.name}:{_who(identity.issuer, identity.subject)}")


def _who(*parts: str) -> str:
    # A digest: identifiers can hold any character, and the store's keys may not hold braces.
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=16).hexdigest()


class RequestLimits:
    """The limits of one configuration, ready to be listed per request."""

    def __init__(self, config: Config) -> None:
        self._routes: Mapping[str, Limits] = {n: r.limits for n, r in config.routes.items()}
        self._policies: Mapping[str, Limits] = {p.name: p.limits for p in config.policies}
        # The configured limits of recent callers, ready: the same caller on the same route
        # touches the same keys, and naming them costs a digest and a few objects each.
        # Buys 34,000 instructions per limited request, 2.5% (bench/instructions.py --limits
        # --compare, docs/performance.md).
        self._known: dict[tuple[str | None, ...], tuple[Limit, ...]] = {}

    def limited(self, route: str, policy: str | None) -> bool:
        """Whether requests to `route` allowed by `policy` touch any configured limit."""
        return bool(self._routes[route]) or bool(policy and self._policies[policy])

    def of(  # noqa: PLR0917  # what the steps before produced
        self,
        route: str,
        policy: str | None,
        identity: Identity,
        task: str | None,
        token_id: str | None,
        own: Sequence[Limit] = (),
    ) -> tuple[Limit, ...]:
        """The limits a request touches: the token's `own` (`token_limits`), then the
        configured ones. `token_id` names the token per-token limits count (a delegated
        token's root)."""
        asked = (route, policy, identity.issuer, identity.subject, task, token_id)
        configured = self._known.get(asked)
        if configured is None:
            configured = self._configured(route, policy, identity, task, token_id)
            if len(self._known) >= _KNOWN:
                self._known.clear()
            self._known[asked] = configured
        return (*own, *configured) if own else configured

    def _configured(
        self,
        route: str,
        policy: str | None,
        identity: Identity,
        task: str | None,
        token_id: str | None,
    ) -> tuple[Limit, ...]:
        found: list[Limit] = []
        groups = [self._routes[route]]
        if policy is not None:
            groups.append(self._policies[policy])
        for group in groups:
            for configured in group.all():
                who = _whom(configured, route, identity, task, token_id)
                if who is not None:
                    found.append(_limit(configured, f"{configured.name}:{who}"))
        return tuple(found)


def _whom(
    limit: RateLimit | ConcurrencyLimit,
    route: str,
    identity: Identity,
    task: str | None,
    token_id: str | None,
) -> str | None:
    if limit.per == "route":
        return _who(route)
    if limit.per == "task":
        return None if task is None else _who(identity.issuer, identity.subject, task)
    if limit.per == "token" and token_id is not None:
        return _who(token_id)
    return _who(identity.issuer, identity.subject)


def _limit(configured: RateLimit | ConcurrencyLimit, key: str) -> Limit:
    on_error = OnStoreError(configured.on_store_error)
    if isinstance(configured, RateLimit):
        return Rate(key, configured.requests, configured.window, configured.burst, on_error)
    return Concurrency(key, configured.max, configured.lease, on_error)


def headers(decision: Decision) -> dict[str, str]:
    """The `RateLimit` and `RateLimit-Policy` fields (IETF httpapi ratelimit-headers draft)
    for the limits of a decision, and `Retry-After` when it was refused."""
    policies, states = [], []
    for outcome in decision.outcomes:
        limit = outcome.limit
        if isinstance(limit, Lease):
            continue  # not a quota: a lapsed lease refuses the token outright
        name = limit_name(limit)
        if isinstance(limit, Rate):
            policies.append(f'"{name}";q={limit.limit};w={_seconds(limit.window)}')
        elif isinstance(limit, Counter):
            policies.append(f'"{name}";q={limit.cap}')
        else:
            policies.append(f'"{name}";q={limit.limit};qu="concurrent-requests"')
        states.append(f'"{name}";r={outcome.remaining};t={_seconds(outcome.reset)}')
    fields = {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(states)}
    if not decision.allowed:
        fields["Retry-After"] = str(decision.retry_after)
    return fields


def _seconds(value: float) -> int:
    return max(0, math.ceil(value))
