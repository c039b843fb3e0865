"""keyproxy.vault.transport against a real OpenBao dev server: hvac's errors, namespaces and
TLS settings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from keyproxy.config import SecretRef, VaultAuth, VaultConfig
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.errors import ConfigError, VaultError
from keyproxy.vault import (
    KeyCache,
    SecretNotFound,
    Vault,
)
from keyproxy.vault.transport import CONCURRENCY
from tests.helpers.certs import pem_files
from tests.helpers.cli import clean_env, keyproxy
from tests.helpers.polling import eventually
from tests.helpers.servers import free_port, new_key
from tests.helpers.vault import VaultRelay, background, route, vault_of


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


async def test_a_hanging_vault_leaves_name_lookups_free(
    openbao: OpenBaoDevServer, proxy_vault_config: VaultConfig
) -> None:
    """While the key cache's reads hang on a stalled Vault, a host name lookup (asyncio's
    default thread pool, as an upstream connection's) still answers at once."""
    loop = asyncio.get_running_loop()
    # The default pool as asyncio sizes it on a 2-CPU host (min(32, CPUs + 4)), whatever
    # this machine has: the reads below are more than it holds.
    loop.set_default_executor(ThreadPoolExecutor(6))
    relay = VaultRelay(openbao.addr)
    await relay.start()
    refs = [
        SecretRef("secret", f"keyproxy/keys/test-{uuid.uuid4().hex}", "api_key")
        for _ in range(CONCURRENCY + 4)
    ]
    routes = {f"r{i}": route(f"r{i}", ref) for i, ref in enumerate(refs)}
    try:
        with vault_of(replace(proxy_vault_config, addr=relay.url, timeout=10.0)) as vault:
            await vault.login()
            cache = KeyCache(vault, {}, refresh_interval=1, max_staleness=30)
            relay.gate.clear()  # Vault hangs from here
            async with background(cache.prepare(routes)) as reads:
                await eventually(lambda: relay.held, "a key read held by the stalled Vault")
                async with asyncio.timeout(2):
                    await loop.getaddrinfo("localhost", 443)
                await eventually(
                    lambda: len(relay.held) >= CONCURRENCY, "the cache's reads all under way"
                )
                relay.gate.set()
                async with asyncio.timeout(10):
                    await reads
    finally:
        await relay.close()


async def test_close_ends_the_clients_threads(proxy_vault_config: VaultConfig) -> None:
    """Vault.close() ends the threads its calls ran in."""
    before = set(threading.enumerate())
    with vault_of(proxy_vault_config) as vault:
        await vault.login()
        assert await vault.healthy()
        started = [
            t for t in set(threading.enumerate()) - before if t.name.startswith("keyproxy-vault")
        ]
        assert started
    await eventually(lambda: not any(t.is_alive() for t in started), "the client's threads ended")
    # A call after close (a request during shutdown) is Vault's error, answered as one.
    with pytest.raises(VaultError, match="closed"):
        await vault.login()


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


@pytest.fixture(scope="module")
def mutual_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MutualTls]:
    """`bao server -dev` with a second listener: TLS, client certificate required."""
    directory = tmp_path_factory.mktemp("mtls")
    files = pem_files(directory)
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
