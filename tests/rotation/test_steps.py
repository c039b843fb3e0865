"""keyproxy.rotation.steps against real OpenBao and the fake legacy API: a failed verification,
a lost lock and a create answering the current key revoke the right key (or none)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import replace

import pytest

from keyproxy import rotation
from keyproxy.rotation import rotators
from keyproxy.rotation.state import Pending, Step
from keyproxy.secret import Secret
from tests.conftest import LegacyApiProcess
from tests.helpers.polling import eventually
from tests.helpers.rotation import Env, _hold_lock, accepted, engine, stored_key, valid_ids


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


async def test_a_create_answering_the_current_key_fails_and_revokes_nothing(
    make_env: Callable[..., Env], legacy_api: LegacyApiProcess
) -> None:
    """A rotator whose create answers with the key already current (here an idempotency key
    that is the same for every attempt) fails the rotation: promoting it would have the old
    version's revocation, after grace, revoke the only key there is."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    create = env.raw["routes"][name]["rotation"]["rotator"]["create"]
    create["headers"]["Idempotency-Key"] = "{route}"  # not {attempt}: every create is one
    async with engine(env) as rotations:
        first = await rotations.rotate(name)
        current, key_id = stored_key(env.openbao, env, name)
        outcome = await rotations.rotate(name)
        assert outcome.failed, repr(outcome)
        assert "current key" in outcome.detail
        # Past the 100 ms grace there is nothing to revoke: the key stays the only one.
        due = await eventually(rotations.run_due, "run_due settles", until=_settled)
        version = await rotations.vault.kv_version(
            "secret", env.raw["routes"][name]["secret"]["path"]
        )
    assert due[0].result == "not_due", due
    assert version == first.version
    assert stored_key(env.openbao, env, name) == (current, key_id)
    assert await asyncio.to_thread(accepted, legacy_api, current)
    assert await asyncio.to_thread(valid_ids, legacy_api, name) == {key_id}


def _settled(outcomes: list[rotation.Outcome]) -> bool:
    return outcomes[0].result not in ("in_grace", "locked")


def _route_of(make_env: Callable[..., Env]) -> tuple[Env, str, str]:
    """A fresh environment, its route and the route's secret path."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    return env, name, env.raw["routes"][name]["secret"]["path"]


async def _first_key_in_grace(
    rotations: rotation.Rotations, env: Env, name: str
) -> tuple[str, str]:
    """Two rotations: the first key (version 1) in its grace period; its value and id."""
    await rotations.rotate(name)
    first = stored_key(env.openbao, env, name)
    assert (await rotations.rotate(name)).result == "rotated"
    return first


async def test_a_key_rolled_back_to_during_grace_is_not_revoked(
    make_env: Callable[..., Env], legacy_api: LegacyApiProcess
) -> None:
    """A key rolled back to during its grace period (`kv rollback` to the version the
    rotation replaced) is current again: the end of grace does not revoke it, and the run
    says so rather than `revoked`."""
    env, name, path = _route_of(make_env)
    async with engine(env) as rotations:
        first, first_id = await _first_key_in_grace(rotations, env, name)
        env.openbao.bao("kv", "rollback", "-mount=secret", "-version=1", path)
        assert stored_key(env.openbao, env, name) == (first, first_id)
        due = await eventually(rotations.run_due, "run_due settles", until=_settled)
    assert due[0].result == "not_due", due  # the grace is over, its version retired
    assert "(version 1) is the current key again" in due[0].detail
    assert await asyncio.to_thread(accepted, legacy_api, first)
    assert first_id in await asyncio.to_thread(valid_ids, legacy_api, name)


async def test_an_old_key_under_the_current_key_id_is_left_to_a_person(
    make_env: Callable[..., Env], legacy_api: LegacyApiProcess
) -> None:
    """An old key whose `key_id` is now the current key's (here set with `kv patch`; an
    upstream regenerating a key in place does it too) is not revoked, as a revocation by
    that id could revoke the current key: the run that ends its grace fails, saying so, and
    the old version stays in Vault to revoke it by hand."""
    env, name, path = _route_of(make_env)
    async with engine(env) as rotations:
        first, first_id = await _first_key_in_grace(rotations, env, name)
        env.openbao.bao("kv", "patch", "-mount=secret", path, f"key_id={first_id}")
        due = await eventually(rotations.run_due, "run_due settles", until=_settled)
    outcome = due[0]
    assert outcome.failed, outcome
    assert "(version 1) has the current key's key id" in outcome.detail
    assert "revoke it upstream by hand" in outcome.detail
    kept = json.loads(
        env.openbao.bao("kv", "get", "-mount=secret", "-version=1", "-format=json", path)
    )
    assert kept["data"]["data"]["api_key"] == first  # kept, to revoke it by
    assert await asyncio.to_thread(accepted, legacy_api, first)


async def test_an_old_key_whose_version_is_gone_fails_the_run_instead_of_revoked(
    make_env: Callable[..., Env], legacy_api: LegacyApiProcess
) -> None:
    """A secret that keeps one version (max_versions 1) loses the old key at promotion:
    an emergency cannot revoke it, and says so (failed, naming the version) rather than
    `rotated+revoked`; the journal moves on, so the next run is not stuck on it."""
    env = make_env()
    name = next(iter(env.raw["routes"]))
    path = env.raw["routes"][name]["secret"]["path"]
    env.openbao.bao("kv", "metadata", "put", "-mount=secret", "-max-versions=1", path)
    async with engine(env) as rotations:
        await rotations.rotate(name)
        leaked, _ = stored_key(env.openbao, env, name)
        outcome = await rotations.rotate(name, emergency=True)
        assert outcome.failed, repr(outcome)
        assert "old key (version 1)" in outcome.detail
        assert "not revoked" in outcome.detail
        after = await rotations.run_due()
    assert after[0].result == "not_due", after
    current, _ = stored_key(env.openbao, env, name)
    assert await asyncio.to_thread(accepted, legacy_api, current)
    assert await asyncio.to_thread(accepted, legacy_api, leaked)  # what the failure says
