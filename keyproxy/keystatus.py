"""What `keyproxy keys status` reports: per route, the key's version, age and rotation state.

Read-only: the route's KV v2 secret (never its value into the report) and its rotation
journal (keyproxy.rotation). A key is `overdue` when it is older than the route's `max_age`;
`keyproxy keys status` then exits non-zero so a monitor can alert.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from keyproxy import rotation, secret
from keyproxy.config import Config, Route
from keyproxy.config.model import CommandRotator, HttpRotator, ManualRotator
from keyproxy.errors import VaultError
from keyproxy.rotation_state import iso, parse_time
from keyproxy.vault import SecretNotFound, Vault


async def report(
    config: Config, vault: Vault, clock: Callable[[], float] = time.time
) -> list[dict[str, Any]]:
    """One entry per route, in configuration order. Vault failures become `error`."""
    return [await _route(route, config, vault, clock()) for route in config.routes.values()]


async def _route(route: Route, config: Config, vault: Vault, now: float) -> dict[str, Any]:
    every = route.rotation.every if route.rotation else None
    entry: dict[str, Any] = {
        "route": route.name,
        "owner": route.owner,
        "secret": f"{route.secret.mount}/{route.secret.path}",
        "rotator": _rotator_name(route),
        "every": every,
        "max_age": route.max_age,
        "version": None,
        "key_id": None,
        "created_at": None,
        "age": None,
        "rotated_by": None,
        "overdue": False,
        "next_due": None,
        "last_rotation": None,
        "in_progress": None,
        "locked_by": None,
        "grace_until": None,
        "last_failure": None,
        "error": None,
    }
    try:
        await _key(route, vault, now, entry)
        await _journal(route, config, vault, now, entry)
    except VaultError as exc:
        entry["error"] = str(exc)
    return entry


async def _key(route: Route, vault: Vault, now: float, entry: dict[str, Any]) -> None:
    ref = route.secret
    try:
        data, version = await vault.read_kv(ref.mount, ref.path)
    except SecretNotFound:
        entry["error"] = "no key stored"
        return
    value = data.get(ref.field)
    if isinstance(value, str):
        secret.register(value)  # never reported; registered in case an error quotes it
    created = await rotation.key_created(vault, route)
    entry["version"] = version
    entry["key_id"] = data.get("key_id") if isinstance(data.get("key_id"), str) else None
    entry["rotated_by"] = (
        data.get("rotated_by") if isinstance(data.get("rotated_by"), str) else None
    )
    if created is not None:
        entry["created_at"] = iso(created)
        entry["age"] = round(now - created, 3)
        if route.max_age is not None:
            entry["overdue"] = now - created > route.max_age
        if entry["every"] is not None:
            entry["next_due"] = iso(created + entry["every"])


async def _journal(
    route: Route, config: Config, vault: Vault, now: float, entry: dict[str, Any]
) -> None:
    try:
        data, _ = await vault.read_kv(config.vault.kv_mount, rotation.journal_path(route.name))
    except SecretNotFound:
        return
    step = data.get("step") or "idle"
    entry["in_progress"] = step if step in ("creating", "created", "verified") else None
    lock = data.get("lock")
    if isinstance(lock, dict) and (parse_time(lock.get("expires_at")) or 0) > now:
        entry["locked_by"] = lock.get("owner")
    previous = data.get("previous")
    if isinstance(previous, dict):
        entry["grace_until"] = iso(parse_time(previous.get("revoke_after")))
    entry["last_rotation"] = iso(parse_time(data.get("last_rotation")))
    failure = data.get("last_failure")
    if isinstance(failure, dict):
        entry["last_failure"] = {
            "at": iso(parse_time(failure.get("at"))),
            "step": failure.get("step"),
            "error": failure.get("error"),
        }


def _rotator_name(route: Route) -> str | None:
    if route.rotation is None:
        return None
    kinds = {HttpRotator: "http", CommandRotator: "command", ManualRotator: "manual"}
    return kinds[type(route.rotation.rotator)]


def failing(entries: list[dict[str, Any]]) -> bool:
    """Whether a monitor should alert: a key past its max_age, or a key that cannot be read."""
    return any(e["overdue"] or e["error"] for e in entries)


__all__ = ["failing", "report"]
