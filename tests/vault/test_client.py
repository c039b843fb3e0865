"""keyproxy.vault.client against a real OpenBao dev server: nothing secret in
what the client shows."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from keyproxy.config import SecretRef, VaultAuth, VaultConfig
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.errors import VaultError
from keyproxy.secret import Secret
from keyproxy.vault import (
    KeyCache,
    KeyVersion,
)
from tests.helpers.vault import VAULT_TOKEN, route, vault_of, write_secret_file


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
