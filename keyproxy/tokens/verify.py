"""Verifying task tokens, locally.

The header and payload are read strictly (`keyproxy.jws`) before PyJWT verifies them. A token
whose key is known never waits for Vault; a verified token is remembered until it expires,
while the key that verified it is still the one published for its version. A token's uses
(`max_uses`) are counted in the state store, with the request's other limits (the proxy's
limit step, keyproxy.state.limits).
"""

from __future__ import annotations

import binascii
import contextlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from jwt.utils import base64url_decode

from keyproxy import jws, strictjson, verified
from keyproxy import scope as scopes
from keyproxy.caller import Identity
from keyproxy.config import EXCEPTION_ISSUER, Config, issuer_names
from keyproxy.errors import Unauthenticated, Unavailable, VaultError
from keyproxy.state import StateStore
from keyproxy.tokens import lineage
from keyproxy.tokens.format import (
    LEASE_RECORD_CONTEXT,
    LEEWAY,
    MAX_TOKEN_BYTES,
    TASK_TOKEN_TYPE,
    CertificateBinding,
    TaskToken,
    optional_text,
)
from keyproxy.tokens.signing import Signing
from keyproxy.vault import Vault
from keyproxy.verified import VerifiedCache

_CACHE_SIZE: Final = 10_000


@dataclass(frozen=True)
class _Verified:
    """A verified token and the key that verified it: remembered only while that very key
    object is what the current key set holds for its version."""

    token: TaskToken
    version: int
    key: jwt.PyJWK


def trusted_issuers(config: Config) -> frozenset[str]:
    """The issuer names a task token's identity may have under `config`: the configured
    issuers', X.509-SVID callers' and exception tokens'."""
    return frozenset(issuer_names(config.identity, config.server) | {EXCEPTION_ISSUER})


def _trusted(token: TaskToken, issuers: frozenset[str]) -> bool:
    """Whether the issuers of the token's identity and of each actor ("issuer|subject") it
    was delegated to are still configured."""
    return token.identity.issuer in issuers and all(
        actor.partition("|")[0] in issuers for actor in token.actors
    )


class Verifier(Signing):
    """Verifies task tokens."""

    def __init__(
        self,
        config: Config,
        vault: Vault,
        clock: Callable[[], float] = time.time,
        *,
        store: StateStore | None = None,
    ) -> None:
        super().__init__(config, vault, clock, store=store)
        self.trusted_issuers = trusted_issuers(config)
        # Keeps the signature check off the request path for a token seen before.
        self._verified: VerifiedCache[_Verified] = VerifiedCache(
            _CACHE_SIZE, lambda entry: entry.token.expires_at + LEEWAY, clock
        )

    async def verify(self, token: str, *, for_use: bool = True) -> TaskToken:
        """Verify a task token locally; raises Unauthenticated with a reason code, or
        Unavailable when the public keys are too old to trust. Not `for_use` (its holder
        renewing its lease or ending its task), a token whose ancestor was revoked is still
        returned (to record how it ended), and a list read once is enough (`list_current`)."""
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated("malformed", "not a task token")
        if not self.list_current(for_use=for_use):  # the tokens waiting for a read share it
            await self.list_read(for_use=for_use)
        digest = verified.digest(token)
        entry = self._verified.get(digest)
        if entry is not None and self._keys.get(entry.version) is entry.key:
            self._check_fresh()
        else:
            # New, or the key version that verified it is no longer published.
            self._verified.discard(digest)
            entry = await self._verify_signed(token)
            self._verified.put(digest, entry)
        if not self.list_current(for_use=for_use):  # after the last wait: a reload moved it?
            await self.list_read(for_use=for_use)
        cached = entry.token
        now = self.clock()
        if now >= cached.expires_at + LEEWAY:
            raise Unauthenticated("expired", "the task token has expired")
        if now + LEEWAY < cached.issued_at:
            raise Unauthenticated("not_yet_valid", "the task token is not valid yet")
        if self._revocations.revoked(cached):
            raise Unauthenticated("revoked", "the task token was revoked")
        if for_use and not _trusted(cached, self.trusted_issuers):
            # SECURITY: a reload removed the issuer its identity (or a sub-agent's it was
            # delegated to) was proven by. A policy without `issuers` would still match its
            # subject, as if that trust remained.
            raise Unauthenticated("issuer_removed", "the token's identity issuer was removed")
        if for_use and cached.ancestors:
            # The cascade: a token dies with every token it was delegated from.
            refusal = self._revocations.chain_refusal(cached)
            if refusal is not None:
                raise refusal
        return cached

    async def _verify_signed(self, token: str) -> _Verified:
        try:
            parts = jws.compact(token)
        except ValueError:
            raise Unauthenticated("malformed", "not a task token") from None
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
        # (A token of an earlier build names no place: it is judged by the list read here.)
        if "rl" in claims and claims["rl"] != self.list_mark():
            raise Unauthenticated("state_moved", "the token's revocations are kept elsewhere now")
        return _Verified(self._task_token(claims), version, key)

    async def lease_claims(self, record: str) -> dict[str, Any]:
        """The claims in a lease record that `Signing._lease_record` wrote. Raises
        Unauthenticated for any other record (one a writer of the store planted, or signed by
        a key version no longer published); Unavailable while the keys are too old to trust,
        or when it names a version newer than this replica has read."""
        try:
            fields = strictjson.loads(record.encode("utf-8", "surrogatepass"))
            kid, signature, text = fields["kid"], fields["sig"], fields["claims"]
            if not (isinstance(signature, str) and isinstance(text, str)):
                raise TypeError("not text")  # noqa: TRY301  # one refusal for every malformed record
            raw = base64url_decode(signature.encode("ascii"))
            signed = text.encode("utf-8", "surrogatepass")
        except (ValueError, TypeError, KeyError, binascii.Error):
            raise Unauthenticated("malformed", "not a lease record") from None
        try:
            _, key = await self._key(kid)
        except Unauthenticated:
            version = self._version_of(kid)
            if version is not None and version > max(self._keys, default=0):
                # Signed by a key version this replica has not read yet (a rotation within
                # key_refetch_cooldown, or Vault unreachable): to be tried again.
                raise Unavailable(
                    "token_keys_unknown", "the record's key is not known yet"
                ) from None
            raise
        public = key.key
        if not isinstance(public, Ed25519PublicKey):  # never: `_jwk` describes Ed25519 keys
            raise Unauthenticated("bad_signature", "lease record signature invalid")
        try:
            public.verify(raw, LEASE_RECORD_CONTEXT + signed)
            claims = strictjson.loads(signed)
        except (InvalidSignature, ValueError):
            raise Unauthenticated("bad_signature", "lease record signature invalid") from None
        if not isinstance(claims, dict):
            raise Unauthenticated("malformed", "not a lease record")
        return claims

    async def _key(self, kid: Any) -> tuple[int, jwt.PyJWK]:
        version = self._version_of(kid)
        if version is None:
            raise Unauthenticated("unknown_kid", "unknown task token key")
        if version not in self._keys:
            # An unknown key stays unknown when Vault is down; known keys keep verifying.
            with contextlib.suppress(VaultError):
                await self.refresh_keys()
        key = self._keys.get(version)
        if key is None:
            raise Unauthenticated("unknown_kid", "unknown task token key")
        self._check_fresh()
        return version, key

    def _version_of(self, kid: Any) -> int | None:
        """The Transit key version a key id names (`Signing._kid`), or None."""
        # ASCII digits only: str.isdigit() would accept "²", which int() refuses.
        pattern = rf"{re.escape(self.cfg.transit_key)}:v([0-9]{{1,9}})"
        match = re.fullmatch(pattern, kid) if isinstance(kid, str) else None
        return None if match is None else int(match[1])

    def _task_token(self, claims: Mapping[str, Any]) -> TaskToken:
        try:
            jws.numeric_date(claims["nbf"])
            scope = scopes.from_claim(
                claims["scope"],
                list(self.config.routes),
                mcp=scopes.mcp_routes(self.config.routes),
            )
            exc = claims.get("exc")
            ctx = claims.get("ctx") or {}
            issuer = str(claims.get("idp") or "")
            token_id = str(claims["jti"])
            max_uses = claims["max_uses"] if isinstance(claims.get("max_uses"), int) else None
            lineage_ = lineage.read(claims, token_id, max_uses)
            # SECURITY: a token never outlives one it was delegated from, whatever its `exp`
            # says: past its parent's expiry, the parent's revocation is pruned from the list.
            own_expiry = jws.numeric_date(claims["exp"])
            expires = min([own_expiry, *(a.expires_at for a in lineage_.ancestors)])
            return TaskToken(
                token_id=token_id,
                identity=Identity(
                    issuer, str(claims["sub"]), dict(ctx) if isinstance(ctx, dict) else {}
                ),
                scope=scope,
                issued_at=jws.numeric_date(claims["iat"]),
                expires_at=expires,
                task=optional_text(claims.get("task")),
                intent=optional_text(claims.get("intent")),
                max_uses=max_uses,
                source=optional_text(claims.get("src")),
                exception_owner=optional_text(exc.get("owner")) if isinstance(exc, dict) else None,
                certificate=_bound_certificate(claims),
                idle_ttl=lineage_.idle_ttl,
                ancestors=lineage_.ancestors,
                actors=lineage_.actors,
                lifecycle=lineage_.lifecycle,
            )
        except (KeyError, ValueError, TypeError):
            raise Unauthenticated("invalid_claims", "task token claims invalid") from None


def _bound_certificate(claims: Mapping[str, Any]) -> CertificateBinding | None:
    """The certificate a token is bound to (`cnf`), or None if it is not bound.

    SECURITY: a `cnf` that is there but unreadable refuses the token (ValueError or
    TypeError): ignoring it would turn a bound token into a bearer one. So does half a
    renewal rule (a SPIFFE ID without a key thumbprint, or the other way round)."""
    if "cnf" not in claims:
        return None
    cnf = claims["cnf"]
    if not isinstance(cnf, dict):
        raise TypeError("cnf is not an object")
    bound, spiffe_id, key = (cnf.get(k) for k in ("x5t#S256", "spiffe_id", "spki#S256"))
    if not isinstance(bound, str) or not bound:
        raise ValueError("cnf without an x5t#S256 thumbprint")
    if spiffe_id is None and key is None:
        return CertificateBinding(bound)
    if not (isinstance(spiffe_id, str) and spiffe_id and isinstance(key, str) and key):
        raise ValueError("cnf with half a renewal rule")
    return CertificateBinding(bound, spiffe_id, key)
