"""Requests under way with a task token, ended with it (invariant 11).

A streamed answer (an SSE completion, an MCP server's GET stream) can outlive the check its
request passed: the token may be revoked, lose its heartbeat (which revokes it) or expire
while it streams. The proxy registers each task-token request while it forwards
(`InFlight.watching`, with the function that ends it), judged again as it registers (the
limit step, the key and an MCP body came between); whenever this replica's revocation list
changes, and at every revocation poll, the requests whose token (or a token it was
delegated from) is revoked or expired are ended. All of them are ended (`end_all`,
UNVERIFIABLE) when the list is older than `tokens.revocation_max_staleness` and cannot be
read (a replica cut off from Vault cannot know what other replicas revoked): the rule a new
request meets. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Final

from keyproxy.errors import RequestError, Unauthenticated, Unavailable
from keyproxy.tokens.format import LEEWAY, TaskToken
from keyproxy.tokens.revoked import Revocations

End = Callable[[str], None]  # ends a request: "revoked", "expired" or UNVERIFIABLE

# Why a request ends when its token cannot be judged: this replica's revocation list is too
# old (the same reason a new request gets, 503 with Retry-After).
UNVERIFIABLE: Final = "revocations_unavailable"


class _Watching:
    """One request's registration, as a `with` block."""

    __slots__ = ("_end", "_inflight", "_token")

    def __init__(self, inflight: InFlight, token: TaskToken, end: End) -> None:
        self._inflight, self._token, self._end = inflight, token, end

    def __enter__(self) -> None:
        why = self._inflight.judge(self._token)
        if why is not None:
            raise self.refusal(why)
        self._inflight.requests[self] = self._token, self._end

    def refusal(self, why: str) -> RequestError:
        """The error of this request, ended (`why`) before its answer started."""
        return self._inflight.refusal(why)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._inflight.requests.pop(self, None)


class _NotWatching:
    """The registration of a request without a task token: nothing to end it."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None

    def refusal(self, why: str) -> RequestError:
        """Never asked: nothing ends a request without a task token."""
        return Unauthenticated(why, "the task token ended")


NOT_WATCHED: Final = _NotWatching()


def list_unreadable(retry_after: int = 1) -> Unavailable:
    """The refusal of a task token while this replica's revocation list cannot be read: 503,
    to try again after `retry_after` seconds (the next read)."""
    return Unavailable(
        UNVERIFIABLE, "the revocation list cannot be read now", retry_after=retry_after
    )


class InFlight:
    """This process's task-token requests under way; `judge` says why a token ended
    ("revoked", "expired"), or None while it lives; `retry_after()` (seconds to the next read
    of the list, under the settings of the moment) goes with the 503 of a token that cannot
    be judged (UNVERIFIABLE)."""

    def __init__(
        self,
        judge: Callable[[TaskToken], str | None],
        retry_after: Callable[[], int] = lambda: 1,
    ) -> None:
        self.judge = judge
        self.retry_after = retry_after
        self.requests: dict[_Watching, tuple[TaskToken, End]] = {}

    def watching(self, token: TaskToken | None, end: End) -> _Watching | _NotWatching:
        """While in this block, a request with `token` is ended (`end`) when the token ends."""
        return NOT_WATCHED if token is None else _Watching(self, token, end)

    def refusal(self, why: str) -> RequestError:
        """The error of a request ended (`why`) before its answer started, as a new request
        would get it: 401 for a token that ended, 503 for one that cannot be judged."""
        if why == UNVERIFIABLE:
            return list_unreadable(self.retry_after())
        return Unauthenticated(why, "the task token ended")

    def end_dead(self) -> None:
        """End the requests whose token ended."""
        for token, end in list(self.requests.values()):
            why = self.judge(token)
            if why is not None:
                end(why)

    def end_all(self, why: str) -> None:
        """End every request under way, for `why`."""
        for _, end in list(self.requests.values()):
            end(why)


def ended(token: TaskToken, revocations: Revocations, now: float) -> str | None:
    """Why `token` ended by `now`: "revoked" (`revocations` name it by id, subject or task,
    or in its chain), "expired" (`expires_at` is the earliest of its chain's), or None."""
    if now >= token.expires_at + LEEWAY:
        return "expired"
    if revocations.revoked(token) or revocations.chain_refusal(token) is not None:
        return "revoked"
    return None
