"""Shared fixtures: a real OpenBao dev server, configured by the vault-dev/ scripts.

- `openbao`: one server for the whole session, started and set up (`openbao.dev_setup`).
  Tests share it, so each one keeps to its own KV paths (`kv_path`).
- `fresh_openbao`: a server of its own, set up the same way, for tests that stop it.
- `proxy_vault_config` / `root_vault_config`: `VaultConfig`s for the session server, logging
  in as the proxy (AppRole, policy keyproxy-proxy) or with the root token (token_file).
  For another server use `server.proxy_vault_config()` / `server.root_vault_config()`.
- `root_vault`: a logged-in root `Vault` on the session server, for writing test data.
- `agent` / `identity_token`: an agent of the session server for the test module, and its token.
- `helpers`: commands that leave a helper process behind (tests/helpers/processes.py); any
  still running after the test is killed.
- `log_scan`: after the last test, no key, key fragment or token in any log of the session
  (tests/helpers/logscan.py); a leak fails the run.
"""

from __future__ import annotations

import os
import secrets
import select
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from keyproxy import audit
from keyproxy.config import VaultConfig
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.vault import Vault
from tests.helpers import cli, logscan
from tests.helpers.processes import Helpers
from tests.helpers.servers import (
    GatedStream,
    Stack,
    Upstream,
    new_key,
    running_proxy,
    running_upstream,
    serve,
    token_config,
)
from tests.state.servers import RedisServer


def _started(workdir: Path) -> OpenBaoDevServer:
    server = OpenBaoDevServer(workdir)
    server.start(timeout=30)
    try:
        server.setup()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoDevServer]:
    """A started and set-up OpenBao dev server shared by the whole session."""
    server = _started(tmp_path_factory.mktemp("openbao"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_openbao(tmp_path: Path) -> Iterator[OpenBaoDevServer]:
    """A started and set-up OpenBao dev server for one test, which may stop it."""
    server = _started(tmp_path / "openbao")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy_vault_config(openbao: OpenBaoDevServer) -> VaultConfig:
    """VaultConfig for the session server, logging in as the proxy (AppRole)."""
    return openbao.proxy_vault_config(refresh_interval=1.0, max_staleness=30.0)


@pytest.fixture
def root_vault_config(openbao: OpenBaoDevServer) -> VaultConfig:
    """VaultConfig for the session server, logging in with the root token."""
    return openbao.root_vault_config()


@pytest.fixture
async def root_vault(root_vault_config: VaultConfig) -> AsyncIterator[Vault]:
    """A Vault logged in as root to the session server."""
    vault = Vault(root_vault_config)
    await vault.login()
    try:
        yield vault
    finally:
        vault.close()


@pytest.fixture(scope="module")
def agent(openbao: OpenBaoDevServer, request: pytest.FixtureRequest) -> Agent:
    """An agent (entity and AppRole) of the session server, one per test module."""
    # tests.vault.test_auth -> vault-auth: modules of the same name in two folders differ
    module = request.module.__name__.removeprefix("tests.").replace("test_", "").replace(".", "-")
    return openbao.add_agent(f"{module}-agent")


@pytest.fixture(scope="module")
def identity_token(openbao: OpenBaoDevServer, agent: Agent) -> str:
    """A workload identity token of `agent`, signed by the session server."""
    value = openbao.agent_token(agent)
    logscan.CANARIES.add(value)
    return value


@pytest.fixture
def kv_path() -> str:
    """A KV path under secret/keyproxy/ that no other test uses."""
    return f"keyproxy/keys/test-{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where every log of the session goes: the in-process audit log and subprocess output.
    `log_scan` reads all of it at the end of the run."""
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session", autouse=True)
def log_scan(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[None]:
    """After every test and every other session fixture: the whole-session log scan. Set up
    first of the session's fixtures, so torn down last, once every log is written; a leak
    is an error in this teardown, which fails the run."""
    yield
    logscan.scan(tmp_path_factory.getbasetemp(), log_dir / "audit.jsonl")


@pytest.fixture(scope="session", autouse=True)
def audit_log(log_scan: None, log_dir: Path) -> Iterator[Path]:
    """The session's audit log file: keyproxy's structlog output for in-process servers."""
    path = log_dir / "audit.jsonl"
    cli.CLI_LOG = log_dir / "cli.log"
    with path.open("a", encoding="utf-8", buffering=1) as stream:
        audit.configure(stream, level="debug")
        yield path


# ---------------------------------------------------------------------------- rotation


@pytest.fixture(scope="session")
def legacy_api(log_dir: Path) -> Iterator[LegacyApiProcess]:
    """The fake legacy API (tests/helpers/legacy_api.py), its own process for the session."""
    admin = "adm-" + secrets.token_urlsafe(18)
    err = (log_dir / "legacy-api.err").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.legacy_api", "serve"],
        stdout=subprocess.PIPE,
        stderr=err,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "LEGACY_ADMIN_TOKEN": admin},
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the fake legacy API did not start within 30 s"
        port = int(proc.stdout.readline())
        yield LegacyApiProcess(f"http://127.0.0.1:{port}", admin)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        err.close()
        if proc.stdout is not None:
            proc.stdout.close()


@dataclass(frozen=True)
class LegacyApiProcess:
    """Where the fake legacy API listens, and its admin credential."""

    url: str
    admin_token: str


# ---------------------------------------------------------------------------- servers


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """The recording upstream of tests/helpers/servers.py on loopback, fresh for each test."""
    async with running_upstream() as value:
        yield value


@pytest.fixture
async def stack(
    openbao: OpenBaoDevServer, agent: Agent, upstream: Upstream
) -> AsyncIterator[Stack]:
    """The proxy serving tests.helpers.servers.token_config's routes, their key stored (a
    module whose tests need another configuration defines its own `stack`)."""
    openbao.put_key("keyproxy/keys/tokens-test", new_key())
    async with running_proxy(token_config(openbao, agent, upstream.url)) as value:
        yield value


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Valkey/Redis server shared by the whole session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def helpers(tmp_path: Path) -> Iterator[Helpers]:
    """Commands that leave a helper process behind, each helper killed after the test."""
    made = Helpers(tmp_path)
    try:
        yield made
    finally:
        made.kill_all()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client session."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def gated() -> AsyncIterator[GatedStream]:
    """The gated streaming upstream on 127.0.0.1."""
    upstream = GatedStream()
    runner, upstream.port = await serve(upstream.app())
    try:
        yield upstream
    finally:
        upstream.gate.set()
        await runner.cleanup()
