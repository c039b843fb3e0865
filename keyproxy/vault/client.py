"""Talk to Vault/OpenBao, and keep every route's key in memory.

This is the only module that imports hvac. hvac is synchronous and untyped, so every call runs
in a worker thread (`asyncio.to_thread`) and every hvac or requests exception becomes
`keyproxy.errors.VaultError`, raised `from None` so the hvac exception (which carries the
response body) is never chained into a traceback:

    VaultError
    ├── SecretNotFound     the KV path (or its latest version) does not exist
    └── CasConflict        a check-and-set write lost the race

`Vault` logs in (token, AppRole, Kubernetes or JWT auth), reads and writes KV v2, and keeps its
token alive. Like the Vault CLI it reads BAO_/VAULT_ NAMESPACE, CACERT (or CAPATH),
CLIENT_CERT and CLIENT_KEY where the configuration sets no namespace or CA (`_transport`);
`operator_config` makes a configuration log in with the operator's own token instead. A call
refused with 401/403 checks whether the token is still valid; if not it logs in again once
and retries once. `KeyCache` holds the current `KeyVersion` of every route,
refreshed in the background, so the proxy's hot path (`KeyCache.get`) does no I/O.

SECURITY: tokens, secret_ids, JWTs and key values never appear in a log event or an exception
message. Key values are wrapped in `Secret` and registered with the log scrubber as they load.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import math
import os
import re
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
import structlog
from requests.adapters import HTTPAdapter

from keyproxy import secret
from keyproxy.config import Route, SecretRef, VaultAuth, VaultConfig, default_full_refresh
from keyproxy.errors import ConfigError, Unavailable, VaultError
from keyproxy.secret import REDACTED, Secret

T = TypeVar("T")

log = structlog.get_logger("keyproxy.vault")

K8S_JWT_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
CONCURRENCY = 16
# A token with no TTL (a root or periodic-less service token) is still checked now and then, so
# a revoked one is replaced before a request finds out.
_CHECK_INTERVAL = 60.0
_MIN_DELAY = 1.0
_BACKOFF = (1.0, 30.0)


_TRANSIT_SIGNATURE = re.compile(r"^vault:v(\d+):([A-Za-z0-9+/=]+)$")


class SecretNotFound(VaultError):
    """The KV v2 path does not exist, or its latest version is deleted or destroyed."""


class CasConflict(VaultError):
    """A check-and-set write was refused: the secret changed since it was read."""


class _TokenRejected(VaultError):
    """Vault answered 401/403: the token is invalid, or lacks a permission."""


@dataclass(frozen=True)
class KeyVersion:
    """A route's key and the KV v2 version it was read from. Its repr shows no value."""

    secret: Secret
    version: int
    created_at: float | None = None  # Vault's creation time of this version (Unix seconds)


class Vault:
    """An authenticated Vault/OpenBao client whose every method is a coroutine."""

    def __init__(self, cfg: VaultConfig, env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self._env = os.environ if env is None else env
        transport = _transport(cfg, self._env)
        # Two clients: `_client` carries the token; `_anon` never holds one, so a login request
        # never presents a stale token and health checks need none.
        self._client = _client(cfg, transport)
        self._anon = _client(cfg, transport)
        self._lock = asyncio.Lock()
        self._generation = 0  # bumped on every login, so concurrent 403s log in only once
        self._ttl = 0.0  # seconds granted at the last login or renewal; 0 = never expires
        self._renewable = False
        self._since: float | None = None  # monotonic time of the last login or renewal
        self._login_ttl = 0.0

    # ------------------------------------------------------------------ authentication

    async def login(self) -> None:
        """Log in with the configured method, replacing any current token."""
        async with self._lock:
            await self._login_locked()

    async def _login_locked(self) -> None:
        auth = self.cfg.auth
        what = f"Vault login ({auth.method} at auth/{auth.mount})"
        if auth.method == "token":
            token = await asyncio.to_thread(self._configured_token)
            self._client.token = token
            info = await self._run(what, lambda c: c.auth.token.lookup_self())
            data = info.get("data") or {}
            ttl, renewable = float(data.get("ttl") or 0), bool(data.get("renewable"))
        else:
            response = await self._run(what, self._login_request, client=self._anon)
            auth_info = response.get("auth") or {}
            issued = auth_info.get("client_token")
            if not isinstance(issued, str) or not issued:
                raise VaultError(f"{what}: the response carried no token")
            secret.register(issued)
            self._client.token = issued
            ttl = float(auth_info.get("lease_duration") or 0)
            renewable = bool(auth_info.get("renewable"))
        self._set_lease(ttl, renewable)
        self._login_ttl = ttl
        self._generation += 1
        log.info("vault.login", method=auth.method, mount=auth.mount, ttl=ttl, renewable=renewable)

    def _configured_token(self) -> str:
        """The token for method "token": token_file, else BAO_TOKEN, else VAULT_TOKEN."""
        file = self.cfg.auth.token_file
        if file is not None:
            token = _read_credential(file, "token_file")
        else:
            token = self._env.get("BAO_TOKEN") or self._env.get("VAULT_TOKEN") or ""
        if not token:
            raise VaultError("Vault login (token): set vault.auth.token_file, or BAO_TOKEN")
        secret.register(token)
        return token

    def _login_request(self, client: Any) -> Any:
        """Runs in a worker thread: read the credentials and send the login request."""
        auth = self.cfg.auth
        if auth.method == "approle":
            role_id = auth.role_id
            if role_id is None:
                assert auth.role_id_file is not None  # config guarantees one of the two
                role_id = _read_credential(auth.role_id_file, "role_id_file")
            assert auth.secret_id_file is not None  # config requires it for approle
            secret_id = _read_credential(auth.secret_id_file, "secret_id_file")
            secret.register(secret_id)
            return client.auth.approle.login(
                role_id, secret_id, use_token=False, mount_point=auth.mount
            )
        jwt = _read_credential(auth.jwt_file or K8S_JWT_FILE, "jwt_file")
        secret.register(jwt)
        if auth.method == "kubernetes":
            return client.auth.kubernetes.login(
                auth.role, jwt, use_token=False, mount_point=auth.mount
            )
        return client.auth.jwt.jwt_login(auth.role, jwt, use_token=False, path=auth.mount)

    def _set_lease(self, ttl: float, renewable: bool) -> None:
        self._ttl, self._renewable, self._since = ttl, renewable, time.monotonic()

    @property
    def token_expires_in(self) -> float | None:
        """Seconds until the current token expires as last granted; None if it never does."""
        if self._since is None or self._ttl <= 0:
            return None
        return self._since + self._ttl - time.monotonic()

    # ------------------------------------------------------------------ calls

    async def _run(self, what: str, call: Callable[[Any], T], client: Any = None) -> T:
        """Run `call(client)` in a worker thread, turning every failure into a VaultError."""
        return await asyncio.to_thread(
            _converted, what, self.cfg.addr, call, self._client if client is None else client
        )

    async def _call(self, what: str, call: Callable[[Any], T]) -> T:
        """`_run`, but a refused token is replaced once (log in again) and the call retried."""
        generation = self._generation
        try:
            return await self._run(what, call)
        except _TokenRejected as exc:
            await self._recover(generation, exc)
        return await self._run(what, call)

    async def _recover(self, generation: int, refused: _TokenRejected) -> None:
        async with self._lock:
            if self._generation != generation:
                return  # another call already logged in again
            try:
                await self._run("token lookup", lambda c: c.auth.token.lookup_self())
            except _TokenRejected:
                log.warning("vault.token_rejected", method=self.cfg.auth.method)
                await self._login_locked()
                return
            # The token is valid, so the refusal is a policy decision: retrying cannot help.
            raise refused

    # ------------------------------------------------------------------ KV v2

    async def read_kv(self, mount: str, path: str) -> tuple[dict[str, Any], int]:
        """The latest version of a KV v2 secret: its data and version number."""
        data, version, _ = await self._read_latest(mount, path)
        return data, version

    async def _read_latest(self, mount: str, path: str) -> tuple[dict[str, Any], int, float | None]:
        """The latest version's data, number, and creation time (Vault's clock)."""
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

    # ------------------------------------------------------------------ Transit

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

    async def read_key(self, ref: SecretRef) -> KeyVersion:
        """A route's key. Refuses (VaultError) a missing, non-string or empty field."""
        data, version, created = await self._read_latest(ref.mount, ref.path)
        where = f"{ref.mount}/{ref.path} (version {version})"
        if ref.field not in data:
            raise VaultError(f"{where} has no field {ref.field!r}")
        value = data[ref.field]
        if not isinstance(value, str):
            raise VaultError(f"{where}: field {ref.field!r} is not a string")
        if not value:
            # SECURITY: an empty key must never be injected (invariant 8).
            raise VaultError(f"{where}: field {ref.field!r} is empty")
        if not secret.is_clean(value):
            # A stray newline (`kv put api_key=@file`) would make every request fail; refuse
            # the version so the last good key stays in use, and say why.
            raise VaultError(f"{where}: field {ref.field!r} has whitespace or control characters")
        secret.register(value)
        return KeyVersion(Secret(value), version, created)

    # ------------------------------------------------------------------ health and token

    async def server_time(self) -> float:
        """Vault's own clock (sys/health server_time_utc), for deadlines that several hosts
        compare: their clocks may differ, Vault's is the same for all of them."""
        status = await self._run(
            "health",
            lambda c: c.sys.read_health_status(method="GET", standby_ok=True),
            client=self._anon,
        )
        value = status.get("server_time_utc") if isinstance(status, dict) else None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise VaultError("health: no server time in the answer")
        return float(value)

    async def healthy(self) -> bool:
        """Vault answers sys/health, is initialised and unsealed (a standby counts)."""
        try:
            status = await self._run(
                "health",
                lambda c: c.sys.read_health_status(method="GET", standby_ok=True),
                client=self._anon,
            )
        except VaultError:
            return False
        return (
            isinstance(status, dict)
            and status.get("initialized") is True
            and status.get("sealed") is False
        )

    async def maintain_token(self) -> None:
        """Keep the token valid until cancelled: renew it at 2/3 of its TTL when renewable,
        log in again when renewal fails, is refused or cannot extend it. Errors back off
        exponentially (1 s to 30 s) and never end the loop."""
        backoff = _BACKOFF[0]
        delay = self._next_maintenance()
        while True:
            await asyncio.sleep(delay)
            try:
                await self._maintain_once()
            except VaultError as exc:
                log.warning("vault.token_maintenance_failed", error=str(exc), retry_in=backoff)
                delay, backoff = backoff, min(backoff * 2, _BACKOFF[1])
            else:
                backoff = _BACKOFF[0]
                delay = self._next_maintenance()

    def _next_maintenance(self) -> float:
        if self._since is None:
            return 0.0
        if self._ttl <= 0:
            return _CHECK_INTERVAL
        return max(_MIN_DELAY, self._since + self._ttl * 2 / 3 - time.monotonic())

    async def _maintain_once(self) -> None:
        async with self._lock:
            if self._since is None:
                await self._login_locked()
            elif self._ttl <= 0:
                await self._check_or_login()
            elif self._renewable:
                await self._renew_or_login()
            else:
                await self._login_locked()

    async def _check_or_login(self) -> None:
        try:
            await self._run("token lookup", lambda c: c.auth.token.lookup_self())
        except _TokenRejected:
            await self._login_locked()

    async def _renew_or_login(self) -> None:
        try:
            response = await self._run("token renewal", lambda c: c.auth.token.renew_self())
        except VaultError as exc:
            log.info("vault.token_renewal_failed", error=str(exc))
            await self._login_locked()
            return
        auth = (response.get("auth") if isinstance(response, dict) else None) or {}
        ttl = float(auth.get("lease_duration") or 0)
        self._set_lease(ttl, bool(auth.get("renewable")))
        log.info("vault.token_renewed", ttl=ttl)
        if self.cfg.auth.method != "token" and ttl < self._login_ttl / 3:
            # Renewal is capped by the token's max TTL: a fresh login restores the full TTL.
            await self._login_locked()

    def close(self) -> None:
        """Close the HTTP connection pools. The object must not be used afterwards."""
        self._client.adapter.close()
        self._anon.adapter.close()


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


@dataclass(frozen=True)
class _Transport:
    """How requests reach Vault: TLS trust, client certificate, namespace."""

    verify: bool | str
    cert: str | tuple[str, str] | None
    namespace: str | None


def _transport(cfg: VaultConfig, env: Mapping[str, str]) -> _Transport:
    """The configuration's settings, else the environment the Vault CLI reads (BAO_* before
    VAULT_*): *_NAMESPACE, *_CACERT (or *_CAPATH, a directory), *_CLIENT_CERT and
    *_CLIENT_KEY. *_SKIP_VERIFY is not read: turning TLS checks off takes vault.tls_verify
    in the file, not a variable left in a shell."""

    def var(name: str) -> str | None:
        return env.get(f"BAO_{name}") or env.get(f"VAULT_{name}") or None

    namespace = (cfg.namespace or var("NAMESPACE") or "").strip("/") or None
    ca = str(cfg.ca_cert) if cfg.ca_cert else var("CACERT") or var("CAPATH")
    verify: bool | str = ca if ca and cfg.tls_verify else cfg.tls_verify
    cert_file, key_file = var("CLIENT_CERT"), var("CLIENT_KEY")
    if key_file and not cert_file:
        raise ConfigError("", "VAULT_CLIENT_KEY is set without VAULT_CLIENT_CERT")
    cert = (cert_file, key_file) if cert_file and key_file else cert_file
    return _Transport(verify, cert, namespace)


def _client(cfg: VaultConfig, transport: _Transport) -> Any:
    session = requests.Session()
    # SECURITY: no HTTP(S)_PROXY or ~/.netrc from the environment on the way to Vault.
    session.trust_env = False
    # On the session itself: hvac takes a given session's verify and cert over its own
    # arguments (and a new session verifies with the system's trust store).
    session.verify, session.cert = transport.verify, transport.cert
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=CONCURRENCY)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # token="" stops hvac from reading VAULT_TOKEN or ~/.vault-token on its own.
    return hvac.Client(
        url=cfg.addr,
        token="",
        verify=transport.verify,
        cert=transport.cert,
        timeout=cfg.timeout,
        session=session,
        namespace=transport.namespace,
    )


def operator_config(cfg: VaultConfig, env: Mapping[str, str] | None = None) -> VaultConfig:
    """`cfg` logging in with the operator's own token instead of its `auth`: BAO_TOKEN, else
    VAULT_TOKEN, else the Vault CLI's token file ~/.vault-token (what `bao login` writes).
    Address, namespace and TLS settings stay as configured."""
    env = os.environ if env is None else env
    token_file = None
    if not (env.get("BAO_TOKEN") or env.get("VAULT_TOKEN")):
        home = env.get("HOME")
        token_file = (Path(home) if home else Path.home()) / ".vault-token"
        if not token_file.is_file():
            raise VaultError(
                "--as-operator: no Vault token: set BAO_TOKEN or VAULT_TOKEN, or log in with "
                "`bao login` (which writes ~/.vault-token)"
            )
    return dataclasses.replace(
        cfg, auth=VaultAuth(method="token", mount="token", token_file=token_file)
    )


def _read_credential(path: Path, name: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise VaultError(f"cannot read vault.auth.{name} {path}: {exc.strerror}") from None
    if not value:
        raise VaultError(f"vault.auth.{name} {path} is empty")
    return value


def _converted(what: str, addr: str, call: Callable[[Any], T], client: Any) -> T:
    """Runs in a worker thread: `call(client)`, every hvac/requests error made a VaultError."""
    try:
        return call(client)
    except (hvac.exceptions.Unauthorized, hvac.exceptions.Forbidden) as exc:
        raise _TokenRejected(f"{what}: {_vault_message(exc)}") from None
    except hvac.exceptions.InvalidPath:
        raise SecretNotFound(f"{what}: not found") from None
    except hvac.exceptions.InvalidRequest as exc:
        message = _vault_message(exc)
        kind = CasConflict if "check-and-set" in message else VaultError
        raise kind(f"{what}: {message}") from None
    except hvac.exceptions.VaultError as exc:
        raise VaultError(f"{what}: {type(exc).__name__}: {_vault_message(exc)}") from None
    except requests.RequestException as exc:
        raise VaultError(f"{what}: cannot reach Vault at {addr} ({type(exc).__name__})") from None


def _vault_message(exc: Exception) -> str:
    """Vault's own error text, cut short, with every known secret value scrubbed out."""
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    for value in secret.known_values():
        text = text.replace(value, REDACTED)
    return text[:300]


# ---------------------------------------------------------------------------- the key cache

# The change index: whoever writes a key (`keyproxy rotate`, `keyproxy keys put`,
# vault-dev/put-key.sh) then writes a new version of this KV v2 secret (under vault.kv_mount)
# naming the key's secret. Caches poll its version number (one metadata read) and re-read only
# the secrets it names; a slow sweep re-reads every key anyway, for writes made without it.
KEY_INDEX_PATH = "keyproxy/state/keys"
# More index versions than this since the last poll (or any of them unreadable): re-read all.
# KV v2 keeps 10 versions by default.
INDEX_WINDOW = 8
# A secret the index names is read again at the next refreshes until a new version shows up,
# at most this many times: a lagging standby may answer the first read with the old one.
AWAIT_READS = 5


async def announce_key_change(vault: Vault, ref: SecretRef) -> None:
    """Tell every cache that `ref`'s secret has a new version. Never raises: the key is stored
    already, and caches find it within vault.full_refresh_interval without the notice."""
    try:
        await vault.write_kv(vault.cfg.kv_mount, KEY_INDEX_PATH, {"secret": _secret_name(ref)})
    except VaultError as exc:
        log.warning("key_index.write_failed", secret=_secret_name(ref), error=str(exc))


def _secret_name(ref: SecretRef) -> str:
    return f"{ref.mount}/{ref.path}"


def _version(entry: _Entry) -> int | None:
    return entry.key.version if entry.key else None


@dataclass
class _Entry:
    key: KeyVersion | None = None
    loaded_at: float | None = None  # clock() of the last read or confirmation (index unchanged)
    error: str | None = None  # the last failure, cleared by a success
    error_at: float | None = None
    errors: int = 0  # failed reads, ever (for metrics)
    changes: int = 0  # new versions seen after the first load (rotations, for metrics)
    reads: int = 0  # reads of the secret, ever


class KeyCache:
    """The current key of every route, refreshed in the background; `get` does no I/O.

    Every `refresh_interval` it polls the change index and re-reads the secrets it names (until
    their new version shows up, a few times at most), plus a slice of all of them so each is
    re-read at least every `full_refresh_interval` (by default a minute, or half of
    `max_staleness` if shorter). A key whose last read succeeded and that the index does not
    name is confirmed current."""

    def __init__(
        self,
        vault: Vault,
        routes: Mapping[str, Route],
        refresh_interval: float,
        max_staleness: float,
        *,
        full_refresh_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._vault = vault
        self._refs = {name: route.secret for name, route in routes.items()}
        self._entries = {ref: _Entry() for ref in self._refs.values()}
        self._interval = refresh_interval
        self._max_staleness = max_staleness
        self._clock = clock
        self._index_version: int | None = None  # None: not read yet, or unreadable
        self._index_created: Any = None  # its creation time: a deleted and recreated index
        self._index_error: str | None = None
        # Named by the index, no new version read yet: (the version cached, reads left).
        self._awaited: dict[SecretRef, tuple[int | None, int]] = {}
        # The sweep: each refresh re-reads the next few secrets in turn, so every one is read
        # once per full_refresh_interval and Vault sees an even trickle rather than bursts.
        self._sweep = itertools.cycle(list(self._entries))
        full = full_refresh_interval or default_full_refresh(refresh_interval, max_staleness)
        self._sweep_rate = len(self._entries) * min(1.0, refresh_interval / full)
        self._sweep_credit = 0.0

    async def load_all(self) -> None:
        """Read every distinct secret (at most 16 at a time). Failures are recorded per
        secret, never raised: the last good key keeps serving until it is too stale."""
        await self._poll_index()  # before the reads: a change after it shows up next time
        await self._load_many(self._entries)

    async def refresh(self) -> None:
        """One refresh: the secrets the index names, those whose last read failed, and the
        next slice of the sweep; the rest are confirmed if the index was read."""
        started = self._clock()
        changed = await self._poll_index()
        if changed is None and self._index_version is not None:
            await self._load_many(self._entries)  # the index cannot tell what changed
            return
        due = {ref for ref, e in self._entries.items() if e.error is not None or e.key is None}
        self._sweep_credit += self._sweep_rate
        turn = min(len(self._entries), math.floor(self._sweep_credit + 1e-9))
        self._sweep_credit -= turn
        due.update(itertools.islice(self._sweep, turn))
        for ref, entry in self._entries.items():
            if changed and _secret_name(ref) in changed:
                self._awaited[ref] = (_version(entry), AWAIT_READS)
        due.update(self._awaited)
        await self._load_many(due)
        self._awaited = {
            ref: (before, left - 1)
            for ref, (before, left) in self._awaited.items()
            if left > 1 and _version(self._entries[ref]) == before
        }
        if self._index_version is None:
            return  # no index: nothing is confirmed without a read
        for e in self._entries.values():
            if e.error is None and e.loaded_at is not None and e.loaded_at < started:
                e.loaded_at = started

    async def _poll_index(self) -> set[str] | None:
        """The secrets named by index versions written since the last poll; None when it
        cannot tell (the first poll, a gap, an unreadable version). After a failed poll
        `_index_version` is None."""
        mount, last, created = self._vault.cfg.kv_mount, self._index_version, self._index_created
        self._index_version = None
        try:
            metadata = await self._vault.kv_metadata(mount, KEY_INDEX_PATH) or {}
        except VaultError as exc:
            if str(exc) != self._index_error:
                log.warning("key_index.read_failed", error=str(exc))
            self._index_error = str(exc)
            return None
        version = metadata.get("current_version")
        version = version if isinstance(version, int) and version > 0 else 0
        self._index_error = None
        self._index_version, self._index_created = version, metadata.get("created_time")
        recreated = created != self._index_created  # deleted and written again, or restored
        if last is None or recreated or not 0 <= version - last <= INDEX_WINDOW:
            return None
        names: set[str] = set()
        for number in range(last + 1, version + 1):
            try:
                data = await self._vault.read_kv_at(mount, KEY_INDEX_PATH, number)
            except VaultError:
                return None  # pruned (max_versions), deleted, or unreadable: re-read all
            names.add(str(data.get("secret")))
        return names

    async def _load_many(self, refs: Iterable[SecretRef]) -> None:
        limit = asyncio.Semaphore(CONCURRENCY)

        async def load(ref: SecretRef) -> None:
            async with limit:
                await self._load(ref)

        await _gather(load(ref) for ref in refs)

    async def _load(self, ref: SecretRef) -> None:
        entry = self._entries[ref]
        entry.reads += 1
        try:
            key = await self._vault.read_key(ref)
        except VaultError as exc:
            if str(exc) != entry.error:  # once per distinct failure, not every refresh
                log.warning("key_cache.read_failed", secret=_secret_name(ref), error=str(exc))
            entry.error, entry.error_at = str(exc), self._clock()
            entry.errors += 1
            return
        if entry.error is not None:
            log.info("key_cache.read_recovered", secret=_secret_name(ref))
        if entry.key is not None and entry.key.version != key.version:
            entry.changes += 1
        if entry.key is None or entry.key.version != key.version:
            log.info(
                "key_cache.key_loaded",
                secret=_secret_name(ref),
                field=ref.field,
                version=key.version,
                fingerprint=key.secret.fingerprint(),
            )
        entry.key, entry.loaded_at, entry.error, entry.error_at = key, self._clock(), None, None

    async def run(self) -> None:
        """Refresh every `refresh_interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            await self.refresh()

    def get(self, route: str) -> KeyVersion:
        """The key to inject for `route`. Raises Unavailable("key_unavailable") if it was never
        loaded, Unavailable("key_stale") if the last good read is older than max_staleness."""
        ref = self._refs.get(route)
        entry = self._entries[ref] if ref is not None else None
        if entry is None or entry.key is None or entry.loaded_at is None:
            raise Unavailable("key_unavailable", "the key for this route is not loaded")
        if self._clock() - entry.loaded_at > self._max_staleness:
            # SECURITY: a key that may have been rotated and revoked is not injected (inv. 8).
            raise Unavailable("key_stale", "the key for this route could not be refreshed")
        return entry.key

    def ready(self) -> bool:
        """Every route has a key that is not stale."""
        now = self._clock()
        return all(
            e.loaded_at is not None and now - e.loaded_at <= self._max_staleness
            for e in self._entries.values()
        )

    def status(self) -> dict[str, dict[str, Any]]:
        """Per route: where its key lives, version, fingerprint, age of the last good read,
        and the last error. Never a key value."""
        now = self._clock()
        out: dict[str, dict[str, Any]] = {}
        for route, ref in self._refs.items():
            e = self._entries[ref]
            out[route] = {
                "secret": f"{ref.mount}/{ref.path}",
                "field": ref.field,
                "version": e.key.version if e.key else None,
                "fingerprint": e.key.secret.fingerprint() if e.key else None,
                "age": None if e.loaded_at is None else now - e.loaded_at,
                "fresh": e.loaded_at is not None and now - e.loaded_at <= self._max_staleness,
                "last_error": e.error,
                "last_error_age": None if e.error_at is None else now - e.error_at,
                "created_at": e.key.created_at if e.key else None,
                "reads": e.reads,
                "read_errors": e.errors,
                "versions_seen": e.changes,
            }
        return out


async def _gather(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    async with asyncio.TaskGroup() as group:
        for coro in coros:
            group.create_task(coro)


__all__ = [
    "AWAIT_READS",
    "INDEX_WINDOW",
    "KEY_INDEX_PATH",
    "CasConflict",
    "KeyCache",
    "KeyVersion",
    "SecretNotFound",
    "Vault",
    "announce_key_change",
    "operator_config",
]
