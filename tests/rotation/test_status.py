"""`keys status` entries: the KeyStatus dataclass gives the JSON object the CLI has always
printed, the same keys in the same order with the same values (pure: no Vault); and
`keys status` end to end against real OpenBao and the fake legacy API."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml

from keyproxy.devserver import OpenBaoDevServer
from keyproxy.rotation.state import Step
from keyproxy.rotation.status import KeyStatus, LastFailure, failing
from keyproxy.secret import fingerprint
from tests.conftest import LegacyApiProcess
from tests.helpers.logscan import CANARIES
from tests.helpers.rotation import Env, http_rotator, outcomes, route_config, stored_key, uid

# The keys of one entry, in the order `keys status -o json` has printed them.
KEYS = [
    "route",
    "owner",
    "secret",
    "rotator",
    "every",
    "max_age",
    "version",
    "key_id",
    "fingerprint",
    "created_at",
    "age",
    "rotated_by",
    "overdue",
    "next_due",
    "last_rotation",
    "in_progress",
    "locked_by",
    "grace_until",
    "last_failure",
    "error",
]


def _entry(**fields: Any) -> KeyStatus:
    base = KeyStatus(
        "legacy", "ml@example.com", "secret/keyproxy/keys/legacy", "http", 86400.0, None
    )
    return replace(base, **fields)


def test_a_fresh_entry_has_every_key_in_order_with_nulls() -> None:
    """Before anything is read, the entry is the known fields and nulls, `overdue` false."""
    entry = _entry().as_dict()
    assert list(entry) == KEYS
    assert entry == {
        "route": "legacy",
        "owner": "ml@example.com",
        "secret": "secret/keyproxy/keys/legacy",
        "rotator": "http",
        "every": 86400.0,
        "max_age": None,
        **dict.fromkeys(KEYS[6:], None),
        "overdue": False,
    }


def test_a_full_entry_prints_the_same_json_text() -> None:
    """An entry with every field set prints byte for byte the JSON the dict form printed:
    the step as its text, the last failure as an object."""
    failure = LastFailure("2026-12-04T10:00:00+00:00", "created", "verification failed: 401")
    entry = _entry(
        version=7,
        key_id="k-7",
        fingerprint="0123456789ab",
        created_at="2026-12-04T09:00:00+00:00",
        age=3600.5,
        rotated_by="host:1:abcdef",
        overdue=True,
        next_due="2026-12-05T09:00:00+00:00",
        last_rotation="2026-12-04T09:00:01+00:00",
        in_progress=Step.CREATED,
        locked_by="host:2:fedcba",
        grace_until="2026-12-04T09:10:00+00:00",
        last_failure=failure,
        error="permission denied",
    )
    as_dict = {
        "route": "legacy",
        "owner": "ml@example.com",
        "secret": "secret/keyproxy/keys/legacy",
        "rotator": "http",
        "every": 86400.0,
        "max_age": None,
        "version": 7,
        "key_id": "k-7",
        "fingerprint": "0123456789ab",
        "created_at": "2026-12-04T09:00:00+00:00",
        "age": 3600.5,
        "rotated_by": "host:1:abcdef",
        "overdue": True,
        "next_due": "2026-12-05T09:00:00+00:00",
        "last_rotation": "2026-12-04T09:00:01+00:00",
        "in_progress": "created",
        "locked_by": "host:2:fedcba",
        "grace_until": "2026-12-04T09:10:00+00:00",
        "last_failure": {
            "at": "2026-12-04T10:00:00+00:00",
            "step": "created",
            "error": "verification failed: 401",
        },
        "error": "permission denied",
    }
    for indent in (None, 2):
        assert json.dumps([entry.as_dict()], indent=indent) == json.dumps([as_dict], indent=indent)


def test_failing_means_overdue_or_unreadable() -> None:
    """A monitor alerts on an overdue key or an error, not on anything else."""
    assert not failing([_entry(), _entry(in_progress=Step.VERIFIED, locked_by="x")])
    assert failing([_entry(), _entry(overdue=True)])
    assert failing([_entry(error="no key stored")])
    assert not failing([])


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
    assert list(f) == list(s) == KEYS  # the documented keys, in their order
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
    assert s["fingerprint"] == fingerprint(old)  # as the audit events name the key
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
    assert entries[stale]["fingerprint"] == fingerprint(new)
    assert stored_key(openbao, env, stale)[0] == new
