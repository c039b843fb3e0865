"""keyproxy.vault against a real OpenBao dev server configured by the vault-dev/ scripts."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from structlog.testing import capture_logs

from keyproxy.config import Injection, Route, SecretRef, Upstream, VaultAuth, VaultConfig
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.errors import ConfigError, Unavailable, VaultError
from keyproxy.secret import Secret
from keyproxy.vault import (
    AWAIT_READS,
    INDEX_WINDOW,
    KEY_INDEX_PATH,
    CasConflict,
    KeyCache,
    KeyVersion,
    SecretNotFound,
    Vault,
    announce_key_change,
)
from tests.helpers.cli import clean_env, keyproxy
from tests.helpers.polling import eventually
from tests.helpers.servers import free_port, new_key

POLL = 0.05
VAULT_TOKEN = re.compile(r"\b(hv)?[sbr]\.[A-Za-z0-9]{20,}")  # OpenBao/Vault token formats


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def route(name: str, ref: SecretRef) -> Route:
    return Route(
        name=name,
        upstream=Upstream("https", "api.example.com", 443, ""),
        secret=ref,
        inject=(Injection("header", "Authorization", "Bearer {key}"),),
    )


@contextlib.contextmanager
def vault_of(cfg: VaultConfig) -> Iterator[Vault]:
    vault = Vault(cfg)
    try:
        yield vault
    finally:
        vault.close()


@contextlib.asynccontextmanager
async def background(coro: Awaitable[None]) -> Any:
    task = asyncio.ensure_future(coro)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def create_token(server: OpenBaoDevServer, *args: str) -> tuple[str, str]:
    """A new token from root (policy keyproxy-proxy): (token, accessor)."""
    out = json.loads(server.bao("token", "create", "-format=json", "-policy=keyproxy-proxy", *args))
    return out["auth"]["client_token"], out["auth"]["accessor"]


def write_secret_file(path: Path, value: str) -> None:
    path.write_text(value, encoding="utf-8")
    path.chmod(0o600)


# ---------------------------------------------------------------------------- login and reads


async def test_token_login_reads_key_and_version(
    openbao: OpenBaoDevServer, root_vault_config: VaultConfig, kv_path: str
) -> None:
    """Token auth (token_file) reads a key's value and its KV v2 version."""
    version = openbao.put_key(kv_path, "sk-token-login-0001")
    with vault_of(root_vault_config) as vault:
        await vault.login()
        key = await vault.read_key(SecretRef("secret", kv_path, "api_key"))
    assert key.secret.reveal() == "sk-token-login-0001"
    assert key.version == version


async def test_token_login_from_environment(openbao: OpenBaoDevServer, kv_path: str) -> None:
    """Token auth without token_file takes BAO_TOKEN, then VAULT_TOKEN, from the environment."""
    openbao.put_key(kv_path, "sk-token-env-0001")
    cfg = VaultConfig(addr=openbao.addr, auth=VaultAuth(method="token", mount="token"))
    for env in ({"BAO_TOKEN": openbao.root_token}, {"VAULT_TOKEN": openbao.root_token}):
        vault = Vault(cfg, env=env)
        try:
            await vault.login()
            key = await vault.read_key(SecretRef("secret", kv_path, "api_key"))
        finally:
            vault.close()
        assert key.secret.reveal() == "sk-token-env-0001"
    with pytest.raises(VaultError, match="BAO_TOKEN"):
        await Vault(cfg, env={}).login()


async def test_approle_login_reads_key(
    openbao: OpenBaoDevServer, proxy_vault_config: VaultConfig, kv_path: str
) -> None:
    """The proxy's AppRole from setup.sh logs in and reads keys under secret/keyproxy/."""
    openbao.put_key(kv_path, "sk-approle-0001")
    version = openbao.put_key(kv_path, "sk-approle-0002")
    with vault_of(proxy_vault_config) as vault:
        await vault.login()
        key = await vault.read_key(SecretRef("secret", kv_path, "api_key"))
        expires_in = vault.token_expires_in
    assert (key.secret.reveal(), key.version) == ("sk-approle-0002", version)
    assert expires_in is not None
    assert 3000 < expires_in <= 3600


async def test_jwt_login_with_a_workload_token(
    openbao: OpenBaoDevServer, proxy_vault_config: VaultConfig, kv_path: str, tmp_path: Path
) -> None:
    """JWT auth: the proxy logs in with a workload identity token (here one issued by
    OpenBao's own OIDC provider, verified by Vault's jwt auth method) and reads keys."""
    setup = openbao.dev_setup
    openbao.bao("auth", "enable", "-path=jwt-test", "jwt")
    openbao.bao("write", "auth/jwt-test/config", f"jwks_url={setup.jwks_uri}")
    openbao.bao(
        "write",
        "auth/jwt-test/role/proxy",
        "role_type=jwt",
        "user_claim=sub",
        f"bound_audiences={setup.audience}",
        "token_policies=keyproxy-proxy",
        "token_ttl=10m",
    )
    jwt_file = tmp_path / "workload.jwt"
    jwt_file.write_text(openbao.agent_token(openbao.add_agent("jwt-login")))
    version = openbao.put_key(kv_path, "sk-jwt-login-0001")
    auth = VaultAuth("jwt", mount="jwt-test", role="proxy", jwt_file=jwt_file)
    with vault_of(replace(proxy_vault_config, auth=auth)) as vault:
        await vault.login()
        key = await vault.read_key(SecretRef("secret", kv_path, "api_key"))
    assert (key.secret.reveal(), key.version) == ("sk-jwt-login-0001", version)


async def test_approle_login_with_inline_role_id(
    openbao: OpenBaoDevServer, proxy_vault_config: VaultConfig, kv_path: str
) -> None:
    """AppRole accepts role_id inline instead of role_id_file."""
    openbao.put_key(kv_path, "sk-inline-role-0001")
    role_id = openbao.dev_setup.role_id_file.read_text(encoding="utf-8").strip()
    auth = replace(proxy_vault_config.auth, role_id=role_id, role_id_file=None)
    with vault_of(replace(proxy_vault_config, auth=auth)) as vault:
        await vault.login()
        key = await vault.read_key(SecretRef("secret", kv_path, "api_key"))
    assert key.secret.reveal() == "sk-inline-role-0001"


async def test_proxy_policy_is_read_only_and_scoped(
    root_vault: Vault, proxy_vault_config: VaultConfig, kv_path: str
) -> None:
    """The proxy's token cannot write keys nor read outside secret/keyproxy/, and a policy
    refusal does not make it log in again."""
    await root_vault.write_kv("secret", "elsewhere/x", {"api_key": "sk-elsewhere-0001"})
    with vault_of(proxy_vault_config) as vault:
        await vault.login()
        with capture_logs() as logs:
            with pytest.raises(VaultError, match="permission denied"):
                await vault.read_kv("secret", "elsewhere/x")
            with pytest.raises(VaultError, match="permission denied"):
                await vault.write_kv("secret", kv_path, {"api_key": "sk-nope-0001"})
    assert not [e for e in logs if e["event"] == "vault.login"]


@pytest.mark.parametrize(
    ("data", "field", "error"),
    [
        (None, "api_key", SecretNotFound),
        ({"other": "sk-other-0001"}, "api_key", VaultError),
        ({"api_key": ""}, "api_key", VaultError),
        ({"api_key": 12345678}, "api_key", VaultError),
        ({"api_key": None}, "api_key", VaultError),
    ],
    ids=["missing-path", "missing-field", "empty", "number", "null"],
)
async def test_read_key_refuses_missing_or_unusable_values(
    root_vault: Vault, kv_path: str, data: dict[str, Any] | None, field: str, error: type[Exception]
) -> None:
    """read_key raises VaultError for a missing path or field, and for an empty or non-string
    value: it never returns an empty key."""
    if data is not None:
        await root_vault.write_kv("secret", kv_path, data)
    with pytest.raises(error):
        await root_vault.read_key(SecretRef("secret", kv_path, field))


async def test_read_kv_of_deleted_latest_version_is_not_found(
    openbao: OpenBaoDevServer, root_vault: Vault, kv_path: str
) -> None:
    """A secret whose latest version is deleted reads as SecretNotFound, not as empty data."""
    openbao.put_key(kv_path, "sk-deleted-0001")
    openbao.bao("kv", "delete", "-mount=secret", kv_path)
    with pytest.raises(SecretNotFound):
        await root_vault.read_kv("secret", kv_path)


async def test_write_kv_check_and_set(root_vault: Vault, kv_path: str) -> None:
    """write_kv returns the new version; with cas it writes only over that exact version."""
    assert await root_vault.write_kv("secret", kv_path, {"journal": "a"}, cas=0) == 1
    with pytest.raises(CasConflict):
        await root_vault.write_kv("secret", kv_path, {"journal": "b"}, cas=0)
    assert await root_vault.write_kv("secret", kv_path, {"journal": "b"}, cas=1) == 2
    with pytest.raises(CasConflict):
        await root_vault.write_kv("secret", kv_path, {"journal": "c"}, cas=1)
    assert await root_vault.write_kv("secret", kv_path, {"journal": "c"}) == 3
    assert await root_vault.read_kv("secret", kv_path) == ({"journal": "c"}, 3)


async def test_healthy_on_running_server(proxy_vault_config: VaultConfig) -> None:
    """healthy() is true for a running, unsealed server, even before login."""
    with vault_of(proxy_vault_config) as vault:
        assert await vault.healthy()


async def test_unreachable_vault_is_a_vault_error() -> None:
    """Nothing listening: login and health fail as VaultError / False, without hanging."""
    cfg = VaultConfig(
        addr="http://127.0.0.1:9",
        auth=VaultAuth(method="token", mount="token"),
        timeout=2.0,
    )
    vault = Vault(cfg, env={"BAO_TOKEN": "hvs.not-a-real-token-0001"})
    try:
        assert not await vault.healthy()
        with pytest.raises(VaultError, match="cannot reach Vault") as info:
            await vault.login()
    finally:
        vault.close()
    assert "not-a-real-token" not in str(info.value)


# ---------------------------------------------------------------------------- re-login


async def _revoke_tokens_with_policy(server: OpenBaoDevServer, policy: str) -> int:
    accessors = json.loads(server.bao("list", "-format=json", "auth/token/accessors"))
    revoked = 0
    for accessor in accessors:
        info = json.loads(server.bao("token", "lookup", "-format=json", "-accessor", accessor))
        if policy in (info["data"].get("policies") or []):
            server.bao("token", "revoke", "-accessor", accessor)
            revoked += 1
    return revoked


async def test_approle_logs_in_again_after_token_revoked(fresh_openbao: OpenBaoDevServer) -> None:
    """When the proxy's token is revoked, the next read logs in again and succeeds."""
    fresh_openbao.put_key("keyproxy/keys/demo", "sk-relogin-0001")
    ref = SecretRef("secret", "keyproxy/keys/demo", "api_key")
    with vault_of(fresh_openbao.proxy_vault_config()) as vault:
        await vault.login()
        assert (await vault.read_key(ref)).secret.reveal() == "sk-relogin-0001"
        assert await _revoke_tokens_with_policy(fresh_openbao, "keyproxy-proxy") == 1
        with capture_logs() as logs:
            key = await vault.read_key(ref)
    assert key.secret.reveal() == "sk-relogin-0001"
    events = [e["event"] for e in logs]
    assert events.count("vault.token_rejected") == 1
    assert events.count("vault.login") == 1


async def test_concurrent_reads_after_revocation_log_in_once(
    fresh_openbao: OpenBaoDevServer,
) -> None:
    """Many reads refused at once share a single new login."""
    fresh_openbao.put_key("keyproxy/keys/demo", "sk-relogin-0002")
    ref = SecretRef("secret", "keyproxy/keys/demo", "api_key")
    with vault_of(fresh_openbao.proxy_vault_config()) as vault:
        await vault.login()
        await _revoke_tokens_with_policy(fresh_openbao, "keyproxy-proxy")
        with capture_logs() as logs:
            keys = await asyncio.gather(*(vault.read_key(ref) for _ in range(20)))
    assert {k.secret.reveal() for k in keys} == {"sk-relogin-0002"}
    assert [e["event"] for e in logs].count("vault.login") == 1


async def test_token_method_rereads_token_file_after_revocation(
    openbao: OpenBaoDevServer, tmp_path: Path, kv_path: str
) -> None:
    """With token auth, a refused token makes the proxy re-read token_file and retry."""
    openbao.put_key(kv_path, "sk-token-file-0001")
    ref = SecretRef("secret", kv_path, "api_key")
    token_file = tmp_path / "token"
    first, first_accessor = create_token(openbao)
    write_secret_file(token_file, first)
    cfg = VaultConfig(
        addr=openbao.addr, auth=VaultAuth(method="token", mount="token", token_file=token_file)
    )
    with vault_of(cfg) as vault:
        await vault.login()
        assert (await vault.read_key(ref)).secret.reveal() == "sk-token-file-0001"
        openbao.bao("token", "revoke", "-accessor", first_accessor)
        second, _ = create_token(openbao)
        write_secret_file(token_file, second)
        assert (await vault.read_key(ref)).secret.reveal() == "sk-token-file-0001"


# ---------------------------------------------------------------------------- token upkeep


async def test_maintain_token_renews_before_expiry(
    openbao: OpenBaoDevServer, tmp_path: Path
) -> None:
    """maintain_token renews a renewable token at about 2/3 of its TTL."""
    token, accessor = create_token(openbao, "-ttl=5s", "-explicit-max-ttl=1h")
    write_secret_file(tmp_path / "token", token)
    cfg = VaultConfig(
        addr=openbao.addr,
        auth=VaultAuth(method="token", mount="token", token_file=tmp_path / "token"),
    )

    async def renewed() -> bool:
        out = await asyncio.to_thread(
            openbao.bao, "token", "lookup", "-format=json", "-accessor", accessor
        )
        return bool(json.loads(out)["data"].get("last_renewal_time"))

    with vault_of(cfg) as vault:
        await vault.login()
        assert not await renewed()
        async with background(vault.maintain_token()):
            await eventually(renewed, "the token to be renewed", within=10, interval=POLL)


async def test_maintain_token_logs_in_again_at_max_ttl(
    openbao: OpenBaoDevServer, tmp_path: Path, kv_path: str
) -> None:
    """When renewal can no longer extend an AppRole token (max TTL), maintain_token logs in
    again, so the proxy keeps a valid token without any request failing."""
    role = f"auth/approle/role/short-{tmp_path.name[-8:]}"
    openbao.bao("write", role, "token_policies=keyproxy-proxy", "token_ttl=3s", "token_max_ttl=4s")
    write_secret_file(
        tmp_path / "role-id", openbao.bao("read", "-field=role_id", f"{role}/role-id")
    )
    write_secret_file(
        tmp_path / "secret-id", openbao.bao("write", "-f", "-field=secret_id", f"{role}/secret-id")
    )
    auth = VaultAuth(
        method="approle",
        mount="approle",
        role_id_file=tmp_path / "role-id",
        secret_id_file=tmp_path / "secret-id",
    )
    openbao.put_key(kv_path, "sk-short-ttl-0001")
    with vault_of(VaultConfig(addr=openbao.addr, auth=auth)) as vault:
        await vault.login()
        with capture_logs() as logs:
            async with background(vault.maintain_token()):

                async def logged_in_again() -> bool:
                    return any(e["event"] == "vault.login" for e in logs)

                await eventually(logged_in_again, "a new login", within=10, interval=POLL)
                key = await vault.read_key(SecretRef("secret", kv_path, "api_key"))
    assert key.secret.reveal() == "sk-short-ttl-0001"
    assert not [e for e in logs if e["event"] == "vault.token_rejected"]


# ---------------------------------------------------------------------------- the key cache


async def test_key_cache_picks_up_new_version(
    openbao: OpenBaoDevServer, proxy_vault_config: VaultConfig, kv_path: str
) -> None:
    """A new KV version is served by KeyCache.get after the next background refresh."""
    openbao.put_key(kv_path, "sk-cache-v1-0001")
    ref = SecretRef("secret", kv_path, "api_key")
    with vault_of(proxy_vault_config) as vault:
        await vault.login()
        cache = KeyCache(vault, {"a": route("a", ref)}, refresh_interval=0.2, max_staleness=30)
        await cache.load_all()
        first = cache.get("a")
        assert first.secret.reveal() == "sk-cache-v1-0001"
        async with background(cache.run()):
            version = await asyncio.to_thread(openbao.put_key, kv_path, "sk-cache-v2-0001")

            async def updated() -> bool:
                return cache.get("a").version == version

            await eventually(updated, "the new key version", within=5, interval=POLL)
    assert cache.get("a").secret.reveal() == "sk-cache-v2-0001"
    assert version == first.version + 1


async def test_key_cache_reads_shared_secret_once(
    openbao: OpenBaoDevServer, proxy_vault_config: VaultConfig, kv_path: str
) -> None:
    """Routes sharing a secret share one cache entry; other fields are separate keys."""
    openbao.put_key(kv_path, "sk-shared-0001")
    openbao.put_key(kv_path, "sk-second-field-0001", field="backup")
    main = SecretRef("secret", kv_path, "api_key")
    routes = {
        "a": route("a", main),
        "b": route("b", main),
        "c": route("c", SecretRef("secret", kv_path, "backup")),
    }
    with vault_of(proxy_vault_config) as vault:
        await vault.login()
        cache = KeyCache(vault, routes, refresh_interval=1, max_staleness=30)
        await cache.load_all()
    assert cache.get("a") is cache.get("b")
    assert cache.get("a").secret.reveal() == "sk-shared-0001"
    assert cache.get("c").secret.reveal() == "sk-second-field-0001"
    assert cache.ready()


async def test_key_cache_never_loaded_is_unavailable(
    proxy_vault_config: VaultConfig, kv_path: str
) -> None:
    """Before a successful read, get() raises key_unavailable and ready() is false; a
    failed read is recorded in status(), not raised."""
    ref = SecretRef("secret", kv_path, "api_key")  # nothing stored there
    with vault_of(proxy_vault_config) as vault:
        await vault.login()
        cache = KeyCache(vault, {"a": route("a", ref)}, refresh_interval=1, max_staleness=30)
        with pytest.raises(Unavailable) as before:
            cache.get("a")
        await cache.load_all()
        with pytest.raises(Unavailable) as after:
            cache.get("a")
    assert before.value.reason == after.value.reason == "key_unavailable"
    assert not cache.ready()
    assert "not found" in cache.status()["a"]["last_error"]
    with pytest.raises(Unavailable):
        cache.get("no-such-route")


async def test_key_cache_serves_last_key_until_max_staleness(
    fresh_openbao: OpenBaoDevServer,
) -> None:
    """With Vault down, the last good key is served until max_staleness, then key_stale."""
    fresh_openbao.put_key("keyproxy/keys/demo", "sk-stale-0001")
    ref = SecretRef("secret", "keyproxy/keys/demo", "api_key")
    clock = FakeClock()
    cfg = replace(fresh_openbao.proxy_vault_config(), timeout=2.0)
    with vault_of(cfg) as vault:
        await vault.login()
        cache = KeyCache(
            vault, {"a": route("a", ref)}, refresh_interval=1, max_staleness=10, clock=clock
        )
        await cache.load_all()
        fresh_openbao.stop()
        assert not await vault.healthy()

        clock.now += 9
        await cache.load_all()  # fails: Vault is gone
        assert cache.get("a").secret.reveal() == "sk-stale-0001"
        assert cache.ready()
        status = cache.status()["a"]
        assert "cannot reach Vault" in status["last_error"]
        assert status["age"] == 9

        clock.now += 2
        with pytest.raises(Unavailable) as info:
            cache.get("a")
        assert info.value.reason == "key_stale"
        assert not cache.ready()
        assert info.value.status == 503


def reads(cache: KeyCache) -> dict[str, int]:
    return {name: entry["reads"] for name, entry in cache.status().items()}


@contextlib.asynccontextmanager
async def two_key_cache(
    openbao: OpenBaoDevServer, cfg: VaultConfig, full_refresh_interval: float
) -> AsyncIterator[tuple[KeyCache, dict[str, str], FakeClock]]:
    """A loaded cache of routes a and b (separate secrets), refreshed by hand: (cache,
    route -> KV path, clock)."""
    paths = {name: f"keyproxy/keys/test-{uuid.uuid4().hex}" for name in ("a", "b")}
    for path in paths.values():
        openbao.put_key(path, new_key())
    routes = {
        name: route(name, SecretRef("secret", path, "api_key")) for name, path in paths.items()
    }
    clock = FakeClock()
    with vault_of(cfg) as vault:
        await vault.login()
        cache = KeyCache(
            vault,
            routes,
            refresh_interval=1,
            max_staleness=300,
            full_refresh_interval=full_refresh_interval,
            clock=clock,
        )
        await cache.load_all()
        assert reads(cache) == {"a": 1, "b": 1}
        yield cache, paths, clock


async def test_key_cache_rereads_only_the_keys_the_change_index_names(
    openbao: OpenBaoDevServer, proxy_vault_config: VaultConfig, root_vault: Vault
) -> None:
    """With the change index unchanged a refresh reads no key and confirms them all; a key
    stored with put-key.sh (which writes the index) is re-read at the next refresh, and only
    it; a write that bypasses the index is not seen until the full refresh."""
    async with two_key_cache(openbao, proxy_vault_config, 3600) as (cache, paths, clock):
        clock.now += 100
        await cache.refresh()
        assert reads(cache) == {"a": 1, "b": 1}
        assert [cache.status()[name]["age"] for name in "ab"] == [0, 0]  # confirmed

        version = await asyncio.to_thread(openbao.put_key, paths["a"], new_key())
        await cache.refresh()
        assert reads(cache) == {"a": 2, "b": 1}
        assert cache.get("a").version == version

        before = cache.get("b")
        await root_vault.write_kv("secret", paths["b"], {"api_key": new_key()})
        await cache.refresh()
        assert cache.get("b") is before
        assert reads(cache) == {"a": 2, "b": 1}


async def test_key_cache_sweep_rereads_every_key_within_the_full_refresh_interval(
    openbao: OpenBaoDevServer, proxy_vault_config: VaultConfig, root_vault: Vault
) -> None:
    """Writes that bypass the change index are found by the sweep: with a full refresh of
    two refresh intervals, two refreshes re-read each of the two keys once."""
    async with two_key_cache(openbao, proxy_vault_config, 2) as (cache, paths, _):
        versions = {
            name: await root_vault.write_kv("secret", path, {"api_key": new_key()})
            for name, path in paths.items()
        }
        await cache.refresh()
        assert sorted(reads(cache).values()) == [1, 2]
        await cache.refresh()
        assert reads(cache) == {"a": 2, "b": 2}
        assert {name: cache.get(name).version for name in paths} == versions


async def test_key_cache_rereads_all_when_the_index_cannot_tell(
    openbao: OpenBaoDevServer, proxy_vault_config: VaultConfig, root_vault: Vault
) -> None:
    """More index versions since the last poll than it reads one by one: every key is
    re-read rather than one being missed."""
    async with two_key_cache(openbao, proxy_vault_config, 3600) as (cache, _, _):
        for _ in range(INDEX_WINDOW + 1):
            await root_vault.write_kv("secret", KEY_INDEX_PATH, {"secret": "secret/elsewhere"})
        await cache.refresh()
        assert reads(cache) == {"a": 2, "b": 2}
        await root_vault.write_kv("secret", KEY_INDEX_PATH, {"secret": "secret/elsewhere"})
        await cache.refresh()
        assert reads(cache) == {"a": 2, "b": 2}  # one version, naming another secret


async def test_key_cache_never_confirms_a_key_it_cannot_read(
    openbao: OpenBaoDevServer, proxy_vault_config: VaultConfig, root_vault: Vault
) -> None:
    """The index names a secret whose new version is refused (an empty key): the last good
    key keeps serving, is re-read at every refresh but never confirmed by the index, and
    turns to key_stale after max_staleness while the other key stays confirmed."""
    async with two_key_cache(openbao, proxy_vault_config, 3600) as (cache, paths, clock):
        good = cache.get("a")
        await root_vault.write_kv("secret", paths["a"], {"api_key": ""})
        await announce_key_change(root_vault, SecretRef("secret", paths["a"], "api_key"))
        clock.now += 100
        await cache.refresh()
        assert cache.get("a") is good
        assert "is empty" in cache.status()["a"]["last_error"]
        for _ in range(3):
            clock.now += 100
            await cache.refresh()
        assert reads(cache) == {"a": 5, "b": 1}
        assert [cache.status()[name]["age"] for name in "ab"] == [400, 0]
        with pytest.raises(Unavailable) as info:
            cache.get("a")
        assert info.value.reason == "key_stale"


async def test_key_cache_awaits_the_new_version_the_index_names(
    openbao: OpenBaoDevServer, proxy_vault_config: VaultConfig, root_vault: Vault
) -> None:
    """A secret the index names but that still reads at its old version (a standby lagging
    behind the write) is read again at the next refreshes, AWAIT_READS times at most, and
    no more once the new version shows up."""
    async with two_key_cache(openbao, proxy_vault_config, 3600) as (cache, paths, _):
        ref_a = SecretRef("secret", paths["a"], "api_key")
        await announce_key_change(root_vault, ref_a)  # no new version behind it
        for _ in range(AWAIT_READS + 2):
            await cache.refresh()
        assert reads(cache) == {"a": 1 + AWAIT_READS, "b": 1}

        await announce_key_change(root_vault, ref_a)
        await cache.refresh()
        await cache.refresh()
        assert reads(cache)["a"] == 3 + AWAIT_READS
        version = await root_vault.write_kv("secret", paths["a"], {"api_key": new_key()})
        await cache.refresh()  # still awaited: reads the new version, and stops
        await cache.refresh()
        assert reads(cache)["a"] == 4 + AWAIT_READS
        assert cache.get("a").version == version


async def test_key_cache_rereads_all_when_the_index_is_recreated(
    openbao: OpenBaoDevServer, proxy_vault_config: VaultConfig, root_vault: Vault
) -> None:
    """An index deleted and written again (or restored from a snapshot) may reach the version
    the cache last saw with other history: every key is re-read."""
    async with two_key_cache(openbao, proxy_vault_config, 3600) as (cache, _, _):
        seen = await root_vault.kv_version("secret", KEY_INDEX_PATH)
        assert seen is not None
        await asyncio.to_thread(
            openbao.bao, "kv", "metadata", "delete", "-mount=secret", KEY_INDEX_PATH
        )
        for _ in range(seen):
            await root_vault.write_kv("secret", KEY_INDEX_PATH, {"secret": "secret/elsewhere"})
        await cache.refresh()
        assert reads(cache) == {"a": 2, "b": 2}


async def test_key_cache_without_the_index_confirms_nothing(
    openbao: OpenBaoDevServer, tmp_path: Path
) -> None:
    """A token that may read the keys but not the change index (a policy not updated): the
    failure is logged once, keys are re-read by the sweep and never confirmed without a read,
    so staleness keeps counting."""
    policy = f"keys-only-{uuid.uuid4().hex[:8]}"
    rules = tmp_path / "keys-only.hcl"
    rules.write_text('path "secret/data/keyproxy/keys/*" { capabilities = ["read"] }\n')
    openbao.bao("policy", "write", policy, str(rules))
    out = json.loads(openbao.bao("token", "create", "-format=json", f"-policy={policy}"))
    write_secret_file(tmp_path / "token", out["auth"]["client_token"])
    cfg = VaultConfig(
        addr=openbao.addr,
        auth=VaultAuth(method="token", mount="token", token_file=tmp_path / "token"),
    )
    with capture_logs() as logs:
        async with two_key_cache(openbao, cfg, 3600) as (cache, _, clock):
            clock.now += 100
            await cache.refresh()
            await cache.refresh()
            assert reads(cache) == {"a": 1, "b": 1}
            assert [cache.status()[name]["age"] for name in "ab"] == [100, 100]
            assert cache.ready()
    failures = [e for e in logs if e["event"] == "key_index.read_failed"]
    assert len(failures) == 1
    assert "permission denied" in failures[0]["error"]


async def test_announcing_a_key_without_permission_logs_and_does_not_raise(
    openbao: OpenBaoDevServer, proxy_vault_config: VaultConfig, kv_path: str
) -> None:
    """The key is stored already when the index write is refused (the proxy's policy cannot
    write it): a warning naming the secret, no exception, no token in the log."""
    with vault_of(proxy_vault_config) as vault, capture_logs() as logs:
        await vault.login()
        await announce_key_change(vault, SecretRef("secret", kv_path, "api_key"))
    (failed,) = [e for e in logs if e["event"] == "key_index.write_failed"]
    assert failed["secret"] == f"secret/{kv_path}"
    assert "permission denied" in failed["error"]
    assert not VAULT_TOKEN.search(str(logs))


# ---------------------------------------------------------------------------- agent identity


def test_agent_token_has_the_claims_keyproxy_checks(openbao: OpenBaoDevServer) -> None:
    """agent-token.sh mints an RS256 JWT with iss {addr}/v1/identity/oidc, aud keyproxy,
    sub = the agent's entity id and an entity_name claim, verifiable with the issuer's JWKS."""
    setup = openbao.dev_setup
    agent = openbao.add_agent("summarizer")
    token = openbao.agent_token(agent)
    signing_key = jwt.PyJWKClient(setup.jwks_uri).get_signing_key_from_jwt(token)
    claims = jwt.decode(
        token,
        signing_key.key,
        algorithms=["RS256"],
        audience=setup.audience,
        issuer=setup.issuer,
        options={"require": ["exp", "iat", "sub"]},
    )
    assert setup.issuer == f"{openbao.addr}/v1/identity/oidc"
    assert claims["sub"] == agent.entity_id
    assert claims["aud"] == "keyproxy"
    assert claims["entity_name"] == "summarizer"
    assert 0 < claims["exp"] - claims["iat"] <= 15 * 60
    assert openbao.add_agent("summarizer") == agent  # idempotent: same entity


# ---------------------------------------------------------------------------- no leaks


async def test_no_secret_in_reprs_errors_or_status(
    openbao: OpenBaoDevServer, proxy_vault_config: VaultConfig, tmp_path: Path, kv_path: str
) -> None:
    """Key values, tokens and secret_ids appear in no repr, str, log event, VaultError or
    status()."""
    value = "sk-never-shown-0001"
    openbao.put_key(kv_path, value)
    ref = SecretRef("secret", kv_path, "api_key")
    secret_id = openbao.dev_setup.secret_id_file.read_text(encoding="utf-8").strip()
    with vault_of(proxy_vault_config) as vault, capture_logs() as logs:
        await vault.login()
        key = await vault.read_key(ref)
        cache = KeyCache(vault, {"a": route("a", ref)}, refresh_interval=1, max_staleness=30)
        await cache.load_all()
    assert [e["event"] for e in logs] == ["vault.login", "key_cache.key_loaded"]
    shown = [repr(key), str(key), f"{key}", repr(key.secret), json.dumps(cache.status()), str(logs)]
    assert not [s for s in shown if secret_id in s or openbao.root_token in s]
    assert not [s for s in shown if VAULT_TOKEN.search(s)]
    assert key == KeyVersion(Secret(value), key.version, key.created_at)
    assert key.created_at is not None
    assert not [s for s in shown if value in s]

    bad_secret_id = "wrong-secret-id-0123456789"
    write_secret_file(tmp_path / "secret-id", bad_secret_id)
    auth = replace(proxy_vault_config.auth, secret_id_file=tmp_path / "secret-id")
    with (
        vault_of(replace(proxy_vault_config, auth=auth)) as vault,
        pytest.raises(VaultError) as info,
    ):
        await vault.login()
    assert bad_secret_id not in str(info.value)
    assert bad_secret_id not in repr(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__

    bad_token = "hvs.not-a-valid-token-0123456789"
    write_secret_file(tmp_path / "token", bad_token)
    cfg = VaultConfig(
        addr=openbao.addr,
        auth=VaultAuth(method="token", mount="token", token_file=tmp_path / "token"),
    )
    with vault_of(cfg) as vault, pytest.raises(VaultError) as refused:
        await vault.login()
    assert bad_token not in str(refused.value)
    assert openbao.root_token not in str(refused.value)


# ---------------------------------------------------------------------------- the Vault CLI's
# environment: namespaces, CA certificates, client certificates, and the operator's token


@contextlib.contextmanager
def vault_in(cfg: VaultConfig, env: dict[str, str]) -> Iterator[Vault]:
    """A Vault for `cfg` reading `env` instead of this process's environment."""
    vault = Vault(cfg, env)
    try:
        yield vault
    finally:
        vault.close()


def _namespace_with_key(openbao: OpenBaoDevServer, path: str, key: str) -> str:
    """A new namespace holding KV v2 at secret/ and `key` at `path` in it."""
    name = f"ns-{uuid.uuid4().hex[:8]}"
    openbao.bao("namespace", "create", name)
    openbao.bao("secrets", "enable", f"-ns={name}", "-path=secret", "-version=2", "kv")
    openbao.bao("kv", "put", f"-ns={name}", "-mount=secret", path, "api_key=-", stdin=key)
    return name


@pytest.mark.parametrize("where", ["setting", "VAULT_NAMESPACE", "BAO_NAMESPACE"])
async def test_a_namespace_from_the_setting_or_the_environment(
    openbao: OpenBaoDevServer, root_vault_config: VaultConfig, kv_path: str, where: str
) -> None:
    """vault.namespace, VAULT_NAMESPACE or BAO_NAMESPACE sends every request into that
    OpenBao namespace: a key stored only there is read; without it, it is not found."""
    key = new_key()
    name = _namespace_with_key(openbao, kv_path, key)
    cfg, env = root_vault_config, {}
    if where == "setting":
        cfg = replace(cfg, namespace=name)
    else:
        env = {where: name}
    with vault_in(cfg, env) as vault:
        await vault.login()
        data, version = await vault.read_kv("secret", kv_path)
        assert (data["api_key"], version) == (key, 1)
    with vault_of(root_vault_config) as outside:
        await outside.login()
        with pytest.raises(SecretNotFound):
            await outside.read_kv("secret", kv_path)


def test_the_cli_reaches_a_namespace_with_vault_namespace(
    openbao: OpenBaoDevServer, tmp_path: Path, kv_path: str
) -> None:
    """`keyproxy keys status --as-operator` with VAULT_TOKEN and VAULT_NAMESPACE reads the key
    of a route stored in that namespace; without VAULT_NAMESPACE it finds none."""
    name = _namespace_with_key(openbao, kv_path, new_key())
    raw = {
        "vault": {"addr": openbao.addr, "auth": {"method": "token"}},
        "identity": {"issuers": [openbao.issuer_yaml()]},
        "routes": {
            "api": {
                "upstream": "https://api.example.com",
                "secret": {"path": kv_path},
                "inject": [{"header": "X-Api-Key"}],
            }
        },
    }
    cfg = tmp_path / "k.yaml"
    cfg.write_text(json.dumps(raw))
    env = clean_env(tmp_path, VAULT_TOKEN=openbao.root_token)
    argv = ["keys", "status", "-c", str(cfg), "--as-operator", "-o", "json"]
    inside = keyproxy(*argv, env={**env, "VAULT_NAMESPACE": name})
    assert inside.returncode == 0, inside.stderr
    assert json.loads(inside.stdout)[0]["version"] == 1
    outside = keyproxy(*argv, env=env)
    assert outside.returncode == 1
    assert json.loads(outside.stdout)[0]["error"] == "no key stored"


@dataclass(frozen=True)
class MutualTls:
    """An OpenBao whose extra listener requires a client certificate, and the PEM files."""

    addr: str
    plain: OpenBaoDevServer
    ca: Path
    cert: Path
    key: Path
    other_ca: Path


def _pem_files(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed, and a
    second CA that signed neither."""
    now = datetime.now(UTC)

    def certificate(
        subject: str, public: Any, signer: Any, issuer: str, *, ca: bool, usage: Any = None
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer, hashes.SHA256())

    def write(name: str, data: bytes) -> Path:
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    pem = serialization.Encoding.PEM
    files = {}
    for ca_name in ("ca", "other-ca"):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = certificate(ca_name, ca_key.public_key(), ca_key, ca_name, ca=True)
        files[ca_name] = write(f"{ca_name}.pem", ca_cert.public_bytes(pem))
        if ca_name == "other-ca":
            break
        for leaf, usage in (
            ("server", ExtendedKeyUsageOID.SERVER_AUTH),
            ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
        ):
            leaf_key = ec.generate_private_key(ec.SECP256R1())
            cert = certificate(leaf, leaf_key.public_key(), ca_key, ca_name, ca=False, usage=usage)
            files[leaf] = write(f"{leaf}.pem", cert.public_bytes(pem))
            private = leaf_key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            files[f"{leaf}-key"] = write(f"{leaf}-key.pem", private)
    return files


@pytest.fixture(scope="module")
def mutual_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MutualTls]:
    """`bao server -dev` with a second listener: TLS, client certificate required."""
    directory = tmp_path_factory.mktemp("mtls")
    files = _pem_files(directory)
    port = free_port()
    (directory / "listener.hcl").write_text(
        f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n'
        f'  tls_cert_file = "{files["server"]}"\n  tls_key_file = "{files["server-key"]}"\n'
        f'  tls_client_ca_file = "{files["ca"]}"\n'
        "  tls_require_and_verify_client_cert = true\n}\n"
    )
    server = MtlsDevServer(directory / "openbao", directory / "listener.hcl")
    server.start(timeout=30)
    try:
        yield MutualTls(
            f"https://127.0.0.1:{port}",
            server,
            files["ca"],
            files["client"],
            files["client-key"],
            files["other-ca"],
        )
    finally:
        server.stop()


class MtlsDevServer(OpenBaoDevServer):
    """The dev server, started with one extra listener configuration file."""

    def __init__(self, workdir: Path, listener: Path) -> None:
        super().__init__(workdir)
        self._listener = listener

    def _spawn(self) -> None:
        bao_bin = self.bao_bin
        self.bao_bin = str(self.workdir.parent / "bao-with-listener")
        self.workdir.mkdir(parents=True, exist_ok=True)
        wrapper = Path(self.bao_bin)
        wrapper.write_text(f'#!/bin/sh\nexec "{bao_bin}" "$@" -config="{self._listener}"\n')
        wrapper.chmod(0o700)
        try:
            super()._spawn()
        finally:
            self.bao_bin = bao_bin


def _tls_env(m: MutualTls, prefix: str = "VAULT_", **extra: str) -> dict[str, str]:
    env = {f"{prefix}CLIENT_CERT": str(m.cert), f"{prefix}CLIENT_KEY": str(m.key)}
    return {"BAO_TOKEN": m.plain.root_token, **env, **extra}


@pytest.mark.parametrize("prefix", ["VAULT_", "BAO_"])
async def test_ca_and_client_certificate_from_the_environment(
    mutual_tls: MutualTls, prefix: str
) -> None:
    """*_CACERT and *_CLIENT_CERT/*_CLIENT_KEY reach a listener that requires a client
    certificate; without the certificate, or trusting another CA, the handshake fails."""
    cfg = VaultConfig(addr=mutual_tls.addr, auth=VaultAuth(method="token", mount="token"))
    ca = {f"{prefix}CACERT": str(mutual_tls.ca)}
    with vault_in(cfg, _tls_env(mutual_tls, prefix, **ca)) as vault:
        await vault.login()
        assert await vault.healthy()
    for env in (
        {"BAO_TOKEN": mutual_tls.plain.root_token, **ca},  # no client certificate
        _tls_env(mutual_tls, prefix, **{f"{prefix}CACERT": str(mutual_tls.other_ca)}),
        _tls_env(mutual_tls, prefix),  # the system's trust store only
    ):
        with vault_in(cfg, env) as refused, pytest.raises(VaultError, match="cannot reach Vault"):
            await refused.login()


async def test_vault_ca_cert_setting_is_used(mutual_tls: MutualTls) -> None:
    """vault.ca_cert in the file is the CA the client trusts (hvac used to drop it for the
    session's default, the system trust store), and it wins over VAULT_CACERT."""
    auth = VaultAuth(method="token", mount="token")
    cfg = VaultConfig(addr=mutual_tls.addr, auth=auth, ca_cert=mutual_tls.ca)
    env = _tls_env(mutual_tls, VAULT_CACERT=str(mutual_tls.other_ca))
    with vault_in(cfg, env) as vault:
        await vault.login()
        assert await vault.healthy()


def test_a_client_key_without_a_certificate_is_refused(mutual_tls: MutualTls) -> None:
    """VAULT_CLIENT_KEY alone is a configuration error, not a silent plain connection."""
    cfg = VaultConfig(addr=mutual_tls.addr, auth=VaultAuth(method="token", mount="token"))
    with pytest.raises(ConfigError, match="VAULT_CLIENT_KEY is set without VAULT_CLIENT_CERT"):
        Vault(cfg, {"VAULT_CLIENT_KEY": str(mutual_tls.key)})


def test_the_cli_honours_the_tls_environment(mutual_tls: MutualTls, tmp_path: Path) -> None:
    """`keyproxy keys status` over the mutual-TLS listener with VAULT_CACERT,
    VAULT_CLIENT_CERT and VAULT_CLIENT_KEY reads a key stored through the plain listener."""
    path = f"keyproxy/keys/mtls-{uuid.uuid4().hex[:8]}"
    mutual_tls.plain.bao("kv", "put", "-mount=secret", path, "api_key=-", stdin=new_key())
    raw = {
        "vault": {"addr": mutual_tls.addr, "auth": {"method": "token"}},
        "identity": {"issuers": [ISSUER]},
        "routes": {
            "api": {
                "upstream": "https://api.example.com",
                "secret": {"path": path},
                "inject": [{"header": "X-Api-Key"}],
            }
        },
    }
    cfg = tmp_path / "k.yaml"
    cfg.write_text(json.dumps(raw))
    env = clean_env(tmp_path, **_tls_env(mutual_tls, VAULT_CACERT=str(mutual_tls.ca)))
    done = keyproxy("keys", "status", "-c", str(cfg), "-o", "json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["version"] == 1
    del env["VAULT_CLIENT_CERT"], env["VAULT_CLIENT_KEY"]
    refused = keyproxy("keys", "status", "-c", str(cfg), "-o", "json", env=env)
    assert refused.returncode == 1
    assert "cannot reach Vault" in refused.stderr


ISSUER = {
    "name": "ci",
    "issuer": "https://ci.example.com",
    "jwks_uri": "https://ci.example.com/jwks",
    "audiences": ["keyproxy"],
    "algorithms": ["RS256"],
}
