"""KV v2 reads and writes, and a route's key read from its KV v2 secret.

SECURITY: key values are wrapped in `Secret` and registered with the log scrubber as they load.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from keyproxy import secret
from keyproxy.config import SecretRef
from keyproxy.errors import VaultError
from keyproxy.secret import Secret
from keyproxy.vault.auth import Session
from keyproxy.vault.transport import SecretNotFound


@dataclass(frozen=True)
class KeyVersion:
    """A route's key and the KV v2 version it was read from. Its repr shows no value."""

    secret: Secret
    version: int
    created_at: float | None = None  # Vault's creation time of this version (Unix seconds)
    # The key's `Secret.fingerprint`, named by each request's audit event: one key stored
    # again under another version (`kv rollback`, a `kv put` of the same value) is still
    # found by it. Computed once, as the key loads.
    fingerprint: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", self.secret.fingerprint())


class Kv(Session):
    """The KV v2 calls of a `Session`."""

    async def read_kv(self, mount: str, path: str) -> tuple[dict[str, Any], int]:
        """The latest version of a KV v2 secret: its data and version number."""
        data, version, _ = await self.read_kv_dated(mount, path)
        return data, version

    async def read_kv_dated(
        self, mount: str, path: str
    ) -> tuple[dict[str, Any], int, float | None]:
        """The latest version's data, number, and when Vault stored it (its clock)."""
        response = await self._call(
            f"read {mount}/{path}",
            lambda c: c.secrets.kv.v2.read_secret_version(
                path=path, mount_point=mount, raise_on_deleted_version=True
            ),
        )
        body = response.get("data") if isinstance(response, dict) else None
        data = body.get("data") if isinstance(body, dict) else None
        metadata = body.get("metadata") if isinstance(body, dict) else None
        version = metadata.get("version") if isinstance(metadata, dict) else None
        if not isinstance(data, dict) or not isinstance(version, int):
            raise VaultError(f"read {mount}/{path}: not a KV v2 secret")
        assert isinstance(metadata, dict)  # checked with version above
        return data, version, _unix_time(metadata.get("created_time"))

    async def write_kv(
        self, mount: str, path: str, data: Mapping[str, Any], cas: int | None = None
    ) -> int:
        """Write a new version (only if the current one is `cas`, when given); its number."""
        response = await self._call(
            f"write {mount}/{path}",
            lambda c: c.secrets.kv.v2.create_or_update_secret(
                path=path, secret=dict(data), cas=cas, mount_point=mount
            ),
        )
        body = response.get("data") if isinstance(response, dict) else None
        version = body.get("version") if isinstance(body, dict) else None
        if not isinstance(version, int):
            raise VaultError(f"write {mount}/{path}: no version in the response")
        return version

    async def kv_version(self, mount: str, path: str) -> int | None:
        """The current version number of a KV v2 secret (metadata only), or None if absent.
        Cheap enough to poll: it never transfers the data."""
        metadata = await self.kv_metadata(mount, path)
        version = metadata.get("current_version") if metadata is not None else None
        return version if isinstance(version, int) and version > 0 else None

    async def read_kv_at(self, mount: str, path: str, version: int) -> dict[str, Any]:
        """The data of one version of a KV v2 secret; SecretNotFound if deleted or destroyed."""
        response = await self._call(
            f"read {mount}/{path} version {version}",
            lambda c: c.secrets.kv.v2.read_secret_version(
                path=path, version=version, mount_point=mount, raise_on_deleted_version=True
            ),
        )
        body = response.get("data") if isinstance(response, dict) else None
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict):
            raise SecretNotFound(f"read {mount}/{path} version {version}: deleted or destroyed")
        return data

    async def kv_metadata(self, mount: str, path: str) -> dict[str, Any] | None:
        """The KV v2 metadata of a secret (current_version, versions with created_time,
        destroyed), or None if the secret does not exist."""
        try:
            response = await self._call(
                f"read metadata {mount}/{path}",
                lambda c: c.secrets.kv.v2.read_secret_metadata(path=path, mount_point=mount),
            )
        except SecretNotFound:
            return None
        body = response.get("data") if isinstance(response, dict) else None
        return body if isinstance(body, dict) else None

    async def destroy_kv_versions(self, mount: str, path: str, versions: list[int]) -> None:
        """Permanently destroy versions of a KV v2 secret (idempotent)."""
        await self._call(
            f"destroy {mount}/{path} versions {versions}",
            lambda c: c.secrets.kv.v2.destroy_secret_versions(
                path=path, versions=versions, mount_point=mount
            ),
        )

    async def read_key(self, ref: SecretRef) -> KeyVersion:
        """A route's key. Refuses (VaultError) a missing, non-string or empty field."""
        data, version, created = await self.read_kv_dated(ref.mount, ref.path)
        where = f"{ref.mount}/{ref.path} (version {version})"
        if ref.field not in data:
            raise VaultError(f"{where} has no field {ref.field!r}")
        value = data[ref.field]
        if not isinstance(value, str):
            raise VaultError(f"{where}: field {ref.field!r} is not a string")
        # SECURITY: an empty key must never be injected (invariant 8); a stray newline (`kv
        # put api_key=@file`) would make every request fail, a huge value hold the process.
        # The version is refused, so the last good key stays in use, and the error says why.
        why = secret.problem(value)
        if why is not None:
            raise VaultError(f"{where}: field {ref.field!r} {why}")
        secret.register(value)
        return KeyVersion(Secret(value), version, created)


def _unix_time(value: Any) -> float | None:
    """Vault's RFC 3339 timestamps (nanoseconds, "Z") as Unix seconds."""
    if not isinstance(value, str) or not value:
        return None
    text = value.replace("Z", "+00:00")
    head, dot, rest = text.partition(".")
    if dot:  # fromisoformat takes at most microseconds
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[: min(digits, 6)]}{rest[digits:]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None
