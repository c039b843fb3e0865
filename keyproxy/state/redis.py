"""The Valkey/Redis state store: limits shared by every worker and replica.

One script per decision. `take` runs one Lua script (`scripts.TAKE`) over every limit the
request touches: it reads the server's clock (`TIME`, so the replicas' own clocks never
matter), checks each limit, and only if all admit does it write any of them, so a refused
request consumes nothing. Redis runs a script atomically, which makes `max_uses` exact
under any number of concurrent takers. The decisions of one event-loop turn share one
round trip: one write of their EVALSHAs, one read of their replies (keyproxy.state.batch),
and so do the releases of their concurrency slots; on Cluster each is a call of its own.
Scripts are loaded again on NOSCRIPT (a restarted or failed-over server), by the batch or
by redis-py's `AsyncScript`. A connection that meets READONLY (still open to a primary that
became a replica, after a failover behind the same address) is closed, by the batch or by
redis-py (`retry_on_error`), so the next call reaches the server the address leads to now.
The scripts are in keyproxy.state.scripts.

Why one script and not the `limits` package: `limits` keeps each limit in its own Redis
call (one `hit` per limit, each a round trip or a script of its own), so a request with a
token counter, two rate limits and a concurrency cap would cost four round trips, and a
request refused by the third limit would already have consumed the first two. One script
keeps the decision all-or-nothing and its latency that of one round trip.

Keys. Every key is `{<prefix>}:<kind>:<limit key>`. The braces are a Cluster hash tag:
all of keyproxy's keys live in one hash slot, which a multi-key script requires (the keys
one decision touches have nothing else in common: a token, an identity, a route). On
Cluster this buys failover, not sharding; one decision is a few small writes, far below
what one primary serves.

Faults. Socket connect and read timeouts are `timeout` (250 ms by default), and a hard
deadline of three times that bounds a whole call. After a failure the store stays "down"
for a backoff that doubles up to `_BACKOFF_MAX` with full jitter: decisions during it answer
at once from each limit's `on_store_error` without touching the network, so an outage
neither stalls requests nor hammers the server, and the first call after the backoff
reconnects (the connection pool makes new connections on demand). A round trip shared by
several decisions counts as one failure, however many decisions it carried.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.connection
import redis.asyncio.sentinel
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider

from keyproxy.config import RedisSettings
from keyproxy.state.batch import ScriptBatch
from keyproxy.state.scripts import LAPSED, REFRESH, RELEASE, RENEW, TAKE, UNWATCH, WATCH
from keyproxy.state.store import (
    Concurrency,
    Counter,
    Decision,
    Health,
    Lease,
    Limit,
    OnStoreError,
    Outcome,
    Rate,
    Slot,
    StateStore,
    StoreStats,
    StoreUnavailable,
)

_BACKOFF_START = 0.05
_BACKOFF_MAX = 2.0

# The faults a call to the store can meet; anything else is a bug and is let through.
_FAULTS = (redis.exceptions.RedisError, OSError, TimeoutError)

_T = TypeVar("_T")

_ERROR_REPLY = redis.exceptions.ResponseError  # a batched call's own error, returned


class _PasswordFile(CredentialProvider):
    """The password read from its file at each new connection, so a rotated password is
    used from the next reconnect on, and the value is kept nowhere else."""

    def __init__(self, path: Path, username: str | None) -> None:
        self._path = path
        self._username = username
        self.get_credentials()  # an unreadable file fails when the store is made

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self._path.read_text(encoding="utf-8").strip()
        return (self._username, password) if self._username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


def _client(settings: RedisSettings) -> tuple[Any, list[Any]]:
    """The redis-py client for `settings` (a Redis, a Sentinel primary, or a RedisCluster),
    and the other clients it uses (the Sentinels), to be closed with it."""
    options: dict[str, Any] = {
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.timeout,
        # One attempt per call: the store's own backoff decides when to try again.
        "retry": Retry(NoBackoff(), 0),
        # A connection that met READONLY reaches a replica (a failover behind the same
        # address): closed, so the next call connects to whichever server that is now.
        "retry_on_error": [redis.exceptions.ReadOnlyError],
    }
    if settings.password_file is not None:
        username = settings.username or redis.asyncio.connection.parse_url(settings.url).get(
            "username"
        )
        options["credential_provider"] = _PasswordFile(settings.password_file, username)
    elif settings.username is not None:
        options["username"] = settings.username
    if settings.ca_file is not None:
        if not settings.url.lower().startswith("rediss://"):
            raise ValueError("a CA file for the state store needs a rediss:// URL")
        options["ssl_ca_certs"] = str(settings.ca_file)
    if settings.cluster:
        # RedisCluster retries per node and slot move (bounded below), and follows a failover.
        del options["retry"], options["retry_on_error"]
        return redis.asyncio.cluster.RedisCluster.from_url(settings.url, **options), []
    if settings.sentinels:
        # The URL gives the scheme (TLS or not), the user and the password for the primary.
        parsed = redis.asyncio.connection.parse_url(settings.url)
        for name in ("username", "password"):
            if "credential_provider" not in options and name not in options and parsed.get(name):
                options[name] = parsed[name]
        ssl = parsed.get("connection_class") is redis.asyncio.SSLConnection
        sentinel = redis.asyncio.sentinel.Sentinel(
            settings.sentinels,
            sentinel_kwargs={k: v for k, v in options.items() if k.startswith("socket_")},
            ssl=ssl,
            **options,
        )
        return sentinel.master_for(settings.service_name), sentinel.sentinels
    return redis.asyncio.Redis.from_url(settings.url, **options), []


class RedisStore(StateStore):
    """Limits counted in Valkey/Redis, one Lua script per decision."""

    def __init__(self, settings: RedisSettings) -> None:
        self._settings = settings
        self._redis, self._others = _client(settings)
        self._take = self._redis.register_script(TAKE)
        # Decisions (and releases) of one loop turn share a round trip (keyproxy.state.batch).
        # A Cluster client has a pool per node: there each is a call of its own.
        self._takes = self._releases = None
        if not settings.cluster:
            self._takes = ScriptBatch(self._redis, TAKE, self._call)
            self._releases = ScriptBatch(self._redis, RELEASE, self._call)
        self._refresh = self._redis.register_script(REFRESH)
        self._release = self._redis.register_script(RELEASE)
        self._watch = self._redis.register_script(WATCH)
        self._unwatch = self._redis.register_script(UNWATCH)
        self._lapsed = self._redis.register_script(LAPSED)
        self._renew = self._redis.register_script(RENEW)
        self._deadline = settings.timeout * 3
        # At most `max_connections` calls at once, whatever the mode (the pools of Sentinel
        # and Cluster clients refuse rather than wait when full); the rest queue here,
        # within the same deadline.
        self._gate = asyncio.Semaphore(settings.max_connections)
        self._failures = 0
        self._down_until = 0.0
        self._id = uuid.uuid4().hex
        self._holders = itertools.count()
        self.stats = StoreStats()

    def _key(self, kind: str, key: str) -> str:
        return f"{{{self._settings.prefix}}}:{kind}:{key}"

    async def _call(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run one store call within the deadline, tracking failures for the backoff."""
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("state store unavailable (backing off after a failure)")
        try:
            async with asyncio.timeout(self._deadline), self._gate:
                result = await call()
        except _FAULTS as error:
            raise self._failed(error) from error
        self._failures = 0
        return result

    def _failed(self, error: BaseException) -> StoreUnavailable:
        """Back off after a failure; the error to raise for it."""
        self._failures += 1
        backoff = min(_BACKOFF_MAX, _BACKOFF_START * 2 ** (self._failures - 1))
        self._down_until = time.monotonic() + secrets.SystemRandom().uniform(0, backoff)
        return StoreUnavailable(f"state store unavailable: {type(error).__name__}")

    async def take(self, limits: Sequence[Limit], units: int = 1) -> Decision:
        if not limits:
            return Decision(())
        started = time.perf_counter()
        # A slot's holder: unique across processes by the store's random id, and cheaper
        # than a random id per decision (a system call each).
        holder = f"{self._id}.{next(self._holders)}"
        keys: list[str] = []
        args: list[str | int] = [units, holder]
        for limit in limits:
            if isinstance(limit, Counter):
                keys.append(self._key("c", limit.key))
                args += ["c", limit.cap, repr(limit.ttl * 1000)]
            elif isinstance(limit, Rate):
                keys.append(self._key("r", limit.key))
                args += ["r", repr(limit.interval * 1000), limit.burst]
            elif isinstance(limit, Lease):
                keys.append(self._key("l", limit.key))
                args += ["l", 0, 0]
            else:
                keys.append(self._key("s", limit.key))
                args += ["s", limit.limit, repr(limit.lease * 1000)]
        try:
            if self._takes is None:
                reply = await self._call(lambda: self._take(keys=keys, args=args))
            else:
                reply = await self._takes.run(keys, args)
                if isinstance(reply, _ERROR_REPLY):
                    raise self._failed(reply) from reply  # this decision's own error
        except StoreUnavailable:
            self.stats.observe(time.perf_counter() - started, error=True)
            return _unanswered(limits)
        self.stats.observe(time.perf_counter() - started, error=False)
        # The reply holds integers (Lua numbers are sent as integer replies). Positional
        # arguments (limit, allowed, remaining, reset, retry_after) and a list: half the cost
        # of keywords and a generator, on every request.
        outcomes = [
            Outcome(
                limit,
                reply[1 + 4 * i] == 1,
                reply[2 + 4 * i],
                reply[3 + 4 * i] / 1000,
                reply[4 + 4 * i] / 1000,
            )
            for i, limit in enumerate(limits)
        ]
        if not reply[0]:
            return Decision(tuple(outcomes))
        slots = tuple(Slot(limit, holder) for limit in limits if isinstance(limit, Concurrency))
        return Decision(tuple(outcomes), slots)

    async def refresh(self, slots: Sequence[Slot]) -> tuple[Slot, ...]:
        if not slots:
            return ()
        keys = [self._key("s", slot.limit.key) for slot in slots]
        args: list[str | float] = []
        for slot in slots:
            args += [slot.holder, slot.limit.lease * 1000]
        lost = await self._call(lambda: self._refresh(keys=keys, args=args))
        return tuple(slot for slot, gone in zip(slots, lost, strict=True) if gone)

    async def release(self, slots: Sequence[Slot]) -> None:
        if not slots:
            return
        keys = [self._key("s", slot.limit.key) for slot in slots]
        holders = [slot.holder for slot in slots]
        try:
            if self._releases is None:
                await self._call(lambda: self._release(keys=keys, args=holders))
            elif isinstance(reply := await self._releases.run(keys, holders), _ERROR_REPLY):
                self._failed(reply)
        except StoreUnavailable:
            return  # the slots expire with their leases

    async def read(self, counter: Counter) -> int:
        value = await self._call(lambda: self._redis.get(self._key("c", counter.key)))
        if value is None:
            return 0
        # INCRBY writes a decimal count below 2**63; anything else another writer put there.
        if not (value.isdigit() and len(value) <= 19):
            raise StoreUnavailable("state store unavailable: a counter holds other than a count")
        return int(value)

    async def beat(self, key: str, ttl: float) -> None:
        px = max(1, round(ttl * 1000))
        await self._call(lambda: self._redis.set(self._key("l", key), b"1", px=px))

    async def renew(self, key: str, ttl: float) -> bool:
        px = max(1, round(ttl * 1000))
        # Only if it exists, so a lapsed lease is never brought back; a watched one's due
        # time moves with it (scripts.RENEW).
        keys = [self._key("l", key), self._registry()[2]]
        return bool(await self._call(lambda: self._renew(keys=keys, args=[px, key])))

    async def alive(self, key: str) -> bool:
        return bool(await self._call(lambda: self._redis.exists(self._key("l", key))))

    async def drop(self, key: str) -> None:
        await self._call(lambda: self._redis.delete(self._key("l", key)))

    def _registry(self) -> list[str]:
        """The watch registry's keys: records, kept, due (see keyproxy.state.scripts)."""
        return [self._key("w", "records"), self._key("w", "kept"), self._key("w", "due")]

    async def watch(self, key: str, record: str, keep: float, lapses_in: float) -> None:
        args = [key, record, max(1, round(keep * 1000)), max(1, round(lapses_in * 1000))]
        await self._call(lambda: self._watch(keys=self._registry(), args=args))

    async def unwatch(self, key: str) -> None:
        await self._call(lambda: self._unwatch(keys=self._registry(), args=[key]))

    async def lapsed(self, most: int, claim: float) -> list[tuple[str, str]]:
        args = [self._key("l", ""), most, max(1, round(claim * 1000))]
        found = list(await self._call(lambda: self._lapsed(keys=self._registry(), args=args)))
        # A record that is not UTF-8 (planted by a writer of the store) reaches the caller
        # as text it cannot read, never as an error that would stop its sweep.
        texts = [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in found]
        return list(zip(texts[::2], texts[1::2], strict=True))

    async def first_end(self, key: str, ttl: float) -> bool:
        px = max(1, round(ttl * 1000))
        marked = await self._call(
            lambda: self._redis.set(self._key("e", key), b"1", px=px, nx=True)
        )
        return bool(marked)

    async def check(self) -> Health:
        # Readiness asks even while backing off: it is how an operator sees recovery. A write,
        # not a PING: a server that answers but refuses writes (out of memory, a replica, an
        # ACL, a Cluster node that does not own the slot) decides nothing either.
        try:
            async with asyncio.timeout(self._deadline):
                await self._redis.set(self._key("h", "ready"), b"1", px=10_000)
        except redis.exceptions.ResponseError as error:
            return Health(ok=False, detail=f"state store refuses writes: {type(error).__name__}")
        except _FAULTS as error:
            return Health(ok=False, detail=f"state store unreachable: {type(error).__name__}")
        self._failures = 0
        self._down_until = 0.0
        return Health(ok=True)

    async def close(self) -> None:
        for batch in (self._takes, self._releases):
            if batch is not None:
                await batch.close()
        for client in [self._redis, *self._others]:
            await client.aclose()


def _unanswered(limits: Sequence[Limit]) -> Decision:
    """The decision when the store did not answer: each limit by its `on_store_error`."""
    return Decision(
        tuple(
            Outcome(
                limit,
                allowed=limit.on_store_error is OnStoreError.ALLOW,
                remaining=0,
                reset=0.0,
                retry_after=1.0,
                store_error=True,
            )
            for limit in limits
        )
    )


__all__ = ["RedisSettings", "RedisStore"]
