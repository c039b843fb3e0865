"""The typed state of key rotation: its steps, modes and results, and the journal record.

Pure: no I/O. keyproxy.rotation.engine drives the state machine over these types and keeps the
journal in Vault; keyproxy.rotation.status reads the journal for `keys status`.

The journal is stored (KV v2, JSON) in this shape, the one earlier versions wrote too:

    {"step": "grace", "attempt": "<hex>", "emergency": false, "base_version": 6,
     "started_at": <epoch>, "pending": null | {"key", "key_id", "created"},
     "previous": null | {"version", "revoke_after"[, "unrevoked"]}, "last_rotation": <epoch>,
     "rotations": 7, "last_failure": null | {"at", "step", "error"},
     "lock": null | {"owner", "expires_at"}}

Times are epoch seconds in Vault's clock. A field missing from a stored journal reads as its
default and is written back with it (null, false, 0, "idle"), which earlier versions read
exactly as they read a missing field. Keys this version does not know (a newer one may have
written them) are kept, at the top level and inside `pending`, `previous` and
`last_failure`, and written back unchanged; the lock is rewritten whole at every write.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from keyproxy.errors import KeyproxyError
from keyproxy.secret import Secret

_T = TypeVar("_T")


class Step(enum.StrEnum):
    """Where a route's rotation stands; the value is what the journal stores."""

    IDLE = "idle"
    CREATING = "creating"  # attempt id recorded; the upstream is asked for a key
    CREATED = "created"  # the new key is in the journal (pending), not verified yet
    VERIFIED = "verified"  # the new key works upstream; next, promote it
    GRACE = "grace"  # promoted; the previous key stays valid until revoke_after
    REVOKED = "revoked"  # the previous key is revoked upstream; next, destroy its version
    ABANDONING = "abandoning"  # the new key must not be promoted; it is being revoked


# Phase 1: from asking for a new key to its promotion. `keys status` calls it in progress.
PHASE1 = frozenset({Step.CREATING, Step.CREATED, Step.VERIFIED})


class Mode(enum.StrEnum):
    """Why a run was started: `rotate --due`, `rotate ROUTE`, `rotate ROUTE --emergency`."""

    DUE = "due"
    NOW = "now"
    EMERGENCY = "emergency"


class Result(enum.StrEnum):
    """What one run did to one route, as `keyproxy rotate` prints it (docs/rotation.md)."""

    ROTATED = "rotated"
    REVOKED = "revoked"
    ROTATED_REVOKED = "rotated+revoked"
    ROTATED_REVOKED_REVOKED = "rotated+revoked+revoked"  # emergency during a grace period
    NOT_DUE = "not_due"
    IN_GRACE = "in_grace"
    LOCKED = "locked"
    MANUAL = "manual"
    FAILED = "failed"

    @classmethod
    def of(cls, *, rotated: bool, revoked: int) -> Result:
        """A run that promoted a new key (or not) and revoked `revoked` old ones; `rotated`
        comes first whatever the order of the steps."""
        return cls("+".join(["rotated"] * rotated + ["revoked"] * revoked) or "not_due")


class JournalError(KeyproxyError):
    """A stored journal this version cannot act on (an unknown step, a missing record)."""


def iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


def parse_time(value: Any) -> float | None:
    """An epoch from a float or an ISO 8601 / RFC 3339 string (Vault's created_time)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


@dataclass(frozen=True)
class Lock:
    """Who holds the route's lock, and until when."""

    owner: str | None
    expires_at: float

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Lock:
        owner = data.get("owner")
        return cls(owner if isinstance(owner, str) else None, _time(data.get("expires_at")))

    def to_data(self) -> dict[str, Any]:
        return {"owner": self.owner, "expires_at": self.expires_at}


@dataclass(frozen=True)
class Pending:
    """The new key between its creation and its promotion (a Secret: its repr is redacted)."""

    key: Secret
    key_id: str | None
    created: float | None
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Pending | None:
        key = data.get("key")
        if not isinstance(key, str) or not key:
            return None
        rest = _unknown(data, ("key", "key_id", "created"))
        return cls(Secret(key), _text(data.get("key_id")), parse_time(data.get("created")), rest)

    def to_data(self) -> dict[str, Any]:
        known = {"key": self.key.reveal(), "key_id": self.key_id, "created": self.created}
        return {**self.extra, **known}


@dataclass(frozen=True)
class Previous:
    """The key version a promotion replaced, when it may be revoked upstream, and, once its
    revocation step ran, why it was not revoked (UNREVOKED_GONE, UNREVOKED_SAME_ID,
    UNREVOKED_CURRENT; None: it was, or not yet): kept so that a run resumed after that
    step says what it left."""

    version: int
    revoke_after: float
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    unrevoked: str | None = None

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Previous:
        rest = _unknown(data, ("version", "revoke_after", "unrevoked"))
        version, after = _count(data.get("version")), _time(data.get("revoke_after"))
        return cls(version, after, rest, _text(data.get("unrevoked")))

    def to_data(self) -> dict[str, Any]:
        known: dict[str, Any] = {"version": self.version, "revoke_after": self.revoke_after}
        if self.unrevoked is not None:  # only once the revocation step ran without revoking
            known["unrevoked"] = self.unrevoked
        return {**self.extra, **known}


# Why an old key was not revoked upstream: gone from Vault (nothing to revoke it with), or
# under the current key's id (a revocation by it could revoke the current key): failures,
# someone must revoke it by hand; or the current key again (rolled back to): kept.
UNREVOKED_GONE = "gone"
UNREVOKED_SAME_ID = "same_id"
UNREVOKED_CURRENT = "current"


@dataclass(frozen=True)
class Failure:
    """The last failed run: when, at which step (as written), and why."""

    at: float | None
    step: str | None  # text, not a Step: a newer version may have failed at a step of its own
    error: str | None
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Failure:
        rest = _unknown(data, ("at", "step", "error"))
        at, step, error = parse_time(data.get("at")), data.get("step"), data.get("error")
        return cls(at, _text(step), _text(error), rest)

    def to_data(self) -> dict[str, Any]:
        return {**self.extra, "at": self.at, "step": self.step, "error": self.error}


@dataclass(frozen=True)
class JournalState:
    """One route's journal as stored in Vault; `from_data` and `to_data` are its JSON form."""

    step: Step = Step.IDLE
    attempt: str | None = None  # the idempotency id a resumed `creating` sends again
    emergency: bool = False  # revoke the replaced key at once, no grace
    base_version: int = 0  # the key version current when the rotation started (0: none)
    started_at: float | None = None
    pending: Pending | None = None
    previous: Previous | None = None
    last_rotation: float | None = None
    rotations: int = 0
    last_failure: Failure | None = None
    lock: Lock | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> JournalState:
        return cls(
            step=_step(data.get("step") or Step.IDLE),
            attempt=_text(data.get("attempt")),
            emergency=bool(data.get("emergency")),
            base_version=_count(data.get("base_version")),
            started_at=parse_time(data.get("started_at")),
            pending=_record(Pending.from_data, data.get("pending")),
            previous=_record(Previous.from_data, data.get("previous")),
            last_rotation=parse_time(data.get("last_rotation")),
            rotations=_count(data.get("rotations")),
            last_failure=_record(Failure.from_data, data.get("last_failure")),
            lock=_record(Lock.from_data, data.get("lock")),
            extra=_unknown(data, _FIELDS),
        )

    def to_data(self) -> dict[str, Any]:
        known: dict[str, Any] = {
            "step": self.step.value,
            "attempt": self.attempt,
            "emergency": self.emergency,
            "base_version": self.base_version,
            "started_at": self.started_at,
            "pending": None if self.pending is None else self.pending.to_data(),
            "previous": None if self.previous is None else self.previous.to_data(),
            "last_rotation": self.last_rotation,
            "rotations": self.rotations,
            "last_failure": None if self.last_failure is None else self.last_failure.to_data(),
            "lock": None if self.lock is None else self.lock.to_data(),
        }
        return {**self.extra, **known}


_FIELDS = tuple(name for name in JournalState.__dataclass_fields__ if name != "extra")


def _record(parse: Callable[[Mapping[str, Any]], _T], value: Any) -> _T | None:
    """A record (a JSON object) parsed by `parse`; anything else reads as no record."""
    return parse(value) if isinstance(value, Mapping) else None


def _step(value: Any) -> Step:
    try:
        return Step(value)
    except (TypeError, ValueError):
        # A newer version's step, perhaps: acting on it as if it were another would be a guess.
        raise JournalError(f"unknown rotation step {str(value)[:40]!r} in the journal") from None


def _unknown(data: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in known}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _time(value: Any) -> float:
    """A deadline; a missing one has passed (earlier versions read it so too)."""
    return parse_time(value) or 0.0


def _count(value: Any) -> int:
    """A version or a count; earlier versions read a missing or null one as 0."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        raise JournalError("a version or count in the journal is not a number") from None


__all__ = [
    "PHASE1",
    "Failure",
    "JournalError",
    "JournalState",
    "Lock",
    "Mode",
    "Pending",
    "Previous",
    "Result",
    "Step",
    "iso",
    "parse_time",
]
