"""keyproxy.vault.kv against a real OpenBao dev server: KV v2 reads, writes and a route's key."""

from __future__ import annotations

from typing import Any

import pytest
from structlog.testing import capture_logs

from keyproxy.config import SecretRef, VaultConfig
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.errors import VaultError
from keyproxy.vault import (
    CasConflict,
    SecretNotFound,
    Vault,
)
from tests.helpers.vault import vault_of


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
        ({"api_key": "k" * (16 * 1024 + 1)}, "api_key", VaultError),
    ],
    ids=["missing-path", "missing-field", "empty", "number", "null", "over-16-KiB"],
)
async def test_read_key_refuses_missing_or_unusable_values(
    root_vault: Vault, kv_path: str, data: dict[str, Any] | None, field: str, error: type[Exception]
) -> None:
    """read_key raises VaultError for a missing path or field, and for an empty, non-string
    or oversized value (one the scrubbers would spend seconds indexing): it never returns an
    empty key."""
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
