"""Helpers shared by the tests of keyproxy.identity."""

from __future__ import annotations

import asyncio
import base64
import json
from collections import Counter
from dataclasses import replace
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from keyproxy.config import Issuer
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.errors import Unauthenticated
from keyproxy.identity import MAX_DOCUMENT_BYTES, IdentityVerifier
from tests.helpers.polling import eventually
from tests.helpers.servers import Upstream, new_key

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


NOW = 1_700_000_000.0


VALID = claims(NOW)


def text(value: dict[str, Any]) -> str:
    return json.dumps(value)


CLUSTER = "corp-cluster-prod"


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
