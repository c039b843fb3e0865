"""keyproxy.tokens.inflight: requests under way end with their task token."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from keyproxy.caller import Identity
from keyproxy.errors import Unauthenticated, Unavailable
from keyproxy.tokens import LEEWAY, Link, Revocations, TaskToken
from keyproxy.tokens.inflight import UNVERIFIABLE, InFlight, ended

WHO = Identity("k8s", "agent")
ROOT = TaskToken("root", WHO, {}, 900.0, 2000.0, task="t")
CHILD = TaskToken("child", WHO, {}, 950.0, 1500.0, task="t", ancestors=(Link("root", 2000.0),))
OTHER = TaskToken("other", Identity("k8s", "other"), {}, 900.0, 2000.0)


class _List:
    """What the replica holds, as the test sets it."""

    def __init__(self) -> None:
        self.revocations, self.now = Revocations(), 1000.0

    def judge(self, token: TaskToken) -> str | None:
        return ended(token, self.revocations, self.now)


def _ender(token: TaskToken, ends: list[tuple[str, str]]) -> Callable[[str], None]:
    return lambda why: ends.append((token.token_id, why))


def test_requests_end_when_their_token_or_a_parent_is_revoked_or_expires() -> None:
    """A request whose token is revoked (by id, subject or task), whose parent is revoked,
    or whose token expired is ended with why; others go on; one that left is not ended."""
    held, ends = _List(), list[tuple[str, str]]()
    inflight = InFlight(held.judge)
    watched = {t.token_id: inflight.watching(t, _ender(t, ends)) for t in (ROOT, CHILD, OTHER)}
    for watching in watched.values():
        watching.__enter__()
    inflight.end_dead()
    assert ends == []
    held.revocations = Revocations(ids={"root": 2000.0})
    inflight.end_dead()
    assert sorted(ends) == [("child", "revoked"), ("root", "revoked")]
    ends.clear()
    held.revocations = Revocations(tasks={"t": 960.0})
    inflight.end_dead()
    assert sorted(ends) == [("child", "revoked"), ("root", "revoked")]
    ends.clear()
    held.revocations, held.now = Revocations(), 1500.0 + LEEWAY
    inflight.end_dead()
    assert ends == [("child", "expired")]
    ends.clear()
    watched["child"].__exit__(None, None, None)
    held.revocations = Revocations(subjects={"k8s|other": 1000.0})
    inflight.end_dead()
    assert ends == [("other", "revoked")]
    assert inflight.watching(None, _ender(ROOT, ends)).__enter__() is None  # no task token
    assert len(inflight.requests) == 2


def test_a_request_whose_token_ended_before_it_registers_is_refused() -> None:
    """A token revoked (or expired) after it was verified and before its request was
    forwarded: the registration refuses it (401 with why), and nothing is registered."""
    held = _List()
    inflight = InFlight(held.judge)
    held.revocations = Revocations(ids={"root": 2000.0})
    for token, why in ((ROOT, "revoked"), (CHILD, "revoked")):
        with pytest.raises(Unauthenticated) as refused:
            inflight.watching(token, _ender(token, [])).__enter__()
        assert refused.value.reason == why
    held.revocations, held.now = Revocations(), 2000.0 + LEEWAY
    with pytest.raises(Unauthenticated, match="ended"):
        inflight.watching(OTHER, _ender(OTHER, [])).__enter__()
    assert inflight.requests == {}


def test_requests_whose_tokens_cannot_be_judged_all_end_with_a_503() -> None:
    """While the replica's list cannot be read, every request under way is ended
    (UNVERIFIABLE), whatever its token; one not answered yet gets the replica's own 503
    (`unreadable`, with its Retry-After), not a 401: the token may be good."""
    held, ends = _List(), list[tuple[str, str]]()
    inflight = InFlight(held.judge, retry_after=lambda: 2)
    watched = [inflight.watching(t, _ender(t, ends)) for t in (ROOT, CHILD)]
    for watching in watched:
        watching.__enter__()
    inflight.end_all(UNVERIFIABLE)
    assert sorted(ends) == [("child", UNVERIFIABLE), ("root", UNVERIFIABLE)]
    late = watched[0].refusal(UNVERIFIABLE)
    assert (type(late), late.reason, late.status, late.retry_after) == (
        Unavailable,
        UNVERIFIABLE,
        503,
        2,
    )
    refused = watched[0].refusal("revoked")
    assert (type(refused), refused.reason) == (Unauthenticated, "revoked")
