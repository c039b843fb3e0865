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
only skips recomputing one that cannot have changed. Failures are never cached.

Keys come from a discovery document, a JWKS URL or a local JWKS file (a SPIFFE trust bundle),
cached per issuer. A request never waits for the issuer while it has keys that are good
enough (stale-while-revalidate): once the set is older than `jwks_cache_ttl` the request is
answered with it and a refresh starts in the background, one at a time, and after a failed
one not again before `jwks_refetch_cooldown`. Past `jwks_max_staleness` since the last
successful fetch the set is no longer trusted: requests wait for a fetch (at most one per
cooldown) and are refused with `Unavailable("issuer_keys_stale")` (503) while it fails. A
request does wait when there is nothing to answer with: no keys yet (`jwks_unavailable` if
the fetch fails), or a `kid` the set lacks, which forces a refetch at most once per cooldown.
Concurrent verifications share one fetch. The fetches are tasks owned by the verifier and
cancelled by `aclose()`.

SECURITY: nothing derived from the token (not even its claims) goes into an error message
or a log event, nor does the name or URL of a configured issuer: error messages reach
unauthenticated callers. JWKS events log the issuer name, the URL, key counts and what went
wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
import jwt
import structlog
from yarl import URL

from keyproxy import jws, verified

# The verifier's result, defined below the pure core that reads it; re-exported for callers.
from keyproxy.caller import Identity as Identity  # noqa: PLC0414  # an explicit re-export
from keyproxy.config import Issuer
from keyproxy.errors import RequestError, Unauthenticated, Unavailable
from keyproxy.verified import VerifiedCache

log = structlog.get_logger("keyproxy.identity")

MAX_TOKEN_BYTES = 16 * 1024
MAX_DOCUMENT_BYTES = 1024 * 1024
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=10.0, sock_connect=5.0)
REQUIRED_CLAIMS = ("exp", "iss", "aud", "sub")
# "jwt-svid" is how SPIFFE trust bundles mark keys for JWT-SVIDs; absent means any use.
KEY_USES = frozenset({None, "sig", "jwt-svid"})
# JWK members that only a private or symmetric key has: a JWKS carrying them is a mistake
# upstream, and such a key is never used.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k"})
# Verified tokens remembered per verifier: enough for every agent of a large deployment to
# hold a few live tokens, small enough (about 1 KiB each) to bound memory.
VERIFIED_CACHE_SIZE = 10_000


class IdentityVerifier:
    """Verifies workload-identity JWTs against the configured issuers."""

    def __init__(
        self,
        issuers: Sequence[Issuer],
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.time,
        rejected_types: Collection[str] = (),
        cache_size: int = VERIFIED_CACHE_SIZE,
    ) -> None:
        self._session = session
        self._clock = clock
        self.cache: VerifiedCache[_Verified] = VerifiedCache(
            cache_size, lambda entry: entry.expires, clock
        )
        self._rejected_types = frozenset(_media_type(t) for t in rejected_types)
        self._closed = False
        self._issuers: dict[str, _IssuerState] = {}
        for issuer in issuers:
            if issuer.issuer in self._issuers:
                raise ValueError(f"issuer {issuer.issuer!r} is configured twice")
            self._issuers[issuer.issuer] = _IssuerState(issuer)

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
            found = (await self._keys(hit.state)).find(hit.kid)
            if found is not None and found.get(hit.alg) is hit.key:
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
        key = await self._key(state, kid, alg)
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

    async def prefetch(self) -> None:
        """Fetch every issuer's keys once; failures are logged, not raised."""
        await asyncio.gather(*(self._prefetch(state) for state in self._issuers.values()))

    async def _prefetch(self, state: _IssuerState) -> None:
        # _refresh has logged why it failed; verification retries after the cooldown.
        with contextlib.suppress(RequestError):
            await self._keys(state)

    async def aclose(self) -> None:
        """Stop the background key fetches; no new ones start after this."""
        self._closed = True
        fetches = [s.fetch for s in self._issuers.values() if s.fetch is not None]
        for fetch in fetches:
            fetch.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)

    def key_status(self) -> dict[str, dict[str, Any]]:
        """Per issuer name: age of its keys (None before the first fetch), whether they are
        past jwks_max_staleness, whether a fetch is running, and stale refusals so far."""
        now = self._clock()
        status = {}
        for state in self._issuers.values():
            age = None if state.keys is None else max(0.0, now - state.fetched_at)
            status[state.issuer.name] = {
                "age": age,
                "stale": age is not None and age > state.issuer.jwks_max_staleness,
                "fetching": _running(state) is not None,
                "stale_refusals": state.stale_refusals,
            }
        return status

    async def _key(self, state: _IssuerState, kid: str | None, alg: str) -> jwt.PyJWK:
        found = (await self._keys(state)).find(kid)
        if found is None:
            found = (await self._keys(state, unknown_kid=True)).find(kid)
        if found is None:
            raise Unauthenticated("unknown_kid", "no key of the issuer fits")
        key = found.get(alg)
        if key is None:
            raise Unauthenticated("bad_signature", "the issuer's key does not fit the algorithm")
        return key

    async def _keys(self, state: _IssuerState, *, unknown_kid: bool = False) -> _KeySet:
        """The issuer's keys: at once while they are good enough, else after a fetch."""
        now = self._clock()
        if state.keys is not None and not unknown_kid:
            age = now - state.fetched_at
            if age < state.issuer.jwks_cache_ttl:
                return state.keys
            if age <= state.issuer.jwks_max_staleness:
                # Stale-while-revalidate: this request does not wait for the issuer.
                if _running(state) is None and self._may_fetch(state, now, forced=False):
                    self._start_fetch(state, forced=False)
                return state.keys
        # Nothing to answer with: no keys, keys too old to trust, or a kid they lack.
        # Single flight: a fetch already running brings what this caller needs too.
        fetch = _running(state)
        if fetch is None and self._may_fetch(state, now, forced=unknown_kid):
            fetch = self._start_fetch(state, forced=unknown_kid)
        if fetch is not None:
            # Shielded: a caller that gives up must not cancel the fetch others wait for.
            await asyncio.shield(fetch)
        return self._usable(state)

    def _usable(self, state: _IssuerState) -> _KeySet:
        if state.keys is None:
            raise Unauthenticated("jwks_unavailable", "the issuer's keys are unavailable")
        if self._clock() - state.fetched_at > state.issuer.jwks_max_staleness:
            # Fail closed: keys this old may include one the issuer has since withdrawn.
            state.stale_refusals += 1
            raise Unavailable("issuer_keys_stale", "the issuer's keys are too old to trust")
        return state.keys

    def _may_fetch(self, state: _IssuerState, now: float, *, forced: bool) -> bool:
        if self._closed:
            return False
        cooldown = state.issuer.jwks_refetch_cooldown
        if forced:
            return state.last_forced is None or now - state.last_forced >= cooldown
        # After a failure not more often than the cooldown, so unauthenticated traffic
        # cannot turn an issuer outage into a fetch storm.
        return state.last_failure is None or now - state.last_failure >= cooldown

    def _start_fetch(self, state: _IssuerState, *, forced: bool) -> asyncio.Task[None]:
        if forced:
            state.last_forced = self._clock()
        # Owned: kept in the issuer's state until done, cancelled by aclose().
        state.fetch = asyncio.create_task(
            self._refresh(state), name=f"jwks-fetch-{state.issuer.name}"
        )
        return state.fetch

    async def _refresh(self, state: _IssuerState) -> None:
        issuer, now = state.issuer, self._clock()
        try:
            keys, url = await self._fetch(issuer)
        except _FetchError as exc:
            self._failed(state, now, exc.url, exc.message)
        except Exception as exc:  # a bug: a failed fetch, not a dead task
            log.exception("jwks_fetch_crashed", issuer=issuer.name)
            self._failed(state, now, _source(issuer), type(exc).__name__)
        else:
            state.keys, state.fetched_at, state.last_failure = keys, now, None
            log.info("jwks_fetched", issuer=issuer.name, url=url, keys=keys.size)

    def _failed(self, state: _IssuerState, now: float, url: str, error: str) -> None:
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

    async def _fetch(self, issuer: Issuer) -> tuple[_KeySet, str]:
        if issuer.jwks_file is not None:
            url = str(issuer.jwks_file)
            try:
                body = await asyncio.to_thread(_read_limited, issuer.jwks_file)
            except OSError as exc:
                raise _FetchError(url, f"cannot read file: {exc.strerror}") from None
            document = _json_object(url, body)
        elif issuer.discovery_url is not None:
            meta = await self._get_json(issuer.discovery_url)
            # SECURITY: a discovery document may only vouch for the issuer we configured;
            # otherwise one issuer's keys could verify tokens claiming another's name.
            if meta.get("issuer") != issuer.issuer:
                raise _FetchError(issuer.discovery_url, "discovery document names another issuer")
            url = _jwks_uri(issuer.discovery_url, meta.get("jwks_uri"))
            document = await self._get_json(url)
        else:
            assert issuer.jwks_uri is not None  # config sets exactly one source
            url = issuer.jwks_uri
            document = await self._get_json(url)
        return _parse_jwks(issuer, url, document), url

    async def _get_json(self, url: str) -> dict[str, Any]:
        # Redirects are not followed: the configured URL is the one that is trusted.
        try:
            async with self._session.get(
                url,
                timeout=FETCH_TIMEOUT,
                allow_redirects=False,
                headers={"Accept": "application/json"},
            ) as response:
                if response.status != 200:
                    raise _FetchError(url, f"HTTP status {response.status}")
                if (response.content_length or 0) > MAX_DOCUMENT_BYTES:
                    raise _FetchError(url, "document larger than the limit")
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise _FetchError(url, "document larger than the limit")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _FetchError(url, f"request failed: {type(exc).__name__}") from None
        return _json_object(url, bytes(body))


@dataclass
class _IssuerState:
    """What the verifier knows about one issuer's keys; `keys` changes only in `_refresh`."""

    issuer: Issuer
    keys: _KeySet | None = None
    fetched_at: float = 0.0  # when the fetch that brought `keys` started
    last_failure: float | None = None
    last_forced: float | None = None
    fetch: asyncio.Task[None] | None = None  # the one running (or last) fetch
    stale_refusals: int = 0


def _running(state: _IssuerState) -> asyncio.Task[None] | None:
    return state.fetch if state.fetch is not None and not state.fetch.done() else None


def _source(issuer: Issuer) -> str:
    return str(issuer.discovery_url or issuer.jwks_uri or issuer.jwks_file)


@dataclass(frozen=True)
class _KeySet:
    """An issuer's usable keys: kid (None when the JWK has none) → algorithm → key."""

    by_kid: Mapping[str | None, Mapping[str, jwt.PyJWK]]
    size: int  # usable JWKs in the document

    def find(self, kid: str | None) -> Mapping[str, jwt.PyJWK] | None:
        if kid is None:
            # Without a kid there is nothing to choose by; guessing among several keys
            # would make "which key signed this" ambiguous.
            return next(iter(self.by_kid.values())) if self.size == 1 else None
        return self.by_kid.get(kid)


@dataclass(frozen=True)
class _Verified:
    """What a successful verification needs to be trusted again without the signature check."""

    identity: Identity
    state: _IssuerState
    kid: str | None
    alg: str
    key: jwt.PyJWK  # the very object that verified the signature
    expires: float  # exp + leeway: after this the token is refused anyway
    keys: _KeySet | None  # the issuer's key set holding `key`, when known
    valid_from: float  # nbf and iat minus leeway: before this it is not valid yet


def _digest(token: str) -> bytes | None:
    """The cache key of a token, or None for one that can never verify (so never hashed)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        return None
    return verified.digest(token)


class _FetchError(Exception):
    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.message = message


# ---------------------------------------------------------------------------- tokens


def _split(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The unverified header and payload, read strictly; PyJWT then verifies the same bytes."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated("malformed", "the token is not a well-formed JWT")
    parts = token.split(".")
    if len(parts) != 3:
        raise Unauthenticated("malformed", "the token is not a well-formed JWT")
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


# ---------------------------------------------------------------------------- key sources


def _read_limited(path: Path) -> bytes:
    with path.open("rb") as f:
        body = f.read(MAX_DOCUMENT_BYTES + 1)
    if len(body) > MAX_DOCUMENT_BYTES:
        raise _FetchError(str(path), "document larger than the limit")
    return body


def _json_object(url: str, body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise _FetchError(url, "not a JSON document") from None
    if not isinstance(document, dict):
        raise _FetchError(url, "not a JSON object")
    return document


def _jwks_uri(discovery_url: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _FetchError(discovery_url, "discovery document has no jwks_uri")
    try:
        url = URL(value)
    except ValueError:
        url = URL()
    if url.scheme not in ("http", "https") or not url.host:
        raise _FetchError(discovery_url, "jwks_uri is not an absolute http(s) URL")
    # SECURITY: an https discovery document must not downgrade key fetching to plain http.
    if URL(discovery_url).scheme == "https" and url.scheme != "https":
        raise _FetchError(discovery_url, "jwks_uri downgrades https to http")
    return value


def _parse_jwks(issuer: Issuer, url: str, document: Mapping[str, Any]) -> _KeySet:
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise _FetchError(url, "not a JWKS (no keys list)")
    by_kid: dict[str | None, dict[str, jwt.PyJWK]] = {}
    size = 0
    for entry in entries:
        loaded = _load_key(issuer, entry)
        if loaded:
            size += 1
            slot = by_kid.setdefault(entry.get("kid"), {})
            for alg, key in loaded.items():
                slot.setdefault(alg, key)
    if size == 0:
        raise _FetchError(url, "no usable keys")
    return _KeySet(by_kid, size)


def _load_key(issuer: Issuer, entry: Any) -> dict[str, jwt.PyJWK]:
    """The entry as a PyJWK per allowed algorithm it fits; empty (and logged) if none."""
    if not isinstance(entry, dict):
        _skipped(issuer, None, None, "not a JSON object")
        return {}
    kid, kty = entry.get("kid"), entry.get("kty")
    if kid is not None and not isinstance(kid, str):
        _skipped(issuer, None, kty, "kid is not a string")
        return {}
    if entry.get("use") not in KEY_USES:
        _skipped(issuer, kid, kty, "use is not sig or jwt-svid")
        return {}
    if _PRIVATE_MEMBERS & entry.keys():
        _skipped(issuer, kid, kty, "private or symmetric key material")
        return {}
    key_ops = entry.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        _skipped(issuer, kid, kty, "key_ops does not allow verify")
        return {}
    # A JWK that names its algorithm is used for that one only (RFC 7517 4.4).
    declared = entry.get("alg")
    candidates = issuer.algorithms if declared is None else (declared,)
    loaded = {}
    for alg in candidates:
        if alg not in issuer.algorithms:
            continue
        try:
            key = jwt.PyJWK(entry, algorithm=alg)
            key.Algorithm.prepare_key(key.key)  # refuses e.g. a P-384 key for ES256
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        loaded[alg] = key
    if not loaded:
        _skipped(issuer, kid, kty, "no allowed algorithm fits this key")
    return loaded


def _skipped(issuer: Issuer, kid: Any, kty: Any, why: str) -> None:
    # SECURITY: only identifiers are logged, never key members.
    log.warning(
        "jwks_key_skipped",
        issuer=issuer.name,
        kid=kid[:128] if isinstance(kid, str) else None,
        kty=kty[:16] if isinstance(kty, str) else None,
        why=why,
    )
