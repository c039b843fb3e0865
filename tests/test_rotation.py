"""Rotation end to end: real OpenBao, the fake legacy API process, real `keyproxy` processes.

Proves issue 4's "done when" list: rotations under load lose no request, a rotation killed
after any step is finished by the next `rotate --due`, concurrent runners rotate once,
`--emergency` revokes at once, `keys status` reports and alerts, and `audit` names who used
a key version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from keyproxy import config, rotation
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.rotation import Rotations, rotators
from keyproxy.rotation.state import JournalState, Pending, Step
from keyproxy.secret import Secret
from keyproxy.upstream import UpstreamSessions
from keyproxy.vault import KEY_INDEX_PATH, SecretNotFound, Vault
from tests.conftest import LegacyApiProcess
from tests.helpers.cli import BIN, keyproxy
from tests.helpers.issuer import Issuer
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually, eventually_blocking
from tests.helpers.servers import bearer, free_port
from tests.test_keystatus import KEYS as STATUS_KEYS

ROOT = Path(__file__).resolve().parent.parent
ISSUER = "https://issuer.rotation.test.invalid"

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    """A local workload-identity issuer: the tests mint each agent's token."""
    return Issuer(tmp_path_factory.mktemp("rot-issuer"), ISSUER, kid="rot-1", lifetime=900)


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


@pytest.fixture
def make_env(
    openbao: OpenBaoDevServer,
    legacy_api: LegacyApiProcess,
    issuer: Issuer,
    tmp_path: Path,
    log_dir: Path,
) -> Callable[..., Env]:
    """Routes named by the caller (each gets its own key path); the admin secret stored."""
    admin_path = f"keyproxy/admin/{uid()}"
    openbao.put_key(admin_path, legacy_api.admin_token, field="token")

    def build(routes: dict[str, Any] | None = None, auth: Any = None, **kw: Any) -> Env:
        if routes is None:
            routes = {f"r-{uid()}": route_config(legacy_api, http_rotator(legacy_api, admin_path))}
        raw = {
            "vault": {
                "addr": openbao.addr,
                "auth": auth or {"method": "token"},
                "refresh_interval": "250ms",
                "max_staleness": "30s",
            },
            "identity": {
                "issuers": [
                    {
                        "name": "local",
                        "issuer": ISSUER,
                        "jwks_file": str(issuer.jwks_file),
                        "audiences": ["keyproxy"],
                        "algorithms": ["RS256"],
                    }
                ]
            },
            "routes": routes,
            "policies": [
                {
                    "name": "agents",
                    "issuers": ["local"],
                    "subjects": ["*"],
                    "allow": {r: {"methods": ["GET"], "paths": ["/v1/**"]} for r in routes},
                }
            ],
        }
        path = tmp_path / f"keyproxy-{uid()}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return Env(openbao, legacy_api, path, raw, log_dir)

    build.admin_path = admin_path  # type: ignore[attr-defined]  # handed to tests that need it
    return build


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


def settle(env: Env, route: str) -> dict[str, Any]:
    """Run `rotate --due` until the route has no rotation in progress, lock or key in grace."""

    def settled() -> dict[str, Any]:
        done = env.rotate("--due")
        _, entries = env.status()
        entry: dict[str, Any] = entries[route]
        if not (entry["in_progress"] or entry["grace_until"] or entry["locked_by"]):
            assert done.returncode == 0, done.stdout
            return entry
        return {}

    # The lock of an interrupted run expires after 1 s.
    return eventually_blocking(settled, f"{route} not settled", within=45, interval=0.2)


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


@dataclass
class Proxy:
    base: str
    out: Path
    admin: str  # the admin listener: detailed readiness


@contextlib.asynccontextmanager
async def serving(env: Env) -> AsyncIterator[Proxy]:
    """`keyproxy serve` as a subprocess, stopped by PID; ready when every key is loaded."""
    port, admin_port = free_port(), free_port()
    out = env.log_dir / f"rotation-serve-{uid()}.out"
    envvars = {**os.environ, "BAO_TOKEN": env.openbao.root_token, "PYTHONUNBUFFERED": "1"}
    with out.open("wb") as stdout:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "keyproxy"),
            *("serve", "-c", str(env.path), "--port", str(port), "--admin-port", str(admin_port)),
            stdout=stdout,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=envvars,
        )
    proxy = Proxy(f"http://127.0.0.1:{port}", out, f"http://127.0.0.1:{admin_port}")
    try:
        await eventually(lambda: _ready(proxy), "proxy ready", within=30, interval=0.05)
        yield proxy
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(30):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _ready(proxy: Proxy) -> bool:
    return bool(await served_versions(proxy))


async def served_versions(proxy: Proxy) -> dict[str, int]:
    """The key version the proxy serves for each route (empty while it is not ready)."""
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{proxy.admin}/readyz") as response,
        ):
            if response.status != 200:
                return {}
            body = await response.json()
    except aiohttp.ClientError:
        return {}
    return {name: k["version"] for name, k in body["keys"].items()}


# ----------------------------------------------------------------------------- tests


async def test_ten_rotations_under_load_fail_no_request(
    make_env: Callable[..., Env], issuer: Issuer
) -> None:
    """20 agents call through the proxy without pause while the key is rotated 10 times:
    every request succeeds, each carries its key version, and only the newest key stays
    valid at the upstream."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    env.raw["routes"][name]["rotation"]["grace"] = "1500ms"
    env.raw["routes"][name]["rotation"]["lock_timeout"] = "30s"
    env.path.write_text(yaml.safe_dump(env.raw))
    statuses: Counter[int] = Counter()
    stop = asyncio.Event()

    async def agent(i: int) -> None:
        headers = bearer(issuer.token(f"load-agent-{i}"))
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                async with session.get(f"{proxy.base}/r/{name}/v1/data", headers=headers) as r:
                    statuses[r.status] += 1

    async with engine(env) as rotations:
        assert (await rotations.rotate(name)).result == "rotated"  # the first key
        async with serving(env) as proxy:
            agents = [asyncio.create_task(agent(i)) for i in range(20)]
            try:
                for _ in range(10):
                    before = statuses[200]
                    outcome = await rotations.rotate(name)
                    assert outcome.result == "rotated", outcome
                    version = outcome.version

                    async def serves(v: int | None = version) -> bool:
                        return (await served_versions(proxy)).get(name) == v

                    await eventually(serves, "promoted version served", within=10, interval=0.05)

                    async def revoked() -> bool:
                        done = await rotations.run_due()
                        return done[0].result == "revoked"

                    await eventually(
                        revoked, "old key revoked after grace", within=15, interval=0.05
                    )
                    assert statuses[200] > before
            finally:
                stop.set()
                async with asyncio.timeout(30):
                    await asyncio.gather(*agents)
    assert set(statuses) == {200}, statuses
    _, key_id = stored_key(env.openbao, env, name)
    assert await asyncio.to_thread(valid_ids, env.legacy, name) == {key_id}
    events = [json.loads(line) for line in proxy.out.read_text().splitlines() if "{" in line]
    served = [e["key_version"] for e in events if e.get("event") == "request"]
    assert len(served) == sum(statuses.values())
    assert len(set(served)) == 11


PHASE1 = ["lock", "create", "record", "verify", "promote", "grace"]
PHASE2 = ["revoke", "revoked", "retire"]


@pytest.mark.parametrize("step", PHASE1 + PHASE2)
def test_rotation_killed_after_any_step_is_finished_by_the_next_run(
    make_env: Callable[..., Env], step: str
) -> None:
    """A `keyproxy rotate` SIGKILLed right after `step` leaves a valid current key; the next
    `rotate --due` runs leave exactly one key, stored in Vault and valid upstream, no other."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    assert env.rotate(name).returncode == 0  # the first key
    first, _ = stored_key(env.openbao, env, name)
    if step in PHASE1:
        crashed = env.rotate(name, failpoint=f"after:{step}")
    else:
        assert env.rotate(name).returncode == 0  # phase 1; phase 2 after the 100 ms grace
        crashed = env.rotate("--due", failpoint=f"after:{step}")
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout
    current, _ = stored_key(env.openbao, env, name)
    assert accepted(env.legacy, current), "the current key must stay valid through a crash"
    settle(env, name)
    value, key_id = stored_key(env.openbao, env, name)
    assert valid_ids(env.legacy, name) == {key_id}
    assert accepted(env.legacy, value)
    assert (value == first) == (step == "lock")


def test_two_due_runners_rotate_each_route_once(
    make_env: Callable[..., Env], openbao: OpenBaoDevServer, legacy_api: LegacyApiProcess
) -> None:
    """Two `keyproxy rotate --due` started together rotate each of three due routes exactly
    once between them."""
    admin_path = make_env.admin_path  # type: ignore[attr-defined]
    routes = {
        f"due-{i}-{uid()}": route_config(
            legacy_api, http_rotator(legacy_api, admin_path), every="1h", grace="10m"
        )
        for i in range(3)
    }
    for route in routes.values():
        route["rotation"]["lock_timeout"] = "30s"
    env = make_env(routes)
    two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
    for route in routes.values():
        key = _admin(legacy_api, "POST", "/admin/keys")  # name "" : not one of the route's keys
        CANARIES.add(key["key"])
        path = route["secret"]["path"]
        args = ["api_key=-", f"key_id={key['id']}", f"created_at={two_hours_ago}"]
        openbao.bao("kv", "put", "-mount=secret", path, *args, stdin=key["key"])
    cmd = [str(BIN / "keyproxy"), "rotate", "-c", str(env.path), "--due", "--json"]
    procs = [
        subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "BAO_TOKEN": openbao.root_token},
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        results += [json.loads(line) for line in out.splitlines()]
    rotated = Counter(r["route"] for r in results if r["result"] == "rotated")
    assert rotated == dict.fromkeys(routes, 1), results
    _, entries = env.status()
    assert {name: entries[name]["version"] for name in routes} == dict.fromkeys(routes, 2)
    for name in routes:
        assert len(valid_ids(legacy_api, name)) == 1


async def test_emergency_revokes_at_once_and_the_proxy_follows_within_5s(
    make_env: Callable[..., Env], issuer: Issuer
) -> None:
    """`rotate ROUTE --emergency` makes the old key invalid upstream when it returns, and the
    proxy serves with the new key within 5 s."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    env.raw["routes"][name]["rotation"]["grace"] = "1h"
    env.path.write_text(yaml.safe_dump(env.raw))
    assert env.rotate(name).returncode == 0
    old, _ = stored_key(env.openbao, env, name)
    headers = bearer(issuer.token("emergency-agent"))
    async with serving(env) as proxy, aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.base}/r/{name}/v1/data", headers=headers) as r:
            assert r.status == 200
        done = await asyncio.to_thread(env.rotate, name, "--emergency")
        returned = time.monotonic()
        assert done.returncode == 0, done.stdout
        assert outcomes(done)[name]["result"] == "rotated+revoked"
        assert not await asyncio.to_thread(accepted, env.legacy, old)
        _, new_id = await asyncio.to_thread(stored_key, env.openbao, env, name)

        async def new_key_served() -> bool:
            async with session.get(f"{proxy.base}/r/{name}/v1/data", headers=headers) as r:
                return r.status == 200 and (await r.json())["key_id"] == new_id

        await eventually(
            new_key_served,
            "new key served",
            within=5 - (time.monotonic() - returned),
            interval=0.05,
        )
    assert await asyncio.to_thread(valid_ids, env.legacy, name) == {new_id}


def test_keys_status_reports_versions_ages_and_alerts_on_max_age(
    make_env: Callable[..., Env], openbao: OpenBaoDevServer, legacy_api: LegacyApiProcess
) -> None:
    """`keys status --json` reports each route's version, age and rotation state, and exits
    non-zero while a key is past its max_age; `keys put` (stdin) clears the alert."""
    admin_path = make_env.admin_path  # type: ignore[attr-defined]
    fresh, stale = f"fresh-{uid()}", f"stale-{uid()}"
    env = make_env(
        {
            fresh: route_config(
                legacy_api, http_rotator(legacy_api, admin_path), every="1h", max_age="2h"
            ),
            stale: route_config(
                legacy_api, {"type": "manual"}, every="1h", grace="10m", max_age="2h"
            ),
        }
    )
    env.raw["routes"][fresh]["owner"] = "platform@example.com"
    env.path.write_text(yaml.safe_dump(env.raw))
    assert env.rotate(fresh).returncode == 0
    three_hours_ago = (datetime.now(UTC) - timedelta(hours=3)).isoformat()
    path = env.raw["routes"][stale]["secret"]["path"]
    old = "sk-manual-" + uid() + uid()
    CANARIES.add(old)
    openbao.bao(
        "kv", "put", "-mount=secret", path, "api_key=-", f"created_at={three_hours_ago}", stdin=old
    )

    code, entries = env.status()
    assert code == 1
    f, s = entries[fresh], entries[stale]
    assert list(f) == list(s) == STATUS_KEYS  # the documented keys, in their order
    assert (f["version"], f["overdue"], f["rotator"], f["owner"]) == (
        1,
        False,
        "http",
        "platform@example.com",
    )
    assert 0 <= f["age"] < 60
    assert f["next_due"] is not None
    assert f["last_rotation"] is not None
    assert (s["version"], s["overdue"], s["rotator"]) == (1, True, "manual")
    assert abs(s["age"] - 3 * 3600) < 60
    assert outcomes(env.rotate("--due"))[stale]["result"] == "manual"

    new = "sk-manual-" + uid() + uid()
    CANARIES.add(new)
    put = env.run("keys", "put", "-c", str(env.path), stale, stdin=new + "\n")
    assert put.returncode == 0, put.stderr
    assert new not in put.stdout + put.stderr
    code, entries = env.status()
    assert code == 0
    assert entries[stale]["version"] == 2
    assert entries[stale]["age"] < 60
    assert entries[stale]["rotated_by"].startswith("keys put")
    assert stored_key(openbao, env, stale)[0] == new


async def test_audit_names_exactly_the_identities_of_a_key_version(
    make_env: Callable[..., Env], issuer: Issuer
) -> None:
    """Agent a calls before and after a rotation, agent b only after: `keyproxy audit`
    names a alone for the old version and both for the new one."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    env.raw["routes"][name]["rotation"]["grace"] = "1h"
    env.path.write_text(yaml.safe_dump(env.raw))
    a, b = bearer(issuer.token("agent-a")), bearer(issuer.token("agent-b"))
    async with engine(env) as rotations:
        first = (await rotations.rotate(name)).version
        async with serving(env) as proxy, aiohttp.ClientSession() as session:
            url = f"{proxy.base}/r/{name}/v1/data"
            for _ in range(3):
                async with session.get(url, headers=a) as r:
                    assert r.status == 200
            second = (await rotations.rotate(name)).version

            async def serves() -> bool:
                return (await served_versions(proxy)).get(name) == second

            await eventually(serves, "new version served", within=10, interval=0.05)
            for headers in (a, b, a):
                async with session.get(url, headers=headers) as r:
                    assert r.status == 200

    def who(version: int | None) -> list[str]:
        done = env.run(
            "audit", "--route", name, "--key-version", str(version), "--json", str(proxy.out)
        )
        assert done.returncode == 0, done.stderr
        return [u["subject"] for u in json.loads(done.stdout)["identities"]]

    assert who(first) == ["agent-a"]
    assert who(second) == ["agent-a", "agent-b"]


def test_the_rotation_approle_policy_suffices_and_the_proxy_role_does_not(
    make_env: Callable[..., Env], openbao: OpenBaoDevServer
) -> None:
    """Logged in with the keyproxy-rotation AppRole, rotate and --emergency succeed; with
    the proxy's AppRole the rotation is refused."""
    creds = openbao.dev_setup.credentials_dir
    env = make_env(
        auth={
            "method": "approle",
            "role_id_file": str(creds / "rotation-role-id"),
            "secret_id_file": str(creds / "rotation-secret-id"),
        }
    )
    name = next(iter(env.raw["routes"]))
    assert env.rotate(name).returncode == 0
    done = env.rotate(name, "--emergency")
    assert done.returncode == 0, done.stdout
    assert outcomes(done)[name]["result"] == "rotated+revoked"
    # The new key is noted in the change index the proxies poll (KEY_INDEX_PATH).
    assert "key_index.write_failed" not in done.stderr
    index = json.loads(
        env.openbao.bao("kv", "get", "-mount=secret", "-format=json", KEY_INDEX_PATH)
    )
    assert index["data"]["data"] == {
        "secret": f"secret/{env.raw['routes'][name]['secret']['path']}"
    }
    env.raw["vault"]["auth"]["role_id_file"] = str(creds / "proxy-role-id")
    env.raw["vault"]["auth"]["secret_id_file"] = str(creds / "proxy-secret-id")
    env.path.write_text(yaml.safe_dump(env.raw))
    refused = env.rotate(name, "--emergency")
    assert refused.returncode == 1
    assert outcomes(refused)[name]["result"] == "failed"


async def test_failed_verification_revokes_the_new_key_and_keeps_the_old(
    make_env: Callable[..., Env], legacy_api: LegacyApiProcess
) -> None:
    """When the new key fails verification it is revoked upstream, the current key stays,
    and the failure is recorded in the journal for `keys status`."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    async with engine(env) as rotations:
        first = await rotations.rotate(name)
    _, first_id = stored_key(env.openbao, env, name)
    # Verify against an admin endpoint, which refuses a data key: verification fails.
    env.raw["routes"][name]["rotation"]["rotator"]["verify"]["url"] = legacy_api.url + "/admin/keys"
    async with engine(env) as rotations:
        outcome = await rotations.rotate(name)
        status = await rotations.vault.kv_version(
            "secret", env.raw["routes"][name]["secret"]["path"]
        )
    assert outcome.failed
    assert "verification failed" in outcome.detail
    assert status == first.version
    assert await asyncio.to_thread(valid_ids, legacy_api, name) == {first_id}
    _, entries = await asyncio.to_thread(env.status)
    assert "verification failed" in entries[name]["last_failure"]["error"]
    assert entries[name]["in_progress"] is None


async def test_command_rotator_rotates_and_revokes(
    make_env: Callable[..., Env], legacy_api: LegacyApiProcess
) -> None:
    """A `command` rotator (JSON on stdin/stdout) creates, verifies and, in an emergency,
    revokes keys at the upstream."""
    admin_path = make_env.admin_path  # type: ignore[attr-defined]
    name = f"cmd-{uid()}"
    rotator = {
        "type": "command",
        "command": [
            sys.executable,
            str(ROOT / "tests" / "helpers" / "legacy_api.py"),
            "rotator",
            legacy_api.url,
        ],
        "admin_secret": {"path": admin_path},
        "verify": True,
        "timeout": "30s",
    }
    env = make_env({name: route_config(legacy_api, rotator)})
    async with engine(env) as rotations:
        assert (await rotations.rotate(name)).result == "rotated"
        first, first_id = stored_key(env.openbao, env, name)
        outcome = await rotations.rotate(name, emergency=True)
    assert outcome.result == "rotated+revoked", outcome
    value, key_id = stored_key(env.openbao, env, name)
    assert key_id != first_id
    assert await asyncio.to_thread(accepted, legacy_api, value)
    assert not await asyncio.to_thread(accepted, legacy_api, first)


async def test_embedded_scheduler_rotates_a_due_route(make_env: Callable[..., Env]) -> None:
    """`run_scheduler` rotates a route that has no key yet (due) and keeps running."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    path = env.raw["routes"][name]["secret"]["path"]
    async with engine(env) as rotations:
        task = asyncio.create_task(rotation.run_scheduler(rotations, interval=0.2))
        try:

            async def stored() -> bool:
                return await rotations.vault.kv_version("secret", path) == 1

            await eventually(stored, "scheduled rotation", within=20, interval=0.05)
            assert not task.done()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


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


async def test_emergency_while_locked_is_a_failure(
    make_env: Callable[..., Env], legacy_api: LegacyApiProcess
) -> None:
    """`rotate ROUTE --emergency` reports failure (non-zero) when another runner holds the
    lock, instead of a quiet skip; the old key stays valid until someone does revoke it."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    async with engine(env) as rotations:
        await rotations.rotate(name)
        await _hold_lock(rotations, name, "elsewhere:1", 60)
        outcome = await rotations.rotate(name, emergency=True)
    assert outcome.failed
    assert "lock" in outcome.detail
    done = env.rotate(name, "--emergency")
    assert done.returncode != 0


async def test_abandon_after_losing_the_lock_revokes_nothing(
    make_env: Callable[..., Env], legacy_api: LegacyApiProcess
) -> None:
    """A runner whose lock was taken over must not revoke the new key it created: the new
    holder may be promoting that very key. Its journal write fails first."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    async with engine(env) as rotations:
        await rotations.rotate(name)
        route = env.compiled.routes[name]
        journal = await rotations._journal(route)
        pending = Pending(Secret("sk-pending-0001"), None, created=None)
        await journal.save(replace(journal.state, step=Step.CREATED, pending=pending))
        await _hold_lock(rotations, name, "elsewhere:2", 60)  # the lock is taken over
        revoked_before = await asyncio.to_thread(valid_ids, legacy_api, name)
        with pytest.raises(rotation.RotationError, match="lost the rotation lock"):
            await rotations._abandon(
                route,
                journal,
                rotators.UpstreamKey(Secret("sk-pending-0001"), None),
                "verification failed",
            )
    assert await asyncio.to_thread(valid_ids, legacy_api, name) == revoked_before


async def test_keys_put_is_refused_during_grace(make_env: Callable[..., Env]) -> None:
    """While the previous key waits for its grace to end, `keys put` is refused: the key in
    between would stay valid upstream with no record."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    route = env.raw["routes"][name]
    route["rotation"]["grace"] = "1h"
    async with engine(env) as rotations:
        await rotations.rotate(name)
        await rotations.rotate(name)  # the first key is now in its grace period
        with pytest.raises(rotation.RotationError, match="in progress"):
            await rotations.put(name, "sk-manual-0001")


@pytest.mark.parametrize("bad", ["sk-del\x7fkey", "sk-nl-key\n", " sk-space", "sk-\x00nul"])
async def test_keys_put_refuses_text_the_proxy_would_refuse(
    make_env: Callable[..., Env], bad: str
) -> None:
    """`keys put` refuses a key with whitespace at an end or a control character (DEL too),
    the same text the proxy refuses to read: storing it would leave the route keyless."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    async with engine(env) as rotations:
        with pytest.raises(rotation.RotationError, match="whitespace or control characters"):
            await rotations.put(name, bad)


async def test_a_runner_with_a_skewed_clock_follows_vaults(make_env: Callable[..., Env]) -> None:
    """A runner whose clock is 2 h ahead computes deadlines in Vault's time; one in sync
    keeps its own clock."""
    env = make_env()
    cfg = env.compiled
    vault = Vault(cfg.vault, env={"BAO_TOKEN": env.openbao.root_token})
    await vault.login()
    sessions = UpstreamSessions(cfg.routes)
    try:
        ahead = Rotations(cfg, vault, sessions, clock=lambda: time.time() + 7200)
        await ahead._sync_clock()
        assert abs(ahead._clock() - time.time()) < 2
        in_sync = Rotations(cfg, vault, sessions)
        await in_sync._sync_clock()
        assert in_sync._offset == 0.0
    finally:
        await sessions.close()
        vault.close()


async def test_the_stored_journal_keeps_the_shape_earlier_versions_wrote(
    make_env: Callable[..., Env],
) -> None:
    """A journal a rotation wrote to Vault has exactly the fields earlier versions wrote
    (each step's changes merged in), and reads and writes back unchanged."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    env.raw["routes"][name]["rotation"]["grace"] = "1h"
    async with engine(env) as rotations:
        await rotations.rotate(name)
        await rotations.rotate(name)  # the first key is now in its grace period
        mount = rotations.config.vault.kv_mount
        data, _ = await rotations.vault.read_kv(mount, rotation.journal_path(name))
    assert set(data) == {
        "step",
        "attempt",
        "emergency",
        "base_version",
        "started_at",
        "last_failure",
        "pending",
        "previous",
        "last_rotation",
        "rotations",
        "lock",
    }
    assert (data["step"], data["base_version"], data["rotations"], data["lock"]) == (
        "grace",
        1,
        2,
        None,
    )
    assert set(data["previous"]) == {"version", "revoke_after"}
    assert data["previous"]["version"] == 1
    assert JournalState.from_data(data).to_data() == data
