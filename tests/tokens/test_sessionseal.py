"""keyproxy.tokens.sessionseal: MCP session ids sealed for the caller that opened them, with
a key that replicas create once in a real OpenBao and share."""

from __future__ import annotations

import asyncio
import json

import pytest

from keyproxy.caller import Identity
from keyproxy.config import EXCEPTION_ISSUER
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.errors import NotFound, Unavailable, VaultError
from keyproxy.tokens.format import Link, TaskToken
from keyproxy.tokens.sessionseal import KEY_PATH, PREFIX, binding
from keyproxy.tokens.shared import encoded
from tests.helpers.logscan import CANARIES
from tests.helpers.tokens import replicas_of_own_list

ALICE = binding("issues", Identity("openbao", "alice"))


async def test_replicas_create_one_key_and_open_each_others_seals(
    openbao: OpenBaoDevServer,
) -> None:
    """Two replicas loading at once create one key (the loser of the check-and-set reads the
    winner's): a session sealed by one opens on the other, for the same caller and route
    only, and an id altered or not sealed at all opens for no one."""
    async with replicas_of_own_list(openbao, "session-seal") as (services, vaults):
        first, second = (service.seal for service in services)
        await asyncio.gather(first.load(), second.load())
        mount, path = services[0].config.vault.kv_mount, f"{services[0].cfg.state_path}/{KEY_PATH}"
        stored, version = await vaults[0].read_kv(mount, path)
        assert version == 1  # created once
        CANARIES.add(json.loads(stored["state"])["key"])  # never in any log

        given = first.seal("3f2a-session", ALICE)
        assert given.startswith(PREFIX)
        assert given.endswith(".3f2a-session")
        assert second.open(given, ALICE) == "3f2a-session"
        assert first.open(second.seal("other", ALICE), ALICE) == "other"
        refused = [
            (given, binding("issues", Identity("openbao", "mallory"))),  # another caller
            (given, binding("issues", Identity("other-issuer", "alice"))),  # same subject
            (given, binding("billing", Identity("openbao", "alice"))),  # another route
            (given.replace(".3f2a-session", ".3f2a-sessioN"), ALICE),  # the server's id altered
            (given[:-13] + given[-12:], ALICE),
            ("3f2a-session", ALICE),  # the server's own id
            (PREFIX + ".3f2a-session", ALICE),
            ("", ALICE),
            ("kp1.\udcff.x", ALICE),  # any text a header may hold
        ]
        for presented, bound in refused:
            with pytest.raises(NotFound) as exc:
                second.open(presented, bound)
            assert exc.value.reason == "mcp_session_unknown", presented


async def test_no_session_opens_before_the_key_is_read_and_a_bad_key_is_refused(
    openbao: OpenBaoDevServer,
) -> None:
    """Before its key is read a seal opens and seals nothing (503, never an unsealed id);
    a key too short to trust, or a secret holding none, is not loaded."""
    async with replicas_of_own_list(openbao, "session-seal-bad", count=1) as (services, vaults):
        seal = services[0].seal
        with pytest.raises(Unavailable) as unavailable:
            seal.seal("3f2a-session", ALICE)
        assert unavailable.value.reason == "mcp_session_key_unavailable"
        with pytest.raises(Unavailable):
            seal.open("kp1.x.3f2a-session", ALICE)
        mount, path = services[0].config.vault.kv_mount, f"{services[0].cfg.state_path}/{KEY_PATH}"
        await vaults[0].write_kv(mount, path, encoded({"key": "c2hvcnQ="}, path))
        with pytest.raises(VaultError, match="too short"):
            await seal.load()
        await vaults[0].write_kv(mount, path, encoded({"other": 1}, path))
        with pytest.raises(VaultError, match="no key"):
            await seal.load()
        with pytest.raises(Unavailable):
            seal.seal("3f2a-session", ALICE)


def test_a_delegated_or_exception_token_is_a_caller_of_its_own() -> None:
    """A workload's identity binds a session whichever of its task tokens (or its identity
    token) it comes with; a token delegated to a sub-agent keeps the identity yet binds its
    own, and so does each exception token of one owner."""
    identity = Identity("openbao", "alice")
    root = TaskToken("t-1", identity, {}, 0.0, 60.0)
    again = TaskToken("t-2", identity, {}, 0.0, 60.0)
    child = TaskToken("t-3", identity, {}, 0.0, 60.0, ancestors=(Link("t-1", 60.0),))
    sibling = TaskToken("t-4", identity, {}, 0.0, 60.0, ancestors=(Link("t-1", 60.0),))
    assert binding("issues", identity) == binding("issues", identity, root)
    assert binding("issues", identity, root) == binding("issues", identity, again)
    bound = {binding("issues", identity, t) for t in (root, child, sibling)}
    assert len(bound) == 3
    owner = Identity(EXCEPTION_ISSUER, "exception:oncall")
    exceptions = [TaskToken(f"e-{n}", owner, {}, 0.0, 60.0, exception_owner="oncall") for n in "12"]
    assert binding("issues", owner, exceptions[0]) != binding("issues", owner, exceptions[1])
