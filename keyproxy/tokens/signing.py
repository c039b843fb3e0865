"""Issuing task tokens: the Transit public keys (read at start, re-read in the background every
`key_refresh_interval`, and at once, at most every `key_refetch_cooldown`, for a version not
seen yet) and signing with the Transit key. Issuance reads the revocation list first, so an
identity or task revoked moments ago gets no new token that the revocation would cover.

While Vault cannot be read the known keys keep verifying for `key_max_staleness` after the
last good read; then task tokens are refused with `Unavailable("token_keys_stale")` (503)
until a read succeeds.

A token issued with `idle_ttl` starts its heartbeat lease in the state store before it is
handed out (`lease_key`); a child delegated from a task token carries the lineage claims of
`keyproxy.tokens.lineage`.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import structlog

from keyproxy import scope as scopes
from keyproxy.caller import Identity
from keyproxy.config import Config
from keyproxy.errors import BadRequest, Forbidden, Unauthenticated, Unavailable, VaultError
from keyproxy.state import StateStore, StoreUnavailable
from keyproxy.state.limits import lease_key
from keyproxy.tokens import lineage
from keyproxy.tokens.exceptions import ExceptionRegister
from keyproxy.tokens.format import (
    LEASE_RECORD_CONTEXT,
    LEEWAY,
    MAX_ISSUED_BYTES,
    TASK_TOKEN_TYPE,
    CertificateBinding,
    Issued,
    TaskToken,
    b64,
    exception_problem,
    json_bytes,
)
from keyproxy.tokens.revoked import Revocations
from keyproxy.vault import Vault

log = structlog.get_logger("keyproxy.tokens")


class Signing(ExceptionRegister):
    """The signing keys, and issuing tokens signed with them."""

    def __init__(
        self,
        config: Config,
        vault: Vault,
        clock: Callable[[], float] = time.time,
        *,
        store: StateStore | None = None,
    ) -> None:
        super().__init__(config, vault, clock)
        self.store = store  # where heartbeat leases live; None: no idle_ttl tokens
        self._keys: dict[int, jwt.PyJWK] = {}
        self._public: dict[int, bytes] = {}
        self._keys_fetched = -1e9
        self._keys_read_at: float | None = None  # self.clock() at the last good read
        self._keys_lock = asyncio.Lock()
        self.stale_refusals = 0
        self._policy_claims = sorted({name for p in config.policies for name, _ in p.claims})

    # ------------------------------------------------------------------ keys

    async def refresh_keys(self, *, force: bool = False) -> None:
        """Read the Transit public keys (at most once per cooldown unless forced)."""
        async with self._keys_lock:
            now = time.monotonic()
            if not force and now - self._keys_fetched < self.cfg.key_refetch_cooldown:
                return
            self._keys_fetched = now
            started = self.clock()
            signer = self._signer()
            public = await self.vault.transit_public_keys(*signer)
            if signer != self._signer():
                return  # a reload named another key meanwhile: these are not its versions
            # An unchanged version keeps its key object: tokens it verified stay remembered.
            keys = {
                v: self._keys[v] if self._public.get(v) == raw else jwt.PyJWK(self._jwk(v, raw))
                for v, raw in public.items()
            }
            changed = keys.keys() != self._keys.keys() or any(
                keys[v] is not self._keys[v] for v in keys
            )
            self._public, self._keys, self._keys_read_at = public, keys, started
            if changed:
                log.info("token_keys_loaded", versions=sorted(keys))

    def _signer(self) -> tuple[str, str]:
        """The Transit mount and key that sign tokens."""
        return self.cfg.transit_mount, self.cfg.transit_key

    def _signer_moved(self) -> None:
        """Another Transit key signs from now on (a reload). The versions known are the old
        key's, numbered as the new key's are: none of them verifies a token again, and the
        new key's are read when the first token needs them."""
        self._keys, self._public, self._keys_fetched = {}, {}, -1e9

    async def _refresh_keys_regularly(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.key_refresh_interval)
            try:
                await self.refresh_keys(force=True)
            except VaultError as exc:
                log.warning("token_keys_refresh_failed", error=str(exc), keys_age=self._age())
            except Exception:  # a bug: the refresh goes on, and so does the group it is in
                log.exception("token_keys_refresh_failed", keys_age=self._age())

    def _age(self) -> float | None:
        return None if self._keys_read_at is None else max(0.0, self.clock() - self._keys_read_at)

    def key_status(self) -> dict[str, Any]:
        """Age of the public keys (None before the first read), whether they are past
        key_max_staleness, the versions known, and stale refusals so far."""
        age = self._age()
        return {
            "age": age,
            "stale": age is not None and age > self.cfg.key_max_staleness,
            "versions": sorted(self._keys),
            "stale_refusals": self.stale_refusals,
        }

    def _check_fresh(self) -> None:
        age = self._age()
        if age is not None and age > self.cfg.key_max_staleness:
            # Fail closed: Vault may have retired a version since, and cannot tell us.
            self.stale_refusals += 1
            raise Unavailable(
                "token_keys_stale",
                "the signing keys are too old to trust",
                retry_after=math.ceil(self.cfg.key_refresh_interval),  # the next read
            )

    def _kid(self, version: int) -> str:
        """The key id of a Transit key version (what `Verifier._key` reads back)."""
        return f"{self.cfg.transit_key}:v{version}"

    def _jwk(self, version: int, raw: bytes) -> dict[str, str]:
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": b64(raw),
            "kid": self._kid(version),
            "alg": "EdDSA",
            "use": "sig",
        }

    def jwks(self) -> dict[str, Any]:
        """The public keys as a JWKS, for the well-known endpoint."""
        return {"keys": [self._jwk(v, raw) for v, raw in sorted(self._public.items())]}

    # ------------------------------------------------------------------ issue

    async def issue(
        self,
        identity: Identity,
        scope: scopes.Scope,
        *,
        ttl: float,
        task: str | None = None,
        intent: str | None = None,
        max_uses: int | None = None,
        source: str | None = None,
        exception: tuple[str, str] | None = None,
        certificate: CertificateBinding | None = None,
        idle_ttl: float | None = None,
        parent: TaskToken | None = None,
        actor: Identity | None = None,
    ) -> Issued:
        """Sign a token for exactly `scope`. The caller has already intersected it with policy
        and clamped `ttl`; `certificate` binds it to the client certificate it was requested with
        (RFC 8705 `cnf`); with `idle_ttl` its heartbeat lease starts now; a token delegated
        from `parent` (verified) by `actor` carries their lineage claims. Raises Unavailable
        when Vault cannot sign or the lease cannot start, BadRequest("token_too_large") for
        a token longer than MAX_ISSUED_BYTES."""
        if not scope:
            raise ValueError("a task token needs a non-empty scope")
        if exception is not None and (problem := exception_problem(*exception)):
            raise ValueError(problem)
        try:
            await self.refresh_revocations()  # one metadata read unless the list changed
        except VaultError as exc:
            log.warning("revocations_refresh_failed", error=str(exc))
            raise Unavailable("vault_unavailable", "cannot issue tokens right now") from None
        now = int(self.clock())
        # A token the revocation list would name at once is not issued at all.
        if self._revocations.covers_subject(f"{identity.issuer}|{identity.subject}", now):
            raise Forbidden("subject_revoked", "this identity's tokens were revoked just now")
        if task is not None and self._revocations.covers_task(task, now):
            raise Forbidden("task_revoked", "this task's tokens were revoked just now")
        expires = now + max(1, int(ttl))
        if parent is not None:
            _still_alive(parent, self._revocations, now)
            expires = min(expires, int(parent.expires_at))  # however long the read took
        token_id = uuid.uuid4().hex
        claims: dict[str, Any] = {
            "iss": self.cfg.issuer,
            "aud": self.cfg.issuer,
            "sub": identity.subject,
            "idp": identity.issuer,
            "jti": token_id,
            "iat": now,
            "nbf": now,
            "exp": expires,
            "scope": scopes.to_claim(scope),
            "rl": self.list_mark(),  # where its revocation would be written
        }
        ctx = {k: identity.claims[k] for k in self._policy_claims if k in identity.claims}
        optional = {"ctx": ctx, "task": task, "intent": intent, "max_uses": max_uses, "src": source}
        claims |= {k: v for k, v in optional.items() if v}
        if idle_ttl is not None:
            claims["idle"] = int(idle_ttl)
        if parent is not None:
            claims |= lineage.child_claims(parent, actor)
        if exception is not None:
            claims["exc"] = {"owner": exception[0], "reason": exception[1]}
        if certificate is not None:
            claims["cnf"] = certificate.claim()
        token = await self._sign(claims)
        if idle_ttl is not None:
            await self._start_lease(token_id, claims)
        if exception is not None:
            await self._record_exception(token_id, claims)
        return Issued(token, token_id, float(expires), expires - now)

    async def _start_lease(self, token_id: str, claims: dict[str, Any]) -> None:
        """Start the token's heartbeat lease, and have the store keep its lease record until
        it expires, so that whichever replica sweeps when the lease lapses records its end
        (TaskTokens.sweep_leases)."""
        if self.store is None:
            raise Unavailable("idle_ttl_unavailable", "this server keeps no heartbeat leases")
        key = lease_key(token_id)
        record = await self._lease_record(claims)
        try:
            idle = float(claims["idle"])
            await self.store.beat(key, idle)
            kept = claims["exp"] - self.clock() + LEEWAY
            await self.store.watch(key, record, kept, idle)
        except StoreUnavailable:
            # The token was signed but is never handed out: without its lease it is dead.
            raise Unavailable(
                "state_store_unavailable", "cannot start the heartbeat lease now"
            ) from None

    async def _lease_record(self, claims: dict[str, Any]) -> str:
        """What the store keeps of a leased token: its claims (what the token says, not the
        token) and the Transit key's signature over them (after LEASE_RECORD_CONTEXT), so
        that a record planted by a writer of the store is never recorded as an end
        (Verifier.lease_claims)."""
        text = json_bytes(claims)
        try:
            version, signature = await self.vault.transit_sign(
                self.cfg.transit_mount, self.cfg.transit_key, LEASE_RECORD_CONTEXT + text
            )
        except VaultError as exc:
            log.warning("token_sign_failed", error=str(exc))
            raise Unavailable("vault_unavailable", "cannot sign tokens right now") from None
        record = {"kid": self._kid(version), "sig": b64(signature), "claims": text.decode()}
        return json_bytes(record).decode()

    async def _sign(self, claims: dict[str, Any]) -> str:
        try:
            if not self._keys:
                await self.refresh_keys(force=True)
            for _ in range(2):
                version = max(self._keys)
                header = {
                    "alg": "EdDSA",
                    "typ": TASK_TOKEN_TYPE,
                    "kid": self._kid(version),
                }
                signing_input = f"{b64(json_bytes(header))}.{b64(json_bytes(claims))}"
                _sendable(len(signing_input) + 1 + SIGNATURE_CHARS)  # before Vault signs it
                used, signature = await self.vault.transit_sign(
                    self.cfg.transit_mount, self.cfg.transit_key, signing_input.encode()
                )
                if used == version:
                    token = f"{signing_input}.{b64(signature)}"
                    _sendable(len(token))  # a signature longer than an Ed25519 one
                    return token
                # The Transit key was rotated since we last looked: sign again, naming it.
                await self.refresh_keys(force=True)
        except VaultError as exc:
            log.warning("token_sign_failed", error=str(exc))
            raise Unavailable("vault_unavailable", "cannot sign tokens right now") from None
        raise Unavailable("signing_key_changing", "the signing key is changing; try again")


def _still_alive(parent: TaskToken, revocations: Revocations, now: int) -> None:
    """Judge a delegation's parent again against the list just read. SECURITY: the parent
    was verified before that read, and a revocation of its subject or task that landed in
    between names no token id the child's cascade could find, and the child (issued after
    it) is not covered by it: the child would live."""
    if revocations.revoked(parent):
        raise Unauthenticated("revoked", "the task token was revoked")
    refusal = revocations.chain_refusal(parent)
    if refusal is not None:
        raise refusal
    if parent.expires_at - now < 1:
        raise Forbidden("parent_expiring", "the parent token expires in less than a second")


# An EdDSA (Ed25519) signature is 64 bytes: 86 characters of base64url without padding.
SIGNATURE_CHARS = 86


def _sendable(length: int) -> None:
    """Refuse a token of `length` characters longer than MAX_ISSUED_BYTES. SECURITY: it would
    be audited as issued, yet its holder could neither use it nor end it (the listener refuses
    so long a header)."""
    if length > MAX_ISSUED_BYTES:
        raise BadRequest(
            "token_too_large",
            f"the token would be longer than {MAX_ISSUED_BYTES} bytes: ask for fewer or "
            "shorter paths, or a shorter task or intent",
        )
