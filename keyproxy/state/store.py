"""The state store's interface: limits that hold across every worker and replica.

A request decision names every limit it touches and takes one unit of each in one call,
all or nothing (`StateStore.take`): if any limit refuses, none is consumed. Four kinds:

- `Counter`      a cap on uses that expires (a task token's `max_uses`, gone with the token);
- `Rate`         requests per window with a burst allowance (GCRA, see `Rate`);
- `Concurrency`  requests in flight; a taken unit is a `Slot`, a lease that expires unless
                 refreshed (`hold` refreshes and releases it), so a dead holder frees it;
- `Lease`        a heartbeat lease that must be alive (a task token with `idle_ttl`, and its
                 delegating ancestors'); nothing is taken from it.

Besides decisions: `read` a counter, heartbeat leases (`beat` starts one, `renew` extends a
live one, `alive`, `drop`) for tokens that die when their holder stops beating, their watch
registry (`watch`, `unwatch`, `lapsed`: any replica, not only the one that started a lease,
learns that it lapsed) with `first_end` (one replica reports each end), a readiness
`check`, and plain-number `stats` (store errors, decision latency) for the metrics.

Faults never escape a decision. When the store cannot answer, each limit says so in its
`Outcome` (`store_error=True`) and is refused unless its `on_store_error` is `ALLOW`.
The calls that are not decisions (`read`, the lease calls and the watch registry's) raise
`StoreUnavailable`.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import math
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

from keyproxy.errors import KeyproxyError


class StoreUnavailable(KeyproxyError):
    """The state store could not be reached or did not answer in time."""


class OnStoreError(enum.Enum):
    """What a limit does when the store cannot answer."""

    DENY = "deny"  # fail closed: the request is refused with a reason
    ALLOW = "allow"  # the operator chose availability: the limit is not enforced


@dataclass(frozen=True, slots=True)
class Counter:
    """At most `cap` units ever, counted until `ttl` seconds after the first use.

    The expiry is set by the first use and never moved, so a token's counter made with
    `ttl = token expiry - now` disappears with the token.
    """

    key: str
    cap: int
    ttl: float
    on_store_error: OnStoreError = OnStoreError.DENY

    def __post_init__(self) -> None:
        _check_key(self.key)
        if self.cap < 0 or self.ttl <= 0:
            raise ValueError("a counter needs cap >= 0 and ttl > 0")


@dataclass(frozen=True, slots=True)
class Rate:
    """`limit` requests per `window` seconds, at most `burst` of them at once (GCRA).

    Requests are admitted at the steady rate of one per `window / limit` seconds, and up to
    `burst` may arrive together after a quiet spell. Any `window`-long span therefore admits
    at most `limit + burst` (a 50-per-10-s limit with burst 5 lets 50 to 55 through in
    10 s), never `limit` per worker.
    """

    key: str
    limit: int
    window: float
    burst: int = 1
    on_store_error: OnStoreError = OnStoreError.DENY

    def __post_init__(self) -> None:
        _check_key(self.key)
        if self.limit < 1 or self.window <= 0 or self.burst < 1:
            raise ValueError("a rate needs limit >= 1, window > 0 and burst >= 1")

    @property
    def interval(self) -> float:
        """Seconds between requests at the steady rate."""
        return self.window / self.limit


@dataclass(frozen=True, slots=True)
class Concurrency:
    """At most `limit` requests in flight; each holds a slot leased for `lease` seconds.

    A holder refreshes its slot while the request lives (`hold` does it every third of the
    lease); a slot whose holder died (a killed process) expires `lease` seconds after its
    last refresh.
    """

    key: str
    limit: int
    lease: float = 30.0
    on_store_error: OnStoreError = OnStoreError.DENY

    def __post_init__(self) -> None:
        _check_key(self.key)
        if self.limit < 1 or self.lease <= 0:
            raise ValueError("a concurrency cap needs limit >= 1 and lease > 0")


@dataclass(frozen=True, slots=True)
class Lease:
    """The heartbeat lease `key` (`StateStore.beat`) must be alive; a decision takes nothing
    from it. A lease that lapsed stays lapsed: only `beat` starts one."""

    key: str
    on_store_error: OnStoreError = OnStoreError.DENY

    def __post_init__(self) -> None:
        _check_key(self.key)


Limit = Counter | Rate | Concurrency | Lease


def _check_key(key: str) -> None:
    # Keys end up inside Redis key names; braces would change the Cluster hash slot.
    # SECURITY: a key is stored in clear and readable by whoever can read the store: build
    # it from identifiers (a token's id, an issuer and subject), never from a credential.
    if not key or "{" in key or "}" in key:
        raise ValueError(f"a limit key must be non-empty and without braces: {key!r}")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one limit said about one decision.

    `remaining` is how many more units it would admit now; `reset` the seconds until it is
    back to full (a counter: until it expires); `retry_after` the seconds until a refused
    request may succeed (0 when admitted). These feed the `RateLimit`/`RateLimit-Policy`
    headers. `allowed` is this limit's own answer: a decision is refused if any is False.
    """

    limit: Limit
    allowed: bool
    remaining: int
    reset: float
    retry_after: float
    store_error: bool = False

    @property
    def reason(self) -> str:
        """A short code for the audit log and the answer."""
        if self.store_error:
            return "state_store_unavailable" if not self.allowed else "state_store_bypassed"
        if self.allowed:
            return "ok"
        return {
            Counter: "max_uses",
            Rate: "rate_limited",
            Concurrency: "too_many_in_flight",
            Lease: "heartbeat_lost",
        }[type(self.limit)]


@dataclass(frozen=True, slots=True)
class Slot:
    """A held concurrency unit: the lease `holder` in the set `key` of `limit`."""

    limit: Concurrency
    holder: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one `take`: every limit's outcome and the slots now held.

    `slots` is empty unless the decision was allowed; whoever allowed the request must
    release them (`StateStore.release`, or `hold`) however it ends.
    """

    outcomes: tuple[Outcome, ...]
    slots: tuple[Slot, ...] = ()

    @property
    def allowed(self) -> bool:
        return all(outcome.allowed for outcome in self.outcomes)

    @property
    def refused_by(self) -> Outcome | None:
        """The refusing limit that frees last (the one Retry-After must wait for)."""
        refused = [outcome for outcome in self.outcomes if not outcome.allowed]
        return max(refused, key=lambda outcome: outcome.retry_after) if refused else None

    @property
    def retry_after(self) -> int:
        """Whole seconds for Retry-After: at least 1 when refused, 0 when allowed."""
        refused = self.refused_by
        return 0 if refused is None else max(1, math.ceil(refused.retry_after))


@dataclass(slots=True)
class StoreStats:
    """Running totals for the metrics, as plain numbers."""

    decisions: int = 0
    errors: int = 0
    decision_seconds_total: float = 0.0
    decision_seconds_max: float = 0.0

    def observe(self, seconds: float, *, error: bool) -> None:
        self.decisions += 1
        self.errors += error
        self.decision_seconds_total += seconds
        self.decision_seconds_max = max(self.decision_seconds_max, seconds)


@dataclass(frozen=True, slots=True)
class Health:
    """The readiness answer: `ok`, and a short reason when not."""

    ok: bool
    detail: str = ""


class StateStore(abc.ABC):
    """Where limits are counted. Implementations: `MemoryStore` and `RedisStore`."""

    stats: StoreStats

    @abc.abstractmethod
    async def take(self, limits: Sequence[Limit], units: int = 1) -> Decision:
        """Take `units` of every limit at once, or none of them. Never raises for the
        store's faults: they are reported per limit in the outcomes."""

    @abc.abstractmethod
    async def refresh(self, slots: Sequence[Slot]) -> tuple[Slot, ...]:
        """Extend the slots' leases; return the ones that had already lapsed (a store out of
        reach for longer than the lease, or one that restarted), which are taken again: their
        requests still run, and counting them keeps new ones within the cap. Raises
        `StoreUnavailable`."""

    @abc.abstractmethod
    async def release(self, slots: Sequence[Slot]) -> None:
        """Give the slots back (a slot already gone is fine). Never raises: a slot that
        could not be released expires with its lease."""

    @abc.abstractmethod
    async def read(self, counter: Counter) -> int:
        """Units used so far of `counter` (0 when unused or expired). Raises `StoreUnavailable`."""

    @abc.abstractmethod
    async def beat(self, key: str, ttl: float) -> None:
        """Set or refresh the heartbeat lease `key` for `ttl` seconds. Raises `StoreUnavailable`."""

    @abc.abstractmethod
    async def renew(self, key: str, ttl: float) -> bool:
        """Extend the lease `key` to `ttl` seconds from now if it is still alive; False (and
        nothing set) if it lapsed or never was. Raises `StoreUnavailable`."""

    @abc.abstractmethod
    async def alive(self, key: str) -> bool:
        """Whether the lease `key` was beaten within its ttl. Raises `StoreUnavailable`."""

    @abc.abstractmethod
    async def drop(self, key: str) -> None:
        """End the lease `key` now. Raises `StoreUnavailable`."""

    @abc.abstractmethod
    async def watch(self, key: str, record: str, keep: float, lapses_in: float) -> None:
        """Keep `record` (what the caller needs to act on it) for the lease `key`, which
        lapses in `lapses_in` seconds unless renewed, for `keep` seconds at most, until
        `unwatch` forgets it. Raises `StoreUnavailable`."""

    @abc.abstractmethod
    async def unwatch(self, key: str) -> None:
        """Forget the record of lease `key` (none is fine). Raises `StoreUnavailable`."""

    @abc.abstractmethod
    async def lapsed(self, most: int, claim: float) -> list[tuple[str, str]]:
        """The lease keys and records of up to `most` watched leases that have lapsed,
        whichever replica asks. Each is handed to one caller, which is to `unwatch` it once
        it has acted on it; until then it is not handed out again for `claim` seconds (so a
        caller that dies first leaves it to another). Only leases due by now are looked at:
        the cost follows the lapsed ones, not the number watched. Raises
        `StoreUnavailable`."""

    @abc.abstractmethod
    async def first_end(self, key: str, ttl: float) -> bool:
        """Mark `key` ended, for `ttl` seconds: True for the first caller to do so, whichever
        replica, False for every later one. Raises `StoreUnavailable`."""

    @abc.abstractmethod
    async def check(self) -> Health:
        """Readiness: whether the store answers now. Never raises."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""


@dataclass
class _Refresher:
    store: StateStore
    slots: tuple[Slot, ...]
    stopped: bool = False
    refreshing: bool = False  # a refresh is under way: let it end (see `_release`)

    async def run(self) -> None:
        period = min(slot.limit.lease for slot in self.slots) / 3
        # The flag, not only the cancellation, ends the loop: a client library may turn a
        # cancellation that lands inside a call into an error of its own, which the loop
        # would take for a store fault and go on beating (the slot would never be freed).
        while not self.stopped:
            await asyncio.sleep(period)
            if self.stopped:
                return
            # A store fault here is not the request's end: the next beat may get through
            # (and takes the slots again if they lapsed meanwhile), and if none does the
            # slots expire on their own.
            self.refreshing = True
            try:
                with suppress(StoreUnavailable):
                    await self.store.refresh(self.slots)
            finally:
                self.refreshing = False


@asynccontextmanager
async def hold(store: StateStore, decision: Decision) -> AsyncIterator[None]:
    """Keep the decision's slots leased while the body runs, and release them however
    it ends (returned, raised, cancelled)."""
    if not decision.slots:
        yield
        return
    refresher = _Refresher(store, decision.slots)
    task = asyncio.create_task(refresher.run())
    try:
        yield
    finally:
        # SECURITY (limits): released even when the request is cancelled meanwhile, as when
        # its caller closes the connection on the answer's last byte (a slot left held would
        # refuse others until its lease ran out).
        await _to_its_end(_release(store, decision.slots, refresher, task))


async def _release(
    store: StateStore, slots: tuple[Slot, ...], refresher: _Refresher, task: asyncio.Task[None]
) -> None:
    refresher.stopped = True
    # A refresh under way is let end (bounded: one store call), not cancelled: cancelled, it
    # may still run in the store after the release below and take the slots back, as a
    # refresh takes back lapsed slots. Waited for, not awaited: a cancellation of this
    # request itself must not be swallowed with the refresher's.
    if not refresher.refreshing:
        task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: a bug in it is not "never retrieved" noise
    await store.release(slots)


async def _to_its_end(work: Coroutine[Any, Any, None]) -> None:
    """Run `work` to its end even if the calling task is cancelled meanwhile, and raise that
    cancellation after it (not `work`'s own error, then: the caller was cancelled). `work`
    must be bounded (every store call has a deadline)."""
    running = asyncio.ensure_future(work)
    cancelled = False
    while not running.done():
        try:
            await asyncio.wait({running})  # never raises `work`'s error
        except asyncio.CancelledError:
            cancelled = True  # the caller's: waited out
    if cancelled:
        if not running.cancelled():
            running.exception()  # retrieved: the cancellation is what the caller sees
        raise asyncio.CancelledError
    running.result()
