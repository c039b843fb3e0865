"""Task tokens: keyproxy's own short-lived, scoped, revocable credentials.

A task token is a compact JWS with `typ: keyproxy-task+jwt`, signed with EdDSA by a Vault
Transit key (the private key never leaves Vault) and verified here, locally, with the
Transit public keys. Claims:

    iss, aud     tokens.issuer ("keyproxy")        jti        token id
    sub, idp     the workload identity it was issued to (subject, issuer name)
    ctx          the identity's claims that policies match on
    iat, nbf, exp                                  task, intent
    scope        {route: [{methods, paths}]}       max_uses, src (bound source address)
    exc          {owner, reason} for an exception token

`TaskTokens` issues, verifies and revokes them. Revocations live in Vault KV (one secret at
`tokens.state_path`/revocations); every replica polls its version number and re-reads it on
change, so a revocation is honoured everywhere within `revocation_poll_interval` plus one
read. Entries are pruned once every token they can name has expired. Issuance reads the list
first, so an identity or task revoked moments ago gets no new token that the revocation
would cover.

The header and payload are read strictly (`keyproxy.jws`) before PyJWT verifies them. The
public keys are read at start, re-read in the background every `key_refresh_interval`, and
at once (at most every `key_refetch_cooldown`) for a token naming a version not seen yet: a
token whose key is known never waits for Vault. While Vault cannot be read the known keys
keep verifying for `key_max_staleness` after the last good read; then task tokens are
refused with `Unavailable("token_keys_stale")` (503) until a read succeeds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import jwt
import structlog

from keyproxy import jws, verified
from keyproxy import scope as scopes
from keyproxy.caller import Identity
from keyproxy.config import Config
from keyproxy.errors import Forbidden, Unauthenticated, Unavailable, VaultError
from keyproxy.vault import CasConflict, Vault
from keyproxy.verified import VerifiedCache

TASK_TOKEN_TYPE: Final = "keyproxy-task+jwt"  # noqa: S105  # a media type, not a secret
EXCEPTION_ISSUER: Final = "exception"
LEEWAY: Final = 5.0
_CACHE_SIZE: Final = 10_000
MAX_TOKEN_BYTES: Final = 16 * 1024
MAX_METERED: Final = 100_000
# Clocks of the replica that issued a token and of whoever revokes may differ: a revocation
# by subject or task covers tokens issued up to this long after it, and entries are kept
# this much longer before pruning.
CLOCK_SKEW: Final = 5.0

log = structlog.get_logger("keyproxy.tokens")


@dataclass(frozen=True)
class TaskToken:
    """A verified task token. Holds no secret; `token_id` is safe to log."""

    token_id: str
    identity: Identity
    scope: scopes.Scope
    issued_at: float
    expires_at: float
    task: str | None = None
    intent: str | None = None
    max_uses: int | None = None
    source: str | None = None
    exception_owner: str | None = None


@dataclass(frozen=True)
class _Verified:
    """A verified token and the key that verified it: remembered only while that very key
    object is what the current key set holds for its version."""

    token: TaskToken
    version: int
    key: jwt.PyJWK


@dataclass(frozen=True)
class Issued:
    token: str = field(repr=False)
    token_id: str = ""
    expires_at: float = 0.0


def exception_subject(owner: str) -> str:
    """The subject an exception token is issued to (its issuer is EXCEPTION_ISSUER)."""
    return f"exception:{owner}"


_MAX_HEADER: Final = 4096  # bytes of an encoded JOSE header we bother to look at


def is_task_token(token: str) -> bool:
    """Cheap look at the header only: does this claim to be one of ours?

    Only the first segment is decoded: PyJWT's get_unverified_header validates the alphabet
    of the whole token, character by character, on every request. This only routes the
    token; whichever verifier it goes to checks it strictly.
    """
    head, dot, _ = token.partition(".")
    if not dot or len(head) > _MAX_HEADER:
        return False
    return _names_task_token(head)


# Buys 27,400 instructions per request (3.3%, bench/instructions.py --compare): base64 and
# JSON decoding of the header, for every token.
@functools.lru_cache(maxsize=256)
def _names_task_token(head: str) -> bool:
    """Whether an encoded JWT header says typ is ours (an issuer's few headers repeat)."""
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error, RecursionError):
        return False
    typ = header.get("typ") if isinstance(header, dict) else None
    return isinstance(typ, str) and typ.lower() == TASK_TOKEN_TYPE


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


@dataclass
class Revocations:
    """The revocation list as stored in Vault, with the pruning rule."""

    ids: dict[str, float] = field(default_factory=dict)  # jti -> token expiry
    subjects: dict[str, float] = field(default_factory=dict)  # "idp|sub" -> revoked at
    tasks: dict[str, float] = field(default_factory=dict)  # task -> revoked at

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Revocations:
        def floats(name: str) -> dict[str, float]:
            value = data.get(name)
            if not isinstance(value, dict):
                return {}
            return {str(k): float(v) for k, v in value.items() if isinstance(v, int | float)}

        return cls(floats("ids"), floats("subjects"), floats("tasks"))

    def to_data(self) -> dict[str, Any]:
        return {"ids": self.ids, "subjects": self.subjects, "tasks": self.tasks}

    def revoked(self, token: TaskToken) -> bool:
        return self.names(
            token.token_id,
            f"{token.identity.issuer}|{token.identity.subject}",
            token.task,
            token.issued_at,
        )

    def names(self, token_id: str, who: str, task: str | None, issued_at: float) -> bool:
        """Whether a token with these facts is revoked: by id, or by subject or task at or
        after it was issued."""
        if token_id in self.ids or self.covers_subject(who, issued_at):
            return True
        return task is not None and self.covers_task(task, issued_at)

    def covers_subject(self, who: str, issued_at: float) -> bool:
        """Whether a revocation of subject `who` ("issuer|subject") names a token issued then."""
        return self.subjects.get(who, -1.0) >= issued_at

    def covers_task(self, task: str, issued_at: float) -> bool:
        """Whether a revocation of `task` names a token of that task issued then."""
        return self.tasks.get(task, -1.0) >= issued_at

    def prune(self, now: float, longest_ttl: float) -> None:
        """Drop entries that can no longer name a live token."""
        margin = LEEWAY + CLOCK_SKEW
        self.ids = {k: exp for k, exp in self.ids.items() if exp + margin > now}
        horizon = now - longest_ttl - margin
        self.subjects = {k: at for k, at in self.subjects.items() if at > horizon}
        self.tasks = {k: at for k, at in self.tasks.items() if at > horizon}


class TaskTokens:
    """Issue, verify and revoke task tokens for one configuration."""

    def __init__(
        self, config: Config, vault: Vault, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.cfg = config.tokens
        self.vault = vault
        self.clock = clock
        self._keys: dict[int, jwt.PyJWK] = {}
        self._public: dict[int, bytes] = {}
        self._keys_fetched = -1e9
        self._keys_read_at: float | None = None  # self.clock() at the last good read
        self._keys_lock = asyncio.Lock()
        self.stale_refusals = 0
        self._revocations = Revocations()
        self._revocations_version: int | None = None
        # Keeps the signature check off the request path for a token seen before.
        self._verified: VerifiedCache[_Verified] = VerifiedCache(
            _CACHE_SIZE, lambda entry: entry.token.expires_at + LEEWAY, clock
        )
        # max_uses counters: token id -> (uses so far, token expiry). Pruned by expiry only.
        self._uses: dict[str, tuple[int, float]] = {}
        self._policy_claims = sorted({name for p in config.policies for name, _ in p.claims})

    # ------------------------------------------------------------------ paths

    @property
    def _revocations_path(self) -> str:
        return f"{self.cfg.state_path}/revocations"

    @property
    def _exceptions_path(self) -> str:
        return f"{self.cfg.state_path}/exceptions"

    # ------------------------------------------------------------------ keys

    async def refresh_keys(self, *, force: bool = False) -> None:
        """Read the Transit public keys (at most once per cooldown unless forced)."""
        async with self._keys_lock:
            now = time.monotonic()
            if not force and now - self._keys_fetched < self.cfg.key_refetch_cooldown:
                return
            self._keys_fetched = now
            started = self.clock()
            public = await self.vault.transit_public_keys(
                self.cfg.transit_mount, self.cfg.transit_key
            )
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

    async def _refresh_keys_regularly(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.key_refresh_interval)
            try:
                await self.refresh_keys(force=True)
            except VaultError as exc:
                log.warning("token_keys_refresh_failed", error=str(exc), keys_age=self._age())

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
            raise Unavailable("token_keys_stale", "the signing keys are too old to trust")

    def _jwk(self, version: int, raw: bytes) -> dict[str, str]:
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": _b64(raw),
            "kid": f"{self.cfg.transit_key}:v{version}",
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
    ) -> Issued:
        """Sign a token for exactly `scope`. The caller has already intersected it with policy
        and clamped `ttl`. Raises Unavailable when Vault cannot sign."""
        if not scope:
            raise ValueError("a task token needs a non-empty scope")
        if exception is not None and not all(part.strip() for part in exception):
            raise ValueError("an exception token needs an owner and a reason")
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
        token_id = uuid.uuid4().hex
        claims: dict[str, Any] = {
            "iss": self.cfg.issuer,
            "aud": self.cfg.issuer,
            "sub": identity.subject,
            "idp": identity.issuer,
            "jti": token_id,
            "iat": now,
            "nbf": now,
            "exp": now + max(1, int(ttl)),
            "scope": scopes.to_claim(scope),
        }
        ctx = {k: identity.claims[k] for k in self._policy_claims if k in identity.claims}
        optional = {"ctx": ctx, "task": task, "intent": intent, "max_uses": max_uses, "src": source}
        claims |= {k: v for k, v in optional.items() if v}
        if exception is not None:
            claims["exc"] = {"owner": exception[0], "reason": exception[1]}
        token = await self._sign(claims)
        if exception is not None:
            await self._record_exception(token_id, claims)
        return Issued(token, token_id, float(claims["exp"]))

    async def _sign(self, claims: dict[str, Any]) -> str:
        try:
            if not self._keys:
                await self.refresh_keys(force=True)
            for _ in range(2):
                version = max(self._keys)
                header = {
                    "alg": "EdDSA",
                    "typ": TASK_TOKEN_TYPE,
                    "kid": f"{self.cfg.transit_key}:v{version}",
                }
                signing_input = f"{_b64(_json(header))}.{_b64(_json(claims))}"
                used, signature = await self.vault.transit_sign(
                    self.cfg.transit_mount, self.cfg.transit_key, signing_input.encode()
                )
                if used == version:
                    return f"{signing_input}.{_b64(signature)}"
                # The Transit key was rotated since we last looked: sign again, naming it.
                await self.refresh_keys(force=True)
        except VaultError as exc:
            log.warning("token_sign_failed", error=str(exc))
            raise Unavailable("vault_unavailable", "cannot sign tokens right now") from None
        raise Unavailable("signing_key_changing", "the signing key is changing; try again")

    # ------------------------------------------------------------------ verify

    async def verify(self, token: str) -> TaskToken:
        """Verify a task token locally; raises Unauthenticated with a reason code, or
        Unavailable when the public keys are too old to trust."""
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated("malformed", "not a task token")
        digest = verified.digest(token)
        entry = self._verified.get(digest)
        if entry is not None and self._keys.get(entry.version) is entry.key:
            self._check_fresh()
        else:
            # New, or the key version that verified it is no longer published.
            self._verified.discard(digest)
            entry = await self._verify_signed(token)
            self._verified.put(digest, entry)
        cached = entry.token
        now = self.clock()
        if now >= cached.expires_at + LEEWAY:
            raise Unauthenticated("expired", "the task token has expired")
        if now + LEEWAY < cached.issued_at:
            raise Unauthenticated("not_yet_valid", "the task token is not valid yet")
        if self._revocations.revoked(cached):
            raise Unauthenticated("revoked", "the task token was revoked")
        return cached

    async def _verify_signed(self, token: str) -> _Verified:
        parts = token.split(".")
        if len(parts) != 3:
            raise Unauthenticated("malformed", "not a task token")
        try:
            # Strictly, before PyJWT reads the same bytes its own, lenient way.
            header, _ = jws.segment(parts[0]), jws.segment(parts[1])
        except ValueError as exc:
            raise Unauthenticated("malformed", f"not a well-formed task token: {exc}") from None
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() != TASK_TOKEN_TYPE:
            raise Unauthenticated("wrong_token_type", "not a task token")
        if header.get("alg") != "EdDSA" or "crit" in header:
            raise Unauthenticated("algorithm_not_allowed", "task tokens are EdDSA")
        version, key = await self._key(header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=["EdDSA"],
                audience=self.cfg.issuer,
                issuer=self.cfg.issuer,
                options={
                    "require": ["exp", "iat", "nbf", "jti", "sub", "iss", "aud", "scope"],
                    "verify_exp": False,  # checked against our clock in verify()
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise Unauthenticated("bad_signature", "task token signature invalid") from None
        except jwt.PyJWTError:
            raise Unauthenticated("invalid_claims", "task token claims invalid") from None
        return _Verified(self._task_token(claims), version, key)

    async def _key(self, kid: Any) -> tuple[int, jwt.PyJWK]:
        # ASCII digits only: str.isdigit() would accept "²", which int() refuses.
        pattern = rf"{re.escape(self.cfg.transit_key)}:v([0-9]{{1,9}})"
        match = re.fullmatch(pattern, kid) if isinstance(kid, str) else None
        if match is None:
            raise Unauthenticated("unknown_kid", "unknown task token key")
        version = int(match[1])
        if version not in self._keys:
            # An unknown key stays unknown when Vault is down; known keys keep verifying.
            with contextlib.suppress(VaultError):
                await self.refresh_keys()
        key = self._keys.get(version)
        if key is None:
            raise Unauthenticated("unknown_kid", "unknown task token key")
        self._check_fresh()
        return version, key

    def _task_token(self, claims: Mapping[str, Any]) -> TaskToken:
        try:
            jws.numeric_date(claims["nbf"])
            scope = scopes.from_claim(claims["scope"], list(self.config.routes))
            exc = claims.get("exc")
            ctx = claims.get("ctx") or {}
            issuer = str(claims.get("idp") or "")
            return TaskToken(
                token_id=str(claims["jti"]),
                identity=Identity(
                    issuer, str(claims["sub"]), dict(ctx) if isinstance(ctx, dict) else {}
                ),
                scope=scope,
                issued_at=jws.numeric_date(claims["iat"]),
                expires_at=jws.numeric_date(claims["exp"]),
                task=_text(claims.get("task")),
                intent=_text(claims.get("intent")),
                max_uses=claims["max_uses"] if isinstance(claims.get("max_uses"), int) else None,
                source=_text(claims.get("src")),
                exception_owner=_text(exc.get("owner")) if isinstance(exc, dict) else None,
            )
        except (KeyError, ValueError, TypeError):
            raise Unauthenticated("invalid_claims", "task token claims invalid") from None

    def use(self, token: TaskToken) -> bool:
        """Count one use against max_uses (per replica); False once they are spent."""
        if token.max_uses is None:
            return True
        count, _ = self._uses.get(token.token_id, (0, token.expires_at))
        if count >= token.max_uses:
            return False
        if token.token_id not in self._uses and len(self._uses) >= MAX_METERED:
            # Never forget a count to make room: refuse new metered tokens instead.
            raise Unavailable("too_many_metered_tokens", "try again later")
        self._uses[token.token_id] = (count + 1, token.expires_at)
        return True

    # ------------------------------------------------------------------ revocation

    async def revoke(
        self,
        *,
        token_id: str | None = None,
        expires_at: float | None = None,
        subject: str | None = None,
        task: str | None = None,
    ) -> None:
        """An operator's revocation: of one token id, of every token issued so far to a
        subject ("issuer|subject"), or of every token of a task."""
        await self._record_revocation(token_id, expires_at, subject, task)
        issuer, _, name = subject.partition("|") if subject is not None else (None, "", None)
        log.info(
            "token.revoked",
            by="operator",
            token_id=token_id,
            issuer=issuer,
            subject=name,
            task=task,
        )

    async def revoke_held(self, token: TaskToken) -> None:
        """The holder ends its task: its own token, verified by the caller, is revoked."""
        await self._record_revocation(token.token_id, token.expires_at, None, None)
        log.info(
            "token.revoked",
            by="holder",
            token_id=token.token_id,
            issuer=token.identity.issuer,
            subject=token.identity.subject,
            task=token.task,
        )

    async def _record_revocation(
        self,
        token_id: str | None,
        expires_at: float | None,
        subject: str | None,
        task: str | None,
    ) -> None:
        """Record a revocation in Vault (check-and-set, retried on a concurrent write)."""
        longest = max(self.cfg.max_ttl, self.cfg.exception_max_ttl)
        for _ in range(8):
            data, version = await self._read_state(self._revocations_path)
            revocations = Revocations.from_data(data)
            now = self.clock()
            if token_id is not None:
                revocations.ids[token_id] = expires_at if expires_at is not None else now + longest
            if subject is not None:
                revocations.subjects[subject] = now + CLOCK_SKEW
            if task is not None:
                revocations.tasks[task] = now + CLOCK_SKEW
            revocations.prune(now, longest)
            try:
                new = await self.vault.write_kv(
                    self.config.vault.kv_mount,
                    self._revocations_path,
                    revocations.to_data(),
                    cas=version,
                )
            except CasConflict:
                continue
            self._revocations, self._revocations_version = revocations, new
            return
        raise Unavailable("revocation_contention", "could not record the revocation; try again")

    async def _read_state(self, path: str) -> tuple[dict[str, Any], int]:
        """A state secret and its version; ({}, 0) when it does not exist yet (cas=0 creates)."""
        if await self.vault.kv_version(self.config.vault.kv_mount, path) is None:
            return {}, 0
        return await self.vault.read_kv(self.config.vault.kv_mount, path)

    async def refresh_revocations(self) -> None:
        """Re-read the revocation list if its version changed (one metadata read otherwise)."""
        version = await self.vault.kv_version(self.config.vault.kv_mount, self._revocations_path)
        if version is None or version == self._revocations_version:
            return
        data, version = await self.vault.read_kv(self.config.vault.kv_mount, self._revocations_path)
        self._revocations = Revocations.from_data(data)
        self._revocations_version = version

    async def run(self) -> None:
        """Background work until cancelled: poll revocations (and forget spent use counters),
        and re-read the public keys every key_refresh_interval."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._poll_revocations(), name="token-revocations")
            group.create_task(self._refresh_keys_regularly(), name="token-keys")

    async def _poll_revocations(self) -> None:
        while True:
            try:
                await self.refresh_revocations()
            except VaultError as exc:
                log.warning("revocations_refresh_failed", error=str(exc))
            now = self.clock()
            self._uses = {k: v for k, v in self._uses.items() if v[1] + LEEWAY > now}
            await asyncio.sleep(self.cfg.revocation_poll_interval)

    # ------------------------------------------------------------------ exception tokens

    async def _record_exception(self, token_id: str, claims: Mapping[str, Any]) -> None:
        for _ in range(8):
            data, version = await self._read_state(self._exceptions_path)
            now = self.clock()
            live = {
                k: v
                for k, v in data.items()
                if isinstance(v, dict) and v.get("expires_at", 0) > now
            }
            live[token_id] = {
                "owner": claims["exc"]["owner"],
                "reason": claims["exc"]["reason"],
                "issued_at": claims["iat"],
                "expires_at": claims["exp"],
                "scope": claims["scope"],
            }
            try:
                await self.vault.write_kv(
                    self.config.vault.kv_mount, self._exceptions_path, live, cas=version
                )
            except CasConflict:
                continue
            return
        raise Unavailable("exception_register_contention", "could not record the token")

    async def exceptions(self) -> list[dict[str, Any]]:
        """Active exception tokens (not expired, not revoked), soonest expiry first."""
        data, _ = await self._read_state(self._exceptions_path)
        revs, _ = await self._read_state(self._revocations_path)
        revocations = Revocations.from_data(revs)
        now = self.clock()
        active = [
            {"token_id": k, **v}
            for k, v in data.items()
            if isinstance(v, dict)
            and v.get("expires_at", 0) > now
            and not revocations.names(
                k,
                f"{EXCEPTION_ISSUER}|{exception_subject(str(v.get('owner')))}",
                None,
                float(v.get("issued_at", 0)),
            )
        ]
        return sorted(active, key=lambda e: e["expires_at"])


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
