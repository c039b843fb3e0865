"""`keyproxy audit` queries: which identities used a route's key version, and when."""

from __future__ import annotations

import itertools
import json
import tracemalloc
from datetime import UTC, datetime
from typing import Any

import pytest

from keyproxy.audit import query as auditlog
from keyproxy.audit import tree as audittree
from keyproxy.config import MAX_DELEGATION_DEPTH


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
        "key_fingerprints": [],
        "actors": [],
        "routes": ["r"],
    }
    assert answer.skipped_lines == 2  # "not json" and a non-request event; blank lines ignored


# Key A in version 1, key B in version 2, then A again as version 3 (`kv rollback`); the
# first event is of an earlier build, which named no fingerprint.
ROLLED_BACK = [
    _event("old", 1, "2025-01-01T09:00:00Z"),
    _event("a", 1, "2025-01-01T10:00:00Z", key_fingerprint="aaaaaaaaaaaa"),
    _event("b", 2, "2025-01-01T11:00:00Z", key_fingerprint="bbbbbbbbbbbb"),
    _event("c", 3, "2025-01-01T12:00:00Z", key_fingerprint="aaaaaaaaaaaa"),
    _event("a", 3, "2025-01-01T13:00:00Z", key_fingerprint="aaaaaaaaaaaa"),
    _event("x", 4, "2025-01-01T14:00:00Z", key_fingerprint=["aaaaaaaaaaaa"]),  # not keyproxy's
]


@pytest.mark.parametrize(
    ("version", "fingerprint", "subjects", "fingerprints"),
    [
        (1, None, ["a", "c", "old"], {"aaaaaaaaaaaa"}),
        (3, None, ["a", "c"], {"aaaaaaaaaaaa"}),
        (2, None, ["b"], {"bbbbbbbbbbbb"}),
        (None, "aaaaaaaaaaaa", ["a", "c"], {"aaaaaaaaaaaa"}),
        (None, "bbbbbbbbbbbb", ["b"], {"bbbbbbbbbbbb"}),
        (None, "cccccccccccc", [], {"cccccccccccc"}),
        (None, None, ["a", "b", "c", "old"], set()),
    ],
)
def test_a_key_is_counted_under_every_version_that_held_it(
    version: int | None, fingerprint: str | None, subjects: list[str], fingerprints: set[str]
) -> None:
    """Asking for a version counts every event of the key it held, also under a later
    version holding the same key (a rollback); asking for a fingerprint counts that key's
    events alone. A line whose fingerprint is not text is no event of keyproxy's."""
    answer = auditlog.query(ROLLED_BACK, "r", version, key_fingerprint=fingerprint)
    assert [u.subject for u in answer.identities] == subjects
    assert answer.key_fingerprints == fingerprints
    assert answer.skipped_lines == 1
    if version == 1:
        a = answer.identities[0]
        assert (a.requests, a.key_versions, a.first, a.last) == (
            2,
            {1, 3},
            "2025-01-01T10:00:00Z",
            "2025-01-01T13:00:00Z",
        )


def test_a_versions_key_is_learnt_from_the_key_loads_when_its_requests_are_gone() -> None:
    """Logs from after a rollback alone (key A back as version 3): the leaked version 1 has
    no request left in them, but a proxy's `key_cache.key_loaded` event of the route's
    secret names its key, so version 3's requests are counted. Another secret's load says
    nothing of it; without the secret, nothing names version 1's key. A route not asked
    about that sent the key is named apart. A fingerprint of no form keyproxy writes is no
    event of keyproxy's."""
    fp = "aaaaaaaaaaaa"
    log = [
        json.dumps({"event": "key_cache.key_loaded", "secret": "secret/k", "field": "api_key",
                    "version": 1, "fingerprint": fp}),
        json.dumps({"event": "key_cache.key_loaded", "secret": "secret/other", "field": "api_key",
                    "version": 2, "fingerprint": "bbbbbbbbbbbb"}),
        _event("c", 3, "2025-01-01T12:00:00Z", key_fingerprint=fp),
        _event("d", 7, "2025-01-01T12:00:00Z", route="moved", key_fingerprint=fp),
        _event("e", 3, "2025-01-01T12:00:00Z", key_fingerprint="AAAAAAAAAAAA"),
    ]  # fmt: skip
    known = auditlog.query(log, "r", 1, secret=("secret/k", "api_key"))
    assert [u.subject for u in known.identities] == ["c"]
    assert (known.key_fingerprints, known.elsewhere, known.skipped_lines) == ({fp}, {"moved"}, 1)
    assert auditlog.query(log, "r", 2, secret=("secret/k", "api_key")).identities == []
    unknown = auditlog.query(log, "r", 1)
    assert (unknown.identities, unknown.key_fingerprints) == ([], set())


TREE_LOG = [
    json.dumps(e)
    for e in [
        {"event": "token.issued", "token_id": "r", "task": "t", "issuer": "k8s",
         "subject": "a", "timestamp": "2025-01-01T10:00:00Z", "expires_at": 1.0},
        {"event": "token.issued", "token_id": "c", "task": "t", "issuer": "k8s",
         "subject": "a", "parent_token_id": "r", "chain": "r,c", "actors": "k8s|helper",
         "timestamp": "2025-01-01T10:01:00Z"},
        {"event": "request", "token_id": "g", "task": "t", "issuer": "k8s", "subject": "a",
         "chain": "r,c,g", "actors": "k8s|helper,k8s|a", "route": "llm", "decision": "allow",
         "timestamp": "2025-01-01T10:02:00Z"},
        {"event": "request", "token_id": "g", "task": "t", "issuer": "k8s", "subject": "a",
         "chain": "r,c,g", "route": "llm", "decision": "deny",
         "timestamp": "2025-01-01T10:03:00Z"},
        {"event": "token.revoked", "token_id": "r", "task": "t", "reason": "failed",
         "timestamp": "2025-01-01T10:04:00Z"},
        {"event": "request", "token_id": "x", "task": "other", "route": "llm",
         "timestamp": "2025-01-01T10:05:00Z"},
    ]
]  # fmt: skip


def test_tree_answers_everything_under_a_task_or_token() -> None:
    """`tree` puts every token of a task in its delegation tree, a grandchild seen only in
    request events included, with requests and end reasons; under a token, only it and its
    descendants."""
    found = audittree.tree(TREE_LOG, task="t", keep_events=True)
    (root,) = found.roots
    assert (root.token_id, root.ended, root.subject) == ("r", "failed", "k8s|a")
    (child,) = root.children
    assert (child.token_id, child.actor) == ("c", "k8s|helper")
    (grandchild,) = child.children
    assert (grandchild.token_id, grandchild.requests, grandchild.refused) == ("g", 2, 1)
    assert len(found.events) == 5
    under_child = audittree.tree(TREE_LOG, token="c", keep_events=True)
    assert {e["token_id"] for e in under_child.events} == {"c", "g"}
    assert [n.token_id for n in audittree.tree(TREE_LOG, task="other").roots] == ["x"]


@pytest.mark.parametrize(
    ("line", "skipped"),
    [
        (
            '{"event":"request","route":"other","key_version":1,"route":"r",'
            '"timestamp":"2025-01-01T10:00:00Z"}',
            3,
        ),  # a member twice: which one did keyproxy write?
        (
            '{"event":"request","route":"r","key_version":1,"timestamp":"2025-01-01T10:00:00Z",'
            '"duration_ms":NaN}',
            3,
        ),  # no JSON, and no JSON reader downstream would take it back
        # A request event with no key version: as a refused one, not counted nor skipped.
        ('{"event":"request","route":"r","key_version":true,"timestamp":"2025-01-01T10:00Z"}', 2),
        (_event(["a"], 1, "2025-01-01T10:00:00Z"), 3),  # type: ignore[arg-type]  # the point
        (_event("a", 1, "2025-01-01T10:00:00Z", issuer=5), 3),
        (_event("a", 1, "yesterday"), 3),  # counted in no window, so said
        (_event("a", 1, "2025-01-01T10:00:00Z", timestamp=None), 3),
    ],
)
def test_a_line_keyproxy_would_not_write_is_skipped(line: str, skipped: int) -> None:
    """A line with a member given twice, NaN, a key version that is no whole number, an
    identity that is not text or a time that cannot be read is no event of keyproxy's: not
    counted under a guessed route, version or window, and not the end of the query (an
    unhashable subject, or one that cannot be sorted with the others, raised TypeError); the
    tree's events never hold NaN, which `-o json` would print as no JSON."""
    answer = auditlog.query([*LOG, line], "r")
    assert [u.subject for u in answer.identities] == ["a", "b"]
    assert sum(u.requests for u in answer.identities) == 4
    assert answer.skipped_lines == skipped
    tree = audittree.tree([line], keep_events=True)
    assert all("NaN" not in json.dumps(e) for e in tree.events)
    if "yesterday" in line:
        assert (tree.events, tree.skipped_lines) == ([], 1)


def _used(token_id: str, chain: list[str]) -> str:
    return json.dumps(
        {"event": "request", "token_id": token_id, "task": "t", "chain": ",".join(chain),
         "route": "llm", "decision": "allow", "timestamp": "2025-01-01T10:00:00Z"}
    )  # fmt: skip


def _depth(node: audittree.TokenNode) -> int:
    pending, deepest = [(node, 0)], 0
    while pending:
        current, depth = pending.pop()
        deepest = max(deepest, depth)
        pending.extend((child, depth + 1) for child in current.children)
    return deepest


def test_a_tree_the_logs_tangle_still_shows_every_token() -> None:
    """Tokens whose parents form a cycle, or a chain deeper than keyproxy delegates (merged
    or tampered logs), are each a root of their own with their parent named, never left out
    of every tree; no tree is deeper than MAX_DELEGATION_DEPTH, so printing it cannot
    exhaust the stack."""
    cycle = audittree.tree([_used("a", ["a", "b", "a"])], task="t")
    assert sorted((n.token_id, n.parent) for n in cycle.roots) == [("a", "b"), ("b", "a")]
    ids = [f"id{i}" for i in range(3000)]
    deep = audittree.tree([_used(ids[-1], ids)], task="t")
    assert len(deep.roots) == 3000 - MAX_DELEGATION_DEPTH
    assert max(_depth(root) for root in deep.roots) == MAX_DELEGATION_DEPTH
    assert deep.roots[0].token_id == "id0"
    assert json.dumps([root.as_dict() for root in deep.roots])
    issued = {"event": "token.issued", "token_id": "c", "task": "t", "parent_token_id": "gone"}
    missing = audittree.tree([json.dumps(issued | {"timestamp": "2025-01-01T10:00:00Z"})])
    assert [(n.token_id, n.parent) for n in missing.roots] == [("c", "gone")]


def test_a_tree_without_its_events_holds_memory_by_tokens_not_by_lines() -> None:
    """`token list --audit` and the table of `audit --task` show no events: the tree keeps
    none, so a long log of one token's requests takes no more memory than a short one."""
    line = _used("g", ["r", "g"])
    tracemalloc.start()
    try:
        found = audittree.tree(itertools.repeat(line, 20_000), task="t")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found.roots[0].children[0].requests == 20_000
    assert found.events == []
    assert peak < 1_000_000  # the events, kept, take about 19 MB


def test_a_sub_agent_that_used_the_key_is_in_the_blast_radius() -> None:
    """A request made with a delegated token names its root identity as issuer and subject,
    policy's identity; the sub-agent that held the token and sent it (its last actor) is
    listed under that identity, not lost from the answer."""
    delegated = _event("a", 1, "2025-01-01T10:10:00Z", chain="j1,j2,j3",
                       actors="k8s|helper,k8s|sub")  # fmt: skip
    (a, _) = auditlog.query([*LOG, delegated], "r").identities
    assert (a.subject, a.requests, a.actors) == ("a", 4, {"k8s|sub"})
    assert a.as_dict()["actors"] == ["k8s|sub"]
