"""keyproxy.tokens.revocation end to end: revocation rules, their store in Vault KV and
its reach across replicas.

Real OpenBao, a real upstream, the real proxy and real clients (`keyproxy serve`
subprocesses for two replicas)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from structlog.testing import capture_logs

from keyproxy import config as config_module
from keyproxy.cli import main
from keyproxy.devserver import Agent, OpenBaoDevServer
from keyproxy.errors import BadRequest, Forbidden, Unauthenticated, Unavailable, VaultError
from keyproxy.identity import Identity
from keyproxy.metrics import Metrics
from keyproxy.state.memory import MemoryStore
from keyproxy.tokens import CLOCK_SKEW, TaskTokens, listread, revoked
from keyproxy.tokens.format import LEEWAY
from keyproxy.tokens.inflight import UNVERIFIABLE
from keyproxy.vault import Vault
from tests.helpers.cli import ready, serve_replicas
from tests.helpers.events import events_of, read_events
from tests.helpers.logscan import CANARIES
from tests.helpers.polling import eventually
from tests.helpers.servers import (
    Stack,
    Upstream,
    bearer,
    running_proxy,
    serve,
    token_config,
)
from tests.helpers.tokens import SCOPE, Clock, exchange, refused, replicas_of_own_list, status
from tests.helpers.vault import VaultRelay


def test_revocation_by_subject_tolerates_clock_skew() -> None:
    """A subject or task revocation also covers tokens a replica with a clock a few seconds
    ahead stamped as issued after it; id revocations outlive their token's expiry."""
    from keyproxy.tokens import CLOCK_SKEW, Revocations  # noqa: PLC0415

    revocations = Revocations(subjects={"k8s|bot": 1000.0 + CLOCK_SKEW})
    assert revocations.names("t1", "k8s|bot", None, 1000.0 + CLOCK_SKEW - 1)
    assert not revocations.names("t1", "k8s|bot", None, 1000.0 + CLOCK_SKEW + 1)
    revocations.ids["t2"] = 2000.0
    revocations.prune(2000.0 + CLOCK_SKEW, 900.0)
    assert "t2" in revocations.ids


@pytest.fixture
def replicas(
    openbao: OpenBaoDevServer, agent: Agent, tmp_path: Path, log_dir: Path
) -> Iterator[list[str]]:
    """Two `keyproxy serve` processes sharing one OpenBao; yields their base URLs."""
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(token_config(openbao, agent, "http://127.0.0.1:9")))
    with contextlib.ExitStack() as stack:
        yield [base for base, _ in serve_replicas(stack, path, log_dir, "revocation")]


async def test_revocation_reaches_another_replica_within_2s(
    replicas: list[str], identity_token: str, http: aiohttp.ClientSession
) -> None:
    """A token revoked through one replica is refused by the other within 2 s."""
    a, b = replicas
    await ready(http, a)
    await ready(http, b)
    code, answer = await exchange(
        http, a, identity_token, scope={"other": {"methods": ["GET"], "paths": ["/echo"]}}
    )
    assert code == 200, answer
    token = answer["access_token"]
    # Both replicas accept it (the upstream is unreachable, so 502 means "authorised").
    assert await status(http, "GET", f"{b}/r/other/echo", token) == 502
    async with http.post(f"{a}/token/revoke", headers=bearer(token)) as response:
        assert response.status == 200
    await refused(
        http,
        "GET",
        f"{b}/r/other/echo",
        token,
        "the other replica still accepts the token",
        within=2.0,
        interval=0.05,
    )


async def test_operator_revokes_by_task(
    stack: Stack,
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`keyproxy token revoke --task` ends every token of that task."""
    _, answer = await exchange(http, stack.base, identity_token, task="op-revoke-me")
    url = f"{stack.base}/r/r/v1/chat/completions"
    assert await status(http, "POST", url, answer["access_token"]) == 200
    path = tmp_path / "k.yaml"
    cfg = token_config(openbao, agent, "http://127.0.0.1:1")
    cfg["vault"]["auth"] = {"method": "token"}
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("BAO_TOKEN", openbao.root_token)
    assert (
        await asyncio.to_thread(
            main, ["token", "revoke", "-c", str(path), "--task", "op-revoke-me"]
        )
        == 0
    )
    await refused(
        http,
        "POST",
        url,
        answer["access_token"],
        "the revoked token kept working",
        within=2,
        interval=0.05,
    )


async def test_holder_revocation_is_one_audit_event(
    stack: Stack, identity_token: str, http: aiohttp.ClientSession, audit_log: Path
) -> None:
    """A holder revoking its token writes exactly one token.revoked event, with who revoked,
    the token id, the task, and the identity's issuer and subject."""
    code, answer = await exchange(http, stack.base, identity_token, task="one-event")
    assert code == 200, answer
    async with http.post(f"{stack.base}/token/revoke", headers=bearer(answer["access_token"])) as r:
        assert r.status == 200
    # Both events of one request reach the file in one write: once one is there, all are.
    events = await eventually(
        lambda: [
            e
            for e in read_events(audit_log)
            if e.get("event") == "token.revoked" and e.get("token_id") == answer["token_id"]
        ],
        "no token.revoked event",
    )
    assert len(events) == 1, events
    assert {k: events[0].get(k) for k in ("by", "task", "issuer", "subject")} == {
        "by": "holder",
        "task": "one-event",
        "issuer": "openbao",
        "subject": stack.config.policies[0].subjects[0],
    }
    nulls = [e for e in read_events(audit_log) if e.get("event") == "token.revoked"]
    assert not [e for e in nulls if e.get("by") is None]


@pytest.fixture
async def revocable(
    openbao: OpenBaoDevServer, upstream: Upstream
) -> AsyncIterator[tuple[Stack, Agent, str]]:
    """A proxy for an agent of its own, so revoking its subject touches no other test."""
    own = openbao.add_agent("revoked-agent")
    token = openbao.agent_token(own)
    CANARIES.add(token)
    async with running_proxy(token_config(openbao, own, upstream.url)) as value:
        yield value, own, token


async def test_revoked_subject_or_task_gets_no_new_token(
    revocable: tuple[Stack, Agent, str],
    openbao: OpenBaoDevServer,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Right after `keyproxy token revoke --task` that task gets no new token (403
    task_revoked) while other tasks do; right after `--issuer --subject` the identity gets
    none (403 subject_revoked); tokens issued before are refused on use."""
    stack, own, identity_token = revocable
    path = tmp_path / "k.yaml"
    cfg = token_config(openbao, own, "http://127.0.0.1:1")
    cfg["vault"]["auth"] = {"method": "token"}
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("BAO_TOKEN", openbao.root_token)
    code, before = await exchange(http, stack.base, identity_token, task="doomed")
    assert code == 200
    revoke = ["token", "revoke", "-c", str(path)]
    assert await asyncio.to_thread(main, [*revoke, "--task", "doomed"]) == 0
    code, answer = await exchange(http, stack.base, identity_token, task="doomed")
    assert (code, answer["error"]["code"]) == (403, "task_revoked")
    code, other = await exchange(http, stack.base, identity_token, task="another")
    assert code == 200, other
    subject = ["--issuer", "openbao", "--subject", own.entity_id]
    assert await asyncio.to_thread(main, [*revoke, *subject]) == 0
    for task in ("another", "fresh", None):
        body = {"task": task} if task else {"task": ""}
        code, answer = await exchange(http, stack.base, identity_token, **body)
        assert (code, answer["error"]["code"]) == (403, "subject_revoked"), task
    url = f"{stack.base}/r/r/v1/chat/completions"
    for token in (before["access_token"], other["access_token"]):
        assert await status(http, "POST", url, token) == 401


async def test_issuance_refusal_covers_what_the_revocation_covers(
    openbao: OpenBaoDevServer,
) -> None:
    """A subject revocation refuses issuance exactly for tokens it would name (issued up to
    CLOCK_SKEW after it), and no longer after that; the same for a task."""
    own = openbao.add_agent("skew-agent")
    cfg = config_module.parse(json.dumps(token_config(openbao, own, "http://127.0.0.1:1")), {})
    vault = Vault(cfg.vault)
    await vault.login()
    clock = Clock()
    clock.now = float(int(clock.now))
    try:
        tasks = TaskTokens(cfg, vault, clock=clock)
        identity = Identity("openbao", own.entity_id, {})
        await tasks.revoke(subject=f"openbao|{own.entity_id}", task="skewed")
        clock.now += CLOCK_SKEW  # a token stamped now is still named by the revocation
        for task, reason in ((None, "subject_revoked"), ("skewed", "subject_revoked")):
            with pytest.raises(Forbidden) as caught:
                await tasks.issue(identity, SCOPE, ttl=60, task=task)
            assert caught.value.reason == reason
        other = Identity("openbao", "someone-else", {})
        with pytest.raises(Forbidden) as caught:
            await tasks.issue(other, SCOPE, ttl=60, task="skewed")
        assert caught.value.reason == "task_revoked"
        assert (await tasks.issue(other, SCOPE, ttl=60, task="unrelated")).token_id
        clock.now += 1  # past the window: the revocation names no token stamped now
        issued = await tasks.issue(identity, SCOPE, ttl=60, task="skewed")
        CANARIES.add(issued.token)
        assert (await tasks.verify(issued.token)).token_id == issued.token_id
    finally:
        vault.close()


async def test_concurrent_revocations_on_two_replicas_are_all_recorded(
    openbao: OpenBaoDevServer,
) -> None:
    """Many revocations at once through two replicas' stores (lapsed leases, task ends, an
    operator) are all recorded, none refused for contention, and a replica's revocations
    that arrive together share a write."""
    own = openbao.add_agent("contention-agent")
    cfg = config_module.parse(json.dumps(token_config(openbao, own, "http://127.0.0.1:1")), {})
    vaults = [Vault(cfg.vault), Vault(cfg.vault)]
    try:
        for vault in vaults:
            await vault.login()
        replicas = [TaskTokens(cfg, vault) for vault in vaults]
        path = replicas[0]._revocations_path  # where the list is kept
        before = await vaults[0].kv_version(cfg.vault.kv_mount, path) or 0
        ids = [f"contended-{i}" for i in range(40)]
        await asyncio.gather(
            *(
                replicas[i % 2].revoke(token_id=token_id, expires_at=time.time() + 600)
                for i, token_id in enumerate(ids)
            )
        )
        listed = await replicas[0].revocation_list()
        assert set(ids) <= set(listed.ids)
        written = (await vaults[0].kv_version(cfg.vault.kv_mount, path) or 0) - before
        assert 1 <= written <= 10, written  # 40 revocations, a few shared writes
    finally:
        for vault in vaults:
            vault.close()


async def test_the_revocation_list_holds_tens_of_thousands_of_live_tokens(
    openbao: OpenBaoDevServer,
) -> None:
    """A revocation list of 40,000 live token ids (far more JSON strings than OpenBao takes
    in one request, and twice what one Vault secret may hold) is written in shards, each far
    below a secret's limits; it takes one more revocation, which another replica's poll
    reads in two reads (the main secret and one shard), not the whole list."""
    async with replicas_of_own_list(openbao, "many-revoked") as ((tasks, other), vaults):
        expiry = time.time() + 600
        ids = [f"many-{i:027d}" for i in range(40_000)]  # as long as a real token id
        with capture_logs():  # 40,000 token.revoked events
            await asyncio.gather(*(tasks.revoke(token_id=t, expires_at=expiry) for t in ids))
        mount, main = tasks.config.vault.kv_mount, tasks._revocations_path
        sizes = [len((await vaults[0].read_kv(mount, main))[0]["state"])]
        for shard in range(revoked.SHARDS):
            stored, _ = await vaults[0].read_kv(mount, revoked.shard_path(main, shard))
            sizes.append(len(stored["state"]))
        assert sum(sizes) > 1024 * 1024, sizes  # more than one secret may hold
        assert max(sizes) < 1024 * 1024 / 8, sizes
        issued = await tasks.issue(Identity("openbao", "one-more", {}), SCOPE, ttl=60)
        CANARIES.add(issued.token)
        await other.verify(issued.token)
        await tasks.revoke_held(await tasks.verify(issued.token), "completed")
        reads = _recording(other.vault, "read_kv")
        await other.refresh_revocations()  # the poll's read
        assert reads == [main, revoked.shard_path(main, revoked.shard_of(issued.token_id))]
        with pytest.raises(Unauthenticated, match="revoked"):
            await other.verify(issued.token)
        listed = (await other.revocation_list()).ids
        assert {*ids, issued.token_id} <= set(listed)
        exposition = _metrics_of(other)
        assert f"keyproxy_revocation_list_entries {float(len(ids) + 1)}" in exposition
        assert "keyproxy_revocation_list_read 1.0" in exposition
        # Whole seconds, rounded up: never an entry that ends before its token.
        assert listed[ids[0]] == math.ceil(expiry)


async def test_an_earlier_build_s_list_is_read_and_never_written(
    openbao: OpenBaoDevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas of an earlier build (the list written a field per entry, at `revocations`)
    and of this one side by side, as in an upgrade: this one honours what the earlier wrote,
    before and during the upgrade, and writes its own revocations elsewhere, so the earlier
    replicas' list is never emptied or overwritten."""
    async with replicas_of_own_list(openbao, "upgrade") as ((tasks, fresh), vaults):
        mount = tasks.config.vault.kv_mount
        legacy = f"{tasks.cfg.state_path}/revocations"
        issued = [
            await tasks.issue(Identity("openbao", f"upgrade-{i}", {}), SCOPE, ttl=60)
            for i in range(2)
        ]
        CANARIES.update(i.token for i in issued)
        before = {issued[0].token_id: time.time() + 600, "earlier": time.time() + 600}
        await vaults[0].write_kv(mount, legacy, {"ids": before, "subjects": {}, "tasks": {}})
        written = await vaults[0].kv_version(mount, legacy)
        with pytest.raises(Unauthenticated, match="revoked"):
            await fresh.verify(issued[0].token)  # its first read takes in the earlier list
        await tasks.revoke(token_id="this-build", expires_at=time.time() + 600)
        assert await vaults[0].kv_version(mount, legacy) == written  # never written here
        assert {"earlier", "this-build", issued[0].token_id} <= set(
            (await tasks.revocation_list()).ids
        )
        # An earlier replica revokes during the upgrade: this build's next look (every
        # LEGACY_POLL; now, here) sees it.
        during = before | {issued[1].token_id: time.time() + 600}
        await vaults[0].write_kv(mount, legacy, {"ids": during, "subjects": {}, "tasks": {}})
        await fresh.verify(issued[1].token)  # not looked at again yet
        monkeypatch.setattr(listread, "LEGACY_POLL", 0.0)
        await fresh.refresh_revocations()
        with pytest.raises(Unauthenticated, match="revoked"):
            await fresh.verify(issued[1].token)
        # A list written as one text at the earlier place is read as well.
        texts = {"ids": {issued[0].token_id: time.time() + 600}}
        await vaults[0].write_kv(mount, legacy, {"state": json.dumps(texts)})
        with pytest.raises(Unauthenticated, match="revoked"):
            await TaskTokens(tasks.config, vaults[1]).verify(issued[0].token)
        # The exception register an earlier build wrote is listed too.
        entry = {
            "owner": "ops@example.com",
            "reason": "upgrade",
            "issued_at": time.time(),
            "expires_at": time.time() + 600,
            "scope": ["r"],
        }
        registers = f"{tasks.cfg.state_path}/exceptions"
        await vaults[0].write_kv(mount, registers, {"earlier-exception": entry})
        assert [e["token_id"] for e in await tasks.exceptions()] == ["earlier-exception"]


async def test_the_list_the_build_before_kept_in_one_secret_is_read_and_never_written(
    openbao: OpenBaoDevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build before this one kept the whole list in one secret, at `revocation-list`:
    this one honours what it holds (ids and subjects) from its first read on, sees what an
    old replica adds there within LEGACY_POLL, and never writes it: its own revocations go
    to the sharded list at `revoked`."""
    async with replicas_of_own_list(openbao, "unsharded") as ((tasks, fresh), vaults):
        mount = tasks.config.vault.kv_mount
        before = f"{tasks.cfg.state_path}/revocation-list"
        assert tasks._revocations_path == f"{tasks.cfg.state_path}/revoked"
        issued = [
            await tasks.issue(Identity("openbao", f"unsharded-{i}", {}), SCOPE, ttl=60)
            for i in range(3)
        ]
        CANARIES.update(i.token for i in issued)
        listed = {
            "ids": {issued[0].token_id: time.time() + 600},
            "subjects": {"openbao|unsharded-1": time.time() + CLOCK_SKEW},
            "tasks": {},
        }
        await vaults[0].write_kv(mount, before, {"state": json.dumps(listed)})
        written = await vaults[0].kv_version(mount, before)
        for token in issued[:2]:
            with pytest.raises(Unauthenticated, match="revoked"):
                await fresh.verify(token.token)
        await fresh.verify(issued[2].token)
        await tasks.revoke(token_id="this-build", expires_at=time.time() + 600)
        assert await vaults[0].kv_version(mount, before) == written  # never written here
        assert "this-build" in (await fresh.revocation_list()).ids
        # An old replica ends a token: this build's next look (every LEGACY_POLL) sees it.
        listed["ids"][issued[2].token_id] = time.time() + 600
        await vaults[0].write_kv(mount, before, {"state": json.dumps(listed)})
        monkeypatch.setattr(listread, "LEGACY_POLL", 0.0)
        await fresh.refresh_revocations()
        with pytest.raises(Unauthenticated, match="revoked"):
            await fresh.verify(issued[2].token)


async def test_a_slow_poll_never_replaces_what_this_replica_just_wrote(
    openbao: OpenBaoDevServer,
) -> None:
    """A poll whose read of the list returns after this replica wrote a later version (a
    task revoked here meanwhile) keeps the later: the task's tokens are refused here at
    once, not from the next poll on."""
    async with replicas_of_own_list(openbao, "slow-poll") as ((here, there), _):
        issued = await here.issue(Identity("openbao", "slow-poll", {}), SCOPE, ttl=60, task="t1")
        CANARIES.add(issued.token)
        await here.verify(issued.token)  # its first read
        await there.revoke(task="another")  # the list moves on: the next poll reads it
        read, was_read, go_on = here.vault.read_kv, asyncio.Event(), asyncio.Event()

        async def slow(mount: str, path: str) -> tuple[dict[str, Any], int]:
            got = await read(mount, path)
            if not was_read.is_set():
                was_read.set()
                await go_on.wait()  # read, and slow to return
            return got

        here.vault.read_kv = slow  # type: ignore[method-assign]
        polling = asyncio.create_task(here.refresh_revocations())
        await eventually(was_read.is_set, "the poll read nothing", until=bool)
        await here.revoke(task="t1")
        go_on.set()
        await polling
        with pytest.raises(Unauthenticated, match="revoked"):
            await here.verify(issued.token)


def _recording(vault: Vault, method: str) -> list[str]:
    """Record the path of each call `vault` makes to `method` (`read_kv`, `kv_version`)."""
    paths: list[str] = []
    real = getattr(vault, method)

    async def recorded(mount: str, path: str) -> Any:
        paths.append(path)
        return await real(mount, path)

    setattr(vault, method, recorded)
    return paths


async def _delete(vault: Vault, mount: str, path: str) -> None:
    """Delete a secret with every version, as an operator's `bao kv metadata delete`."""
    await vault._call(
        f"delete {path}",
        lambda c: c.secrets.kv.v2.delete_metadata_and_all_versions(path=path, mount_point=mount),
    )


def _failing_once(vault: Vault, path_end: str, failure: BaseException) -> list[str]:
    """Make `vault`'s next look at a secret whose path ends with `path_end` fail."""
    seen: list[str] = []
    version = vault.kv_version

    async def failing(mount: str, path: str) -> int | None:
        if path.endswith(path_end) and not seen:
            seen.append(path)
            raise failure
        return await version(mount, path)

    vault.kv_version = failing  # type: ignore[method-assign]
    return seen


async def test_what_a_read_took_is_in_use_even_when_a_later_step_fails(
    openbao: OpenBaoDevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each part of the list is in use as soon as it is read: a read that fails (or whose
    caller is cancelled) after it took the main secret and the shards, at the look at an
    earlier build's list, never leaves the replica judging by what it held before, on its
    first read as on a later poll."""
    async with replicas_of_own_list(openbao, "late-failure", count=3) as (replicas, _):
        tasks, fresh, polled = replicas
        issued = [
            await tasks.issue(Identity("openbao", f"late-{i}", {}), SCOPE, ttl=60, task=f"t{i}")
            for i in range(2)
        ]
        CANARIES.update(i.token for i in issued)
        await polled.verify(issued[1].token)  # its first read
        await tasks.revoke(token_id=issued[0].token_id, expires_at=issued[0].expires_at)
        seen = _failing_once(fresh.vault, "/revocation-list", VaultError("transient"))
        with pytest.raises(Unavailable, match="revocation list"):
            await fresh.verify(issued[0].token)  # the first read fails late
        assert seen
        assert fresh.revocation_status()[:2] == (1, False)  # in use, though not read whole
        with pytest.raises(Unauthenticated, match="revoked"):
            await fresh.verify(issued[0].token)
        # A later poll that fails late: the task it read is refused all the same.
        await tasks.revoke(task="t1")
        monkeypatch.setattr(listread, "LEGACY_POLL", 0.0)
        _failing_once(polled.vault, "/revocation-list", VaultError("transient"))
        with pytest.raises(VaultError):
            await polled.refresh_revocations()
        with pytest.raises(Unauthenticated, match="revoked"):
            await polled.verify(issued[1].token)


async def test_a_first_read_whose_caller_went_away_late_leaves_nothing_unused(
    openbao: OpenBaoDevServer,
) -> None:
    """The request that began a replica's first read is cancelled (its client went away)
    after the main secret and shards were taken: the next request reads again and the
    revoked token is refused."""
    async with replicas_of_own_list(openbao, "late-cancel") as ((tasks, fresh), _):
        issued = await tasks.issue(Identity("openbao", "late-cancel", {}), SCOPE, ttl=60)
        CANARIES.add(issued.token)
        await tasks.revoke(token_id=issued.token_id, expires_at=issued.expires_at)
        version, reached, never = fresh.vault.kv_version, asyncio.Event(), asyncio.Event()

        async def hanging(mount: str, path: str) -> int | None:
            if path.endswith("/revocation-list") and not reached.is_set():
                reached.set()
                await never.wait()  # until cancelled
            return await version(mount, path)

        fresh.vault.kv_version = hanging  # type: ignore[method-assign]
        request = asyncio.create_task(fresh.verify(issued.token))
        await eventually(
            reached.is_set, "the first read never reached the earlier list", until=bool
        )
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert fresh.revocation_status()[:2] == (1, False)  # in use, though not read whole
        with pytest.raises(Unauthenticated, match="revoked"):
            await fresh.verify(issued.token)


async def test_while_vault_fails_the_tokens_waiting_fail_together(
    openbao: OpenBaoDevServer,
) -> None:
    """A replica that has not read the list, with Vault failing: twenty task tokens waiting
    for the first read share its failure (503 each), not a read each in turn."""
    async with replicas_of_own_list(openbao, "fail-together", count=1) as ((tasks,), vaults):
        issued = await tasks.issue(Identity("openbao", "fail-together", {}), SCOPE, ttl=60)
        CANARIES.add(issued.token)
        fresh, looks = TaskTokens(tasks.config, vaults[0]), []

        async def failing(mount: str, path: str) -> int | None:
            looks.append(path)
            await asyncio.sleep(0)  # the others arrive while it is under way
            raise VaultError("Vault does not answer")

        fresh.vault.kv_version = failing  # type: ignore[method-assign]
        outcomes = await asyncio.gather(
            *(fresh.verify(issued.token) for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(o, Unavailable) for o in outcomes), outcomes
        assert len(looks) <= 2, looks


async def test_a_newer_list_read_while_this_replica_s_own_write_returned_is_taken(
    openbao: OpenBaoDevServer,
) -> None:
    """This replica's write commits, another replica then revokes a subject, and this
    replica's read of that later list returns after its own write's slow answer: the later
    list is taken, so the subject's tokens are refused here at once."""
    async with replicas_of_own_list(openbao, "late-answer") as ((here, there), _):
        token = await here.issue(Identity("openbao", "late-answer", {}), SCOPE, ttl=60)
        CANARIES.add(token.token)
        await here.verify(token.token)  # its first read
        main = here._revocations_path
        write, committed, answer = here.vault.write_kv, asyncio.Event(), asyncio.Event()

        async def slow_answer(mount: str, path: str, data: Any, cas: int | None = None) -> int:
            version = await write(mount, path, data, cas=cas)
            if path == main:
                committed.set()
                await answer.wait()
            return version

        read, was_read, go_on = here.vault.read_kv, asyncio.Event(), asyncio.Event()

        async def slow_read(mount: str, path: str) -> tuple[dict[str, Any], int]:
            got = await read(mount, path)
            if path == main and committed.is_set() and not was_read.is_set():
                was_read.set()
                await go_on.wait()
            return got

        here.vault.write_kv = slow_answer  # type: ignore[method-assign]
        here.vault.read_kv = slow_read  # type: ignore[method-assign]
        writing = asyncio.create_task(here.revoke(token_id="mine", expires_at=time.time() + 60))
        await eventually(committed.is_set, "the write never committed", until=bool)
        await there.revoke(subject="openbao|late-answer")  # the later list
        polling = asyncio.create_task(here.refresh_revocations())
        await eventually(was_read.is_set, "the poll read nothing", until=bool)
        answer.set()
        await writing  # its answer, the earlier list, is taken first
        go_on.set()
        await polling
        with pytest.raises(Unauthenticated, match="revoked"):
            await here.verify(token.token)


async def test_a_list_deleted_and_made_afresh_is_read_afresh(
    openbao: OpenBaoDevServer, root_vault: Vault
) -> None:
    """The whole list deleted by hand and made afresh by later revocations, its main secret
    past the version a replica held: that replica reads the new list whole (its name is
    new), not only what the new index names above what it held."""
    async with replicas_of_own_list(openbao, "afresh-list", count=3) as (replicas, _):
        tasks, other, writer = replicas
        mount, main = tasks.config.vault.kv_mount, tasks._revocations_path
        issued = await tasks.issue(Identity("openbao", "afresh-list", {}), SCOPE, ttl=60)
        CANARIES.add(issued.token)
        shard = revoked.shard_of(issued.token_id)
        same = [f"old-{i}" for i in range(999) if revoked.shard_of(f"old-{i}") == shard]
        for token_id in same[:2]:  # the shard at version 2, the main secret too
            await tasks.revoke(token_id=token_id, expires_at=time.time() + 600)
        await other.verify(issued.token)  # holds both at version 2
        for path in [main, *(revoked.shard_path(main, n) for n in range(revoked.SHARDS))]:
            await _delete(root_vault, mount, path)
        await writer.revoke(token_id=issued.token_id, expires_at=issued.expires_at)  # v1
        await writer.revoke(subject="openbao|someone")
        await writer.revoke(subject="openbao|someone-else")  # the main secret at v3
        await other.refresh_revocations()
        with pytest.raises(Unauthenticated, match="revoked"):
            await other.verify(issued.token)


async def test_one_unreadable_shard_keeps_no_other_from_use(
    openbao: OpenBaoDevServer,
) -> None:
    """A shard that no longer reads (not keyproxy's state) fails each poll, but every other
    shard is still read and used: a revocation acknowledged meanwhile, into another shard,
    is honoured. None into the unreadable one is acknowledged."""
    async with replicas_of_own_list(openbao, "bad-shard") as ((tasks, other), vaults):
        mount, main = tasks.config.vault.kv_mount, tasks._revocations_path
        issued = await tasks.issue(Identity("openbao", "bad-shard", {}), SCOPE, ttl=60)
        CANARIES.add(issued.token)
        await other.verify(issued.token)  # its first read
        bad = (revoked.shard_of(issued.token_id) + 1) % revoked.SHARDS
        in_bad = [f"bad-{i}" for i in range(999) if revoked.shard_of(f"bad-{i}") == bad]
        await tasks.revoke(token_id=in_bad[0], expires_at=time.time() + 600)
        await vaults[0].write_kv(mount, revoked.shard_path(main, bad), {"junk": "1"})
        await tasks.revoke(token_id=issued.token_id, expires_at=issued.expires_at)
        with pytest.raises(VaultError, match="not keyproxy's state"):
            await tasks.revoke(token_id=in_bad[1], expires_at=time.time() + 600)
        with pytest.raises(VaultError, match="not keyproxy's state"):
            await other.refresh_revocations()
        with pytest.raises(Unauthenticated, match="revoked"):
            await other.verify(issued.token)


async def test_a_shard_made_afresh_is_refused_not_hidden(
    openbao: OpenBaoDevServer, root_vault: Vault
) -> None:
    """A shard deleted and written again starts its versions over, below what the index
    and every replica hold: its next write is refused (the index would hide it from them),
    and a replica that reads it below its indexed version fails its poll, never taking it
    for the later version."""
    async with replicas_of_own_list(openbao, "afresh") as ((tasks, other), vaults):
        mount, main = tasks.config.vault.kv_mount, tasks._revocations_path
        issued = await tasks.issue(Identity("openbao", "afresh", {}), SCOPE, ttl=60)
        CANARIES.add(issued.token)
        shard = revoked.shard_of(issued.token_id)
        path = revoked.shard_path(main, shard)
        same = [f"afresh-{i}" for i in range(999) if revoked.shard_of(f"afresh-{i}") == shard]
        for token_id in same[:3]:
            await tasks.revoke(token_id=token_id, expires_at=time.time() + 600)
        await other.verify(issued.token)  # holds the shard at version 3
        await _delete(root_vault, mount, path)
        with pytest.raises(VaultError, match="behind its index"):
            await tasks.revoke(token_id=issued.token_id, expires_at=issued.expires_at)
        await vaults[0].write_kv(mount, path, {"state": json.dumps({"ids": {}})})
        fresh = TaskTokens(tasks.config, vaults[1])
        with pytest.raises(Unavailable, match="revocation list"):
            await fresh.verify(issued.token)


async def test_a_reload_that_moves_the_list_mid_read_reads_the_new_place_whole(
    openbao: OpenBaoDevServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload that moves `tokens.state_path` while a poll waits on Vault: the poll reads
    the new place, earlier builds' lists there included, before anything is judged."""
    async with replicas_of_own_list(openbao, "moved-mid-read") as ((here, there), vaults):
        mount = here.config.vault.kv_mount
        raw = token_config(openbao, openbao.add_agent("moved-mid-there"), "http://127.0.0.1:1")
        raw["tokens"]["state_path"] = f"{here.cfg.state_path}-there"
        moved = config_module.parse(json.dumps(raw), {})
        elsewhere = TaskTokens(moved, vaults[1])  # a replica that moved already issues it
        await elsewhere.refresh_keys(force=True)
        issued = await elsewhere.issue(Identity("openbao", "moved-mid", {}), SCOPE, ttl=60)
        CANARIES.add(issued.token)
        # An earlier build's list at the new place names the token.
        earlier = {"ids": {issued.token_id: time.time() + 600}}
        await vaults[0].write_kv(mount, f"{moved.tokens.state_path}/revocations", earlier)
        await here.refresh_revocations()  # its first read, at the old place
        await there.revoke(task="elsewhere")  # the old place's list moves on
        monkeypatch.setattr(listread, "LEGACY_POLL", 0.0)
        version, reloaded = here.vault.kv_version, list[str]()

        async def reloading(mount: str, path: str) -> int | None:
            if path.endswith("/revocations") and not reloaded:
                reloaded.append(path)
                here.reconfigure(moved)  # the reload lands while the poll waits on Vault
            return await version(mount, path)

        here.vault.kv_version = reloading  # type: ignore[method-assign]
        await here.refresh_revocations()
        assert reloaded
        assert here.revocations_read
        monkeypatch.setattr(listread, "LEGACY_POLL", 10.0)
        with pytest.raises(Unauthenticated, match="revoked"):
            await here.verify(issued.token)


async def test_issuances_at_once_share_their_reads_of_the_list(
    openbao: OpenBaoDevServer,
) -> None:
    """Twenty issuances at once each need the list as it is when they arrive; they share two
    reads of it (the one under way when they arrived cannot serve them), not one each in
    turn, and the one for a subject revoked before they arrived is refused."""
    async with replicas_of_own_list(openbao, "shared-reads") as ((tasks, other), _):
        await tasks.refresh_revocations()  # its first read
        looks = _recording(tasks.vault, "kv_version")
        await other.revoke(subject="openbao|shared-reads")
        issuing = [
            tasks.issue(Identity("openbao", f"shared-{i}", {}), SCOPE, ttl=60) for i in range(19)
        ]
        issuing.append(tasks.issue(Identity("openbao", "shared-reads", {}), SCOPE, ttl=60))
        *issued, refused_one = await asyncio.gather(*issuing, return_exceptions=True)
        CANARIES.update(i.token for i in issued if not isinstance(i, BaseException))
        assert isinstance(refused_one, Forbidden), refused_one
        assert not any(isinstance(i, BaseException) for i in issued), issued
        assert looks.count(tasks._revocations_path) == 2, looks


async def _judged(tasks: TaskTokens, token: str) -> str:
    """How `tasks` judges `token`: "accepted", or the reason it is refused."""
    try:
        await tasks.verify(token)
    except (Unauthenticated, Unavailable) as exc:
        return exc.reason
    return "accepted"


def _behind(
    openbao: OpenBaoDevServer, relay: VaultRelay, name: str
) -> contextlib.AbstractAsyncContextManager[tuple[list[TaskTokens], list[Vault]]]:
    """One token service reaching Vault through `relay`, polling every 500 ms and judging a
    use only by a list read within 1 s."""
    return replicas_of_own_list(
        openbao,
        name,
        count=1,
        vault_addr=relay.url,
        revocation_poll_interval="500ms",
        revocation_max_staleness="1s",
    )


async def test_a_replica_judges_only_by_a_list_read_within_its_staleness_bound(
    openbao: OpenBaoDevServer, relay: VaultRelay
) -> None:
    """A task token is judged only by a list read within tokens.revocation_max_staleness:
    a replica whose poll stalled reads again (and refuses what another replica revoked
    meanwhile); one cut off from Vault answers 503 rather than accept a token another
    replica revoked, and judges again once Vault answers."""
    async with _behind(openbao, relay, "cut-off") as ((cut,), _):
        direct = dataclasses.replace(
            cut.config, vault=dataclasses.replace(cut.config.vault, addr=openbao.addr)
        )
        vault = Vault(direct.vault)
        try:
            await vault.login()
            here = TaskTokens(direct, vault)
            who = Identity("openbao", "cut-off", {})
            issued = [await here.issue(who, SCOPE, ttl=60) for _ in range(2)]
            CANARIES.update(i.token for i in issued)
            assert [await _judged(cut, i.token) for i in issued] == ["accepted"] * 2
            # No poll runs on `cut`: its own checks re-read the list once it is too old.
            await here.revoke(token_id=issued[0].token_id, expires_at=issued[0].expires_at)
            await eventually(
                lambda: _judged(cut, issued[0].token),
                "a replica without a poll judged by its old list",
                until="revoked".__eq__,
            )
            relay.down = True
            await here.revoke(token_id=issued[1].token_id, expires_at=issued[1].expires_at)
            await eventually(
                lambda: _judged(cut, issued[1].token),
                "a replica cut off from Vault judged by its old list",
                until="revocations_unavailable".__eq__,
            )
            status = cut.revocation_status()
            assert status.read
            assert status.age is not None
            assert status.age >= 1.0
            exposition = _metrics_of(cut)
            assert "keyproxy_revocation_list_age_seconds " in exposition
            relay.down = False
            await eventually(  # within a poll interval of the last failed read
                lambda: _judged(cut, issued[1].token),
                "Vault answers again, and the revocation is not seen",
                until="revoked".__eq__,
            )
            age = cut.revocation_status().age
            assert age is not None
            assert age < 1.0
        finally:
            vault.close()


async def test_a_lease_is_renewed_and_a_task_ended_while_vault_is_out_of_reach(
    openbao: OpenBaoDevServer, relay: VaultRelay
) -> None:
    """A heartbeat renews no use (every use checks a current list), so it is renewed while
    the list is too old to judge a use by (Vault out of reach): an outage longer than the
    lease does not kill the tokens it was meant to keep alive. Their use is 503 meanwhile,
    and fails at once while the last read failed (no read each)."""
    async with _behind(openbao, relay, "lease-outage") as ((tasks,), vaults):
        leased = TaskTokens(tasks.config, vaults[0], store=MemoryStore())
        issued = await leased.issue(
            Identity("openbao", "lease-outage", {}), SCOPE, ttl=60, idle_ttl=5
        )
        CANARIES.add(issued.token)
        token = await leased.verify(issued.token)
        relay.down = True
        await eventually(
            lambda: _judged(leased, issued.token),
            "a use was judged by a list Vault could not confirm",
            until="revocations_unavailable".__eq__,
        )
        reads = _recording(leased.vault, "kv_version")
        assert await _judged(leased, issued.token) == "revocations_unavailable"
        assert reads == []  # the last read failed just now: refused without another
        assert (await leased.verify(issued.token, for_use=False)).token_id == issued.token_id
        assert await leased.heartbeat(token) > time.time()
        relay.down = False


class _Shifted:
    """The real clock, moved by `offset` seconds (it runs on, unlike `Clock`)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def test_a_request_ends_when_its_token_expires_while_vault_hangs(
    openbao: OpenBaoDevServer, relay: VaultRelay
) -> None:
    """Invariant 11: a request under way ends when its token expires, on time, even while
    Vault hangs (every request to it held, not refused). The check of the list's staleness
    waits on Vault's answer (up to vault.timeout, 5 s) as a new request would; the expiry
    does not wait on it."""
    clock = _Shifted()
    async with replicas_of_own_list(
        openbao,
        "hung-expiry",
        count=1,
        vault_addr=relay.url,
        clock=clock,
        revocation_poll_interval="500ms",
        revocation_max_staleness="600ms",
    ) as ((tasks,), _):
        issued = await tasks.issue(Identity("openbao", "hung-expiry", {}), SCOPE, ttl=60)
        CANARIES.add(issued.token)
        token = await tasks.verify(issued.token)
        ends: list[str] = []
        with tasks.inflight.watching(token, ends.append):
            relay.gate.clear()  # Vault hangs from here: its list is stale at the first check
            started = time.monotonic()
            # Checks every 500 ms: the list is stale from the second (1 s; its last read ended
            # before now), and the token expired (leeway included) 1.7 s from now, after it.
            clock.offset = issued.expires_at + LEEWAY - (time.time() + 1.7)
            runner = asyncio.create_task(tasks.run())
            try:
                await eventually(lambda: ends, "a request outlived its token", within=4.0)
            finally:
                runner.cancel()
                await asyncio.gather(runner, return_exceptions=True)
                relay.gate.set()
        assert ends[0] == "expired"
        assert time.monotonic() - started < 3.0


async def test_a_reload_moves_the_retry_after_of_an_unreadable_list(
    openbao: OpenBaoDevServer,
) -> None:
    """The 503 of a list that cannot be read says to try again at the next read: after a
    reload, the new poll interval's, for a new request and one under way alike."""
    async with replicas_of_own_list(
        openbao,
        "retry-after",
        count=1,
        revocation_poll_interval="500ms",
        revocation_max_staleness="1s",
    ) as ((tasks,), _):
        assert tasks.unreadable().retry_after == 1
        slower = dataclasses.replace(
            tasks.config.tokens, revocation_poll_interval=1.5, revocation_max_staleness=3.0
        )
        tasks.reconfigure(dataclasses.replace(tasks.config, tokens=slower))
        assert tasks.unreadable().retry_after == 2
        assert tasks.inflight.refusal(UNVERIFIABLE).retry_after == 2


def _metrics_of(tasks: TaskTokens) -> str:
    metrics = Metrics(dict)
    metrics.watch_revocations(tasks.revocation_status)
    return metrics.exposition()[0].decode()


async def test_a_list_that_cannot_be_read_refuses_task_tokens(
    openbao: OpenBaoDevServer,
) -> None:
    """A replica that has not read the revocation list (here its main secret, or a shard
    its index names, holds something other than keyproxy's state, or is not there) refuses
    task tokens with 503 rather than judging them
    against an empty list; once the list reads, they verify, the list read once for all the
    tokens that waited."""
    async with replicas_of_own_list(openbao, "unreadable", count=1) as ((tasks,), vaults):
        issued = await tasks.issue(Identity("openbao", "unread", {}), SCOPE, ttl=60)
        CANARIES.add(issued.token)
        mount, path = tasks.config.vault.kv_mount, tasks._revocations_path

        def main(shards: str = "{}", **fields: str) -> dict[str, str]:
            parts = {"list": '"x"', "subjects": "{}", "tasks": "{}", "shards": shards, **fields}
            return {"state": "{" + ", ".join(f'"{k}": {v}' for k, v in parts.items()) + "}"}

        unreadable: list[dict[str, Any]] = [
            {"state": "[]"},
            {"state": "{}", "ids": {}},
            {"ids": {}},
            {"state": 5},
            {"state": '{"ids": {}, "ids": {}}'},
            main(list='""'),
            main(subjects="[]"),
            main(ids="{}"),  # a field keyproxy does not write here
            main('{"3": "1"}'),
            main('{"three": 1}'),
            main('{"3": 5, "03": 1}'),  # one shard twice
            main('{"3": 1}'),  # a shard that is not there
            main('{"4": 1}'),  # a shard that is not keyproxy's
            main('{"5": 1}'),  # nor is this one
        ]
        await vaults[0].write_kv(mount, revoked.shard_path(path, 4), {"ids": {}})
        await vaults[0].write_kv(mount, revoked.shard_path(path, 5), {"state": '{"ids": []}'})
        for stored in unreadable:
            await vaults[0].write_kv(mount, path, stored)
            replica = TaskTokens(tasks.config, vaults[0])
            with pytest.raises(Unavailable, match="revocation list"):
                await replica.verify(issued.token)
            assert replica.revocation_status()[:2] == (0, False)
        await vaults[0].write_kv(mount, path, main())
        # Once it reads, the list is read once for all the tokens that waited for it.
        replica = TaskTokens(tasks.config, vaults[0])
        reads = _recording(replica.vault, "read_kv")
        verified = await asyncio.gather(*(replica.verify(issued.token) for _ in range(20)))
        assert {v.token_id for v in verified} == {issued.token_id}
        assert len(reads) == 1, reads


async def test_a_text_no_reader_could_take_back_is_never_written(
    openbao: OpenBaoDevServer,
) -> None:
    """A revocation naming a task or subject that is not valid Unicode (what Python makes of
    undecodable command-line bytes) is refused before it is written, as is an exception
    token whose owner is such a text, and the list stays readable: a replica starting after
    it reads it, and the next revocation is written."""
    async with replicas_of_own_list(openbao, "surrogate") as ((tasks, _), vaults):
        issued_to = Identity("openbao", "surrogate", {})
        issued = await tasks.issue(issued_to, SCOPE, ttl=60)
        CANARIES.add(issued.token)
        with pytest.raises(BadRequest, match="not valid Unicode"):
            await tasks.revoke(task="build-\udcff")
        with pytest.raises(BadRequest, match="not valid Unicode"):
            await tasks.revoke(subject="openbao|\ud800x")
        # The exception register's writes are held to the same rule.
        with pytest.raises(VaultError, match="not valid Unicode"):
            await tasks.issue(issued_to, SCOPE, ttl=60, exception=("ops-\udcff", "why"))
        assert await tasks.exceptions() == []
        assert (await TaskTokens(tasks.config, vaults[1]).verify(issued.token)).token_id == (
            issued.token_id
        )
        await tasks.revoke(token_id=issued.token_id, expires_at=issued.expires_at)
        with pytest.raises(Unauthenticated, match="revoked"):
            await TaskTokens(tasks.config, vaults[1]).verify(issued.token)


async def test_a_moved_state_path_is_read_before_tokens_are_judged(
    openbao: OpenBaoDevServer,
) -> None:
    """A reload that moves `tokens.state_path` has the replica judge tokens by the list at
    the new place, read afresh, even when its version number is the old one's; a token
    issued under the old place is refused (its revocation would be written there)."""
    async with replicas_of_own_list(openbao, "moved") as ((here, there), _):
        raw = token_config(openbao, openbao.add_agent("moved-there"), "http://127.0.0.1:1")
        raw["tokens"]["state_path"] = f"{here.cfg.state_path}-there"
        moved = config_module.parse(json.dumps(raw), {})
        there.reconfigure(moved)
        tokens = [
            await replica.issue(Identity("openbao", f"moved-{i}", {}), SCOPE, ttl=60)
            for i, replica in enumerate((here, there))
        ]
        CANARIES.update(t.token for t in tokens)
        await here.revoke(token_id=tokens[0].token_id, expires_at=tokens[0].expires_at)
        await there.revoke(token_id=tokens[1].token_id, expires_at=tokens[1].expires_at)
        with pytest.raises(Unauthenticated, match="revoked"):
            await here.verify(tokens[0].token)
        here.reconfigure(moved)  # both lists are at version 1
        with pytest.raises(Unauthenticated, match="revoked"):
            await here.verify(tokens[1].token)
        # Revoked at a place no one reads any more: refused, never taken as not revoked.
        with pytest.raises(Unauthenticated, match="kept elsewhere"):
            await here.verify(tokens[0].token)


async def test_a_reload_that_moves_the_list_while_a_token_is_verified_is_read_first(
    openbao: OpenBaoDevServer,
) -> None:
    """A reload moves `tokens.state_path` while a token's signing key is being fetched: the
    token is judged by the list at the new place, read before it is judged, not by the empty
    list the move left."""
    async with replicas_of_own_list(openbao, "moved-verify", count=3) as (replicas, _):
        here, there, judge = replicas
        raw = token_config(openbao, openbao.add_agent("moved-verify-there"), "http://127.0.0.1:1")
        raw["tokens"]["state_path"] = f"{here.cfg.state_path}-there"
        moved = config_module.parse(json.dumps(raw), {})
        there.reconfigure(moved)
        issued = await there.issue(Identity("openbao", "moved-verify", {}), SCOPE, ttl=60)
        CANARIES.add(issued.token)
        await there.revoke(token_id=issued.token_id, expires_at=issued.expires_at)
        await judge.refresh_revocations()  # read at the old place, where it is not revoked
        fetching, go_on = asyncio.Event(), asyncio.Event()
        fetch = judge.refresh_keys

        async def slow_keys(*, force: bool = False) -> None:
            fetching.set()
            await go_on.wait()
            await fetch(force=force)

        judge.refresh_keys = slow_keys  # type: ignore[method-assign]
        verifying = asyncio.create_task(judge.verify(issued.token))
        await eventually(fetching.is_set, "no key was fetched", until=bool)
        judge.reconfigure(moved)  # the reload lands while the key is fetched
        go_on.set()
        with pytest.raises(Unauthenticated, match="revoked"):
            await verifying


async def test_a_write_under_way_when_the_list_moves_is_written_again_at_the_new_place(
    openbao: OpenBaoDevServer,
) -> None:
    """A revocation being written to the old place when a reload moves `tokens.state_path`
    does not become the replica's copy of the new place's list, even when both are at the
    same version (the new list is read before any token is judged), and is written again at
    the new place before it counts as recorded."""
    async with replicas_of_own_list(openbao, "moving") as ((here, there), _):
        raw = token_config(openbao, openbao.add_agent("moving-there"), "http://127.0.0.1:1")
        raw["tokens"]["state_path"] = f"{here.cfg.state_path}-there"
        moved = config_module.parse(json.dumps(raw), {})
        there.reconfigure(moved)
        issued = await there.issue(Identity("openbao", "moving", {}), SCOPE, ttl=60)
        CANARIES.add(issued.token)
        await there.revoke(token_id=issued.token_id, expires_at=issued.expires_at)  # version 1
        written, began, go_on = here.vault.write_kv, asyncio.Event(), asyncio.Event()

        async def held_write(*args: Any, **kwargs: Any) -> int:
            began.set()
            await go_on.wait()  # the real write, once the reload happened
            return await written(*args, **kwargs)

        here.vault.write_kv = held_write  # type: ignore[method-assign]
        writing = asyncio.create_task(
            here.revoke(token_id="old-place", expires_at=time.time() + 60)
        )
        await eventually(began.is_set, "no write began", until=bool)
        here.reconfigure(moved)
        go_on.set()
        await writing  # written at the old place, then again at the new one
        with pytest.raises(Unauthenticated, match="revoked"):
            await here.verify(issued.token)
        assert "old-place" in (await there.revocation_list()).ids


async def test_revocation_whose_caller_went_away_is_still_recorded(
    openbao: OpenBaoDevServer,
) -> None:
    """An operator's revocation is written, and its event logged, even when the request
    that asked for it is cancelled (its caller disconnected) while it is under way."""
    own = openbao.add_agent("cancelled-revoker")
    cfg = config_module.parse(json.dumps(token_config(openbao, own, "http://127.0.0.1:1")), {})
    vault = Vault(cfg.vault)
    try:
        await vault.login()
        tasks = TaskTokens(cfg, vault)
        with capture_logs() as logs:
            asking = asyncio.create_task(
                tasks.revoke(token_id="walked-away", expires_at=time.time() + 60)
            )
            await asyncio.sleep(0)  # it is queued for the write
            asking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asking

            async def listed() -> bool:
                return "walked-away" in (await tasks.revocation_list()).ids

            await eventually(listed, "the cancelled revocation recorded", until=bool)
            await eventually(
                lambda: [e for e in logs if e["event"] == "token.revoked"],
                "the cancelled revocation's event",
                until=bool,
            )
        (event,) = [e for e in logs if e["event"] == "token.revoked"]
        assert (event["by"], event["token_id"]) == ("operator", "walked-away")
    finally:
        vault.close()


async def _ticking(request: web.Request) -> web.StreamResponse:
    """An event every 50 ms for 30 s: an LLM's long answer, or an MCP server's GET stream."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(600):
        await response.write(b"data: %d\n\n" % i)
        await asyncio.sleep(0.05)  # the stream's own pace
    await response.write_eof()
    return response


async def _events_until_cut(answer: aiohttp.ClientResponse) -> int:
    """How many events arrived before the answer was cut (asserting it was, within 10 s)."""
    events = 0
    with pytest.raises(aiohttp.ClientPayloadError):  # noqa: PT012  # cut while reading
        async with asyncio.timeout(10):
            async for _ in answer.content.iter_any():
                events += 1
    return events


async def test_an_open_stream_ends_with_its_token(
    openbao: OpenBaoDevServer,
    agent: Agent,
    identity_token: str,
    http: aiohttp.ClientSession,
    audit_log: Path,
) -> None:
    """A task token's answer still streaming when the token is revoked is cut: by another
    replica's revocation within the poll interval, by its holder's at once; each request's
    audit event says token_revoked."""
    app = web.Application()
    app.router.add_get("/echo", _ticking)
    runner, port = await serve(app)
    try:
        cfg = token_config(openbao, agent, f"http://127.0.0.1:{port}")
        async with running_proxy(cfg) as stack:
            vault = Vault(stack.config.vault)
            await vault.login()
            try:
                elsewhere = TaskTokens(stack.config, vault)
                scope = {"other": {"methods": ["GET"], "paths": ["/echo"]}}
                for how in ("another replica", "its holder"):
                    code, answer = await exchange(http, stack.base, identity_token, scope=scope)
                    assert code == 200, answer
                    # Hex alone: a word in it could meet 8 characters of a key another test
                    # registered ("sk-stream-..."), and the scrubber would redact the id.
                    token, rid = answer["access_token"], uuid.uuid4().hex
                    headers = {**bearer(token), "X-Request-Id": rid}
                    async with http.get(f"{stack.base}/r/other/echo", headers=headers) as stream:
                        assert stream.status == 200
                        await stream.content.readuntil(b"\n\n")
                        if how == "its holder":
                            async with http.post(
                                f"{stack.base}/token/revoke", headers=bearer(token)
                            ) as revoked:
                                assert revoked.status == 200
                        else:
                            await elsewhere.revoke(
                                token_id=answer["token_id"], expires_at=answer["expires_at"]
                            )
                        assert await _events_until_cut(stream) < 590, how
                    try:
                        events = await eventually(
                            functools.partial(events_of, audit_log, rid),
                            f"no audit event for the stream cut by {how}",
                        )
                    except AssertionError as missing:  # rare: say what the log does hold
                        raise AssertionError(
                            f"{missing}; the token's events: "
                            f"{read_events(audit_log, answer['token_id'])[-5:]}; in flight: "
                            f"{[t.get_coro() for t in asyncio.all_tasks()][:20]}"
                        ) from None
                    assert [e["reason"] for e in events] == ["token_revoked"], how
            finally:
                vault.close()
    finally:
        await runner.cleanup()


async def test_an_open_stream_ends_when_its_list_is_too_old_to_judge_by(
    openbao: OpenBaoDevServer,
    relay: VaultRelay,
    agent: Agent,
    identity_token: str,
    http: aiohttp.ClientSession,
    audit_log: Path,
) -> None:
    """A replica cut off from Vault cannot know what other replicas revoke: a task token's
    answer still streaming there is cut once its list is older than
    tokens.revocation_max_staleness (audit reason revocations_unavailable), as a new
    request is refused (503)."""
    app = web.Application()
    app.router.add_get("/echo", _ticking)
    runner, port = await serve(app)
    try:
        cfg = token_config(openbao, agent, f"http://127.0.0.1:{port}")
        cfg["vault"]["addr"] = relay.url
        cfg["tokens"]["revocation_max_staleness"] = "1s"
        async with running_proxy(cfg) as stack:
            code, answer = await exchange(
                http, stack.base, identity_token, scope={"other": {"methods": ["GET"]}}
            )
            assert code == 200, answer
            rid = uuid.uuid4().hex  # hex alone: see test_an_open_stream_ends_with_its_token
            headers = {**bearer(answer["access_token"]), "X-Request-Id": rid}
            url = f"{stack.base}/r/other/echo"
            async with http.get(url, headers=headers) as stream:
                assert stream.status == 200
                await stream.content.readuntil(b"\n\n")
                relay.down = True
                assert await _events_until_cut(stream) < 590
            events = await eventually(
                functools.partial(events_of, audit_log, rid), "no audit event for the cut stream"
            )
            assert [e["reason"] for e in events] == ["revocations_unavailable"]
            async with http.get(url, headers=bearer(answer["access_token"])) as refused:
                assert refused.status == 503
                assert (await refused.json())["error"]["code"] == "revocations_unavailable"
                assert refused.headers["Retry-After"] == "1"
            relay.down = False
    finally:
        await runner.cleanup()
