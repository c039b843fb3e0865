"""keyproxy.rotation.rotators against real OpenBao and a real upstream: the command rotator,
and what happens to one that does not end."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import LegacyApiProcess
from tests.helpers.polling import eventually, finishes
from tests.helpers.processes import Helpers, running
from tests.helpers.rotation import Env, accepted, engine, route_config, stored_key, uid

ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize(
    ("then", "within", "said"),
    [
        ("echo partial", "2s", "create: the command ran longer than its timeout"),
        # Ended by the limit: a timeout it never reaches, on a loaded machine too.
        ("exec yes canary-output", "60s", "create: the command printed more than 1048576 bytes"),
    ],
)  # fmt: skip
async def test_a_command_rotator_that_will_not_end_fails_and_leaves_nothing_running(
    then: str,
    within: str,
    said: str,
    make_env: Callable[..., Env],
    legacy_api: LegacyApiProcess,
    helpers: Helpers,
) -> None:
    """A command that leaves a helper holding its stdout (or prints without end) fails the
    rotation at its timeout (or at 1 MiB), quoting none of its output, instead of holding the
    rotation lock; the command and its helper are killed."""
    name = f"cmd-{uid()}"
    rotator = {"type": "command", "command": helpers.command(then=then), "timeout": within}
    env = make_env({name: route_config(legacy_api, rotator)})
    async with engine(env) as rotations:
        outcome = await finishes(rotations.rotate(name), "the rotation ends")
    assert outcome.failed
    assert outcome.detail == said
    shell, helper = await helpers.started()
    await eventually(lambda: not running(shell), "the command is killed")
    await eventually(lambda: not running(helper), "the helper is killed")


async def test_a_create_answer_naming_its_key_twice_fails_the_rotation(
    make_env: Callable[..., Env], legacy_api: LegacyApiProcess
) -> None:
    """Invariant 12: an answer giving its key twice is no answer (which one was made?),
    read strictly as every JSON keyproxy takes, never as its last value."""
    name = f"cmd-{uid()}"
    answer = '{"key": "sk-first-0123456789", "key": "sk-second-0123456789", "key_id": "k1"}'
    rotator = {"type": "command", "command": ["sh", "-c", f"echo '{answer}'"], "timeout": "30s"}
    env = make_env({name: route_config(legacy_api, rotator)})
    async with engine(env) as rotations:
        outcome = await rotations.rotate(name)
    assert outcome.failed
    assert outcome.detail == "create: the command's answer is not JSON"


async def test_a_create_answer_with_a_key_id_of_no_use_fails_the_rotation(
    make_env: Callable[..., Env], legacy_api: LegacyApiProcess
) -> None:
    """The key id goes into the journal, a revocation's URL and the operator's terminal: one
    that is a boolean, empty, too long or holds a control is no answer, and nothing is
    promoted."""
    ids = {"bool": "true", "empty": '""', "long": '"' + "k" * 257 + '"', "escape": '"k\\u001b[2J"'}
    names = {why: f"id-{why}-{uid()}" for why in ids}
    routes = {
        names[why]: route_config(
            legacy_api,
            {
                "type": "command",
                "command": [
                    "sh",
                    "-c",
                    f'echo \'{{"key": "sk-{uid()}{uid()}", "key_id": {value}}}\'',
                ],
                "timeout": "30s",
            },
        )
        for why, value in ids.items()
    }
    env = make_env(routes)
    async with engine(env) as rotations:
        for why, name in names.items():
            outcome = await rotations.rotate(name)
            assert outcome.failed, why
            assert "the key id is not a string of 1 to 256 characters" in outcome.detail, why
