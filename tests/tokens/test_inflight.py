"""keyproxy.tokens.inflight: requests under way end with their task token."""

from __future__ import annotations

from collections.abc import Callable

from keyproxy.caller import Identity
from keyproxy.tokens import LEEWAY, Link, Revocations, TaskToken
from keyproxy.tokens.inflight import InFlight

WHO = Identity("k8s", "agent")
ROOT = TaskToken("root", WHO, {}, 900.0, 2000.0, task="t")
CHILD = TaskToken("child", WHO, {}, 950.0, 1500.0, task="t", ancestors=(Link("root", 2000.0),))
OTHER = TaskToken("other", Identity("k8s", "other"), {}, 900.0, 2000.0)


def _ender(token: TaskToken, ended: list[tuple[str, str]]) -> Callable[[str], None]:
    return lambda why: ended.append((token.token_id, why))


def test_requests_end_when_their_token_or_a_parent_is_revoked_or_expires() -> None:
    """A request whose token is revoked (by id, subject or task), whose parent is revoked,
    or whose token expired is ended once, with why; others go on; a request that left is
    not ended."""
    inflight, ended = InFlight(), list[tuple[str, str]]()
    watched = {t.token_id: inflight.watching(t, _ender(t, ended)) for t in (ROOT, CHILD, OTHER)}
    for watching in watched.values():
        watching.__enter__()
    inflight.end_dead(Revocations(), 1000.0)
    assert ended == []
    inflight.end_dead(Revocations(ids={"root": 2000.0}), 1000.0)
    assert sorted(ended) == [("child", "revoked"), ("root", "revoked")]
    ended.clear()
    inflight.end_dead(Revocations(tasks={"t": 960.0}), 1000.0)
    assert sorted(ended) == [("child", "revoked"), ("root", "revoked")]
    ended.clear()
    inflight.end_dead(Revocations(), 1500.0 + LEEWAY)
    assert ended == [("child", "expired")]
    ended.clear()
    watched["child"].__exit__(None, None, None)
    inflight.end_dead(Revocations(subjects={"k8s|other": 1000.0}), 1500.0 + LEEWAY)
    assert ended == [("other", "revoked")]
    assert inflight.watching(None, _ender(ROOT, ended)).__enter__() is None  # no task token
    assert len(inflight.requests) == 2
