"""What `keyproxy keys status` reports: per route, the key's version, age and rotation state.

Read-only: the route's KV v2 secret (never its value into the report) and its rotation
journal (keyproxy.rotation.journal). A key is `overdue` when it is older than the route's
`max_age`; `keyproxy keys status` then exits non-zero so a monitor can alert.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from keyproxy import secret
from keyproxy.config import CommandRotator, Config, HttpRotator, ManualRotator, Route
from keyproxy.errors import VaultError
from keyproxy.rotation.engine import key_created
from keyproxy.rotation.journal import journal_path
from keyproxy.rotation.state import PHASE1, JournalError, JournalState, Step, iso
from keyproxy.vault import SecretNotFound, Vault


@dataclass(frozen=True)
class LastFailure:
    """The last failed rotation, as reported (times in ISO 8601)."""

    at: str | None
    step: str | None
    error: str | None


@dataclass(frozen=True)
class KeyStatus:
    """One route's entry; `as_dict()` is its JSON object, fields in this order
    (docs/rotation.md lists them). Times are ISO 8601 in UTC, durations seconds."""

    route: str
    owner: str | None
    secret: str  # mount/path of the key, never its value
    rotator: str | None
    every: float | None
    max_age: float | None
    version: int | None = None
    key_id: str | None = None
    fingerprint: str | None = None  # the key's (keyproxy.secret.fingerprint), as events name it
    created_at: str | None = None
    age: float | None = None
    rotated_by: str | None = None
    overdue: bool = False
    next_due: str | None = None
    last_rotation: str | None = None
    in_progress: Step | None = None  # a phase-1 step
    locked_by: str | None = None
    grace_until: str | None = None
    last_failure: LastFailure | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


async def report(
    config: Config, vault: Vault, clock: Callable[[], float] = time.time
) -> list[KeyStatus]:
    """One entry per route, in configuration order. Vault failures become `error`."""
    return [await _route(route, config, vault, clock()) for route in config.routes.values()]


async def _route(route: Route, config: Config, vault: Vault, now: float) -> KeyStatus:
    status = KeyStatus(
        route=route.name,
        owner=route.owner,
        secret=route.secret.name,
        rotator=_rotator_name(route),
        every=route.rotation.every if route.rotation else None,
        max_age=route.max_age,
    )
    try:
        status = await _with_key(status, route, vault, now)
        status = await _with_journal(status, route, config, vault, now)
    except (VaultError, JournalError) as exc:
        status = replace(status, error=str(exc))
    return status


async def _with_key(status: KeyStatus, route: Route, vault: Vault, now: float) -> KeyStatus:
    ref = route.secret
    try:
        data, version = await vault.read_kv(ref.mount, ref.path)
    except SecretNotFound:
        return replace(status, error="no key stored")
    value = data.get(ref.field)
    if isinstance(value, str):
        secret.register(value)  # never reported; registered in case an error quotes it
    created = await key_created(vault, route)
    status = replace(
        status,
        version=version,
        key_id=_text(data.get("key_id")),
        fingerprint=secret.fingerprint(value) if isinstance(value, str) else None,
        rotated_by=_text(data.get("rotated_by")),
    )
    if created is None:
        return status
    return replace(
        status,
        created_at=iso(created),
        age=round(now - created, 3),
        overdue=route.max_age is not None and now - created > route.max_age,
        next_due=None if status.every is None else iso(created + status.every),
    )


async def _with_journal(
    status: KeyStatus, route: Route, config: Config, vault: Vault, now: float
) -> KeyStatus:
    try:
        data, _ = await vault.read_kv(config.vault.kv_mount, journal_path(route.name))
    except SecretNotFound:
        return status
    journal = JournalState.from_data(data)
    lock, previous, failure = journal.lock, journal.previous, journal.last_failure
    return replace(
        status,
        in_progress=journal.step if journal.step in PHASE1 else None,
        locked_by=lock.owner if lock is not None and lock.expires_at > now else None,
        grace_until=None if previous is None else iso(previous.revoke_after),
        last_rotation=iso(journal.last_rotation),
        last_failure=None
        if failure is None
        else LastFailure(iso(failure.at), failure.step, failure.error),
    )


def _rotator_name(route: Route) -> str | None:
    if route.rotation is None:
        return None
    kinds = {HttpRotator: "http", CommandRotator: "command", ManualRotator: "manual"}
    return kinds[type(route.rotation.rotator)]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def failing(entries: Sequence[KeyStatus]) -> bool:
    """Whether a monitor should alert: a key past its max_age, or a key that cannot be read."""
    return any(e.overdue or e.error for e in entries)


__all__ = ["KeyStatus", "LastFailure", "failing", "report"]
