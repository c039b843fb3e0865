"""keyproxy.identity.keys against real loopback servers: an issuer's keys from discovery,
JWKS URLs and JWKS files, and the keys that are refused."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm
from structlog.testing import capture_logs

from keyproxy.identity import Identity, IdentityVerifier
from keyproxy.identity.keys import MAX_KEYS
from tests.helpers.identity import (
    ATTACKER_KEY,
    EC_KEY,
    ISS,
    ISSUER_KEYS,
    ROTATED_KEY,
    RSA_KEY,
    SUB,
    Clock,
    IssuerServer,
    b64,
    claims,
    make_issuer,
    public_jwk,
    reason_for,
    sign,
)


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
    """Broken, private, encryption, wrong-curve and too short keys, and a use that is not a
    string, are skipped and logged by id only; the usable key among them is read."""
    private = RSAAlgorithm.to_jwk(ROTATED_KEY, as_dict=True)
    p384 = public_jwk(ec.generate_private_key(ec.SECP384R1()), "p384")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505  # refused: the point
    short = public_jwk(weak, "short")
    server.keys = [
        {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
        {**private, "kid": "private"},
        public_jwk(ATTACKER_KEY, "enc", use="enc"),
        public_jwk(ATTACKER_KEY, "use-list", use=["sig"]),
        public_jwk(ATTACKER_KEY, "no-verify", key_ops=["encrypt"]),
        {"kty": "oct", "kid": "hmac", "k": b64(b"shared-secret")},
        p384,
        short,
        "not-an-object",
        public_jwk(RSA_KEY, "rsa-1"),
    ]
    verifier = new_verifier()
    with capture_logs() as logs:
        await verifier.prefetch()
    skipped = [e for e in logs if e["event"] == "jwks_key_skipped"]
    assert len(skipped) == 9
    assert [e["why"] for e in skipped if e["kid"] == "short"] == ["too short for its algorithm"]
    fetched = [e for e in logs if e["event"] == "jwks_fetched"]
    assert fetched[0]["keys"] == 1
    text = json.dumps(logs)
    for member in ("n", "d", "p", "q"):
        assert private[member] not in text
    assert p384["x"] not in text
    assert short["n"] not in text
    assert (await verifier.verify(sign(claims(clock.now)))).subject == SUB
    assert await reason_for(verifier, sign(claims(clock.now), kid="private")) == "unknown_kid"
    assert await reason_for(verifier, sign(claims(clock.now), kid="short")) == "unknown_kid"


async def test_jwk_declared_alg_binds_the_key(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer, clock: Clock
) -> None:
    """A JWK that names its alg never verifies a token of another allowed algorithm."""
    server.keys = [public_jwk(RSA_KEY, "rsa-1", alg="RS256")]
    verifier = new_verifier(algorithms=("RS256", "PS256"))
    assert (await verifier.verify(sign(claims(clock.now)))).subject == SUB
    token = sign(claims(clock.now), alg="PS256")
    assert await reason_for(verifier, token) == "bad_signature"


async def test_jwks_with_too_many_keys_is_refused_unread(
    new_verifier: Callable[..., IdentityVerifier], server: IssuerServer, clock: Clock
) -> None:
    """A JWKS of more than MAX_KEYS entries yields no keys, and none of them is looked at
    (each would be loaded or logged on the event loop); MAX_KEYS entries are read."""
    filler = ["not-a-key"] * (MAX_KEYS - len(ISSUER_KEYS))
    server.keys = [*ISSUER_KEYS, *filler]
    verifier = new_verifier()
    assert (await verifier.verify(sign(claims(clock.now)))).subject == SUB
    server.keys = [*ISSUER_KEYS, *filler, "one-too-many"]
    verifier = new_verifier()
    with capture_logs() as logs:
        await verifier.prefetch()
    assert [e["event"] for e in logs] == ["jwks_fetch_failed"]
    assert logs[0]["error"] == f"more than {MAX_KEYS} keys"
    assert await reason_for(verifier, sign(claims(clock.now))) == "jwks_unavailable"
