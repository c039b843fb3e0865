"""keyproxy.identity.verifier: strict JWT verification against real loopback JWKS servers."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from jwt.algorithms import get_default_algorithms
from structlog.testing import capture_logs

from keyproxy.devserver import OpenBaoDevServer
from keyproxy.errors import Unauthenticated
from keyproxy.identity import Identity, IdentityVerifier
from keyproxy.identity import verifier as identity_module
from tests.helpers.identity import (
    ATTACKER_KEY,
    AUD,
    CLUSTER,
    EC_KEY,
    ED_KEY,
    ISS,
    LEEWAY,
    NOW,
    ROTATED_KEY,
    RSA_KEY,
    SUB,
    TASK_TYP,
    TTL,
    VALID,
    Clock,
    IssuerServer,
    PrivateKey,
    b64,
    claims,
    make_issuer,
    public_jwk,
    reason_for,
    settled,
    sign,
    stack_config,
    text,
)
from tests.helpers.logscan import CANARIES
from tests.helpers.servers import Stack, Upstream, bearer, running_proxy


def b64json(value: Any) -> str:
    return b64(json.dumps(value).encode())


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token assembled by hand, as an attacker would."""
    return f"{b64json(header)}.{b64json(payload)}.{b64(signature)}"


def hs256_with_public_pem(payload: dict[str, Any]) -> str:
    """The classic key-confusion attack: HMAC keyed with the issuer's public key PEM."""
    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', 'kid': 'rsa-1'})}.{b64json(payload)}"
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def tampered(token: str) -> str:
    header, _, signature = token.split(".")
    payload = claims(1_700_000_000.0, sub="system:serviceaccount:kube-system:admin")
    return f"{header}.{b64json(payload)}.{signature}"


@pytest.fixture
async def attacker() -> AsyncIterator[IssuerServer]:
    srv = IssuerServer([public_jwk(ATTACKER_KEY, "attacker")])
    await srv.start()
    yield srv
    await srv.close()


@pytest.mark.parametrize(
    ("key", "alg", "kid"),
    [(RSA_KEY, "RS256", "rsa-1"), (EC_KEY, "ES256", "ec-1"), (ED_KEY, "EdDSA", "ed-1")],
)
async def test_valid_token_verifies(
    verifier: IdentityVerifier, clock: Clock, key: PrivateKey, alg: str, kid: str
) -> None:
    """A correctly signed RS256, ES256 or EdDSA token yields the issuer name, sub and claims."""
    payload = claims(clock.now, repository="org/repo")
    identity = await verifier.verify(sign(payload, key, alg, kid))
    assert identity == Identity(issuer="k8s", subject=SUB, claims=payload)


@pytest.mark.parametrize(
    "changes",
    [
        {"aud": [AUD, "someone-else"]},
        {"aud": "other-audience"},
        {"exp": 1_700_000_000 - int(LEEWAY) + 1},
        {"nbf": 1_700_000_000 + int(LEEWAY) - 1},
        {"iat": 1_700_000_000 + int(LEEWAY) - 1},
        {"iat": None},
    ],
    ids=[
        "aud-list",
        "second-audience",
        "exp-in-leeway",
        "nbf-in-leeway",
        "iat-in-leeway",
        "no-iat",
    ],
)
async def test_accepted_claim_variants(
    verifier: IdentityVerifier, clock: Clock, changes: dict[str, Any]
) -> None:
    """An aud list containing a configured audience, and times within the leeway, verify."""
    identity = await verifier.verify(sign(claims(clock.now, **changes)))
    assert identity.subject == SUB


async def test_claims_are_read_only(verifier: IdentityVerifier, clock: Clock) -> None:
    """The claims of a verified identity cannot be changed by later pipeline steps."""
    identity = await verifier.verify(sign(claims(clock.now)))
    with pytest.raises(TypeError):
        identity.claims["sub"] = "someone-else"  # type: ignore[index]


CASES: list[tuple[str, Callable[[], str], str]] = [
    (
        "alg-none",
        lambda: forge({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, VALID),
        "algorithm_not_allowed",
    ),
    ("alg-none-no-kid", lambda: forge({"alg": "none"}, VALID), "algorithm_not_allowed"),
    ("hs256-public-pem", lambda: hs256_with_public_pem(VALID), "algorithm_not_allowed"),
    ("rs512-not-allowed", lambda: sign(VALID, alg="RS512"), "algorithm_not_allowed"),
    ("ps256-not-allowed", lambda: sign(VALID, alg="PS256"), "algorithm_not_allowed"),
    ("es256-on-rsa-kid", lambda: sign(VALID, EC_KEY, "ES256", kid="rsa-1"), "bad_signature"),
    ("rs256-on-ec-kid", lambda: sign(VALID, kid="ec-1"), "bad_signature"),
    ("unknown-issuer", lambda: sign(claims(NOW, iss="https://evil.test")), "unknown_issuer"),
    ("issuer-trailing-slash", lambda: sign(claims(NOW, iss=ISS + "/")), "unknown_issuer"),
    ("issuer-case", lambda: sign(claims(NOW, iss=ISS.upper())), "unknown_issuer"),
    (
        "iss-not-string",
        lambda: forge({"alg": "RS256"}, claims(NOW, iss=["x"]), b"sig"),
        "malformed",
    ),
    ("wrong-aud", lambda: sign(claims(NOW, aud="someone-else")), "bad_audience"),
    ("wrong-aud-list", lambda: sign(claims(NOW, aud=["a", "b"])), "bad_audience"),
    ("expired", lambda: sign(claims(NOW, exp=int(NOW - LEEWAY) - 1)), "expired"),
    ("nbf-future", lambda: sign(claims(NOW, nbf=int(NOW + LEEWAY) + 10)), "not_yet_valid"),
    ("iat-future", lambda: sign(claims(NOW, iat=int(NOW + LEEWAY) + 10)), "not_yet_valid"),
    ("exp-not-number", lambda: sign(claims(NOW, exp="tomorrow")), "malformed"),
    ("missing-exp", lambda: sign(claims(NOW, exp=None)), "missing_claim"),
    ("missing-sub", lambda: sign(claims(NOW, sub=None)), "missing_claim"),
    ("empty-sub", lambda: sign(claims(NOW, sub="")), "missing_claim"),
    ("missing-aud", lambda: sign(claims(NOW, aud=None)), "missing_claim"),
    ("missing-iss", lambda: sign(claims(NOW, iss=None)), "missing_claim"),
    ("unknown-kid", lambda: sign(VALID, kid="nope"), "unknown_kid"),
    ("no-kid-several-keys", lambda: sign(VALID, kid=None), "unknown_kid"),
    (
        "attacker-jwk-header-issuer-kid",
        lambda: sign(VALID, ATTACKER_KEY, jwk=public_jwk(ATTACKER_KEY, "rsa-1")),
        "bad_signature",
    ),
    (
        "attacker-jwk-header-own-kid",
        lambda: sign(VALID, ATTACKER_KEY, kid="attacker", jwk=public_jwk(ATTACKER_KEY, "attacker")),
        "unknown_kid",
    ),
    ("attacker-key-issuer-kid", lambda: sign(VALID, ATTACKER_KEY), "bad_signature"),
    ("tampered-payload", lambda: tampered(sign(VALID)), "bad_signature"),
    ("stripped-signature", lambda: sign(VALID).rsplit(".", 1)[0] + ".", "bad_signature"),
    ("crit-header", lambda: sign(VALID, crit=["exp"], exp=1), "forbidden_header"),
    ("crit-b64", lambda: sign(VALID, crit=["b64"]), "forbidden_header"),
    ("task-typ", lambda: sign(VALID, typ=TASK_TYP), "wrong_token_type"),
    ("task-typ-case", lambda: sign(VALID, typ=TASK_TYP.upper()), "wrong_token_type"),
    ("task-typ-media", lambda: sign(VALID, typ="application/" + TASK_TYP), "wrong_token_type"),
    ("typ-not-string", lambda: sign(VALID, typ=1), "malformed"),
    ("kid-not-string", lambda: forge({"alg": "RS256", "kid": 1}, VALID, b"x"), "malformed"),
    ("empty", lambda: "", "malformed"),
    ("one-part", lambda: "garbage", "malformed"),
    ("two-parts", lambda: "abc.def", "malformed"),
    ("four-parts", lambda: sign(VALID) + ".abc", "malformed"),
    ("header-not-json", lambda: f"{b64(b'{nope')}.{b64json(VALID)}.sig", "malformed"),
    ("header-is-list", lambda: f"{b64json(['RS256'])}.{b64json(VALID)}.sig", "malformed"),
    ("payload-not-base64", lambda: f"{b64json({'alg': 'RS256'})}.***.sig", "malformed"),
    ("no-alg", lambda: forge({"typ": "JWT"}, VALID), "malformed"),
    ("oversized", lambda: sign(claims(NOW, pad="x" * 20_000)), "malformed"),
]


@pytest.mark.parametrize(("make", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_rejected_token(
    verifier: IdentityVerifier, clock: Clock, make: Callable[[], str], reason: str
) -> None:
    """Each malformed, forged, misdirected or out-of-time token is refused with its reason."""
    assert clock.now == NOW
    assert await reason_for(verifier, make()) == reason


async def test_jku_header_is_never_fetched(
    verifier: IdentityVerifier, attacker: IssuerServer
) -> None:
    """A token pointing jku/x5u at an attacker JWKS is refused and that URL is never fetched."""
    token = sign(
        VALID,
        ATTACKER_KEY,
        kid="attacker",
        jku=f"{attacker.url}/jwks",
        x5u=f"{attacker.url}/jwks",
    )
    assert await reason_for(verifier, token) == "unknown_kid"
    assert attacker.hits.total() == 0


async def test_failures_leave_no_token_in_logs(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer
) -> None:
    """Refused tokens, including ones that trigger JWKS fetches, never appear in log events."""
    verifier = new_verifier()
    tokens = [make() for _, make, _ in CASES]
    with capture_logs() as logs:
        await verifier.prefetch()
        server.down = True
        for token in tokens:
            with pytest.raises(Unauthenticated):
                await verifier.verify(token)
    assert logs, "the prefetch should have logged"
    text = json.dumps(logs, default=str)
    for token in tokens:
        for part in token.split("."):
            if len(part) >= 8:
                assert part not in text


async def test_no_kid_accepted_with_single_key(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer, clock: Clock
) -> None:
    """A token without kid verifies when the issuer publishes exactly one usable key."""
    server.keys = [public_jwk(RSA_KEY, None), public_jwk(EC_KEY, "ec-1", use="enc")]
    verifier = new_verifier()
    identity = await verifier.verify(sign(claims(clock.now), kid=None))
    assert identity.subject == SUB


async def test_issuer_settings_apply_per_issuer(
    server: IssuerServer, session: aiohttp.ClientSession, clock: Clock
) -> None:
    """Each token is checked with its own issuer's audiences and algorithms only."""
    other = "https://other.test"
    verifier = IdentityVerifier(
        [
            make_issuer(jwks_uri=f"{server.url}/jwks"),
            make_issuer(
                name="gha",
                issuer=other,
                audiences=("gha-only",),
                algorithms=("ES256",),
                jwks_uri=f"{server.url}/jwks",
            ),
        ],
        session,
        clock=clock,
    )
    ok = await verifier.verify(
        sign(claims(clock.now, iss=other, aud="gha-only"), EC_KEY, "ES256", "ec-1")
    )
    assert ok.issuer == "gha"
    assert await reason_for(verifier, sign(claims(clock.now, iss=other, aud="gha-only"))) == (
        "algorithm_not_allowed"
    )
    wrong_aud = sign(claims(clock.now, iss=other), EC_KEY, "ES256", "ec-1")
    assert await reason_for(verifier, wrong_aud) == "bad_audience"
    assert await reason_for(verifier, sign(claims(clock.now, aud="gha-only"))) == "bad_audience"


async def test_verified_token_is_cached_by_digest_only(
    verifier: IdentityVerifier, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second use of a token skips the signature check; the cache holds its SHA-256, not it."""
    token = sign(claims(clock.now))
    first = await verifier.verify(token)
    decoded: list[object] = []

    def counting(*args: object) -> dict[str, Any]:
        decoded.append(args)
        return {}

    monkeypatch.setattr(identity_module, "_decode", counting)
    assert await verifier.verify(token) == first
    assert decoded == []
    assert len(verifier.cache) == 1
    assert hashlib.sha256(token.encode()).digest() in verifier.cache
    assert token not in repr(vars(verifier.cache))


async def test_cached_token_still_expires(verifier: IdentityVerifier, clock: Clock) -> None:
    """The time checks run on every use: a cached token is refused once it has expired."""
    token = sign(claims(clock.now))
    await verifier.verify(token)
    clock.now += 300 + LEEWAY
    assert await reason_for(verifier, token) == "expired"
    assert len(verifier.cache) == 0


async def test_cached_token_is_refused_before_its_time(
    verifier: IdentityVerifier, clock: Clock
) -> None:
    """The window is checked at both ends on every use: with the clock set back before the
    token's iat (beyond the leeway), a remembered token is not valid yet."""
    token = sign(claims(clock.now))
    await verifier.verify(token)
    clock.now -= 2 * LEEWAY
    assert await reason_for(verifier, token) == "not_yet_valid"
    clock.now += 2 * LEEWAY
    assert (await verifier.verify(token)).subject == SUB


async def test_cached_token_survives_a_refetch_that_keeps_its_key(
    verifier: IdentityVerifier, server: IssuerServer, clock: Clock
) -> None:
    """A refetched key set holding the same key again still accepts the remembered token."""
    token = sign(claims(clock.now, exp=int(clock.now + 10 * TTL)))
    await verifier.verify(token)
    clock.now += TTL  # stale: the next use refetches the same document
    assert (await verifier.verify(token)).subject == SUB
    await settled(verifier)
    assert (await verifier.verify(token)).subject == SUB
    assert server.hits["jwks"] >= 2


async def test_cached_token_needs_the_key_that_verified_it(
    verifier: IdentityVerifier, server: IssuerServer, clock: Clock
) -> None:
    """When the issuer drops the key that verified a cached token, it is refused as if new
    once the refreshed key set has landed (until then the cached set still answers)."""
    token = sign(claims(clock.now, exp=int(clock.now + 10 * TTL)))
    await verifier.verify(token)
    server.keys = [public_jwk(ROTATED_KEY, "rsa-2", use="sig")]
    clock.now += TTL  # the key set is stale and refreshed in the background on the next use
    assert (await verifier.verify(token)).subject == SUB
    await settled(verifier)
    assert await reason_for(verifier, token) == "unknown_kid"
    assert server.hits["jwks"] == 3  # the refresh, then one forced by the unknown kid


async def test_failures_are_not_cached(verifier: IdentityVerifier, clock: Clock) -> None:
    """A token that failed is checked again in full next time, and never remembered."""
    token = sign(claims(clock.now), ATTACKER_KEY)
    assert await reason_for(verifier, token) == "bad_signature"
    assert await reason_for(verifier, token) == "bad_signature"
    assert len(verifier.cache) == 0


async def test_not_yet_valid_token_is_not_cached(verifier: IdentityVerifier, clock: Clock) -> None:
    """A token refused for its time is not remembered, and verifies once its time has come."""
    token = sign(claims(clock.now, nbf=int(clock.now + 2 * LEEWAY)))
    assert await reason_for(verifier, token) == "not_yet_valid"
    assert len(verifier.cache) == 0
    clock.now += 2 * LEEWAY
    assert (await verifier.verify(token)).subject == SUB


async def test_cache_is_bounded(
    new_verifier: Callable[..., IdentityVerifier], clock: Clock
) -> None:
    """The cache never holds more tokens than its size; the oldest one goes first."""
    verifier = new_verifier()
    verifier.cache.size = 2
    tokens = [sign(claims(clock.now, jti=f"t{i}")) for i in range(3)]
    for token in tokens:
        await verifier.verify(token)
    assert len(verifier.cache) == 2
    assert hashlib.sha256(tokens[0].encode()).digest() not in verifier.cache
    assert hashlib.sha256(tokens[2].encode()).digest() in verifier.cache


async def test_cache_evicts_expired_tokens_first(
    new_verifier: Callable[..., IdentityVerifier], clock: Clock
) -> None:
    """When the cache is full, tokens that have expired make room before live ones."""
    verifier = new_verifier()
    verifier.cache.size = 2
    short = sign(claims(clock.now, exp=int(clock.now + 10)))
    live = sign(claims(clock.now, jti="live"))
    await verifier.verify(short)
    await verifier.verify(live)
    clock.now += 10 + LEEWAY
    await verifier.verify(sign(claims(clock.now, jti="new")))
    assert hashlib.sha256(short.encode()).digest() not in verifier.cache
    assert hashlib.sha256(live.encode()).digest() in verifier.cache


HEADER = {"alg": "RS256", "kid": "rsa-1", "typ": "JWT"}


def sign_raw(header: bytes, payload: bytes, key: PrivateKey = RSA_KEY, alg: str = "RS256") -> str:
    """A token validly signed over exactly these header and payload bytes."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    signature = get_default_algorithms()[alg].sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


def with_member(value: dict[str, Any], member: str) -> str:
    """The JSON text of `value` with one more raw member written after the others."""
    return text(value)[:-1] + ", " + member + "}"


HEADER_TEXT = text(HEADER)


ADMIN = "system:serviceaccount:kube-system:admin"


# (id, header bytes, payload bytes, what the refusal message names)
ENCODINGS: list[tuple[str, bytes, bytes, str]] = [
    ("payload-utf16le", HEADER_TEXT.encode(), text(VALID).encode("utf-16-le"), "not JSON"),
    ("payload-utf16be", HEADER_TEXT.encode(), text(VALID).encode("utf-16-be"), "not JSON"),
    ("payload-utf16-bom", HEADER_TEXT.encode(), text(VALID).encode("utf-16"), "not UTF-8"),
    ("payload-utf32", HEADER_TEXT.encode(), text(VALID).encode("utf-32"), "not UTF-8"),
    ("payload-utf32be", HEADER_TEXT.encode(), text(VALID).encode("utf-32-be"), "not JSON"),
    ("payload-utf8-bom", HEADER_TEXT.encode(), text(VALID).encode("utf-8-sig"), "byte order"),
    ("header-utf16le", HEADER_TEXT.encode("utf-16-le"), text(VALID).encode(), "not JSON"),
    ("header-utf8-bom", HEADER_TEXT.encode("utf-8-sig"), text(VALID).encode(), "byte order"),
    (
        "payload-latin1",
        HEADER_TEXT.encode(),
        json.dumps(claims(NOW, name="Jos\u00e9"), ensure_ascii=False).encode("latin-1"),
        "not UTF-8",
    ),
    (
        "payload-encoded-surrogate",
        HEADER_TEXT.encode(),
        text(VALID).encode()[:-1] + b', "x": "\xed\xa0\x80"}',
        "not UTF-8",
    ),
    (
        "payload-escaped-lone-surrogate",
        HEADER_TEXT.encode(),
        with_member(VALID, '"name": "\\ud800"').encode(),
        "lone surrogate",
    ),
    (
        "duplicate-sub",
        HEADER_TEXT.encode(),
        with_member(VALID, f'"sub": "{ADMIN}"').encode(),
        "repeated",
    ),
    (
        "duplicate-aud",
        HEADER_TEXT.encode(),
        with_member(claims(NOW, aud="someone-else"), f'"aud": "{AUD}"').encode(),
        "repeated",
    ),
    (
        "duplicate-iss",
        HEADER_TEXT.encode(),
        with_member(claims(NOW, iss="https://evil.test"), f'"iss": "{ISS}"').encode(),
        "repeated",
    ),
    (
        "duplicate-exp",
        HEADER_TEXT.encode(),
        with_member(VALID, f'"exp": {int(NOW) + 10**6}').encode(),
        "repeated",
    ),
    (
        "duplicate-nested",
        HEADER_TEXT.encode(),
        with_member(VALID, '"ctx": {"repo": "a", "repo": "b"}').encode(),
        "repeated",
    ),
    (
        "duplicate-header-alg",
        with_member(HEADER, '"alg": "RS256"').encode(),
        text(VALID).encode(),
        "repeated",
    ),
    (
        "duplicate-header-alg-none-first",
        ('{"alg": "none", ' + HEADER_TEXT[1:]).encode(),
        text(VALID).encode(),
        "repeated",
    ),
    (
        "duplicate-header-kid",
        ('{"kid": "ec-1", ' + HEADER_TEXT[1:]).encode(),
        text(VALID).encode(),
        "repeated",
    ),
    ("nan-claim", HEADER_TEXT.encode(), with_member(VALID, '"x": NaN').encode(), "NaN"),
    (
        "infinity-claim",
        HEADER_TEXT.encode(),
        with_member(VALID, '"x": Infinity').encode(),
        "Infinity",
    ),
    (
        "minus-infinity-claim",
        HEADER_TEXT.encode(),
        with_member(VALID, '"x": -Infinity').encode(),
        "Infinity",
    ),
    (
        "nan-exp",
        HEADER_TEXT.encode(),
        with_member(claims(NOW, exp=None), '"exp": NaN').encode(),
        "NaN",
    ),
    (
        "overflowing-exp",
        HEADER_TEXT.encode(),
        with_member(claims(NOW, exp=None), '"exp": 1e400').encode(),
        "out of range",
    ),
    ("payload-is-list", HEADER_TEXT.encode(), b"[1, 2]", "not a JSON object"),
]


async def test_strictly_encoded_raw_token_verifies(verifier: IdentityVerifier) -> None:
    """The control for the encoding table: the same construction over plain UTF-8 JSON,
    with escapes and text beyond ASCII, verifies."""
    payload = json.dumps(claims(NOW, name="Jos\u00e9 \U0001f600"), ensure_ascii=False)
    identity = await verifier.verify(sign_raw(HEADER_TEXT.encode(), payload.encode()))
    assert identity.claims["name"] == "Jos\u00e9 \U0001f600"
    escaped = json.dumps(claims(NOW, name="Jos\u00e9 \U0001f600"))  # \\u escapes, a pair
    identity = await verifier.verify(sign_raw(HEADER_TEXT.encode(), escaped.encode()))
    assert identity.claims["name"] == "Jos\u00e9 \U0001f600"


@pytest.mark.parametrize(
    ("header", "payload", "why"), [c[1:] for c in ENCODINGS], ids=[c[0] for c in ENCODINGS]
)
async def test_token_outside_strict_utf8_json_is_refused(
    verifier: IdentityVerifier, header: bytes, payload: bytes, why: str
) -> None:
    """A validly signed token whose header or claims are not strictly UTF-8 JSON objects
    (UTF-16/32, a BOM, repeated names, NaN/Infinity, lone surrogates) is malformed."""
    token = sign_raw(header, payload)
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(token)
    assert caught.value.reason == "malformed"
    assert why in caught.value.message
    assert len(verifier.cache) == 0


TIMES: list[tuple[str, dict[str, Any], str]] = [
    ("exp-1e20", {"exp": 1e20}, "exp"),
    ("exp-after-9999", {"exp": 253402300800}, "exp"),
    ("exp-negative", {"exp": -1}, "exp"),
    ("exp-huge-int", {"exp": 10**30}, "exp"),
    ("iat-negative", {"iat": -1}, "iat"),
    ("iat-1e20", {"iat": 1e20}, "iat"),
    ("nbf-negative", {"nbf": -5}, "nbf"),
    ("nbf-after-9999", {"nbf": 253402300800}, "nbf"),
]


@pytest.mark.parametrize(("changes", "name"), [c[1:] for c in TIMES], ids=[c[0] for c in TIMES])
async def test_times_no_issuer_writes_are_refused(
    verifier: IdentityVerifier, changes: dict[str, Any], name: str
) -> None:
    """exp, iat and nbf beyond year 9999 or before 1970 are malformed, not merely expired."""
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(sign(claims(NOW, **changes)))
    assert (caught.value.reason, caught.value.message) == (
        "malformed",
        f"the token's {name} claim is not a plausible time",
    )


@pytest.mark.parametrize("exp", [253402300799, 253402300799.0, int(NOW) + 366 * 86400])
async def test_far_expiry_is_accepted_without_a_lifetime_limit(
    verifier: IdentityVerifier, exp: float
) -> None:
    """Without max_token_lifetime a year-long token (Kubernetes' extended expiration) and
    one expiring at the end of year 9999 verify."""
    assert (await verifier.verify(sign(claims(NOW, exp=exp)))).subject == SUB


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"exp": int(NOW) + 3600}, None),
        ({"exp": int(NOW) + 60}, None),
        ({"iat": int(NOW) - 3000, "exp": int(NOW) + 600}, None),
        ({"exp": int(NOW) + 3601}, "lifetime_too_long"),
        ({"iat": int(NOW) - 3000, "exp": int(NOW) + 601}, "lifetime_too_long"),
        ({"exp": int(NOW) + 366 * 86400}, "lifetime_too_long"),
        ({"iat": None}, "missing_claim"),
    ],
    ids=["at-limit", "short", "old-iat-in-limit", "over", "old-iat-over", "a-year", "no-iat"],
)
async def test_max_token_lifetime(
    new_verifier: Callable[..., IdentityVerifier], changes: dict[str, Any], reason: str | None
) -> None:
    """With max_token_lifetime, exp - iat above it is refused and iat becomes required."""
    verifier = new_verifier(max_token_lifetime=3600.0)
    token = sign(claims(NOW, **changes))
    if reason is None:
        assert (await verifier.verify(token)).subject == SUB
    else:
        assert await reason_for(verifier, token) == reason


PARTNER = "partner-ci-west"


PARTNER_ISS = "https://partner-ci.example.test"


def bad_tokens(now: float) -> list[tuple[str, str, str]]:
    """(id, token, reason) for tokens refused for many reasons, at time `now`."""
    good = claims(now)
    return [
        ("algorithm", sign(good, alg="PS256"), "algorithm_not_allowed"),
        ("unknown-kid", sign(good, kid="nope"), "unknown_kid"),
        ("attacker-key", sign(good, ATTACKER_KEY), "bad_signature"),
        ("wrong-key-type", sign(good, EC_KEY, "ES256", kid="rsa-1"), "bad_signature"),
        ("audience", sign(claims(now, aud="someone-else")), "bad_audience"),
        ("expired", sign(claims(now, exp=int(now) - 600)), "expired"),
        ("future", sign(claims(now, nbf=int(now) + 600)), "not_yet_valid"),
        ("no-sub", sign(claims(now, sub=None)), "missing_claim"),
        ("lifetime", sign(claims(now, exp=int(now) + 7200)), "lifetime_too_long"),
        ("exp-1e20", sign(claims(now, exp=1e20)), "malformed"),
        ("utf16", sign_raw(HEADER_TEXT.encode(), text(good).encode("utf-16")), "malformed"),
        (
            "duplicate-sub",
            sign_raw(HEADER_TEXT.encode(), with_member(good, f'"sub": "{ADMIN}"').encode()),
            "malformed",
        ),
        ("partner-keys-down", sign(claims(now, iss=PARTNER_ISS)), "jwks_unavailable"),
        (
            "partner-algorithm",
            sign(claims(now, iss=PARTNER_ISS), EC_KEY, "ES256", "ec-1"),
            "algorithm_not_allowed",
        ),
        ("unknown-issuer", sign(claims(now, iss="https://evil.test")), "unknown_issuer"),
        ("issuer-near-miss", sign(claims(now, iss=ISS + "/")), "unknown_issuer"),
        ("garbage", "not-a-token", "malformed"),
    ]


@pytest.fixture
async def named_stack(
    openbao: OpenBaoDevServer, server: IssuerServer, upstream: Upstream
) -> AsyncIterator[Stack]:
    """The real proxy trusting two issuers with telling names: `server` (max token lifetime
    1h) and one whose keys cannot be fetched."""
    closed = IssuerServer([])
    await closed.start()
    down_url = f"{closed.url}/jwks"
    await closed.close()
    issuers = [
        {
            "name": CLUSTER,
            "issuer": ISS,
            "jwks_uri": f"{server.url}/jwks",
            "audiences": [AUD],
            "algorithms": ["RS256", "ES256"],
            "max_token_lifetime": "1h",
        },
        {
            "name": PARTNER,
            "issuer": PARTNER_ISS,
            "jwks_uri": down_url,
            "audiences": [AUD],
            "algorithms": ["RS256"],
        },
    ]
    async with running_proxy(stack_config(openbao, upstream, issuers)) as stack:
        yield stack


async def test_refusals_name_no_configured_issuer(
    named_stack: Stack, server: IssuerServer, http: aiohttp.ClientSession
) -> None:
    """No 401 from the proxy or the token broker, whatever is wrong with the token, names a
    configured issuer or its URL; each carries its reason, and a good token still works."""
    now = time.time()
    secret_words = [CLUSTER, PARTNER, ISS, PARTNER_ISS, "issuer.test", "partner-ci", server.url]
    good = sign(claims(now))
    CANARIES.add(good)
    async with http.get(f"{named_stack.base}/r/r/echo", headers=bearer(good)) as response:
        assert response.status == 200
    for name, token, reason in bad_tokens(now):
        CANARIES.add(token)
        for method, url in (("GET", "/r/r/echo"), ("POST", "/token")):
            async with http.request(
                method, named_stack.base + url, headers=bearer(token), json={"scope": {}}
            ) as response:
                body = await response.text()
                assert response.status == 401, (name, url, body)
                assert json.loads(body)["error"]["code"] == reason, (name, url)
                answer = body + json.dumps(dict(response.headers))
                for word in secret_words:
                    assert word not in answer, (name, url, word)
