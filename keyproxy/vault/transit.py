"""Transit: signing with a key that never leaves Vault, and reading its public keys."""

from __future__ import annotations

import base64
import re

from keyproxy.errors import VaultError
from keyproxy.vault.auth import Session

_TRANSIT_SIGNATURE = re.compile(r"^vault:v(\d+):([A-Za-z0-9+/=]+)$")


class Transit(Session):
    """The Transit calls of a `Session`."""

    async def transit_sign(self, mount: str, key: str, message: bytes) -> tuple[int, bytes]:
        """Sign `message` with a Transit key (Ed25519: the message itself, no prehash).
        Returns the key version that signed and the raw signature. The private key never
        leaves Vault."""
        response = await self._call(
            f"sign with {mount}/{key}",
            lambda c: c.secrets.transit.sign_data(
                name=key, hash_input=base64.b64encode(message).decode(), mount_point=mount
            ),
        )
        body = response.get("data") if isinstance(response, dict) else None
        signature = body.get("signature") if isinstance(body, dict) else None
        match = _TRANSIT_SIGNATURE.match(signature) if isinstance(signature, str) else None
        if match is None:
            raise VaultError(f"sign with {mount}/{key}: no signature in the response")
        return int(match[1]), base64.b64decode(match[2])

    async def transit_public_keys(self, mount: str, key: str) -> dict[int, bytes]:
        """Every version's public key of an Ed25519 Transit key (raw 32 bytes), by version."""
        response = await self._call(
            f"read {mount}/keys/{key}",
            lambda c: c.secrets.transit.read_key(name=key, mount_point=mount),
        )
        body = response.get("data") if isinstance(response, dict) else None
        versions = body.get("keys") if isinstance(body, dict) else None
        if not isinstance(body, dict) or body.get("type") != "ed25519":
            raise VaultError(f"{mount}/keys/{key} is not an ed25519 key")
        out: dict[int, bytes] = {}
        for version, entry in (versions or {}).items():
            public = entry.get("public_key") if isinstance(entry, dict) else None
            if isinstance(public, str) and str(version).isdigit():
                out[int(version)] = base64.b64decode(public)
        if not out:
            raise VaultError(f"{mount}/keys/{key}: no public keys")
        return out
