"""Task tokens: keyproxy's own short-lived, scoped, revocable credentials.

`TaskTokens` issues (`signing`), verifies (`verify`) and revokes (`revocation`) them, keeps
the exception register (`exceptions`), renews heartbeat leases (`heartbeat`), and runs the
background work: the revocation poll, the key refresh, the lease sweep (an idle_ttl token
whose lease lapsed is recorded as ended, `heartbeat_lost`, within a second or so, whether or
not anyone uses it again, by one of the replicas sharing the state store), and the load of
the key that binds MCP sessions to their callers (`sessionseal`). The token's format is in
`format`, its lifecycle claims in `lineage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools

import structlog

from keyproxy.config import Config
from keyproxy.errors import BadRequest, RequestError, Unauthenticated, Unavailable, VaultError
from keyproxy.state import StoreUnavailable
from keyproxy.state.limits import lease_key
from keyproxy.tokens.format import CLOCK_SKEW, LEEWAY, TaskToken
from keyproxy.tokens.inflight import UNVERIFIABLE
from keyproxy.tokens.sessionseal import SessionSeal
from keyproxy.tokens.verify import Verifier, trusted_issuers

log = structlog.get_logger("keyproxy.tokens")

LEASE_SWEEP_INTERVAL = 1.0  # seconds between looks for lapsed leases
SWEEP_MOST = 500  # lapsed leases one sweep records at most (the rest wait for the next)
LEASE_CLAIM = 30.0  # seconds a lapsed lease handed to a sweep waits before another may take it


class TaskTokens(Verifier):
    """Issue, verify and revoke task tokens for one configuration."""

    @functools.cached_property
    def seal(self) -> SessionSeal:
        """MCP session ids bound to their callers, keyed beside the revocation list; it
        follows a reload's configuration in `prepare`, before the swap."""
        return SessionSeal(self.vault, self.config)

    def reconfigure(self, config: Config) -> None:
        """Follow `config` (a reload): its token settings apply to tokens issued from now on,
        and tokens are verified against its routes. Signing keys, revocations and use
        counts carry over; the revocation list is read again first if `tokens.state_path`
        moved, and the public keys if another Transit key signs."""
        moved = config.tokens.state_path != self.cfg.state_path
        signer = self._signer()
        self.config, self.cfg = config, config.tokens
        if moved:
            self._moved()
        if self._signer() != signer:
            self._signer_moved()
        self._policy_claims = sorted({name for p in config.policies for name, _ in p.claims})
        self.trusted_issuers = trusted_issuers(config)
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
        await self.list_read(for_use=False)  # a renewal is no use: every use checks a current list
        refusal = self._revocations.chain_refusal(token)
        if refusal is not None:
            raise refusal
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
        """Background work until cancelled: poll revocations, end the requests under way
        whose token ended, and re-read the public keys every key_refresh_interval."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._poll_revocations(), name="token-revocations")
            group.create_task(self._end_expired_regularly(), name="token-expiries")
            group.create_task(self._end_unjudgeable_regularly(), name="token-inflight")
            group.create_task(self._refresh_keys_regularly(), name="token-keys")
            group.create_task(self._sweep_leases_regularly(), name="token-leases")
            group.create_task(self.seal.run(), name="mcp-session-key")

    async def _sweep_leases_regularly(self) -> None:
        while True:
            await asyncio.sleep(LEASE_SWEEP_INTERVAL)
            try:
                await self.sweep_leases()
            except Exception:
                # SECURITY: never the end of the group, which would stop the revocation poll.
                log.exception("token_leases_sweep_failed")

    async def sweep_leases(self) -> None:
        """Record the end (`heartbeat_lost`) of each token whose lease lapsed and that no
        revocation names yet, whichever replica issued it: the store hands each lapsed lease
        to one sweeping replica at a time (`StateStore.lapsed`), also when the one that
        issued it is gone, and again after LEASE_CLAIM if that one did not finish (it
        stopped, or Vault could not be written)."""
        if self.store is None:
            return
        try:
            lapsed = await self.store.lapsed(SWEEP_MOST, LEASE_CLAIM)
        except StoreUnavailable:
            return  # tried again at the next sweep
        # All at once: their revocations share one write to the list.
        ended = await asyncio.gather(
            *(self._record_lapsed(key, record) for key, record in lapsed), return_exceptions=True
        )
        for outcome in ended:
            if isinstance(outcome, BaseException):
                log.error("token_leases_sweep_failed", error=type(outcome).__name__)

    async def _record_lapsed(self, key: str, record: str) -> None:
        """Record the end of a token whose lease `key` lapsed (`record`: its claims), unless
        a revocation names it or it has expired; either way take it off the store's list."""
        try:
            token = self._task_token(await self.lease_claims(record))
        except Unavailable:
            return  # its key is too old to trust or not read yet: handed out after LEASE_CLAIM
        except (ValueError, TypeError, RequestError) as exc:
            reason = exc.reason if isinstance(exc, RequestError) else "unreadable"
            await self._not_recorded(key, reason)
            return
        if key != lease_key(token.token_id):
            # SECURITY: a genuine record copied under another lease (one that lapsed, or never
            # was) would end a live token.
            await self._not_recorded(key, "wrong_lease")
            return
        if self._revocations.revoked(token) or token.expires_at + LEEWAY <= self.clock():
            await self._forget(key)
            return
        # The revocation list keeps an id no longer than the longest token lives from now:
        # a record signed before a reload shortened them cannot keep it longer. Its lease is
        # gone, so the token is refused everywhere whatever the list says.
        longest = max(self.cfg.max_ttl, self.cfg.exception_max_ttl)
        latest = self.clock() + longest + LEEWAY
        if token.expires_at > latest:
            token = dataclasses.replace(token, expires_at=latest)
        try:
            await self.revoke_held(token, "heartbeat_lost")  # which takes it off the list
        except (RequestError, VaultError) as exc:
            # Handed out again after LEASE_CLAIM, while the token has not expired.
            log.warning("token.end_not_recorded", error=str(exc), token_id=token.token_id)

    async def _not_recorded(self, key: str, reason: str) -> None:
        """Drop lease `key`'s record without recording an end: not one keyproxy signed for
        this lease (planted in the store), or not a token this configuration knows (a route
        a reload removed). Its lease is gone, so the token is refused anyway."""
        log.warning("token.end_not_recorded", error="unreadable lease record", reason=reason)
        await self._forget(key)

    async def _first_to_end(self, token: TaskToken) -> bool:
        """The first replica to mark the token ended in the store reports it (a holder's
        revoke, a heartbeat after the lapse and another replica's sweep can race); a store
        that cannot answer lets each report it rather than none. Its lease then ends and is
        no longer watched: every replica refuses the token (and what was delegated from it)
        at once, before its revocation poll."""
        if self.store is None:
            return True
        # As long as any replica (with a clock up to CLOCK_SKEW behind) could still see it.
        ttl = max(1.0, token.expires_at + LEEWAY + CLOCK_SKEW - self.clock())
        try:
            first = await self.store.first_end(f"end:{token.token_id}", ttl)
        except StoreUnavailable:
            first = True
        if token.idle_ttl is not None:
            await self._end_lease(token.token_id)
        return first

    async def _end_lease(self, token_id: str) -> None:
        if self.store is None:
            return
        key = lease_key(token_id)
        with contextlib.suppress(StoreUnavailable):  # then the revocation poll does it
            await self.store.drop(key)
        await self._forget(key)

    async def _forget(self, key: str) -> None:
        """Take lease `key` off the store's list (a store that cannot answer: the next
        sweep after LEASE_CLAIM tries again)."""
        if self.store is not None:
            with contextlib.suppress(StoreUnavailable):
                await self.store.unwatch(key)

    async def _poll_revocations(self) -> None:
        while True:
            try:
                await self.refresh_revocations()
            except VaultError as exc:
                log.warning("revocations_refresh_failed", error=str(exc))
            except Exception:  # a bug: the poll goes on, or no revocation would reach us
                log.exception("revocations_refresh_failed")
            await asyncio.sleep(self.cfg.revocation_poll_interval)

    async def _end_expired_regularly(self) -> None:
        """End the requests under way whose token expired, with no I/O: Vault's pace never
        delays an expiry (the list's check below may wait on it for vault.timeout)."""
        while True:
            await asyncio.sleep(self.cfg.revocation_poll_interval)
            try:
                self.inflight.end_dead()
            except Exception:  # a bug: never the end of the group, which holds the poll
                log.exception("inflight_check_failed")

    async def _end_unjudgeable_regularly(self) -> None:
        """As a new request would be refused, end every request under way once this
        replica's list is older than `revocation_max_staleness` and cannot be read (that read
        is waited for, as a new request waits; on its own timer, so a hung read delays
        neither the poll's next turn nor an expiry)."""
        while True:
            await asyncio.sleep(self.cfg.revocation_poll_interval)
            try:
                if self.inflight.requests and not self.list_current():
                    try:
                        await self.list_read()
                    except Unavailable:
                        self.inflight.end_all(UNVERIFIABLE)
            except Exception:  # a bug: never the end of the group, which holds the poll
                log.exception("inflight_check_failed")
