"""Key rotation: a crash-safe state machine whose only state is a journal in Vault.

Each route with a `rotation` has a journal at KV v2 `<kv_mount>/keyproxy/state/rotation/<route>`.
It holds the lock (owner, expiry) and the step; every write is a check-and-set on the version
this runner last wrote, so a runner that lost its lock to a takeover fails its next write and
stops. A lock whose expiry has passed is taken over, and the new owner resumes from the step.

    idle ──lock──▶ creating ──create(attempt)──▶ created ──verify──▶ verified
      ▲                                            │ verify fails: revoke the new key
      │                                            ▼
      │                                        (abandoned: back to idle, failure recorded)
      │        verified ──promote: new KV version of the key (CAS on the version at start)──▶
      │        grace ──(grace passed, or --emergency)──revoke old key──▶ revoked
      └─────── revoked ──destroy the old KV version──▶ idle

A crash at any point leaves the old key current and valid (before promotion) or the new key
current with the old one still valid until revoked (after), so there is never zero current
keys and never two. `creating` is resumed by calling create again with the same attempt id,
which an idempotent upstream answers with the same key (adopted, not orphaned).

KEYPROXY_FAILPOINT=after:<step> (test-only) SIGKILLs the process right after that step:
lock, create, record, verify, promote, grace, revoke, revoked, retire.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from keyproxy import rotators, secret
from keyproxy.config import Config, Route
from keyproxy.config.model import ManualRotator
from keyproxy.errors import KeyproxyError, VaultError
from keyproxy.rotators import RotatorError, UpstreamKey
from keyproxy.secret import Secret
from keyproxy.upstream import UpstreamSessions
from keyproxy.vault import CasConflict, SecretNotFound, Vault, announce_key_change

log = structlog.get_logger("keyproxy.rotation")

STATE_PATH = "keyproxy/state/rotation"
FAILPOINT_ENV = "KEYPROXY_FAILPOINT"
_PHASE1 = ("creating", "created", "verified")
# Clock differences below this are within what Vault's clock (whole seconds) can show.
_CLOCK_TOLERANCE = 2.0
# Journal writes between recording a new key and promoting it are fewer than this.
_PENDING_VERSIONS = 8


class RotationError(KeyproxyError):
    """A rotation could not proceed (lost lock, key changed underneath, wrong route)."""


@dataclass(frozen=True)
class Outcome:
    """What one run did to one route. `failed` outcomes make `keyproxy rotate` exit 1."""

    route: str
    result: str  # rotated, revoked, rotated+revoked, not_due, in_grace, locked, manual, failed
    detail: str = ""
    version: int | None = None

    @property
    def failed(self) -> bool:
        return self.result == "failed"


def failpoint(step: str) -> None:
    """Test-only crash injection: die by SIGKILL right after `step` if asked to."""
    if os.environ.get(FAILPOINT_ENV) == f"after:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


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


class Journal:
    """One route's journal, held under its lock by this runner."""

    def __init__(
        self,
        vault: Vault,
        mount: str,
        path: str,
        *,
        owner: str,
        lease: float,
        clock: Callable[[], float],
    ) -> None:
        self._vault, self._mount, self._path = vault, mount, path
        self._owner, self._lease, self._clock = owner, lease, clock
        self.data: dict[str, Any] = {}
        self.version = 0

    async def load(self) -> None:
        try:
            self.data, self.version = await self._vault.read_kv(self._mount, self._path)
        except SecretNotFound:
            self.data, self.version = {}, 0
        pending = self.data.get("pending")
        if isinstance(pending, dict) and isinstance(pending.get("key"), str):
            secret.register(pending["key"])

    @property
    def step(self) -> str:
        return str(self.data.get("step") or "idle")

    def held_by_other(self) -> str | None:
        lock = self.data.get("lock")
        if not isinstance(lock, dict) or lock.get("owner") == self._owner:
            return None
        expires = parse_time(lock.get("expires_at")) or 0.0
        return str(lock.get("owner")) if expires > self._clock() else None

    async def save(self, *, release: bool = False, **changes: Any) -> None:
        """Write the journal with `changes` (check-and-set), renewing or releasing the lock."""
        data = {**self.data, **changes}
        data["lock"] = (
            None if release else {"owner": self._owner, "expires_at": self._clock() + self._lease}
        )
        try:
            self.version = await self._vault.write_kv(
                self._mount, self._path, data, cas=self.version
            )
        except CasConflict:
            raise RotationError("lost the rotation lock to another runner") from None
        self.data = data


class Rotations:
    """Rotate, store and report the keys of every route of one configuration."""

    def __init__(
        self,
        config: Config,
        vault: Vault,
        sessions: UpstreamSessions,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Rotator calls go through the route's egress fence, like the proxy's own requests.
        self.config, self.vault, self._sessions, self._local = config, vault, sessions, clock
        # Deadlines in the journal (lock expiry, end of grace) are compared by every runner:
        # they are kept in Vault's time, which all runners share, whatever their own clocks.
        self._offset = 0.0
        self.owner = owner or (f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}")

    def _clock(self) -> float:
        return self._local() + self._offset

    async def _sync_clock(self) -> None:
        """Follow Vault's clock when ours is off by more than Vault's one-second resolution
        can tell; a host in sync keeps its own (finer) clock."""
        try:
            # server_time_utc is whole seconds: the true time lies up to 1 s after it.
            estimate = await self.vault.server_time() + 0.5 - self._local()
        except VaultError as exc:
            log.warning("rotation.vault_time_unavailable", error=str(exc))
            return
        self._offset = estimate if abs(estimate) > _CLOCK_TOLERANCE else 0.0
        if self._offset:
            log.warning("rotation.clock_skew", seconds=round(self._offset, 1))

    # ------------------------------------------------------------------ entry points

    async def run_due(self) -> list[Outcome]:
        """Every rotated route: finish interrupted work, revoke old keys past their grace,
        and rotate keys older than `every`."""
        routes = [r for r in self.config.routes.values() if r.rotation is not None]
        return [await self._run(route, "due") for route in routes]

    async def rotate(self, name: str, emergency: bool = False) -> Outcome:
        """Rotate one route now; with `emergency` the old key is revoked at once."""
        route = self._route(name)
        if route.rotation is None:
            return Outcome(name, "failed", "the route has no rotation configured")
        outcome = await self._run(route, "emergency" if emergency else "now")
        if outcome.result == "locked":
            # Asked for by name (a leak, perhaps): not done is a failure, not a skip.
            return Outcome(name, "failed", f"not rotated: the lock is {outcome.detail}")
        return outcome

    async def put(self, name: str, value: str, key_id: str | None = None) -> int:
        """Store `value` as the route's new key version (manual rotation or import)."""
        route = self._route(name)
        if not value or not secret.is_clean(value):
            raise RotationError("the key is empty or has whitespace or control characters")
        secret.register(value)
        journal = await self._journal(route)
        if (holder := journal.held_by_other()) is not None:
            raise RotationError(f"a rotation by {holder} holds the lock; try again later")
        if journal.step in _PHASE1 or journal.step in ("grace", "revoked"):
            # During grace the previous key is still to be revoked upstream; a key stored now
            # would leave the one in between valid there with no record.
            raise RotationError(
                f"a rotation is in progress (step {journal.step}): run keyproxy rotate {name}"
            )
        await journal.save()
        try:
            version = await self._store(
                route, UpstreamKey(Secret(value), key_id), f"keys put ({self.owner})"
            )
        except BaseException:
            await journal.save(release=True)
            raise
        await journal.save(release=True, last_rotation=self._clock())
        log.info("rotation.key_put", route=name, version=version)
        return version

    # ------------------------------------------------------------------ the state machine

    async def _run(self, route: Route, mode: str) -> Outcome:
        await self._sync_clock()
        try:
            journal = await self._journal(route)
            if (holder := journal.held_by_other()) is not None:
                return Outcome(route.name, "locked", f"held by {holder}")
            if mode == "due" and (idle := await self._idle_outcome(route, journal)) is not None:
                return idle  # nothing to do: no lock taken, no journal write
        except Exception as exc:  # noqa: BLE001  # one route's failure must not stop the others
            log.warning("rotation.failed", route=route.name, error=str(exc))
            return Outcome(route.name, "failed", f"cannot read the rotation state: {exc}")
        if (refused := await self._lock(route, journal)) is not None:
            return refused
        try:
            failpoint("lock")
            return await self._drive(route, journal, mode)
        except Exception as exc:  # noqa: BLE001  # recorded, the lock released, reported
            log.warning("rotation.failed", route=route.name, step=journal.step, error=str(exc))
            failure = {"at": self._clock(), "step": journal.step, "error": str(exc)}
            try:
                await journal.save(release=True, last_failure=failure)
            except (VaultError, RotationError) as again:
                log.warning("rotation.unlock_failed", route=route.name, error=str(again))
            return Outcome(route.name, "failed", str(exc))

    async def _lock(self, route: Route, journal: Journal) -> Outcome | None:
        """Take (or take over) the route's lock; the outcome if that failed."""
        try:
            await journal.save()
        except RotationError:
            return Outcome(route.name, "locked", "another runner took the lock first")
        except VaultError as exc:
            return Outcome(route.name, "failed", f"cannot take the rotation lock: {exc}")
        return None

    async def _drive(self, route: Route, journal: Journal, mode: str) -> Outcome:
        assert route.rotation is not None  # callers check
        done: list[str] = []
        if mode == "emergency" and journal.step != "idle":
            await journal.save(emergency=True)
        if journal.step in ("grace", "revoked"):
            revoke_after = parse_time(journal.data["previous"].get("revoke_after")) or 0.0
            if mode == "emergency" or journal.step == "revoked" or self._clock() >= revoke_after:
                await self._phase2(route, journal)
                done.append("revoked")
            elif mode == "now":
                raise RotationError(
                    f"the previous key is in its grace period until {iso(revoke_after)};"
                    " use --emergency to revoke it now"
                )
            else:
                await journal.save(release=True)
                return Outcome(route.name, "in_grace", f"old key revoked after {iso(revoke_after)}")
        if isinstance(route.rotation.rotator, ManualRotator):
            await journal.save(release=True)
            if mode != "due":
                raise RotationError("manual rotator: store a new key with keyproxy keys put")
            due = await self._age(route) >= (route.rotation.every or float("inf"))
            return Outcome(route.name, "manual", "key is due: keys put" if due else "")
        if journal.step == "abandoning":
            # A run died while compensating: finish revoking the key it was abandoning.
            pending = journal.data["pending"]
            await self._rotator(route).revoke(
                UpstreamKey(Secret(pending["key"]), pending.get("key_id"))
            )
            await journal.save(step="idle", pending=None)
        resume = journal.step in _PHASE1
        if journal.step == "idle" and (mode != "due" or await self._age(route) >= _every(route)):
            await journal.save(
                step="creating",
                attempt=uuid.uuid4().hex,
                emergency=mode == "emergency",
                base_version=await self._current_version(route),
                started_at=self._clock(),
                last_failure=None,
            )
            resume = True
        if resume:
            await self._phase1(route, journal)
            done.insert(0, "rotated")
            if journal.data.get("emergency") and journal.step == "grace":
                await self._phase2(route, journal)
                done.append("revoked")
        await journal.save(release=True)
        version = await self._current_version(route)
        return Outcome(route.name, "+".join(done) or "not_due", version=version)

    async def _idle_outcome(self, route: Route, journal: Journal) -> Outcome | None:
        """For --due: the outcome when there is plainly nothing to do, else None. Checked
        again under the lock, since another runner may act in between."""
        assert route.rotation is not None  # callers check
        if journal.step in _PHASE1 or journal.step == "revoked":
            return None
        if journal.step == "grace":
            revoke_after = parse_time(journal.data["previous"].get("revoke_after")) or 0.0
            if self._clock() >= revoke_after:
                return None
            return Outcome(route.name, "in_grace", f"old key revoked after {iso(revoke_after)}")
        age = await self._age(route)
        if isinstance(route.rotation.rotator, ManualRotator):
            due = age >= (route.rotation.every or float("inf"))
            return Outcome(route.name, "manual", "key is due: keys put" if due else "")
        return Outcome(route.name, "not_due") if age < _every(route) else None

    async def _phase1(self, route: Route, journal: Journal) -> int:
        rotator = self._rotator(route)
        if journal.step == "creating":
            key = await rotator.create(str(journal.data["attempt"]))
            failpoint("create")
            pending = {"key": key.secret.reveal(), "key_id": key.key_id, "created": self._clock()}
            await journal.save(step="created", pending=pending)
            failpoint("record")
        pending = journal.data["pending"]
        key = UpstreamKey(Secret(pending["key"]), pending.get("key_id"))
        if journal.step == "created":
            try:
                await rotator.verify(key)
            except RotatorError as exc:
                await self._abandon(route, journal, key, f"verification failed: {exc}")
            await journal.save(step="verified")
            failpoint("verify")
        base = int(journal.data.get("base_version") or 0)
        version = await self._promote(route, journal, key, base)
        failpoint("promote")
        previous = None
        if base:
            revoke_after = self._clock() + (0.0 if journal.data.get("emergency") else _grace(route))
            previous = {"version": base, "revoke_after": revoke_after}
        await journal.save(
            step="grace" if previous else "idle",
            pending=None,
            previous=previous,
            last_rotation=self._clock(),
            rotations=int(journal.data.get("rotations") or 0) + 1,
        )
        failpoint("grace")
        # KV keeps every version: the journal versions that held the new key before its
        # promotion must not stay readable by whoever may read the journal.
        earlier = list(range(max(1, journal.version - _PENDING_VERSIONS), journal.version))
        if earlier:
            await self.vault.destroy_kv_versions(
                self.config.vault.kv_mount, journal_path(route.name), earlier
            )
        log.info("rotation.promoted", route=route.name, version=version, key_id=key.key_id)
        return version

    async def _promote(self, route: Route, journal: Journal, key: UpstreamKey, base: int) -> int:
        ref = route.secret
        try:
            data, current = await self.vault.read_kv(ref.mount, ref.path)
        except SecretNotFound:
            data, current = {}, 0
        if current != base and data.get(ref.field) == key.secret.reveal():
            await announce_key_change(self.vault, ref)  # the crash may have come before it
            return current  # promoted before a crash
        if current != base:
            await self._abandon(route, journal, key, "the key was changed during the rotation")
        try:
            return await self._store(route, key, self.owner, data, cas=base)
        except CasConflict:
            # Another runner that took the lock over may have promoted this very key.
            data, current = await self.vault.read_kv(ref.mount, ref.path)
            if data.get(ref.field) == key.secret.reveal():
                await announce_key_change(self.vault, ref)
                return current
            await self._abandon(route, journal, key, "the key was changed during the rotation")
            raise  # unreachable: _abandon raises

    async def _abandon(self, route: Route, journal: Journal, key: UpstreamKey, why: str) -> None:
        """Compensate a phase 1 that must not complete: revoke the new key, back to idle.
        The journal is written first: a runner that lost its lock fails there and revokes
        nothing (the lock's new holder may be promoting this very key)."""
        await journal.save(step="abandoning")
        await self._rotator(route).revoke(key)
        await journal.save(step="idle", pending=None)
        raise RotationError(f"{why}; the new key was revoked")

    async def _phase2(self, route: Route, journal: Journal) -> None:
        ref, version = route.secret, int(journal.data["previous"]["version"])
        if journal.step == "grace":
            try:
                data = await self.vault.read_kv_at(ref.mount, ref.path, version)
            except SecretNotFound:
                log.warning("rotation.old_key_gone", route=route.name, version=version)
            else:
                value = data.get(ref.field)
                if isinstance(value, str) and value:
                    secret.register(value)
                    old = UpstreamKey(Secret(value), _key_id(data))
                    await self._rotator(route).revoke(old)
            failpoint("revoke")
            await journal.save(step="revoked")
            failpoint("revoked")
        await self.vault.destroy_kv_versions(ref.mount, ref.path, [version])
        failpoint("retire")
        await journal.save(step="idle", previous=None, emergency=False)
        log.info("rotation.revoked", route=route.name, version=version)

    # ------------------------------------------------------------------ helpers

    async def _store(
        self,
        route: Route,
        key: UpstreamKey,
        rotated_by: str,
        data: dict[str, Any] | None = None,
        cas: int | None = None,
    ) -> int:
        """Write `key` as a new version of the route's secret, keeping its other fields."""
        ref = route.secret
        if data is None:
            try:
                data, cas = await self.vault.read_kv(ref.mount, ref.path)
            except SecretNotFound:
                data, cas = {}, 0
        new = {**data, ref.field: key.secret.reveal(), "created_at": iso(self._clock())}
        new["rotated_by"] = rotated_by
        new.pop("key_id", None)
        if key.key_id is not None:
            new["key_id"] = key.key_id
        version = await self.vault.write_kv(ref.mount, ref.path, new, cas=cas)
        await announce_key_change(self.vault, ref)  # proxies re-read it at their next poll
        return version

    async def _journal(self, route: Route) -> Journal:
        lease = route.rotation.lock_timeout if route.rotation else 300.0
        journal = Journal(
            self.vault,
            self.config.vault.kv_mount,
            journal_path(route.name),
            owner=self.owner,
            lease=lease,
            clock=self._clock,
        )
        await journal.load()
        return journal

    async def _current_version(self, route: Route) -> int:
        return await self.vault.kv_version(route.secret.mount, route.secret.path) or 0

    async def _age(self, route: Route) -> float:
        """Seconds since the current key was created; infinite when there is none."""
        created = await key_created(self.vault, route)
        return float("inf") if created is None else self._clock() - created

    def _rotator(self, route: Route) -> rotators.Rotator:
        assert route.rotation is not None  # callers check
        cfg = route.rotation.rotator
        if isinstance(cfg, ManualRotator):
            raise RotationError("manual rotator: no upstream automation")
        return rotators.build(
            route.name, cfg, self.vault, self._sessions.get(route.name), route.egress_allow
        )

    def _route(self, name: str) -> Route:
        route = self.config.routes.get(name)
        if route is None:
            raise RotationError(f"unknown route {name!r}")
        return route


def journal_path(route: str) -> str:
    return f"{STATE_PATH}/{route}"


async def key_created(vault: Vault, route: Route) -> float | None:
    """When the route's current key was created: its `created_at` field, else Vault's
    created_time of the version. None when the secret does not exist."""
    ref = route.secret
    try:
        data, version = await vault.read_kv(ref.mount, ref.path)
    except SecretNotFound:
        return None
    created = parse_time(data.get("created_at"))
    if created is None:
        meta = await vault.kv_metadata(ref.mount, ref.path) or {}
        entry = (meta.get("versions") or {}).get(str(version)) or {}
        created = parse_time(entry.get("created_time"))
    return created


def _key_id(data: dict[str, Any]) -> str | None:
    value = data.get("key_id")
    return value if isinstance(value, str) and value else None


def _every(route: Route) -> float:
    assert route.rotation is not None  # callers check
    return route.rotation.every or float("inf")


def _grace(route: Route) -> float:
    assert route.rotation is not None  # callers check
    return route.rotation.grace


async def run_scheduler(rotations: Rotations, interval: float = 60.0) -> None:
    """Run `run_due` every `interval` seconds until cancelled, under the same locks as
    `keyproxy rotate --due`. Failures are logged and retried on the next tick."""
    while True:
        try:
            for outcome in await rotations.run_due():
                if outcome.result not in ("not_due", "in_grace", "locked", "manual"):
                    log.info("rotation.scheduled", route=outcome.route, result=outcome.result)
        except Exception as exc:  # noqa: BLE001  # the scheduler outlives one bad tick
            log.warning("rotation.scheduler_failed", error=str(exc))
        await asyncio.sleep(interval)


__all__ = [
    "FAILPOINT_ENV",
    "Outcome",
    "RotationError",
    "Rotations",
    "journal_path",
    "key_created",
    "run_scheduler",
]
