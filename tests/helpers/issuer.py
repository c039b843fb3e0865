"""A workload-identity issuer whose signing key the tests hold: they mint each agent's token
(and hostile ones), and keyproxy reads the public key from `jwks_file`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.helpers.logscan import CANARIES


class Issuer:
    """An RS256 issuer named `issuer`, its one key published as `kid` in `jwks_file`."""

    def __init__(
        self, directory: Path, issuer: str, *, kid: str = "test-1", lifetime: int = 300
    ) -> None:
        self.issuer, self.kid, self.lifetime = issuer, kid, lifetime
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=kid, alg="RS256", use="sig")
        self.jwks_file = directory / "jwks.json"
        self.jwks_file.write_text(json.dumps({"keys": [jwk]}))

    def token(
        self, subject: str = "local-agent", *, headers: dict[str, Any] | None = None, **claims: Any
    ) -> str:
        """A signed token for `subject`, valid for `lifetime` seconds; `claims` and `headers`
        add to or override the usual ones."""
        now = int(time.time())
        body = {
            "iss": self.issuer,
            "aud": "keyproxy",
            "sub": subject,
            "iat": now,
            "exp": now + self.lifetime,
            **claims,
        }
        value = jwt.encode(
            body, self.key, algorithm="RS256", headers={"kid": self.kid, **(headers or {})}
        )
        CANARIES.add(value)
        return value

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
