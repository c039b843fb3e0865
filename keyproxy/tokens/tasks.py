"""Task tokens: keyproxy's own short-lived, scoped, revocable credentials.

`TaskTokens` issues (`signing`), verifies (`verify`) and revokes (`revocation`) them, keeps
the exception register (`exceptions`), renews heartbeat leases (`heartbeat`), and runs the
background work: the revocation poll, the key refresh, and the lease sweep (an idle_ttl token
this process issued whose lease lapsed is recorded as ended, `heartbeat_lost`, within a
second or so, whether or not anyone uses it again). The token's format is in `format`,
its lifecycle claims in `lineage`.
"""

from __future__ import annotations

import asyncio

import structlog

from keyproxy.config import Config
from keyproxy.errors import BadRequest, RequestError, Unauthenticated, Unavailable, VaultError
from keyproxy.state import Lease, StoreUnavailable
from keyproxy.state.limits import lease_key
from keyproxy.tokens.format import LEEWAY, TaskToken
from keyproxy.tokens.verify import Verifier

log = structlog.get_logger("keyproxy.tokens")

LEASE_SWEEP_INTERVAL = 1.0  # seconds between looks at the leases of tokens issued here


class TaskTokens(Verifier):
    """Issue, verify and revoke task tokens for one configuration."""

    def reconfigure(self, config: Config) -> None:
        """Follow `config` (a reload): its token settings apply to tokens issued from now on,
        and tokens are verified against its routes. Signing keys, revocations and use
        counts carry over."""
        self.config, self.cfg = config, config.tokens
        self._policy_claims = sorted({name for p in config.policies for name, _ in p.claims})
        self._verified.clear()  # their scopes were read against the old routes

    async def heartbeat(self, token: TaskToken) -> float:
        """Renew a verified token's heartbeat lease; its new end (epoch seconds). Raises
        Unauthenticated("heartbeat_lost") if its lease already lapsed (a lapsed lease is never
        brought back), or "parent_revoked" if a token it was delegated from is revoked or
        lost its own heartbeat. One store
        call for a token not delegated from a leased one; no Vault call."""
        if token.idle_ttl is None:
            raise BadRequest("no_idle_ttl", "this token was issued without idle_ttl")
        if self.store is None:
            raise Unavailable("idle_ttl_unavailable", "this server keeps no heartbeat leases")
        if token.ancestors and self._revocations.any_id(token.ancestors):
            raise Unauthenticated("parent_revoked", "a token it was delegated from was revoked")
        if token.ancestors and self._revocations.any_actor(token):
            raise Unauthenticated("revoked", "an identity acting with this token was revoked")
        await self.check_leases(token, own=False)
        try:
            renewed = await self.store.renew(lease_key(token.token_id), token.idle_ttl)
        except StoreUnavailable:
            raise Unavailable("state_store_unavailable", "cannot renew the lease now") from None
        if not renewed:
            raise Unauthenticated("heartbeat_lost", "the heartbeat lease already lapsed")
        return self.clock() + token.idle_ttl

    async def check_leases(self, token: TaskToken, *, own: bool = True) -> None:
        """Refuse a token whose heartbeat lease (with `own`), or an ancestor's, lapsed."""
        leased = [link for link in token.lifecycle if link.idle_ttl is not None]
        if not own:
            leased = [link for link in leased if link.token_id != token.token_id]
        if not leased:
            return
        if self.store is None:
            raise Unavailable("idle_ttl_unavailable", "this server keeps no heartbeat leases")
        for link in leased:
            try:
                alive = await self.store.alive(lease_key(link.token_id))
            except StoreUnavailable:
                raise Unavailable("state_store_unavailable", "cannot check the lease now") from None
            if not alive:
                mine = link.token_id == token.token_id
                raise Unauthenticated(
                    "heartbeat_lost" if mine else "parent_revoked",
                    "the heartbeat lease lapsed"
                    if mine
                    else "a token it was delegated from lost its heartbeat",
                )

    async def run(self) -> None:
        """Background work until cancelled: poll revocations, and re-read the public keys
        every key_refresh_interval."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._poll_revocations(), name="token-revocations")
            group.create_task(self._refresh_keys_regularly(), name="token-keys")
            group.create_task(self._sweep_leases_regularly(), name="token-leases")

    async def _sweep_leases_regularly(self) -> None:
        while True:
            await asyncio.sleep(LEASE_SWEEP_INTERVAL)
            await self.sweep_leases()

    async def sweep_leases(self) -> None:
        """Record the end (`heartbeat_lost`) of each token issued here whose lease lapsed and
        that no revocation names yet. One store call for all of them; a store or Vault fault
        leaves them for the next sweep."""
        now = self.clock()
        self._leased = {k: c for k, c in self._leased.items() if c["exp"] + LEEWAY > now}
        if not self._leased or self.store is None:
            return
        ids = list(self._leased)
        decision = await self.store.take([Lease(lease_key(token_id)) for token_id in ids])
        lapsed = [
            token_id
            for token_id, outcome in zip(ids, decision.outcomes, strict=True)
            if not (outcome.allowed or outcome.store_error)
        ]
        # All at once: their revocations share one write to the list.
        await asyncio.gather(*(self._record_lapsed(token_id) for token_id in lapsed))

    async def _record_lapsed(self, token_id: str) -> None:
        """Record the end of a token whose lease lapsed, unless a revocation names it."""
        claims = self._leased.get(token_id)
        if claims is None:
            return
        try:
            token = self._task_token(claims)
            if not self._revocations.revoked(token):
                await self.revoke_held(token, "heartbeat_lost")
        except (RequestError, VaultError) as exc:
            # Tried again at the next sweep, while the token has not expired.
            log.warning("token.end_not_recorded", error=str(exc), token_id=token_id)
            return
        self._leased.pop(token_id, None)

    async def _poll_revocations(self) -> None:
        while True:
            try:
                await self.refresh_revocations()
            except VaultError as exc:
                log.warning("revocations_refresh_failed", error=str(exc))
            await asyncio.sleep(self.cfg.revocation_poll_interval)
