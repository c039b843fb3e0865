"""How keyproxy reaches Vault/OpenBao through hvac, and how hvac's errors become keyproxy's.

This is the only module that imports hvac; `auth`, `kv` and `transit` describe their calls as
functions of the hvac client, and every one runs through `converted`. hvac is synchronous
and untyped, so every call runs in one of the client's own worker threads (`thread_pool`, see
`auth.Session._run`) and every hvac or requests exception becomes
`keyproxy.errors.VaultError`, raised `from None` so the hvac exception (which carries the
response body) is never chained into a traceback:

    VaultError
    ├── SecretNotFound     the KV path (or its latest version) does not exist
    └── CasConflict        a check-and-set write lost the race

Like the Vault CLI it reads BAO_/VAULT_ NAMESPACE, CACERT (or CAPATH), CLIENT_CERT and
CLIENT_KEY where the configuration sets no namespace or CA (`transport_settings`).

SECURITY: Vault's error texts are scrubbed of every known secret value before they are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
from requests.adapters import HTTPAdapter

from keyproxy import secret
from keyproxy.config import VaultConfig
from keyproxy.errors import ConfigError, VaultError
from keyproxy.secret import REDACTED

T = TypeVar("T")

CONCURRENCY = 16
# The key cache's CONCURRENCY reads at once, and beside them a login, token upkeep, a Transit
# signature and the revocation list's reads.
THREADS = CONCURRENCY + 4


class SecretNotFound(VaultError):
    """The KV v2 path does not exist, or its latest version is deleted or destroyed."""


class CasConflict(VaultError):
    """A check-and-set write was refused: the secret changed since it was read."""


class TokenRejected(VaultError):
    """Vault answered 401/403: the token is invalid, or lacks a permission."""


@dataclass(frozen=True)
class Transport:
    """How requests reach Vault: TLS trust, client certificate, namespace."""

    verify: bool | str
    cert: str | tuple[str, str] | None
    namespace: str | None


def transport_settings(cfg: VaultConfig, env: Mapping[str, str]) -> Transport:
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
    return Transport(verify, cert, namespace)


def hvac_client(cfg: VaultConfig, transport: Transport) -> Any:
    session = requests.Session()
    # SECURITY: no HTTP(S)_PROXY or ~/.netrc from the environment on the way to Vault.
    session.trust_env = False
    # On the session itself: hvac takes a given session's verify and cert over its own
    # arguments (and a new session verifies with the system's trust store).
    session.verify, session.cert = transport.verify, transport.cert
    # As many kept connections as calls can run at once: a call beyond them would open a
    # connection only to close it afterwards (urllib3's "Connection pool is full").
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=THREADS)
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


def thread_pool() -> ThreadPoolExecutor:
    """A Vault client's own threads for hvac's blocking calls. Not asyncio's default pool:
    that one also resolves upstream host names (`loop.getaddrinfo`) with a handful of threads,
    and a Vault that hangs would hold them all for vault.timeout, so a new upstream connection
    would fail while the cached keys are still fresh."""
    return ThreadPoolExecutor(THREADS, thread_name_prefix="keyproxy-vault")


def read_credential(path: Path, name: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise VaultError(f"cannot read vault.auth.{name} {path}: {exc.strerror}") from None
    if not value:
        raise VaultError(f"vault.auth.{name} {path} is empty")
    return value


def converted(what: str, addr: str, call: Callable[[Any], T], client: Any) -> T:
    """Runs in a worker thread: `call(client)`, every hvac/requests error made a VaultError."""
    try:
        return call(client)
    except (hvac.exceptions.Unauthorized, hvac.exceptions.Forbidden) as exc:
        raise TokenRejected(f"{what}: {_vault_message(exc)}") from None
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
