"""keyproxy.tokens.shared: batched check-and-set writes to a secret every replica writes, and
work that outlives a caller that went away. A real OpenBao for the writes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from structlog.testing import capture_logs

from keyproxy import config as config_module
from keyproxy.devserver import OpenBaoDevServer
from keyproxy.errors import Unavailable
from keyproxy.tokens.shared import SharedSecret, finish_running, read_state, to_the_end
from keyproxy.vault import Vault
from tests.helpers.polling import eventually
from tests.helpers.servers import token_config


def _appended(data: dict[str, Any], items: list[str]) -> dict[str, Any]:
    return {"items": [*data.get("items", []), *items]}


def _contended() -> Unavailable:
    return Unavailable("test_contention", "contended")


async def test_changes_from_two_writers_all_land_in_a_few_writes(
    openbao: OpenBaoDevServer,
) -> None:
    """Thirty changes at once from two writers (two replicas) all land, none lost to a
    concurrent write, and each writer's changes that came together share a write."""
    own = openbao.add_agent(f"shared-{uuid.uuid4().hex[:8]}")
    cfg = config_module.parse(json.dumps(token_config(openbao, own, "http://127.0.0.1:1")), {})
    mount, path = cfg.vault.kv_mount, f"{cfg.tokens.state_path}/test-shared-{uuid.uuid4().hex}"
    vaults = [Vault(cfg.vault), Vault(cfg.vault)]
    try:
        for vault in vaults:
            await vault.login()
        writers = [SharedSecret(v, lambda: (mount, path), _appended, _contended) for v in vaults]
        items = [f"item-{i}" for i in range(30)]
        await asyncio.gather(*(writers[i % 2].change(item) for i, item in enumerate(items)))
        data, version = await read_state(vaults[0], mount, path)
        assert sorted(data["items"]) == sorted(items)
        assert version <= 8, version  # 30 changes, a few shared writes
    finally:
        for vault in vaults:
            vault.close()


async def test_work_whose_caller_went_away_is_finished() -> None:
    """`to_the_end` runs its work to the end though its caller is cancelled, and a failure
    then (no caller left to tell) is logged, naming the work."""
    go_on = asyncio.Event()
    finished: list[str] = []

    async def work(fail: bool) -> None:
        await go_on.wait()
        if fail:
            raise Unavailable("vault_unavailable", "Vault could not be reached")
        finished.append("done")

    with capture_logs() as logs:
        callers = [
            asyncio.create_task(to_the_end(work(fail), name))
            for fail, name in ((False, "fine"), (True, "failing"))
        ]
        await asyncio.sleep(0)  # both callers wait on their work
        for caller in callers:
            caller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await caller
        go_on.set()
        await finish_running(5.0)
    assert finished == ["done"]
    failed = [e for e in logs if e["event"] == "shared_write_failed"]
    assert [(e["what"], e["error"]) for e in failed] == [("failing", "Vault could not be reached")]


async def test_a_stop_waits_for_work_under_way_within_its_bound() -> None:
    """At shutdown `finish_running` waits for work under way at most its bound; work still
    running then is reported as abandoned once the loop cancels it."""
    stuck = asyncio.Event()

    async def never_ends() -> None:
        await stuck.wait()

    caller = asyncio.create_task(to_the_end(never_ends(), "stuck"))
    await asyncio.sleep(0)
    caller.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await caller
    started = time.monotonic()
    await finish_running(0.2)
    assert time.monotonic() - started < 2.0
    with capture_logs() as logs:
        for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
            if "never_ends" in repr(task.get_coro()):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await eventually(lambda: logs, "no report of the abandoned work", until=bool)
    assert [(e["event"], e["what"]) for e in logs] == [("shared_write_abandoned", "stuck")]
