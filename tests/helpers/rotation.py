"""Helpers shared by the tests of keyproxy.rotation."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyproxy import config, rotation
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.rotation import Rotations
from keyproxy.upstream import UpstreamSessions
from keyproxy.vault import SecretNotFound, Vault
from tests.conftest import LegacyApiProcess
from tests.helpers.cli import keyproxy
from tests.helpers.logscan import CANARIES

ISSUER = "https://issuer.rotation.test.invalid"


@dataclass
class Env:
    """One test's routes: a config file, its compiled form, and the servers it uses."""

    openbao: OpenBaoDevServer
    legacy: LegacyApiProcess
    path: Path
    raw: dict[str, Any]
    log_dir: Path

    @property
    def compiled(self) -> config.Config:
        return config.parse(json.dumps(self.raw), {})

    def run(
        self, *args: str, stdin: str = "", extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`keyproxy ARGS` with the root token in BAO_TOKEN; stderr goes to the log dir."""
        env = {**os.environ, "BAO_TOKEN": self.openbao.root_token, **(extra_env or {})}
        return keyproxy(*args, env=env, stdin=stdin, log=self.log_dir / "rotation-cli.err")

    def rotate(self, *args: str, failpoint: str | None = None) -> subprocess.CompletedProcess[str]:
        extra = {rotation.FAILPOINT_ENV: failpoint} if failpoint else None
        return self.run("rotate", "-c", str(self.path), "--json", *args, extra_env=extra)

    def status(self) -> tuple[int, dict[str, dict[str, Any]]]:
        done = self.run("keys", "status", "-c", str(self.path), "--json")
        return done.returncode, {e["route"]: e for e in json.loads(done.stdout)}


def outcomes(done: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    return {o["route"]: o for o in map(json.loads, done.stdout.splitlines())}


def uid() -> str:
    return uuid.uuid4().hex[:8]


def http_rotator(legacy: LegacyApiProcess, admin_path: str, verify: str = "/v1/verify") -> Any:
    return {
        "type": "http",
        "allow_http": True,
        "admin_secret": {"path": admin_path},
        "create": {
            "url": f"{legacy.url}/admin/keys",
            "headers": {"Authorization": "Bearer {admin}", "Idempotency-Key": "{attempt}"},
            "body": {"name": "{route}"},
        },
        "verify": {
            "method": "GET",
            "url": legacy.url + verify,
            "headers": {"Authorization": "Bearer {key}"},
        },
        "revoke": {
            "method": "DELETE",
            "url": legacy.url + "/admin/keys/{key_id}",
            "headers": {"Authorization": "Bearer {admin}"},
        },
    }


def route_config(
    legacy: LegacyApiProcess, rotator: Any, every: str = "24h", grace: str = "100ms", **extra: Any
) -> dict[str, Any]:
    return {
        "upstream": legacy.url,
        "allow_http": True,
        "egress": {"allow_cidrs": ["127.0.0.0/8"]},
        "secret": {"path": f"keyproxy/keys/{uid()}"},
        "inject": [{"header": "Authorization", "format": "Bearer {key}"}],
        "rotation": {"every": every, "grace": grace, "lock_timeout": "1s", "rotator": rotator},
        **extra,
    }


def _admin(legacy: LegacyApiProcess, method: str, path: str) -> Any:
    request = urllib.request.Request(  # noqa: S310  # the test's own loopback server
        legacy.url + path, method=method, headers={"Authorization": f"Bearer {legacy.admin_token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
        return json.loads(response.read() or b"{}")


def valid_ids(legacy: LegacyApiProcess, route: str) -> set[str]:
    """The ids of the keys made for `route` that the upstream still accepts."""
    keys = _admin(legacy, "GET", "/admin/keys")["keys"]
    return {k["id"] for k in keys if k["name"] == route and not k["revoked"]}


def accepted(legacy: LegacyApiProcess, key: str) -> bool:
    request = urllib.request.Request(  # noqa: S310  # the test's own loopback server
        legacy.url + "/v1/check", headers={"Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            return True
    except urllib.error.HTTPError as exc:
        status = exc.code
    assert status == 401
    return False


def stored_key(openbao: OpenBaoDevServer, env: Env, route: str) -> tuple[str, str]:
    """(value, key_id) of the route's current key in Vault."""
    path = env.raw["routes"][route]["secret"]["path"]
    out = openbao.bao("kv", "get", "-mount=secret", "-format=json", path)
    data = json.loads(out)["data"]["data"]
    CANARIES.add(data["api_key"])
    return data["api_key"], data.get("key_id", "")


@contextlib.asynccontextmanager
async def engine(env: Env) -> AsyncIterator[Rotations]:
    """The rotation engine in this process, logged in with the root token."""
    cfg = env.compiled
    vault = Vault(cfg.vault, env={"BAO_TOKEN": env.openbao.root_token})
    await vault.login()
    sessions = UpstreamSessions(cfg.routes)
    try:
        yield Rotations(cfg, vault, sessions)
    finally:
        await sessions.close()
        vault.close()


async def _hold_lock(rotations: Rotations, route: str, owner: str, for_seconds: float) -> None:
    """Write the route's journal as if another runner held its lock."""
    path = rotation.journal_path(route)
    mount = rotations.config.vault.kv_mount
    try:
        data, version = await rotations.vault.read_kv(mount, path)
    except SecretNotFound:
        data, version = {}, 0
    now = await rotations.vault.server_time()
    data["lock"] = {"owner": owner, "expires_at": now + for_seconds}
    await rotations.vault.write_kv(mount, path, data, cas=version)
