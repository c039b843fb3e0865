"""keyproxy.rotation.journal against real OpenBao: the stored journal keeps its shape."""

from __future__ import annotations

from collections.abc import Callable

from keyproxy import rotation
from keyproxy.rotation.state import JournalState
from tests.helpers.rotation import Env, engine


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
