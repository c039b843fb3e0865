"""The in-process state store: exact for one process, no I/O.

The default for `keyproxy dev` and a single-worker `serve`. Every call runs to completion
without awaiting, so on one event loop a decision is atomic with no lock. Expired entries
are dropped when touched, and a sweep every `_SWEEP_EVERY` decisions drops the rest, so
memory follows the live keys. The clock is injectable so tests can move time.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from keyproxy.state.store import (
    Concurrency,
    Counter,
    Decision,
    Health,
    Lease,
    Limit,
    Outcome,
    Rate,
    Slot,
    StateStore,
    StoreStats,
)

_SWEEP_EVERY = 10_000


@dataclass(slots=True)
class _Used:
    count: int
    expires: float


class MemoryStore(StateStore):
    """Limits counted in this process's memory. `clock` returns seconds (monotonic)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._counters: dict[str, _Used] = {}
        self._tats: dict[str, float] = {}  # Rate: theoretical arrival time of the next request
        self._slots: dict[str, dict[str, float]] = {}  # Concurrency: holder -> lease expiry
        self._leases: dict[str, float] = {}
        self._watched: dict[str, tuple[str, float]] = {}  # lease key -> (record, kept until)
        self._due: dict[str, float] = {}  # watched lease key -> when it lapses (or is retried)
        self._ended: dict[str, float] = {}  # first_end's marks -> kept until
        self._since_sweep = 0
        self.stats = StoreStats()

    async def take(self, limits: Sequence[Limit], units: int = 1) -> Decision:
        started = time.perf_counter()
        now = self._clock()
        self._sweep(now)
        outcomes = tuple(self._check(limit, units, now) for limit in limits)
        slots: tuple[Slot, ...] = ()
        if all(outcome.allowed for outcome in outcomes):
            holder = uuid.uuid4().hex
            for limit in limits:
                self._apply(limit, units, now, holder)
            slots = tuple(Slot(limit, holder) for limit in limits if isinstance(limit, Concurrency))
        self.stats.observe(time.perf_counter() - started, error=False)
        return Decision(outcomes, slots)

    def _check(self, limit: Limit, units: int, now: float) -> Outcome:
        if isinstance(limit, Counter):
            used = self._live_counter(limit.key, now)
            count, expires = (used.count, used.expires) if used else (0, now + limit.ttl)
            allowed = count + units <= limit.cap
            return Outcome(
                limit,
                allowed,
                remaining=max(0, limit.cap - count - (units if allowed else 0)),
                reset=expires - now,
                retry_after=0.0 if allowed else expires - now,
            )
        if isinstance(limit, Rate):
            tat = max(self._tats.get(limit.key, now), now)
            new_tat = tat + units * limit.interval
            allow_at = new_tat - limit.burst * limit.interval
            if allow_at <= now:
                remaining = math.floor((now - allow_at) / limit.interval + 1e-9)
                return Outcome(limit, True, remaining, reset=new_tat - now, retry_after=0.0)
            return Outcome(limit, False, 0, reset=tat - now, retry_after=allow_at - now)
        if isinstance(limit, Lease):
            alive = self._leases.get(limit.key, -math.inf) > now
            return Outcome(limit, alive, 0, reset=0.0, retry_after=0.0)
        held = self._live_slots(limit.key, now)
        # A request holds one slot whatever its `units`.
        allowed = len(held) < limit.limit
        remaining = max(0, limit.limit - len(held) - allowed)
        # A refused request can hope for a slot when the oldest lease would run out.
        wait = 0.0 if allowed else max(0.0, min(held.values()) - now)
        return Outcome(limit, allowed, remaining, reset=wait, retry_after=wait)

    def _apply(self, limit: Limit, units: int, now: float, holder: str) -> None:
        if isinstance(limit, Counter):
            used = self._live_counter(limit.key, now)
            if used is None:
                used = self._counters[limit.key] = _Used(0, now + limit.ttl)
            used.count += units
        elif isinstance(limit, Rate):
            self._tats[limit.key] = max(self._tats.get(limit.key, now), now) + (
                units * limit.interval
            )
        elif isinstance(limit, Concurrency):
            self._slots.setdefault(limit.key, {})[holder] = now + limit.lease

    def _live_counter(self, key: str, now: float) -> _Used | None:
        used = self._counters.get(key)
        return used if used is not None and used.expires > now else None

    def _live_slots(self, key: str, now: float) -> dict[str, float]:
        held = self._slots.get(key, {})
        for holder in [h for h, expires in held.items() if expires <= now]:
            del held[holder]
        return held

    def _sweep(self, now: float) -> None:
        self._since_sweep += 1
        if self._since_sweep < _SWEEP_EVERY:
            return
        self._since_sweep = 0
        self._counters = {key: used for key, used in self._counters.items() if used.expires > now}
        self._tats = {key: tat for key, tat in self._tats.items() if tat > now}
        for key in list(self._slots):
            if not self._live_slots(key, now):
                del self._slots[key]
        self._leases = {key: expires for key, expires in self._leases.items() if expires > now}
        self._ended = {key: until for key, until in self._ended.items() if until > now}

    async def refresh(self, slots: Sequence[Slot]) -> tuple[Slot, ...]:
        now = self._clock()
        lost = []
        for slot in slots:
            self._slots.setdefault(slot.limit.key, {})
            held = self._live_slots(slot.limit.key, now)
            if slot.holder not in held:
                lost.append(slot)
            held[slot.holder] = now + slot.limit.lease  # lapsed or not, it still runs
        return tuple(lost)

    async def release(self, slots: Sequence[Slot]) -> None:
        for slot in slots:
            self._slots.get(slot.limit.key, {}).pop(slot.holder, None)

    async def read(self, counter: Counter) -> int:
        used = self._live_counter(counter.key, self._clock())
        return used.count if used else 0

    async def beat(self, key: str, ttl: float) -> None:
        self._leases[key] = self._clock() + ttl

    async def renew(self, key: str, ttl: float) -> bool:
        now = self._clock()
        if self._leases.get(key, -math.inf) <= now:
            return False
        self._leases[key] = now + ttl
        if key in self._due:
            self._due[key] = now + ttl
        return True

    async def alive(self, key: str) -> bool:
        return self._leases.get(key, -math.inf) > self._clock()

    async def drop(self, key: str) -> None:
        self._leases.pop(key, None)

    async def watch(self, key: str, record: str, keep: float, lapses_in: float) -> None:
        now = self._clock()
        self._watched[key] = (record, now + keep)
        self._due[key] = now + lapses_in

    async def unwatch(self, key: str) -> None:
        self._watched.pop(key, None)
        self._due.pop(key, None)

    async def lapsed(self, most: int, claim: float) -> list[tuple[str, str]]:
        now = self._clock()
        for key in [k for k, (_, until) in self._watched.items() if until <= now]:
            await self.unwatch(key)
        found: list[tuple[str, str]] = []
        for key in [k for k, due in self._due.items() if due <= now][:most]:
            left = self._leases.get(key, -math.inf) - now
            if left > 0:
                self._due[key] = now + left
            elif key in self._watched:
                found.append((key, self._watched[key][0]))
                self._due[key] = now + claim
            else:
                del self._due[key]
        return found

    async def first_end(self, key: str, ttl: float) -> bool:
        now = self._clock()
        if self._ended.get(key, -math.inf) > now:
            return False
        self._ended[key] = now + ttl
        return True

    async def check(self) -> Health:
        return Health(ok=True)

    async def close(self) -> None:
        return None
