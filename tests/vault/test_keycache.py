"""keyproxy.vault.keycache against a real OpenBao dev server: the key cache and the change index."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from keyproxy.config import SecretRef, VaultAuth, VaultConfig
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.errors import Unavailable
from keyproxy.vault import (
    AWAIT_READS,
    INDEX_WINDOW,
    KEY_INDEX_PATH,
    KeyCache,
    Vault,
    announce_key_change,
)
from tests.helpers.polling import eventually
from tests.helpers.servers import new_key
from tests.helpers.vault import POLL, VAULT_TOKEN, background, route, vault_of, write_secret_file


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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
