"""Each configured issuer and its current key set, kept fresh without making requests wait.

A request never waits for the issuer while it has keys that are good enough
(stale-while-revalidate): once the set is older than `jwks_cache_ttl` the request is
answered with it and a refresh starts in the background, one at a time, and after a failed
one not again before `jwks_refetch_cooldown`. Past `jwks_max_staleness` since the last
successful fetch the set is no longer trusted: requests wait for a fetch (at most one per
cooldown) and are refused with `Unavailable("issuer_keys_stale")` (503) while it fails. A
request does wait when there is nothing to answer with: no keys yet (`jwks_unavailable` if
the fetch fails), or a `kid` the set lacks, which forces a refetch at most once per cooldown.
Concurrent verifications share one fetch. The fetches are tasks owned by the verifier and
cancelled by `aclose()`, and by a reload for the issuers it replaces or removes.

SECURITY: no event names anything derived from a token; JWKS events log the issuer name, the
URL, key counts and what went wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import structlog

from keyproxy.config import Issuer
from keyproxy.errors import RequestError, Unauthenticated, Unavailable
from keyproxy.identity.keys import FetchError, KeySet, fetch_keys

log = structlog.get_logger("keyproxy.identity")


class IssuerKeys:
    """The configured issuers and their keys; `IdentityVerifier` verifies tokens with them."""

    def __init__(
        self,
        issuers: Sequence[Issuer],
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._clock = clock
        self._closed = False
        self._issuers: dict[str, IssuerState] = {}
        for issuer in issuers:
            if issuer.issuer in self._issuers:
                raise ValueError(f"issuer {issuer.issuer!r} is configured twice")
            self._issuers[issuer.issuer] = IssuerState(issuer)

    async def reconfigure(self, issuers: Sequence[Issuer]) -> bool:
        """Verify with `issuers` from now on (a reload). An issuer whose settings are unchanged
        keeps its keys; a new or changed one has its keys fetched first (failures logged, as
        at start-up). True if any issuer was removed or changed: what verified a remembered
        token may no longer be trusted."""
        states: dict[str, IssuerState] = {}
        fresh = []
        for issuer in issuers:
            if issuer.issuer in states:
                raise ValueError(f"issuer {issuer.issuer!r} is configured twice")
            state = self._issuers.get(issuer.issuer)
            if state is None or state.issuer != issuer:
                state = IssuerState(issuer)
                fresh.append(state)
            states[issuer.issuer] = state
        try:
            await asyncio.gather(*(self._prefetch(state) for state in fresh))
        except asyncio.CancelledError:
            # The reload was abandoned: its new issuers are no one's, nor are their fetches.
            await _stop_fetches(fresh)
            raise
        kept = {id(state) for state in states.values()}
        dropped = [s for s in self._issuers.values() if id(s) not in kept]
        self._issuers = states
        for state in dropped:
            if state.fetch is not None:
                state.fetch.cancel()
        return bool(dropped)

    async def prefetch(self) -> None:
        """Fetch every issuer's keys once; failures are logged, not raised."""
        await asyncio.gather(*(self._prefetch(state) for state in self._issuers.values()))

    async def _prefetch(self, state: IssuerState) -> None:
        # _refresh has logged why it failed; verification retries after the cooldown.
        with contextlib.suppress(RequestError):
            await self._keys(state)

    async def aclose(self) -> None:
        """Stop the background key fetches; no new ones start after this."""
        self._closed = True
        await _stop_fetches(self._issuers.values())

    def key_status(self) -> dict[str, dict[str, Any]]:
        """Per issuer name: age of its keys (None before the first fetch), how many are
        usable (None before the first fetch; 0: every token of the issuer is refused),
        whether they are past jwks_max_staleness, whether a fetch is running, and stale
        refusals so far."""
        now = self._clock()
        status = {}
        for state in self._issuers.values():
            age = None if state.keys is None else max(0.0, now - state.fetched_at)
            status[state.issuer.name] = {
                "age": age,
                "keys": None if state.keys is None else state.keys.size,
                "stale": age is not None and age > state.issuer.jwks_max_staleness,
                "fetching": running(state) is not None,
                "stale_refusals": state.stale_refusals,
            }
        return status

    async def _key(self, state: IssuerState, kid: str | None, alg: str) -> jwt.PyJWK:
        found = (await self._keys(state)).find(kid)
        if found is None:
            found = (await self._keys(state, unknown_kid=True)).find(kid)
        if found is None:
            raise Unauthenticated("unknown_kid", "no key of the issuer fits")
        key = found.get(alg)
        if key is None:
            raise Unauthenticated("bad_signature", "the issuer's key does not fit the algorithm")
        return key

    async def _keys(self, state: IssuerState, *, unknown_kid: bool = False) -> KeySet:
        """The issuer's keys: at once while they are good enough, else after a fetch."""
        now = self._clock()
        if state.keys is not None and not unknown_kid:
            age = now - state.fetched_at
            if age < state.issuer.jwks_cache_ttl:
                return state.keys
            if age <= state.issuer.jwks_max_staleness:
                # Stale-while-revalidate: this request does not wait for the issuer.
                if running(state) is None and self._may_fetch(state, now, forced=False):
                    self._start_fetch(state, forced=False)
                return state.keys
        # Nothing to answer with: no keys, keys too old to trust, or a kid they lack.
        # Single flight: a fetch already running brings what this caller needs too.
        fetch = running(state)
        if fetch is None and self._may_fetch(state, now, forced=unknown_kid):
            fetch = self._start_fetch(state, forced=unknown_kid)
        if fetch is not None:
            # Waited for, not awaited: a caller that gives up must not cancel the fetch others
            # wait for, and a fetch a reload or aclose() stopped is no cancellation of theirs.
            await asyncio.wait([fetch])
        return self._usable(state)

    def _replaced(self, state: IssuerState) -> bool:
        """Whether a reload has replaced or removed the issuer of `state` since it was read."""
        return self._issuers.get(state.issuer.issuer) is not state

    def _usable(self, state: IssuerState) -> KeySet:
        if state.keys is None:
            raise Unauthenticated("jwks_unavailable", "the issuer's keys are unavailable")
        if self._clock() - state.fetched_at > state.issuer.jwks_max_staleness:
            # Fail closed: keys this old may include one the issuer has since withdrawn.
            state.stale_refusals += 1
            raise Unavailable("issuer_keys_stale", "the issuer's keys are too old to trust")
        return state.keys

    def _may_fetch(self, state: IssuerState, now: float, *, forced: bool) -> bool:
        if self._closed:
            return False
        cooldown = state.issuer.jwks_refetch_cooldown
        if forced:
            return state.last_forced is None or now - state.last_forced >= cooldown
        # After a failure not more often than the cooldown, so unauthenticated traffic
        # cannot turn an issuer outage into a fetch storm.
        return state.last_failure is None or now - state.last_failure >= cooldown

    def _start_fetch(self, state: IssuerState, *, forced: bool) -> asyncio.Task[None]:
        if forced:
            state.last_forced = self._clock()
        # Owned: kept in the issuer's state until done, cancelled by aclose().
        state.fetch = asyncio.create_task(
            self._refresh(state), name=f"jwks-fetch-{state.issuer.name}"
        )
        return state.fetch

    async def _refresh(self, state: IssuerState) -> None:
        issuer, now = state.issuer, self._clock()
        try:
            keys, url = await fetch_keys(issuer, self._session)
        except FetchError as exc:
            self._failed(state, now, exc.url, exc.message)
        except Exception as exc:  # a bug: a failed fetch, not a dead task
            log.exception("jwks_fetch_crashed", issuer=issuer.name)
            self._failed(state, now, source(issuer), type(exc).__name__)
        else:
            state.keys, state.fetched_at, state.last_failure = keys, now, None
            # No usable key refuses every token of the issuer: worth a warning.
            report = log.info if keys.size else log.warning
            report("jwks_fetched", issuer=issuer.name, url=url, keys=keys.size)

    def _failed(self, state: IssuerState, now: float, url: str, error: str) -> None:
        state.last_failure = now
        age = None if state.keys is None else now - state.fetched_at
        log.warning(
            "jwks_fetch_failed",
            issuer=state.issuer.name,
            url=url,
            error=error,
            serving_cached=age is not None and age <= state.issuer.jwks_max_staleness,
            keys_age=age,
        )


@dataclass
class IssuerState:
    """What the verifier knows about one issuer's keys; `keys` changes only in `_refresh`."""

    issuer: Issuer
    keys: KeySet | None = None
    fetched_at: float = 0.0  # when the fetch that brought `keys` started
    last_failure: float | None = None
    last_forced: float | None = None
    fetch: asyncio.Task[None] | None = None  # the one running (or last) fetch
    stale_refusals: int = 0


def running(state: IssuerState) -> asyncio.Task[None] | None:
    return state.fetch if state.fetch is not None and not state.fetch.done() else None


def source(issuer: Issuer) -> str:
    return str(issuer.discovery_url or issuer.jwks_uri or issuer.jwks_file)


async def _stop_fetches(states: Iterable[IssuerState]) -> None:
    """Cancel the key fetches of `states` under way, and wait for them to end."""
    fetches = [s.fetch for s in states if s.fetch is not None]
    for fetch in fetches:
        fetch.cancel()
    await asyncio.gather(*fetches, return_exceptions=True)
