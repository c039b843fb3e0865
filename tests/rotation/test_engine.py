"""keyproxy.rotation.engine end to end: real OpenBao, the fake legacy API process, real
`keyproxy` processes.

Rotations under load lose no request, a rotation killed after any step is finished by the
next run, two runners rotate each route once, emergencies, the scheduler and `keys put`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from keyproxy import rotation
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.rotation import Rotations
from keyproxy.upstream import UpstreamSessions
from keyproxy.vault import KEY_INDEX_PATH, Vault
from tests.conftest import LegacyApiProcess
from tests.helpers.cli import BIN
from tests.helpers.issuer import Issuer
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually, eventually_blocking
from tests.helpers.rotation import (
    Env,
    _admin,
    _hold_lock,
    accepted,
    engine,
    http_rotator,
    outcomes,
    route_config,
    stored_key,
    uid,
    valid_ids,
)
from tests.helpers.servers import bearer, free_port


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


def test_an_old_key_gone_is_still_reported_by_the_run_resumed_after_its_revocation_step(
    make_env: Callable[..., Env],
) -> None:
    """With the old key gone from Vault (a secret keeping one version), a `rotate
    --emergency` killed right after the revocation step leaves the journal at `revoked`:
    the run that finishes it fails too, naming the version to revoke by hand, never
    reporting it revoked."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    path = env.raw["routes"][name]["secret"]["path"]
    env.openbao.bao("kv", "metadata", "put", "-mount=secret", "-max-versions=1", path)
    assert env.rotate(name).returncode == 0  # the first key
    crashed = env.rotate(name, "--emergency", failpoint="after:revoked")
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout

    def past_the_lock() -> subprocess.CompletedProcess[str]:  # the killed run's, 1 s
        return env.rotate("--due")

    resumed = eventually_blocking(
        past_the_lock,
        "the killed run's lock never expired",
        until=lambda done: outcomes(done)[name]["result"] != "locked",
    )
    outcome = outcomes(resumed)[name]
    assert (resumed.returncode, outcome["result"]) == (1, "failed"), resumed.stdout
    assert "old key (version 1)" in outcome["detail"]
    assert "revoke it upstream by hand" in outcome["detail"]


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


async def test_audit_names_exactly_the_identities_of_a_key_version(
    make_env: Callable[..., Env], issuer: Issuer
) -> None:
    """Agent a calls before and after a rotation, agent b only after: `keyproxy audit`
    names a alone for the old version and both for the new one. The old key rolled back to
    (`kv rollback`: the same key under a third version) and used by agent c is still the
    old key: c is named for the old version, and for the third, with a."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    path = env.raw["routes"][name]["secret"]["path"]
    env.raw["routes"][name]["rotation"]["grace"] = "1h"
    env.raw["vault"]["full_refresh_interval"] = "250ms"  # a rollback notes no change index
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
            assert second is not None

            async def serves() -> bool:
                return (await served_versions(proxy)).get(name) == second

            await eventually(serves, "new version served", within=10, interval=0.05)
            for headers in (a, b, a):
                async with session.get(url, headers=headers) as r:
                    assert r.status == 200
            rollback = f"-version={first}"
            env.openbao.bao("kv", "rollback", "-mount=secret", rollback, path)

            async def rolled_back() -> bool:
                return (await served_versions(proxy)).get(name) == second + 1

            await eventually(rolled_back, "rolled back key served", within=10, interval=0.05)
            async with session.get(url, headers=bearer(issuer.token("agent-c"))) as r:
                assert r.status == 200

    def who(version: int | None) -> list[str]:
        done = env.run(
            "audit", "--route", name, "--key-version", str(version), "--json", str(proxy.out)
        )
        assert done.returncode == 0, done.stderr
        return [u["subject"] for u in json.loads(done.stdout)["identities"]]

    assert who(first) == ["agent-a", "agent-c"]
    assert who(second) == ["agent-a", "agent-b"]
    assert who(second + 1) == ["agent-a", "agent-c"]  # the first key, rolled back to
    # Logs without a request of the leaked version itself: the proxy's key load names its key.
    later = env.log_dir / f"rotation-later-{uid()}.out"
    later.write_text(
        "".join(
            line
            for line in proxy.out.read_text(encoding="utf-8").splitlines(keepends=True)
            if f'"key_version":{first},' not in line
        ),
        encoding="utf-8",
    )
    args = ("audit", "-c", str(env.path), "--route", name, "--key-version", str(first))
    done = env.run(*args, "--json", str(later))
    assert done.returncode == 0, done.stderr
    assert [u["subject"] for u in json.loads(done.stdout)["identities"]] == ["agent-c"]


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


async def test_a_key_dated_in_the_future_counts_from_its_vault_version(
    make_env: Callable[..., Env],
) -> None:
    """A key whose `created_at` lies after Vault stored it (`keys put` from a host whose
    clock is a year ahead, a date written by hand) counts from when Vault stored it: else it
    would be neither due for rotation nor past max_age until that date."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    route = env.compiled.routes[name]
    async with engine(env) as rotations:
        year = 365 * 86400.0
        ahead = Rotations(
            rotations.config, rotations.vault, rotations._sessions, clock=lambda: time.time() + year
        )
        key = f"sk-ahead-{uid()}{uid()}"
        CANARIES.add(key)
        await ahead.put(name, key)
        put_created = await rotation.key_created(rotations.vault, route)
        env.openbao.bao(
            "kv", "patch", "-mount=secret", route.secret.path, "created_at=2099-01-01T00:00:00Z"
        )
        patched_created = await rotation.key_created(rotations.vault, route)
        now = await rotations.vault.server_time()
    assert put_created is not None
    assert put_created <= now + 2
    assert patched_created is not None
    assert patched_created <= now + 2
