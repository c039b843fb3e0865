"""`keys status` entries: the KeyStatus dataclass gives the JSON object the CLI has always
printed, the same keys in the same order with the same values. Pure: no Vault."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from keyproxy.rotation.state import Step
from keyproxy.rotation.status import KeyStatus, LastFailure, failing

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
