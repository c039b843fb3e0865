"""The authenticated connection to Vault/OpenBao: login, token upkeep, calls, health.

`Session` logs in (token, AppRole, Kubernetes or JWT auth) and keeps its token alive. A call
refused with 401/403 checks whether the token is still valid; if not it logs in again once
and retries once. `operator_config` makes a configuration log in with the operator's own token
instead.

SECURITY: tokens, secret_ids and JWTs never appear in a log event or an exception message;
each is registered with the log scrubber as it is read.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import structlog

from keyproxy import secret
from keyproxy.config import VaultAuth, VaultConfig
from keyproxy.errors import VaultError
from keyproxy.vault.transport import (
    TokenRejected,
    converted,
    hvac_client,
    read_credential,
    thread_pool,
    transport_settings,
)

T = TypeVar("T")

log = structlog.get_logger("keyproxy.vault")

K8S_JWT_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
# A token with no TTL (a root or periodic-less service token) is still checked now and then, so
# a revoked one is replaced before a request finds out.
_CHECK_INTERVAL = 60.0
_MIN_DELAY = 1.0
_BACKOFF = (1.0, 30.0)


class Session:
    """An authenticated Vault/OpenBao connection whose every call is a coroutine; `Vault`
    adds the KV v2 and Transit calls."""

    def __init__(self, cfg: VaultConfig, env: Mapping[str, str] | None = None) -> None:
        self.cfg = cfg
        self._env = os.environ if env is None else env
        transport = transport_settings(cfg, self._env)
        # Two clients: `_client` carries the token; `_anon` never holds one, so a login request
        # never presents a stale token and health checks need none.
        self._client = hvac_client(cfg, transport)
        self._anon = hvac_client(cfg, transport)
        self._threads = thread_pool()  # every blocking call runs here, through `_in_thread`
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
            token = await self._in_thread(self._configured_token)
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
            token = read_credential(file, "token_file")
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
                role_id = read_credential(auth.role_id_file, "role_id_file")
            assert auth.secret_id_file is not None  # config requires it for approle
            secret_id = read_credential(auth.secret_id_file, "secret_id_file")
            secret.register(secret_id)
            return client.auth.approle.login(
                role_id, secret_id, use_token=False, mount_point=auth.mount
            )
        jwt = read_credential(auth.jwt_file or K8S_JWT_FILE, "jwt_file")
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

    async def _in_thread(self, call: Callable[[], T]) -> T:
        """`call()` in one of this client's threads (with the caller's context variables, as
        `asyncio.to_thread`), never on asyncio's default pool; a VaultError once the client
        is closed (shutting down), not the executor's RuntimeError."""
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._threads, context.run, call)
        except RuntimeError:  # the pool is shut down: `close()` was called
            raise VaultError("the Vault client is closed") from None
        return await future

    async def _run(self, what: str, call: Callable[[Any], T], client: Any = None) -> T:
        """Run `call(client)` in a worker thread, turning every failure into a VaultError."""
        chosen = self._client if client is None else client
        return await self._in_thread(lambda: converted(what, self.cfg.addr, call, chosen))

    async def _call(self, what: str, call: Callable[[Any], T]) -> T:
        """`_run`, but a refused token is replaced once (log in again) and the call retried."""
        generation = self._generation
        try:
            return await self._run(what, call)
        except TokenRejected as exc:
            await self._recover(generation, exc)
        return await self._run(what, call)

    async def _recover(self, generation: int, refused: TokenRejected) -> None:
        async with self._lock:
            if self._generation != generation:
                return  # another call already logged in again
            try:
                await self._run("token lookup", lambda c: c.auth.token.lookup_self())
            except TokenRejected:
                log.warning("vault.token_rejected", method=self.cfg.auth.method)
                await self._login_locked()
                return
            # The token is valid, so the refusal is a policy decision: retrying cannot help.
            raise refused

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
        except TokenRejected:
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
        """Close the HTTP connection pools and the threads: a call not started yet is
        cancelled, one under way ends on its own (within vault.timeout). The object must not
        be used afterwards."""
        self._threads.shutdown(wait=False, cancel_futures=True)
        self._client.adapter.close()
        self._anon.adapter.close()


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
