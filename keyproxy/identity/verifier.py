"""Workload identity: verify OIDC JWTs (Kubernetes, GitHub Actions, Vault/OpenBao, SPIFFE).

`IdentityVerifier.verify(token)` returns an `Identity` or raises `Unauthenticated(reason)`
(or `Unavailable` when the issuer's keys are too old to trust, below).
Checks run in this order (PRODUCT.md invariant 6), each one stopping at the first failure:

1. The token is a compact JWS whose header and payload are UTF-8 JSON objects without a
   repeated member name, NaN or Infinity, read strictly by `keyproxy.jws` before PyJWT
   sees the same bytes (`malformed`).
2. Header: `crit` is refused (`forbidden_header`); a `typ` listed in `rejected_types` is
   refused (`wrong_token_type`). `jwk`, `jku`, `x5u` and `x5c` are ignored: keys come only
   from the issuer's configured source.
3. The unverified `iss` picks the issuer, matched exactly (`unknown_issuer`); from here on
   only that issuer's settings apply. Its `alg` allowlist (`algorithm_not_allowed`).
4. The key whose `kid` matches, loaded by PyJWT as a `PyJWK` bound to one algorithm, so a
   key of another type or curve never verifies (`unknown_kid`, `bad_signature`). A token
   without `kid` is accepted only when the issuer publishes exactly one usable key.
5. `jwt.decode` checks the signature, then `exp`/`iss`/`aud`/`sub` presence, exact `iss` and
   the audience (`bad_signature`, `missing_claim`, `bad_audience`).
6. Time, against the injected clock with the issuer's leeway (`expired`, `not_yet_valid`);
   `exp`, `nbf` and `iat` must be times from 1970 to year 9999 (`malformed`), and with
   `max_token_lifetime` set, `iat` is required and `exp - iat` bounded (`lifetime_too_long`).

A token that verified is remembered (`VerifiedCache`, keyed by its SHA-256, never the token
itself) until its `exp` plus leeway, so a caller reusing its token costs one hash and a dict
look-up instead of a signature check. A remembered token is accepted only while the very key
object that verified it is still what the issuer's current key set holds for its `kid` and
algorithm, and the time checks run again on every use: the cache never changes a result, it
only skips recomputing one that cannot have changed. Failures are never cached. A reload
that changes or removes an issuer forgets what it verified, and a token whose check was
waiting on that issuer's keys meanwhile is checked again under the issuers now configured.

SECURITY: nothing derived from the token (not even its claims) goes into an error message
or a log event, nor does the name or URL of a configured issuer: error messages reach
unauthenticated callers. JWKS events log the issuer name, the URL, key counts and what went
wrong.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import aiohttp
import jwt

from keyproxy import jws, verified

# The verifier's result, defined below the pure core that reads it; re-exported for callers.
from keyproxy.caller import Identity as Identity  # noqa: PLC0414  # an explicit re-export
from keyproxy.config import Issuer
from keyproxy.errors import RequestError, Unauthenticated
from keyproxy.identity.issuers import IssuerKeys, IssuerState
from keyproxy.identity.keys import KeySet
from keyproxy.verified import VerifiedCache

MAX_TOKEN_BYTES = 16 * 1024
REQUIRED_CLAIMS = ("exp", "iss", "aud", "sub")
# Verified tokens remembered per verifier: enough for every agent of a large deployment to
# hold a few live tokens, small enough (about 1 KiB each) to bound memory.
VERIFIED_CACHE_SIZE = 10_000


class IdentityVerifier(IssuerKeys):
    """Verifies workload-identity JWTs against the configured issuers."""

    def __init__(
        self,
        issuers: Sequence[Issuer],
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
        rejected_types: Collection[str] = (),
        cache_size: int = VERIFIED_CACHE_SIZE,
    ) -> None:
        super().__init__(issuers, session, clock)
        self.cache: VerifiedCache[_Verified] = VerifiedCache(
            cache_size, lambda entry: entry.expires, clock
        )
        self._rejected_types = frozenset(_media_type(t) for t in rejected_types)

    async def reconfigure(self, issuers: Sequence[Issuer]) -> bool:
        """As `IssuerKeys.reconfigure`; remembered tokens are forgotten when an issuer was
        removed or changed, so each is verified again under the issuers now configured."""
        changed = await super().reconfigure(issuers)
        if changed:
            self.cache.clear()
        return changed

    async def verify(self, token: str) -> Identity:
        """Return the caller's identity, or raise `Unauthenticated` with a reason code
        (`Unavailable("issuer_keys_stale")` when the issuer's keys are too old to trust)."""
        digest = _digest(token)
        if digest is None:
            return (await self._verify(token))[0]  # refused there, as malformed
        hit = self.cache.get(digest)
        if hit is not None:
            # The common case, without awaiting anything: the key set that verified the
            # token is still current and fresh, and the token is inside its time window.
            state, now = hit.state, self._clock()
            if (
                hit.keys is not None
                and state.keys is hit.keys
                and now - state.fetched_at < state.issuer.jwks_cache_ttl
                and hit.valid_from <= now < hit.expires
            ):
                return hit.identity
            try:
                found = (await self._keys(hit.state)).find(hit.kid)
            except RequestError:
                if not self._replaced(hit.state):
                    raise
                found = None  # a reload replaced the issuer meanwhile: as below
            if (
                found is not None
                and found.get(hit.alg) is hit.key
                and not self._replaced(hit.state)
            ):
                try:
                    _check_times(hit.identity.claims, self._clock(), hit.state.issuer.leeway)
                except Unauthenticated:
                    self.cache.discard(digest)
                    raise
                return hit.identity
            # The issuer's keys changed since: verify from scratch, exactly as if never seen.
            self.cache.discard(digest)
        identity, entry = await self._verify(token)
        self.cache.put(digest, entry)
        return identity

    async def _verify(self, token: str) -> tuple[Identity, _Verified]:
        header, unverified = _split(token)
        _check_header(header, self._rejected_types)
        iss = unverified.get("iss")
        if iss is None:
            raise Unauthenticated("missing_claim", "the token has no iss claim")
        if not isinstance(iss, str):
            raise Unauthenticated("malformed", "the token's iss claim is not a string")
        state = self._issuers.get(iss)
        if state is None:
            raise Unauthenticated("unknown_issuer", "the token's issuer is not trusted")
        issuer = state.issuer
        alg: str = header["alg"]
        if alg not in issuer.algorithms:
            # SECURITY: no issuer name here: it would tell any caller what is configured.
            raise Unauthenticated("algorithm_not_allowed", "algorithm not allowed")
        kid = header.get("kid")
        try:
            key = await self._key(state, kid, alg)
        except RequestError:
            if self._replaced(state):
                return await self._verify(token)
            raise
        if self._replaced(state):
            # A reload replaced or removed the issuer while its keys were fetched: verify
            # under the issuers now configured, never under the one it replaced.
            return await self._verify(token)
        holder = state.keys  # where _key found `key`: nothing was awaited since
        claims = _decode(token, key, alg, issuer)
        _check_times(claims, self._clock(), issuer.leeway)
        _check_lifetime(claims, issuer.max_token_lifetime)
        subject: str = claims["sub"]  # PyJWT has checked it is a string
        if not subject:
            raise Unauthenticated("missing_claim", "the token has an empty sub claim")
        identity = Identity(issuer.name, subject, MappingProxyType(claims))
        expires = _numeric(claims, "exp") + issuer.leeway
        # _check_times passed: nbf and iat are numbers where present.
        starts = max((_numeric(claims, n) for n in ("nbf", "iat") if n in claims), default=None)
        valid_from = -math.inf if starts is None else starts - issuer.leeway
        found = holder.find(kid) if holder is not None else None
        if found is None or found.get(alg) is not key:
            holder = None
        return identity, _Verified(identity, state, kid, alg, key, expires, holder, valid_from)


@dataclass(frozen=True)
class _Verified:
    """What a successful verification needs to be trusted again without the signature check."""

    identity: Identity
    state: IssuerState
    kid: str | None
    alg: str
    key: jwt.PyJWK  # the very object that verified the signature
    expires: float  # exp + leeway: after this the token is refused anyway
    keys: KeySet | None  # the issuer's key set holding `key`, when known
    valid_from: float  # nbf and iat minus leeway: before this it is not valid yet


def _digest(token: str) -> bytes | None:
    """The cache key of a token, or None for one that can never verify (so never hashed)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        return None
    return verified.digest(token)


# ---------------------------------------------------------------------------- tokens


def _split(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The unverified header and payload, read strictly; PyJWT then verifies the same bytes."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated("malformed", "the token is not a well-formed JWT")
    try:
        parts = jws.compact(token)
    except ValueError:
        raise Unauthenticated("malformed", "the token is not a well-formed JWT") from None
    return _segment(parts[0]), _segment(parts[1])


def _segment(part: str) -> dict[str, Any]:
    try:
        return jws.segment(part)
    except ValueError as exc:
        # The reason names what was wrong (a repeated name, not UTF-8), never the content.
        raise Unauthenticated("malformed", f"the token is not a well-formed JWT: {exc}") from None


def _check_header(header: Mapping[str, Any], rejected_types: frozenset[str]) -> None:
    alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
    if not isinstance(alg, str) or not alg:
        raise Unauthenticated("malformed", "the token header has no algorithm")
    if kid is not None and not isinstance(kid, str):
        raise Unauthenticated("malformed", "the token header's kid is not a string")
    if "crit" in header:
        # SECURITY: we implement no JOSE extensions, so a critical one can never be honoured.
        raise Unauthenticated("forbidden_header", "the token header carries crit")
    if typ is not None:
        if not isinstance(typ, str):
            raise Unauthenticated("malformed", "the token header's typ is not a string")
        if _media_type(typ) in rejected_types:
            raise Unauthenticated("wrong_token_type", "this token type is not accepted here")


def _media_type(typ: str) -> str:
    """RFC 7515 4.1.9: compare case-insensitively, 'application/' implied when no '/'."""
    typ = typ.strip().lower()
    return typ if "/" in typ else "application/" + typ


def _decode(token: str, key: jwt.PyJWK, alg: str, issuer: Issuer) -> dict[str, Any]:
    try:
        return jwt.decode(
            token,
            key=key,
            algorithms=[alg],
            audience=list(issuer.audiences),
            issuer=issuer.issuer,
            options={
                "require": list(REQUIRED_CLAIMS),
                # Time is checked by _check_times against the injected clock.
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "enforce_minimum_key_length": True,
            },
        )
    except jwt.InvalidSignatureError:
        raise Unauthenticated("bad_signature", "the token signature does not verify") from None
    except jwt.MissingRequiredClaimError as exc:
        # exc.claim is one of REQUIRED_CLAIMS, never token content.
        raise Unauthenticated("missing_claim", f"the token has no {exc.claim} claim") from None
    except jwt.InvalidAudienceError:
        raise Unauthenticated("bad_audience", "the token is not meant for keyproxy") from None
    except jwt.InvalidIssuerError:
        raise Unauthenticated("unknown_issuer", "the token's issuer is not trusted") from None
    except jwt.InvalidAlgorithmError:
        raise Unauthenticated("algorithm_not_allowed", "algorithm not allowed") from None
    except jwt.InvalidKeyError:
        raise Unauthenticated("bad_signature", "the issuer's key is not usable") from None
    except jwt.PyJWTError:
        raise Unauthenticated("malformed", "the token is not a well-formed JWT") from None


def _check_times(claims: Mapping[str, Any], now: float, leeway: float) -> None:
    if _numeric(claims, "exp") <= now - leeway:
        raise Unauthenticated("expired", "the token has expired")
    for name in ("nbf", "iat"):
        if name in claims and _numeric(claims, name) > now + leeway:
            raise Unauthenticated("not_yet_valid", f"the token's {name} is in the future")


def _check_lifetime(claims: Mapping[str, Any], longest: float | None) -> None:
    if longest is None:
        return
    if "iat" not in claims:
        raise Unauthenticated("missing_claim", "the token has no iat claim")
    if _numeric(claims, "exp") - _numeric(claims, "iat") > longest:
        raise Unauthenticated("lifetime_too_long", "the token lives longer than allowed")


def _numeric(claims: Mapping[str, Any], name: str) -> float:
    try:
        return jws.numeric_date(claims[name])
    except ValueError as exc:
        raise Unauthenticated("malformed", f"the token's {name} claim is {exc}") from None
