"""Upstream read deadlines without an event-loop timer per read.

aiohttp's `sock_read` timeout cancels and re-creates a loop timer on every read of every
answer: two timers and two cancellations for a short answer, about a fifth of what keyproxy
added per request to a bare aiohttp proxy. Here a request waiting on its upstream keeps only
the time by which it must hear from it (or, while the caller uploads its body, from the
caller); one sweep every `granularity` seconds, scheduled only while requests are in flight,
times out those that stayed silent longer. A limit is enforced between `limit` and
`limit + granularity` after the awaited side was last heard from.

The time out works as `asyncio.timeout`'s does (which costs as much again to enter and
leave as the timers it replaces): the sweep cancels the waiting task, and the watch's `with`
block turns that cancellation, and only that one, into TimeoutError.
"""

from __future__ import annotations

import asyncio
import math
import time
from types import TracebackType


class Watch:
    """One request's wait on its upstream, as a `with` block (inside a task) that raises
    TimeoutError when the awaited side stays silent for longer than `limit` (`first` before
    the upstream is first heard from)."""

    __slots__ = (
        "_cancelling",
        "_deadlines",
        "_on_caller",
        "_task",
        "deadline",
        "expired",
        "limit",
    )
    _task: asyncio.Task[object]  # and _cancelling: set on entering, before the sweep sees it
    _cancelling: int

    def __init__(self, deadlines: ReadDeadlines, limit: float, first: float) -> None:
        self._deadlines = deadlines
        self.limit = limit
        self.deadline = time.monotonic() + first
        self._on_caller = False
        self.expired = ""  # once ended: "upstream" or "caller", whoever was silent, or why

    def heard(self) -> None:
        """The upstream answered (or it is its turn again): the silence starts now."""
        self.deadline = time.monotonic() + self.limit
        self._on_caller = False

    def caller_turn(self) -> None:
        """The caller's turn to send (its upload): the upstream is not waited on, but the
        caller may stay silent no longer than the upstream may."""
        self.deadline = time.monotonic() + self.limit
        self._on_caller = True

    def pause(self) -> None:
        """The caller's turn to read (a write to a slow caller): nothing is waited on."""
        self.deadline = math.inf

    def expire(self) -> None:
        """Time the watch out now (its sweep found the awaited side silent too long)."""
        self.end("caller" if self._on_caller else "upstream")

    def end(self, why: str) -> None:
        """End the wait now, for `why` (`expired` says it): the sweep's "upstream" or
        "caller", or another part's (the caller's token ended). Only while it is watched."""
        if not self.expired and self in self._deadlines.watches:
            self.expired = why
            self._task.cancel()

    def __enter__(self) -> Watch:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a read deadline is watched inside a task")
        self._task, self._cancelling = task, task.cancelling()
        self._deadlines.add(self, task.get_loop())
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._deadlines.watches.discard(self)
        # Ours if nobody else asked the task to stop meanwhile (asyncio.timeout's rule).
        if (
            self.expired
            and self._task.uncancel() <= self._cancelling
            and kind is asyncio.CancelledError
        ):
            raise TimeoutError from exc


class ReadDeadlines:
    """The watches of one event loop's requests, swept every `granularity` seconds."""

    def __init__(self, granularity: float) -> None:
        self.granularity = granularity
        self.watches: set[Watch] = set()
        self._sweep_due: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, watch: Watch, loop: asyncio.AbstractEventLoop) -> None:
        self.watches.add(watch)
        # A sweep due on another (stopped) loop would never run: sweep on this one.
        if self._sweep_due is None or loop is not self._loop:
            self._loop = loop
            self._sweep_due = loop.call_later(self.granularity, self._sweep, loop)

    def close(self) -> None:
        """Stop sweeping (the app is shutting down)."""
        if self._sweep_due is not None:
            self._sweep_due.cancel()
            self._sweep_due = None

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.watches:
            self._sweep_due = None  # idle: no timer until the next request
            return
        now = time.monotonic()
        for watch in [w for w in self.watches if w.deadline <= now]:
            watch.expire()
        self._sweep_due = loop.call_later(self.granularity, self._sweep, loop)
