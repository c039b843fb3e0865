"""An issuer's signing keys: fetched from a discovery document, a JWKS URL or a local JWKS file
(a SPIFFE trust bundle), and read into the keys PyJWT verifies with.

Redirects are not followed, documents are size-limited and a JWKS holds at most `MAX_KEYS`
keys. A key of an unusable type, a private or symmetric key, an RSA key under 2048 bits, or
one with another use is skipped with a log event naming the issuer and the kid. A JWKS
with none left is an empty `KeySet`, not an error: it is what the issuer publishes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import structlog
from yarl import URL

from keyproxy import capped
from keyproxy.config import Issuer

log = structlog.get_logger("keyproxy.identity")

MAX_DOCUMENT_BYTES = 1024 * 1024
# Issuers publish a handful of keys (a SPIFFE bundle a few dozen while authorities rotate).
# SECURITY: each key is loaded, or logged as skipped, on the event loop; without a bound a
# 1 MiB document of 500,000 tiny entries stalls every request for seconds per fetch.
MAX_KEYS = 100
_TOO_LARGE = "document larger than the limit"
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=10.0, sock_connect=5.0)
# "jwt-svid" is how SPIFFE trust bundles mark keys for JWT-SVIDs; absent means any use.
KEY_USES = frozenset({None, "sig", "jwt-svid"})
# JWK members that only a private or symmetric key has: a JWKS carrying them is a mistake
# upstream, and such a key is never used.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k"})


@dataclass(frozen=True)
class KeySet:
    """An issuer's usable keys: kid (None when the JWK has none) → algorithm → key."""

    by_kid: Mapping[str | None, Mapping[str, jwt.PyJWK]]
    size: int  # usable JWKs in the document; 0 refuses every token of the issuer

    def find(self, kid: str | None) -> Mapping[str, jwt.PyJWK] | None:
        if kid is None:
            # Without a kid there is nothing to choose by; guessing among several keys
            # would make "which key signed this" ambiguous.
            return next(iter(self.by_kid.values())) if self.size == 1 else None
        return self.by_kid.get(kid)


class FetchError(Exception):
    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.message = message


async def fetch_keys(issuer: Issuer, session: aiohttp.ClientSession) -> tuple[KeySet, str]:
    """The issuer's usable keys from its configured source, and where they came from."""
    if issuer.jwks_file is not None:
        url = str(issuer.jwks_file)
        try:
            body = await asyncio.to_thread(read_limited, issuer.jwks_file)
        except OSError as exc:
            raise FetchError(url, f"cannot read file: {exc.strerror}") from None
        document = json_object(url, body)
    elif issuer.discovery_url is not None:
        meta = await _get_json(session, issuer.discovery_url)
        # SECURITY: a discovery document may only vouch for the issuer we configured;
        # otherwise one issuer's keys could verify tokens claiming another's name.
        if meta.get("issuer") != issuer.issuer:
            raise FetchError(issuer.discovery_url, "discovery document names another issuer")
        url = jwks_uri(issuer.discovery_url, meta.get("jwks_uri"))
        document = await _get_json(session, url)
    else:
        assert issuer.jwks_uri is not None  # config sets exactly one source
        url = issuer.jwks_uri
        document = await _get_json(session, url)
    return parse_jwks(issuer, url, document), url


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    # Redirects are not followed: the configured URL is the one that is trusted.
    try:
        async with session.get(
            url,
            timeout=FETCH_TIMEOUT,
            allow_redirects=False,
            headers={"Accept": "application/json"},
        ) as response:
            if response.status != 200:
                raise FetchError(url, f"HTTP status {response.status}")
            if (response.content_length or 0) > MAX_DOCUMENT_BYTES:
                raise FetchError(url, _TOO_LARGE)
            body = await capped.read_body(response.content, MAX_DOCUMENT_BYTES)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise FetchError(url, f"request failed: {type(exc).__name__}") from None
    if body is None:
        raise FetchError(url, _TOO_LARGE)
    return json_object(url, body)


# ---------------------------------------------------------------------------- key sources


def read_limited(path: Path) -> bytes:
    body = capped.read_file(path, MAX_DOCUMENT_BYTES)
    if body is None:
        raise FetchError(str(path), _TOO_LARGE)
    return body


def json_object(url: str, body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise FetchError(url, "not a JSON document") from None
    if not isinstance(document, dict):
        raise FetchError(url, "not a JSON object")
    return document


def jwks_uri(discovery_url: str, value: Any) -> str:
    if not isinstance(value, str):
        raise FetchError(discovery_url, "discovery document has no jwks_uri")
    try:
        url = URL(value)
    except ValueError:
        url = URL()
    if url.scheme not in ("http", "https") or not url.host:
        raise FetchError(discovery_url, "jwks_uri is not an absolute http(s) URL")
    # SECURITY: an https discovery document must not downgrade key fetching to plain http.
    if URL(discovery_url).scheme == "https" and url.scheme != "https":
        raise FetchError(discovery_url, "jwks_uri downgrades https to http")
    return value


def parse_jwks(issuer: Issuer, url: str, document: Mapping[str, Any]) -> KeySet:
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise FetchError(url, "not a JWKS (no keys list)")
    if len(entries) > MAX_KEYS:
        raise FetchError(url, f"more than {MAX_KEYS} keys")
    by_kid: dict[str | None, dict[str, jwt.PyJWK]] = {}
    size = 0
    for entry in entries:
        loaded = _load_key(issuer, entry)
        if loaded:
            size += 1
            slot = by_kid.setdefault(entry.get("kid"), {})
            for alg, key in loaded.items():
                slot.setdefault(alg, key)
    # SECURITY: none usable is still the issuer's answer, not a failed fetch: keeping the
    # cached set instead would trust keys it has withdrawn (a JWKS emptied after a key was
    # compromised) until jwks_max_staleness.
    return KeySet(by_kid, size)


def _load_key(issuer: Issuer, entry: Any) -> dict[str, jwt.PyJWK]:
    """The entry as a PyJWK per allowed algorithm it fits; empty (and logged) if none."""
    if not isinstance(entry, dict):
        _skipped(issuer, None, None, "not a JSON object")
        return {}
    kid, kty = entry.get("kid"), entry.get("kty")
    if kid is not None and not isinstance(kid, str):
        _skipped(issuer, None, kty, "kid is not a string")
        return {}
    use = entry.get("use")
    # Not a string: skipped like any other use (a list or object is not even hashable).
    if not isinstance(use, str | None) or use not in KEY_USES:
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
    loaded, short = {}, False
    for alg in candidates:
        if alg not in issuer.algorithms:
            continue
        try:
            key = jwt.PyJWK(entry, algorithm=alg)
            prepared = key.Algorithm.prepare_key(key.key)  # refuses e.g. P-384 for ES256
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        # What the verifier's enforce_minimum_key_length refuses (an RSA key under 2048
        # bits) is no usable key either: it would count as one, then fail every token.
        if key.Algorithm.check_key_length(prepared) is None:
            loaded[alg] = key
        else:
            short = True
    if not loaded:
        why = "too short for its algorithm" if short else "no allowed algorithm fits this key"
        _skipped(issuer, kid, kty, why)
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
