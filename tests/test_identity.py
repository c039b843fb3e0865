"""Tests for keyproxy.identity: strict JWT verification against real loopback JWKS servers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from structlog.testing import capture_logs

from keyproxy import identity as identity_module
from keyproxy.config import Issuer
from keyproxy.errors import Unauthenticated
from keyproxy.identity import MAX_DOCUMENT_BYTES, Identity, IdentityVerifier

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
def new_verifier(
    server: IssuerServer, session: aiohttp.ClientSession, clock: Clock
) -> Callable[..., IdentityVerifier]:
    """Build a verifier for one issuer (by default the JWKS URL of `server`)."""

    def build(**changes: Any) -> IdentityVerifier:
        if not {"discovery_url", "jwks_file", "jwks_uri"} & changes.keys():
            changes["jwks_uri"] = f"{server.url}/jwks"
        return IdentityVerifier(
            [make_issuer(**changes)], session, clock=clock, rejected_types=(TASK_TYP,)
        )

    return build


@pytest.fixture
async def verifier(new_verifier: Callable[..., IdentityVerifier]) -> IdentityVerifier:
    v = new_verifier()
    await v.prefetch()
    return v


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
        deadline = asyncio.get_running_loop().time() + 5
        while server.hits["jwks"] < 2:
            assert asyncio.get_running_loop().time() < deadline, "the refetch never arrived"
            await asyncio.sleep(0.01)
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
        assert server.hits["jwks"] == 2
        assert (await verifier.verify(sign(claims(clock.now)))).subject == SUB
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
    assert (await verifier.verify(token)).subject == SUB
    assert server.hits["jwks"] >= 2


async def test_cached_token_needs_the_key_that_verified_it(
    verifier: IdentityVerifier, server: IssuerServer, clock: Clock
) -> None:
    """When the issuer drops the key that verified a cached token, it is refused as if new."""
    token = sign(claims(clock.now, exp=int(clock.now + 10 * TTL)))
    await verifier.verify(token)
    server.keys = [public_jwk(ROTATED_KEY, "rsa-2", use="sig")]
    clock.now += TTL  # the key set is stale and refetched on the next use
    assert await reason_for(verifier, token) == "unknown_kid"
    assert server.hits["jwks"] >= 2


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
