"""The Valkey/Redis state store: limits shared by every worker and replica.

One round trip per decision. `take` runs one Lua script (`_TAKE`) over every limit the
request touches: it reads the server's clock (`TIME`, so the replicas' own clocks never
matter), checks each limit, and only if all admit does it write any of them, so a refused
request consumes nothing. Redis runs a script atomically, which makes `max_uses` exact
under any number of concurrent takers. Scripts are sent with EVALSHA and loaded again on
NOSCRIPT (a restarted or failed-over server) by redis-py's `AsyncScript`.

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
reconnects (the connection pool makes new connections on demand).
"""

from __future__ import annotations

import asyncio
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

# KEYS: one per limit. ARGV: units, holder, then per limit (kind, a, b):
#   counter 'c': cap, ttl ms         rate 'r': interval ms, burst         slot 's': limit, lease ms
#   lease 'l': 0, 0 (it must exist; nothing is taken from it)
# Returns {all allowed (1/0), then per limit: allowed, remaining, reset ms, retry-after ms}.
_TAKE = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local units = tonumber(ARGV[1])
local holder = ARGV[2]
local out = {1}
local new_tats = {}
for i, key in ipairs(KEYS) do
  local kind, a, b = ARGV[3 * i], tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  local allowed, remaining, reset, retry
  if kind == 'c' then
    local used = tonumber(redis.call('GET', key) or '0')
    local pttl = redis.call('PTTL', key)
    if pttl < 0 then pttl = b end
    allowed = used + units <= a
    remaining = allowed and (a - used - units) or math.max(0, a - used)
    reset = pttl
    retry = allowed and 0 or pttl
  elseif kind == 'r' then
    local tat = tonumber(redis.call('GET', key) or '0')
    if tat < now then tat = now end
    local new_tat = tat + units * a
    local allow_at = new_tat - b * a
    allowed = allow_at <= now
    if allowed then
      remaining = math.floor((now - allow_at) / a + 1e-9)
      reset, retry = new_tat - now, 0
    else
      remaining, reset, retry = 0, tat - now, allow_at - now
    end
    new_tats[i] = new_tat
  elseif kind == 'l' then
    allowed = redis.call('EXISTS', key) == 1
    remaining, reset, retry = 0, 0, 0
  else
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local held = redis.call('ZCARD', key)
    allowed = held < a
    remaining = allowed and (a - held - 1) or 0
    reset, retry = 0, 0
    if not allowed then
      local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      reset = tonumber(first[2]) - now
      retry = reset
    end
  end
  if not allowed then out[1] = 0 end
  out[#out + 1] = allowed and 1 or 0
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retry
end
if out[1] == 0 then return out end
for i, key in ipairs(KEYS) do
  local kind, b = ARGV[3 * i], tonumber(ARGV[3 * i + 2])
  if kind == 'c' then
    redis.call('INCRBY', key, units)
    if redis.call('PTTL', key) < 0 then redis.call('PEXPIRE', key, math.ceil(b)) end
  elseif kind == 'r' then
    local keep = math.ceil(new_tats[i] - now) + 1
    redis.call('SET', key, string.format('%.3f', new_tats[i]), 'PX', keep)
  elseif kind == 's' then
    redis.call('ZADD', key, now + b, holder)
    if redis.call('PTTL', key) < b then redis.call('PEXPIRE', key, math.ceil(b)) end
  end
end
return out
"""

# KEYS: slot sets. ARGV: per key (holder, lease ms). Returns per key 1 if the slot was lost.
_REFRESH = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local out = {}
for i, key in ipairs(KEYS) do
  local holder, lease = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  local score = redis.call('ZSCORE', key, holder)
  if score and tonumber(score) > now then
    redis.call('ZADD', key, now + lease, holder)
    if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, math.ceil(lease)) end
    out[i] = 0
  else
    if score then redis.call('ZREM', key, holder) end
    out[i] = 1
  end
end
return out
"""

# KEYS: slot sets. ARGV: the holder in each.
_RELEASE = """
for i, key in ipairs(KEYS) do redis.call('ZREM', key, ARGV[i]) end
return 0
"""


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
        del options["retry"]  # RedisCluster retries per node and slot move; bounded below
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
        self._take = self._redis.register_script(_TAKE)
        self._refresh = self._redis.register_script(_REFRESH)
        self._release = self._redis.register_script(_RELEASE)
        self._deadline = settings.timeout * 3
        # At most `max_connections` calls at once, whatever the mode (the pools of Sentinel
        # and Cluster clients refuse rather than wait when full); the rest queue here,
        # within the same deadline.
        self._gate = asyncio.Semaphore(settings.max_connections)
        self._failures = 0
        self._down_until = 0.0
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
            self._failures += 1
            backoff = min(_BACKOFF_MAX, _BACKOFF_START * 2 ** (self._failures - 1))
            self._down_until = time.monotonic() + secrets.SystemRandom().uniform(0, backoff)
            raise StoreUnavailable(f"state store unavailable: {type(error).__name__}") from error
        self._failures = 0
        return result

    async def take(self, limits: Sequence[Limit], units: int = 1) -> Decision:
        if not limits:
            return Decision(())
        started = time.perf_counter()
        holder = uuid.uuid4().hex
        keys: list[str] = []
        args: list[str | int | float] = [units, holder]
        for limit in limits:
            if isinstance(limit, Counter):
                keys.append(self._key("c", limit.key))
                args += ["c", limit.cap, limit.ttl * 1000]
            elif isinstance(limit, Rate):
                keys.append(self._key("r", limit.key))
                args += ["r", repr(limit.interval * 1000), limit.burst]
            elif isinstance(limit, Lease):
                keys.append(self._key("l", limit.key))
                args += ["l", 0, 0]
            else:
                keys.append(self._key("s", limit.key))
                args += ["s", limit.limit, limit.lease * 1000]
        try:
            reply = await self._call(lambda: self._take(keys=keys, args=args))
        except StoreUnavailable:
            self.stats.observe(time.perf_counter() - started, error=True)
            return _unanswered(limits)
        self.stats.observe(time.perf_counter() - started, error=False)
        outcomes = tuple(
            Outcome(
                limit,
                allowed=bool(reply[1 + 4 * i]),
                remaining=int(reply[2 + 4 * i]),
                reset=int(reply[3 + 4 * i]) / 1000,
                retry_after=int(reply[4 + 4 * i]) / 1000,
            )
            for i, limit in enumerate(limits)
        )
        slots = tuple(Slot(limit, holder) for limit in limits if isinstance(limit, Concurrency))
        return Decision(outcomes, slots if reply[0] else ())

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
        try:
            holders = [slot.holder for slot in slots]
            await self._call(lambda: self._release(keys=keys, args=holders))
        except StoreUnavailable:
            return  # the slots expire with their leases

    async def read(self, counter: Counter) -> int:
        value = await self._call(lambda: self._redis.get(self._key("c", counter.key)))
        return int(value or 0)

    async def beat(self, key: str, ttl: float) -> None:
        px = max(1, round(ttl * 1000))
        await self._call(lambda: self._redis.set(self._key("l", key), b"1", px=px))

    async def renew(self, key: str, ttl: float) -> bool:
        px = max(1, round(ttl * 1000))
        # XX: set only if it exists, so a lapsed lease is never brought back.
        renewed = await self._call(
            lambda: self._redis.set(self._key("l", key), b"1", px=px, xx=True)
        )
        return bool(renewed)

    async def alive(self, key: str) -> bool:
        return bool(await self._call(lambda: self._redis.exists(self._key("l", key))))

    async def drop(self, key: str) -> None:
        await self._call(lambda: self._redis.delete(self._key("l", key)))

    async def check(self) -> Health:
        # Readiness asks even while backing off: it is how an operator sees recovery.
        try:
            async with asyncio.timeout(self._deadline):
                await self._redis.ping()
        except _FAULTS as error:
            return Health(ok=False, detail=f"state store unreachable: {type(error).__name__}")
        self._failures = 0
        self._down_until = 0.0
        return Health(ok=True)

    async def close(self) -> None:
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
