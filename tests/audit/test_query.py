"""`keyproxy audit` queries: which identities used a route's key version, and when."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from keyproxy.audit import query as auditlog


def _event(subject: str, version: int | None, at: str, route: str = "r", **kw: Any) -> str:
    return json.dumps(
        {
            "event": "request",
            "route": route,
            "issuer": "k8s",
            "subject": subject,
            "key_version": version,
            "timestamp": at,
            **kw,
        }
    )


LOG = [
    _event("a", 1, "2025-01-01T10:00:00Z", task="t1", token_id="j1"),
    _event("a", 1, "2025-01-01T10:05:00Z", task="t2"),
    _event("b", 2, "2025-01-01T11:00:00Z"),
    _event("a", 2, "2025-01-01T11:30:00Z"),
    _event("c", None, "2025-01-01T11:40:00Z"),  # denied: no key was injected
    _event("d", 2, "2025-01-01T11:45:00Z", route="other"),
    '{"event": "vault.login"}',
    "not json",
    "",
]


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("version", "since", "until", "subjects"),
    [
        (None, None, None, ["a", "b"]),
        (1, None, None, ["a"]),
        (2, None, None, ["a", "b"]),
        (3, None, None, []),
        (None, _at("2025-01-01T10:30"), None, ["a", "b"]),
        (None, None, _at("2025-01-01T10:30"), ["a"]),
        (2, _at("2025-01-01T11:10"), _at("2025-01-01T12:00"), ["a"]),
    ],
)
def test_query_filters_by_version_and_time(
    version: int | None, since: datetime | None, until: datetime | None, subjects: list[str]
) -> None:
    """Only events that injected a key of the route (and version) inside the window count."""
    answer = auditlog.query(LOG, "r", version, since, until)
    assert [u.subject for u in answer.identities] == subjects


def test_usage_collects_tasks_tokens_counts_and_times() -> None:
    """Each identity's tasks, token ids, request count, versions and first/last use."""
    answer = auditlog.query(LOG, "r")
    a = answer.identities[0].as_dict()
    assert a == {
        "issuer": "k8s",
        "subject": "a",
        "requests": 3,
        "first": "2025-01-01T10:00:00Z",
        "last": "2025-01-01T11:30:00Z",
        "tasks": ["t1", "t2"],
        "token_ids": ["j1"],
        "key_versions": [1, 2],
    }
    assert answer.skipped_lines == 2  # "not json" and a non-request event; blank lines ignored
