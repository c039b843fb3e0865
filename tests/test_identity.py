"""Tests for keyproxy.identity: strict JWT verification against real loopback JWKS servers."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm, get_default_algorithms
from structlog.testing import capture_logs

from keyproxy import config
from keyproxy.config import Issuer
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.errors import ConfigError, Unauthenticated, Unavailable
from keyproxy.identity import MAX_DOCUMENT_BYTES, Identity, IdentityVerifier
from keyproxy.identity import verifier as identity_module
from keyproxy.metrics import Metrics
from keyproxy.server.app import METRICS
from tests.helpers.configs import CONFIG_SECTIONS
from tests.helpers.events import read_events
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import Stack, Upstream, bearer, new_key, running_proxy

ISS = "https://issuer.test"
AUD = "keyproxy"
SUB = "system:serviceaccount:agents:summarizer"
TASK_TYP = "keyproxy-task+jwt"
LEEWAY = 30.0
TTL = 600.0
COOLDOWN = 30.0

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ROTATED_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ATTACKER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def public_jwk(key: PrivateKey, kid: str | None, **extra: Any) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    return {**jwk, **extra}


ISSUER_KEYS = [
    public_jwk(RSA_KEY, "rsa-1", use="sig"),
    public_jwk(EC_KEY, "ec-1"),
    public_jwk(ED_KEY, "ed-1", use="sig"),
]


class Clock:
    """An injectable clock the tests move by hand."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def claims(now: float, **changes: Any) -> dict[str, Any]:
    """Valid claims at `now`; a change to None drops the claim."""
    base = {"iss": ISS, "sub": SUB, "aud": AUD, "iat": int(now), "exp": int(now) + 300}
    merged = {**base, **changes}
    return {k: v for k, v in merged.items() if v is not None}


def sign(
    payload: dict[str, Any],
    key: PrivateKey = RSA_KEY,
    alg: str = "RS256",
    kid: str | None = "rsa-1",
    **headers: Any,
) -> str:
    if kid is not None:
        headers["kid"] = kid
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


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


class IssuerServer:
    """A real JWKS and discovery server on 127.0.0.1 that counts what it serves."""

    def __init__(self, keys: list[Any]) -> None:
        self.keys = keys
        self.hits: Counter[str] = Counter()
        self.down = False
        self.discovery_issuer: str | None = ISS
        self.gate: asyncio.Event | None = None
        self.url = ""
        app = web.Application()
        app.router.add_get("/jwks", self._jwks)
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/huge", self._huge)
        self._runner = web.AppRunner(app)

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def close(self) -> None:
        await self._runner.cleanup()

    async def _jwks(self, _: web.Request) -> web.Response:
        self.hits["jwks"] += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            return web.Response(status=503)
        return web.json_response({"keys": self.keys})

    async def _discovery(self, _: web.Request) -> web.Response:
        self.hits["discovery"] += 1
        document: dict[str, Any] = {"jwks_uri": f"{self.url}/jwks"}
        if self.discovery_issuer is not None:
            document["issuer"] = self.discovery_issuer
        return web.json_response(document)

    async def _redirect(self, _: web.Request) -> web.Response:
        self.hits["redirect"] += 1
        raise web.HTTPFound(f"{self.url}/jwks")

    async def _huge(self, _: web.Request) -> web.Response:
        self.hits["huge"] += 1
        padding = "x" * MAX_DOCUMENT_BYTES
        return web.json_response({"keys": self.keys, "padding": padding})


@pytest.fixture
async def server() -> AsyncIterator[IssuerServer]:
    srv = IssuerServer(list(ISSUER_KEYS))
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def attacker() -> AsyncIterator[IssuerServer]:
    srv = IssuerServer([public_jwk(ATTACKER_KEY, "attacker")])
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_issuer(**changes: Any) -> Issuer:
    base = Issuer(
        name="k8s",
        issuer=ISS,
        audiences=(AUD, "other-audience"),
        algorithms=("RS256", "ES256", "EdDSA"),
        leeway=LEEWAY,
        jwks_cache_ttl=TTL,
        jwks_refetch_cooldown=COOLDOWN,
    )
    return replace(base, **changes)


@pytest.fixture
async def new_verifier(
    server: IssuerServer, session: aiohttp.ClientSession, clock: Clock
) -> AsyncIterator[Callable[..., IdentityVerifier]]:
    """Build a verifier for one issuer (by default the JWKS URL of `server`); each one is
    closed (its background fetches cancelled) after the test."""
    built: list[IdentityVerifier] = []

    def build(**changes: Any) -> IdentityVerifier:
        if not {"discovery_url", "jwks_file", "jwks_uri"} & changes.keys():
            changes["jwks_uri"] = f"{server.url}/jwks"
        built.append(
            IdentityVerifier(
                [make_issuer(**changes)], session, clock=clock, rejected_types=(TASK_TYP,)
            )
        )
        return built[-1]

    yield build
    for verifier in built:
        await verifier.aclose()


@pytest.fixture
async def verifier(new_verifier: Callable[..., IdentityVerifier]) -> IdentityVerifier:
    v = new_verifier()
    await v.prefetch()
    return v


async def settled(verifier: IdentityVerifier) -> None:
    """Wait, bounded, until no background key fetch is running."""
    await eventually(
        lambda: not any(entry["fetching"] for entry in verifier.key_status().values()),
        "the key fetch never ended",
        within=5,
    )


async def reason_for(verifier: IdentityVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(token)
    # SECURITY: the error text reaches callers and logs; no part of the token may be in it.
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in str(caught.value)
            assert part not in caught.value.message
    return caught.value.reason


# ---------------------------------------------------------------------------- valid tokens


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


# ---------------------------------------------------------------------------- rejected tokens

NOW = 1_700_000_000.0
VALID = claims(NOW)
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


# ---------------------------------------------------------------------------- key sources


async def test_unknown_kid_refetches_once_per_cooldown(
    verifier: IdentityVerifier, server: IssuerServer, clock: Clock
) -> None:
    """An unknown kid refetches the JWKS once; more unknown kids wait out the cooldown."""
    assert server.hits["jwks"] == 1
    assert await reason_for(verifier, sign(VALID, kid="first-unknown")) == "unknown_kid"
    assert server.hits["jwks"] == 2
    clock.now += COOLDOWN - 1
    assert await reason_for(verifier, sign(VALID, kid="second-unknown")) == "unknown_kid"
    assert server.hits["jwks"] == 2
    clock.now += 1
    assert await reason_for(verifier, sign(VALID, kid="third-unknown")) == "unknown_kid"
    assert server.hits["jwks"] == 3


async def test_rotated_key_is_picked_up(
    verifier: IdentityVerifier, server: IssuerServer, clock: Clock
) -> None:
    """A newly published issuer key verifies through the unknown-kid refetch."""
    server.keys = [public_jwk(ROTATED_KEY, "rsa-2")]
    identity = await verifier.verify(sign(claims(clock.now), ROTATED_KEY, kid="rsa-2"))
    assert identity.subject == SUB
    assert server.hits["jwks"] == 2
    # The retired key is gone with the set it belonged to.
    assert await reason_for(verifier, sign(claims(clock.now))) == "unknown_kid"


@pytest.mark.parametrize("cooldown", [COOLDOWN, 0.0])
async def test_concurrent_unknown_kids_share_one_fetch(
    new_verifier: Callable[..., IdentityVerifier],
    server: IssuerServer,
    clock: Clock,
    cooldown: float,
) -> None:
    """Concurrent verifications that miss the same kid wait on a single JWKS fetch."""
    verifier = new_verifier(jwks_refetch_cooldown=cooldown)
    await verifier.prefetch()
    server.keys = [*ISSUER_KEYS, public_jwk(ROTATED_KEY, "rsa-2")]
    server.gate = asyncio.Event()
    token = sign(claims(clock.now), ROTATED_KEY, kid="rsa-2")
    tasks = [asyncio.create_task(verifier.verify(token)) for _ in range(5)]
    try:
        await eventually(lambda: server.hits["jwks"] >= 2, "the refetch never arrived", within=5)
        server.gate.set()
        identities = await asyncio.gather(*tasks)
    finally:
        server.gate.set()
        for task in tasks:
            task.cancel()
    assert {i.subject for i in identities} == {SUB}
    assert server.hits["jwks"] == 2


async def test_no_kid_accepted_with_single_key(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer, clock: Clock
) -> None:
    """A token without kid verifies when the issuer publishes exactly one usable key."""
    server.keys = [public_jwk(RSA_KEY, None), public_jwk(EC_KEY, "ec-1", use="enc")]
    verifier = new_verifier()
    identity = await verifier.verify(sign(claims(clock.now), kid=None))
    assert identity.subject == SUB


async def test_discovery_document_source(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer, clock: Clock
) -> None:
    """Keys are found through the discovery document's jwks_uri."""
    verifier = new_verifier(discovery_url=f"{server.url}/.well-known/openid-configuration")
    await verifier.prefetch()
    assert await verifier.verify(sign(claims(clock.now))) == Identity("k8s", SUB, claims(clock.now))
    assert server.hits == Counter({"discovery": 1, "jwks": 1})


@pytest.mark.parametrize("named", ["https://evil.test", ISS + "/", None])
async def test_discovery_naming_another_issuer_is_refused(
    new_verifier: Callable[..., IdentityVerifier],
    server: IssuerServer,
    clock: Clock,
    named: str | None,
) -> None:
    """A discovery document whose issuer differs (or is absent) yields no keys."""
    server.discovery_issuer = named
    verifier = new_verifier(discovery_url=f"{server.url}/.well-known/openid-configuration")
    with capture_logs() as logs:
        await verifier.prefetch()
    assert await reason_for(verifier, sign(claims(clock.now))) == "jwks_unavailable"
    assert server.hits["jwks"] == 0
    assert [e["event"] for e in logs] == ["jwks_fetch_failed"]
    assert logs[0]["issuer"] == "k8s"


async def test_jwks_file_source(
    new_verifier: Callable[..., IdentityVerifier],
    server: IssuerServer,
    clock: Clock,
    tmp_path: Path,
) -> None:
    """A local SPIFFE bundle verifies JWT-SVIDs; keys for other uses are not used."""
    bundle = tmp_path / "bundle.json"
    bundle.write_text(
        json.dumps(
            {
                "spiffe_sequence": 1,
                "keys": [
                    public_jwk(EC_KEY, "svid-1", use="jwt-svid"),
                    public_jwk(RSA_KEY, "x509-1", use="x509-svid"),
                ],
            }
        )
    )
    verifier = new_verifier(jwks_file=bundle)
    payload = claims(clock.now, sub="spiffe://example.org/agent")
    identity = await verifier.verify(sign(payload, EC_KEY, "ES256", kid="svid-1"))
    assert identity == Identity("k8s", "spiffe://example.org/agent", payload)
    assert await reason_for(verifier, sign(claims(clock.now), kid="x509-1")) == "unknown_kid"
    assert server.hits.total() == 0


async def test_missing_jwks_file_is_unavailable(
    new_verifier: Callable[..., IdentityVerifier], clock: Clock, tmp_path: Path
) -> None:
    """An unreadable JWKS file means no keys, and the error names no token content."""
    verifier = new_verifier(jwks_file=tmp_path / "absent.json")
    assert await reason_for(verifier, sign(claims(clock.now))) == "jwks_unavailable"


async def test_cached_keys_survive_outage(
    verifier: IdentityVerifier, server: IssuerServer, clock: Clock
) -> None:
    """After the TTL a failed refetch keeps the old keys, and retries wait for the cooldown."""
    server.down = True
    clock.now += TTL + 1
    with capture_logs() as logs:
        assert (await verifier.verify(sign(claims(clock.now)))).subject == SUB
        await settled(verifier)
        assert server.hits["jwks"] == 2
        assert (await verifier.verify(sign(claims(clock.now)))).subject == SUB
        await settled(verifier)
        assert server.hits["jwks"] == 2
    assert logs[0]["event"] == "jwks_fetch_failed"
    assert logs[0]["serving_cached"] is True
    clock.now += COOLDOWN
    server.down = False
    server.keys = [public_jwk(ROTATED_KEY, "rsa-2")]
    assert (await verifier.verify(sign(claims(clock.now), ROTATED_KEY, kid="rsa-2"))).subject
    assert server.hits["jwks"] == 3


async def test_keys_are_cached_until_ttl(
    verifier: IdentityVerifier, server: IssuerServer, clock: Clock
) -> None:
    """Verifications within the TTL reuse the cached set; after it the set is refetched."""
    for _ in range(3):
        await verifier.verify(sign(claims(clock.now)))
    assert server.hits["jwks"] == 1
    clock.now += TTL
    await verifier.verify(sign(claims(clock.now)))
    await settled(verifier)
    assert server.hits["jwks"] == 2


@pytest.mark.parametrize(
    ("path", "reason"),
    [("/jwks", "HTTP status 503"), ("/redirect", "HTTP status 302"), ("/huge", "limit")],
)
async def test_unusable_jwks_endpoint_is_unavailable(
    new_verifier: Callable[..., IdentityVerifier],
    server: IssuerServer,
    clock: Clock,
    path: str,
    reason: str,
) -> None:
    """A failing, redirecting or oversized JWKS endpoint yields no keys; prefetch only logs."""
    server.down = path == "/jwks"
    verifier = new_verifier(jwks_uri=f"{server.url}{path}")
    with capture_logs() as logs:
        await verifier.prefetch()
    assert logs[0]["event"] == "jwks_fetch_failed"
    assert reason in logs[0]["error"]
    assert await reason_for(verifier, sign(claims(clock.now))) == "jwks_unavailable"
    assert server.hits["jwks"] == (1 if path == "/jwks" else 0)


async def test_unreachable_issuer_is_unavailable(
    session: aiohttp.ClientSession, clock: Clock
) -> None:
    """A JWKS URL nobody listens on yields jwks_unavailable, not an exception."""
    closed = IssuerServer([])
    await closed.start()
    url = f"{closed.url}/jwks"
    await closed.close()
    verifier = IdentityVerifier([make_issuer(jwks_uri=url)], session, clock=clock)
    assert await reason_for(verifier, sign(claims(clock.now))) == "jwks_unavailable"


async def test_unusable_keys_are_skipped_without_key_material(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer, clock: Clock
) -> None:
    """Broken, private, encryption and wrong-curve keys are skipped and logged by id only."""
    private = RSAAlgorithm.to_jwk(ROTATED_KEY, as_dict=True)
    p384 = public_jwk(ec.generate_private_key(ec.SECP384R1()), "p384")
    server.keys = [
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        {**private, "kid": "private"},
        public_jwk(ATTACKER_KEY, "enc", use="enc"),
        public_jwk(ATTACKER_KEY, "no-verify", key_ops=["encrypt"]),
        {"kty": "oct", "kid": "hmac", "k": b64(b"shared-secret")},
        p384,
        "not-an-object",
        public_jwk(RSA_KEY, "rsa-1"),
    ]
    verifier = new_verifier()
    with capture_logs() as logs:
        await verifier.prefetch()
    skipped = [e for e in logs if e["event"] == "jwks_key_skipped"]
    assert len(skipped) == 7
    fetched = [e for e in logs if e["event"] == "jwks_fetched"]
    assert fetched[0]["keys"] == 1
    text = json.dumps(logs)
    for member in ("n", "d", "p", "q"):
        assert private[member] not in text
    assert p384["x"] not in text
    assert (await verifier.verify(sign(claims(clock.now)))).subject == SUB
    assert await reason_for(verifier, sign(claims(clock.now), kid="private")) == "unknown_kid"


async def test_jwk_declared_alg_binds_the_key(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer, clock: Clock
) -> None:
    """A JWK that names its alg never verifies a token of another allowed algorithm."""
    server.keys = [public_jwk(RSA_KEY, "rsa-1", alg="RS256")]
    verifier = new_verifier(algorithms=("RS256", "PS256"))
    assert (await verifier.verify(sign(claims(clock.now)))).subject == SUB
    token = sign(claims(clock.now), alg="PS256")
    assert await reason_for(verifier, token) == "bad_signature"


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


# ---------------------------------------------------------------------------- verified cache


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


# ---------------------------------------------------------------------------- strict encodings

HEADER = {"alg": "RS256", "kid": "rsa-1", "typ": "JWT"}


def sign_raw(header: bytes, payload: bytes, key: PrivateKey = RSA_KEY, alg: str = "RS256") -> str:
    """A token validly signed over exactly these header and payload bytes."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    signature = get_default_algorithms()[alg].sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


def text(value: dict[str, Any]) -> str:
    return json.dumps(value)


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


# ---------------------------------------------------------------------------- stale keys


async def test_cached_kid_is_answered_while_the_issuer_stalls(
    verifier: IdentityVerifier, server: IssuerServer, clock: Clock
) -> None:
    """Past jwks_cache_ttl a token with a cached kid is answered at once while the refresh
    is still waiting on the issuer; once it lands its new keys are used without a fetch."""
    remembered = sign(claims(clock.now, exp=int(clock.now + 10 * TTL)))
    await verifier.verify(remembered)
    server.gate = asyncio.Event()
    clock.now += TTL + 1
    fresh = sign(claims(clock.now, jti="never-seen"))
    answers = [asyncio.create_task(verifier.verify(t)) for t in (remembered, fresh)]
    try:
        await eventually(
            lambda: server.hits["jwks"] == 2, "the refresh never reached the issuer", within=5
        )
        assert all(a.done() for a in answers), "a request waited for the stalled issuer"
        assert [a.result().subject for a in answers] == [SUB, SUB]
        assert verifier.key_status()["k8s"]["fetching"]
        # More requests while it stalls: still answered, and no second fetch.
        assert (await verifier.verify(sign(claims(clock.now, jti="another")))).subject == SUB
        assert server.hits["jwks"] == 2
        server.keys = [*ISSUER_KEYS, public_jwk(ROTATED_KEY, "rsa-2")]
    finally:
        server.gate.set()
        for answer in answers:
            answer.cancel()
    await settled(verifier)
    rotated = sign(claims(clock.now), ROTATED_KEY, kid="rsa-2")
    assert (await verifier.verify(rotated)).subject == SUB
    assert server.hits["jwks"] == 2
    assert verifier.key_status()["k8s"]["age"] == 0.0


async def test_keys_past_max_staleness_are_refused(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer, clock: Clock
) -> None:
    """With the issuer down, cached keys serve until jwks_max_staleness after the last good
    fetch; then its tokens, remembered ones too, get 503 issuer_keys_stale, which is counted
    and logged with the issuer's name, until a fetch succeeds again."""
    verifier = new_verifier(jwks_max_staleness=3 * TTL)
    await verifier.prefetch()
    remembered = sign(claims(clock.now, exp=int(clock.now + 10 * TTL)))
    await verifier.verify(remembered)
    server.down = True
    clock.now += 3 * TTL  # exactly at the limit: still served
    assert (await verifier.verify(remembered)).subject == SUB
    await settled(verifier)
    clock.now += COOLDOWN + 1
    with capture_logs() as logs:
        for token in (remembered, sign(claims(clock.now, jti="new"))):
            with pytest.raises(Unavailable) as caught:
                await verifier.verify(token)
            assert (caught.value.reason, caught.value.status) == ("issuer_keys_stale", 503)
            assert "k8s" not in caught.value.message
            assert ISS not in caught.value.message
    failed = [e for e in logs if e["event"] == "jwks_fetch_failed"]
    assert len(failed) == 1  # one fetch per cooldown, however many requests
    assert (failed[0]["issuer"], failed[0]["serving_cached"]) == ("k8s", False)
    assert failed[0]["keys_age"] > 3 * TTL
    status = verifier.key_status()["k8s"]
    assert (status["stale"], status["stale_refusals"]) == (True, 2)
    metrics = Metrics(dict)
    metrics.watch_signing_keys(verifier.key_status, lambda: _NO_TASK_KEYS)
    exposition = metrics.exposition()[0].decode()
    assert 'keyproxy_identity_stale_refusals_total{issuer="k8s"} 2.0' in exposition
    assert 'keyproxy_identity_keys_stale{issuer="k8s"} 1.0' in exposition
    assert f'keyproxy_identity_keys_age_seconds{{issuer="k8s"}} {status["age"]}' in exposition
    server.down = False
    clock.now += COOLDOWN
    assert (await verifier.verify(remembered)).subject == SUB
    assert verifier.key_status()["k8s"]["stale"] is False


_NO_TASK_KEYS: dict[str, Any] = {"age": None, "stale": False, "stale_refusals": 0}


async def test_no_keys_yet_waits_for_the_fetch(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer, clock: Clock
) -> None:
    """Without any cached keys a request does wait for the fetch (there is nothing to
    answer with), and concurrent ones share it."""
    verifier = new_verifier()
    server.gate = asyncio.Event()
    answers = [asyncio.create_task(verifier.verify(sign(claims(clock.now)))) for _ in range(3)]
    try:
        await eventually(
            lambda: server.hits["jwks"] == 1, "the fetch never reached the issuer", within=5
        )
        assert not any(a.done() for a in answers)
        server.gate.set()
        assert [i.subject for i in await asyncio.gather(*answers)] == [SUB] * 3
    finally:
        server.gate.set()
        for answer in answers:
            answer.cancel()
    assert server.hits["jwks"] == 1


async def test_aclose_cancels_the_background_fetch(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer, clock: Clock
) -> None:
    """aclose() cancels a refresh stalled on the issuer and starts no new one after."""
    verifier = new_verifier()
    await verifier.prefetch()
    server.gate = asyncio.Event()
    clock.now += TTL
    try:
        assert (await verifier.verify(sign(claims(clock.now)))).subject == SUB
        await eventually(
            lambda: server.hits["jwks"] == 2, "the refresh never reached the issuer", within=5
        )
        await verifier.aclose()
        assert not verifier.key_status()["k8s"]["fetching"]
        clock.now += COOLDOWN
        assert (await verifier.verify(sign(claims(clock.now, jti="x")))).subject == SUB
        assert not verifier.key_status()["k8s"]["fetching"]
    finally:
        server.gate.set()
    assert server.hits["jwks"] == 2


# ---------------------------------------------------------------------------- through the proxy

CLUSTER = "corp-cluster-prod"
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


def stack_config(
    openbao: OpenBaoDevServer, upstream: Upstream, issuers: list[dict[str, Any]]
) -> dict[str, Any]:
    """A proxy with one route `r` that `SUB` of the first issuer may call (GET/POST /echo)."""
    openbao.put_key("keyproxy/keys/identity-stack", new_key())
    return {
        "vault": openbao.vault_yaml(),
        "identity": {"issuers": issuers},
        "routes": {
            "r": {
                "upstream": upstream.url,
                "secret": {"path": "keyproxy/keys/identity-stack"},
                "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
                "egress": {"allow_cidrs": ["127.0.0.0/8"]},
                "allow_http": True,
            }
        },
        "policies": [
            {
                "name": "agents",
                "issuers": [issuers[0]["name"]],
                "subjects": [SUB],
                "allow": {"r": {"methods": ["GET", "POST"], "paths": ["/echo"]}},
            }
        ],
    }


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


async def test_stale_issuer_keys_are_503_and_audited(
    openbao: OpenBaoDevServer,
    server: IssuerServer,
    upstream: Upstream,
    http: aiohttp.ClientSession,
    audit_log: Path,
) -> None:
    """Through the proxy: with the issuer down its cached keys keep serving, then past
    jwks_max_staleness requests get 503 issuer_keys_stale, audited with that reason and
    counted; once the issuer is back they work again."""
    issuer = {
        "name": CLUSTER,
        "issuer": ISS,
        "jwks_uri": f"{server.url}/jwks",
        "audiences": [AUD],
        "algorithms": ["RS256"],
        "jwks_cache_ttl": "200ms",
        "jwks_max_staleness": "1s",
        "jwks_refetch_cooldown": "100ms",
    }
    token = sign(claims(time.time(), jti="stale-keys"))
    CANARIES.add(token)
    url = "/r/r/echo"
    async with running_proxy(stack_config(openbao, upstream, [issuer])) as stack:

        async def call() -> tuple[int, dict[str, Any]]:
            async with http.get(stack.base + url, headers=bearer(token)) as response:
                return response.status, await response.json()

        assert (await call())[0] == 200
        server.down = True
        answer = await eventually(
            call, "stale keys were served forever", interval=0.05, until=lambda a: a[0] != 200
        )
        assert answer == (503, {"error": {"code": "issuer_keys_stale", "message": ANY}})
        assert CLUSTER not in json.dumps(answer)
        exposition = stack.app[METRICS].exposition()[0].decode()
        assert f'keyproxy_identity_keys_stale{{issuer="{CLUSTER}"}} 1.0' in exposition
        assert f'keyproxy_identity_stale_refusals_total{{issuer="{CLUSTER}"}}' in exposition
        server.down = False
        await eventually(
            call,
            "the issuer's return was never noticed",
            interval=0.05,
            until=lambda a: a[0] == 200,
        )
    stale = await eventually(
        lambda: [e for e in read_events(audit_log) if e.get("reason") == "issuer_keys_stale"],
        "no audit event for the stale keys",
    )
    assert {(e["status"], e["route"], e["path"]) for e in stale} == {(503, "r", "/echo")}


# ---------------------------------------------------------------------------- settings


def _config_with_issuer(**settings: Any) -> dict[str, Any]:
    doc = copy.deepcopy(CONFIG_SECTIONS)
    doc["identity"]["issuers"][0].update(settings)
    doc["routes"] = {
        "r": {
            "upstream": "https://api.example.com",
            "secret": {"path": "keyproxy/keys/r"},
            "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
        }
    }
    return doc


def test_issuer_staleness_and_lifetime_settings() -> None:
    """jwks_max_staleness defaults to a day and max_token_lifetime to no limit; both read
    durations."""
    default = config.parse(json.dumps(_config_with_issuer()), {}).identity[0]
    assert (default.jwks_max_staleness, default.max_token_lifetime) == (86400.0, None)
    issuer = config.parse(
        json.dumps(_config_with_issuer(jwks_max_staleness="6h", max_token_lifetime="2h")), {}
    ).identity[0]
    assert (issuer.jwks_max_staleness, issuer.max_token_lifetime) == (21600.0, 7200.0)


@pytest.mark.parametrize(
    ("settings", "where"),
    [
        ({"jwks_max_staleness": "10m"}, "identity.issuers[0].jwks_max_staleness"),
        ({"jwks_cache_ttl": "48h"}, "identity.issuers[0].jwks_cache_ttl"),
        ({"max_token_lifetime": "0s"}, "identity.issuers[0].max_token_lifetime"),
        ({"max_token_lifetime": "forever"}, "identity.issuers[0].max_token_lifetime"),
    ],
)
def test_bad_issuer_settings_are_refused(settings: dict[str, Any], where: str) -> None:
    """A max staleness below the cache TTL, or a lifetime that is no duration, is refused
    with its YAML path."""
    with pytest.raises(ConfigError) as caught:
        config.parse(json.dumps(_config_with_issuer(**settings)), {})
    assert caught.value.path == where
