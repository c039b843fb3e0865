"""The configuration's state store settings (the `state:` section) and the limits counted in
the store (a route's or a policy's `limits:`), as frozen objects; compiled by
keyproxy.config.limits and keyproxy.config.sections. The reference is docs/configuration.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class RedisSettings:
    """How to reach the Valkey/Redis state store (the `state:` section).

    `url` is `redis://`, `rediss://` (TLS) or `unix://`, and may carry `user:password@`.
    `username` and `password_file` override it (the password is read from the file, so it
    never appears in argv or the configuration). With `sentinels`, the primary of
    `service_name` is found through them (the URL then gives only the scheme, user, and
    password); with `cluster`, `url` is any node of the Cluster.
    """

    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str = "keyproxy"
    cluster: bool = False
    timeout: float = 0.25
    max_connections: int = 64
    prefix: str = "keyproxy"


# Who a limit counts: one workload identity (issuer and subject), one task of one identity,
# one token, or everyone on the route together.
LimitPer = Literal["identity", "task", "token", "route"]


@dataclass(frozen=True)
class RateLimit:
    """`requests` per `window` seconds, `burst` of them at once, counted `per` ... (GCRA)."""

    name: str
    per: LimitPer
    requests: int
    window: float
    burst: int
    on_store_error: Literal["deny", "allow"] = "deny"


@dataclass(frozen=True)
class ConcurrencyLimit:
    """At most `max` requests in flight `per` ...; a slot is leased for `lease` seconds."""

    name: str
    per: LimitPer
    max: int
    lease: float = 30.0
    on_store_error: Literal["deny", "allow"] = "deny"


@dataclass(frozen=True)
class Limits:
    """The limits of one route or one policy."""

    rate: tuple[RateLimit, ...] = ()
    concurrency: tuple[ConcurrencyLimit, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.rate or self.concurrency)

    def all(self) -> tuple[RateLimit | ConcurrencyLimit, ...]:
        return (*self.rate, *self.concurrency)
