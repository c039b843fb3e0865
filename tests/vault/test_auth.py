"""keyproxy.vault.auth against a real OpenBao dev server: login (token,
AppRole, JWT), token upkeep, health."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from keyproxy.config import SecretRef, VaultAuth, VaultConfig
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.errors import VaultError
from keyproxy.vault import (
    Vault,
)
from tests.helpers.polling import eventually
from tests.helpers.vault import POLL, background, vault_of, write_secret_file


def create_token(server: OpenBaoDevServer, *args: str) -> tuple[str, str]:
    """A new token from root (policy keyproxy-proxy): (token, accessor)."""
    out = json.loads(server.bao("token", "create", "-format=json", "-policy=keyproxy-proxy", *args))
    return out["auth"]["client_token"], out["auth"]["accessor"]


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


async def test_healthy_on_running_server(proxy_vault_config: VaultConfig) -> None:
    """healthy() is true for a running, unsealed server, even before login."""
    with vault_of(proxy_vault_config) as vault:
        assert await vault.healthy()


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
