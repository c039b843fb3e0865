"""Key rotation: a crash-safe state machine whose only state is a journal in Vault.

Each route with a `rotation` has a journal at KV v2 `<kv_mount>/keyproxy/state/rotation/<route>`.
It holds the lock (owner, expiry) and the step; every write is a check-and-set on the version
this runner last wrote, so a runner that lost its lock to a takeover fails its next write and
stops. A lock whose expiry has passed is taken over, and the new owner resumes from the step.

    idle ──lock──▶ creating ──create(attempt)──▶ created ──verify──▶ verified
      ▲                                            │ verify fails: revoke the new key
      │                                            ▼
      │                                        abandoning ──revoke it──▶ idle, failure recorded
      │        verified ──promote: new KV version of the key (CAS on the version at start)──▶
      │        grace ──(grace passed, or --emergency)──revoke old key──▶ revoked
      └─────── revoked ──destroy the old KV version──▶ idle

A crash at any point leaves the old key current and valid (before promotion) or the new key
current with the old one still valid until revoked (after), so there is never zero current
keys and never two. `creating` is resumed by calling create again with the same attempt id,
which an idempotent upstream answers with the same key (adopted, not orphaned).

The steps, modes and results, and the journal's stored shape, are typed in
keyproxy.rotation_state.

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
from dataclasses import dataclass, replace
from typing import Any

import structlog

from keyproxy import secret
from keyproxy.config import Config, ManualRotator, Route
from keyproxy.errors import KeyproxyError, VaultError
from keyproxy.rotation import rotators
from keyproxy.rotation.rotators import RotatorError, UpstreamKey
from keyproxy.rotation.state import (
    PHASE1,
    Failure,
    JournalError,
    JournalState,
    Lock,
    Mode,
    Pending,
    Previous,
    Result,
    Step,
    iso,
    parse_time,
)
from keyproxy.secret import Secret
from keyproxy.upstream import UpstreamSessions
from keyproxy.vault import CasConflict, SecretNotFound, Vault, announce_key_change

log = structlog.get_logger("keyproxy.rotation")

STATE_PATH = "keyproxy/state/rotation"
FAILPOINT_ENV = "KEYPROXY_FAILPOINT"
# Clock differences below this are within what Vault's clock (whole seconds) can show.
_CLOCK_TOLERANCE = 2.0
# Journal writes between recording a new key and promoting it are fewer than this.
_PENDING_VERSIONS = 8
# The scheduler logs every other result: something was done, or failed.
_QUIET = frozenset({Result.NOT_DUE, Result.IN_GRACE, Result.LOCKED, Result.MANUAL})


class RotationError(KeyproxyError):
    """A rotation could not proceed (lost lock, key changed underneath, wrong route)."""


@dataclass(frozen=True)
class Outcome:
    """What one run did to one route. `failed` outcomes make `keyproxy rotate` exit 1."""

    route: str
    result: Result
    detail: str = ""
    version: int | None = None

    @property
    def failed(self) -> bool:
        return self.result is Result.FAILED


def failpoint(step: str) -> None:
    """Test-only crash injection: die by SIGKILL right after `step` if asked to."""
    if os.environ.get(FAILPOINT_ENV) == f"after:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


class Journal:
    """One route's journal, held under its lock by this runner: `state` as last read or
    written, and `version`, the KV version of that write (the next write's check-and-set)."""

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
        self.state = JournalState()
        self.version = 0

    async def load(self) -> None:
        try:
            data, self.version = await self._vault.read_kv(self._mount, self._path)
        except SecretNotFound:
            data, self.version = {}, 0
        self.state = JournalState.from_data(data)
        if self.state.pending is not None:
            secret.register(self.state.pending.key.reveal())

    @property
    def step(self) -> Step:
        return self.state.step

    def held_by_other(self) -> str | None:
        lock = self.state.lock
        if lock is None or lock.owner == self._owner:
            return None
        return str(lock.owner) if lock.expires_at > self._clock() else None

    async def save(self, state: JournalState | None = None, *, release: bool = False) -> None:
        """Write `state` (by default the state as it stands) with check-and-set, renewing
        or releasing the lock. `state` becomes the journal's only once it is written."""
        lock = None if release else Lock(self._owner, self._clock() + self._lease)
        new = replace(self.state if state is None else state, lock=lock)
        try:
            self.version = await self._vault.write_kv(
                self._mount, self._path, new.to_data(), cas=self.version
            )
        except CasConflict:
            raise RotationError("lost the rotation lock to another runner") from None
        self.state = new

    def new_key(self) -> UpstreamKey:
        """The new key the journal holds (from `created` until promotion or abandon)."""
        if (pending := self.state.pending) is None:
            raise JournalError(f"the journal has no new key at step {self.step}")
        return UpstreamKey(pending.key, pending.key_id)

    def previous(self) -> Previous:
        """The replaced key version (from `grace` until it is destroyed)."""
        if (previous := self.state.previous) is None:
            raise JournalError(f"the journal has no previous key version at step {self.step}")
        return previous


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
        return [await self._run(route, Mode.DUE) for route in routes]

    async def rotate(self, name: str, emergency: bool = False) -> Outcome:
        """Rotate one route now; with `emergency` the old key is revoked at once."""
        route = self._route(name)
        if route.rotation is None:
            return Outcome(name, Result.FAILED, "the route has no rotation configured")
        outcome = await self._run(route, Mode.EMERGENCY if emergency else Mode.NOW)
        if outcome.result is Result.LOCKED:
            # Asked for by name (a leak, perhaps): not done is a failure, not a skip.
            return Outcome(name, Result.FAILED, f"not rotated: the lock is {outcome.detail}")
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
        if journal.step in PHASE1 or journal.step in (Step.GRACE, Step.REVOKED):
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
        await journal.save(replace(journal.state, last_rotation=self._clock()), release=True)
        log.info("rotation.key_put", route=name, version=version)
        return version

    # ------------------------------------------------------------------ the state machine

    async def _run(self, route: Route, mode: Mode) -> Outcome:
        await self._sync_clock()
        try:
            journal = await self._journal(route)
            if (holder := journal.held_by_other()) is not None:
                return Outcome(route.name, Result.LOCKED, f"held by {holder}")
            if mode is Mode.DUE and (idle := await self._idle_outcome(route, journal)) is not None:
                return idle  # nothing to do: no lock taken, no journal write
        except Exception as exc:  # noqa: BLE001  # one route's failure must not stop the others
            log.warning("rotation.failed", route=route.name, error=str(exc))
            return Outcome(route.name, Result.FAILED, f"cannot read the rotation state: {exc}")
        if (refused := await self._lock(route, journal)) is not None:
            return refused
        try:
            failpoint("lock")
            return await self._drive(route, journal, mode)
        except Exception as exc:  # noqa: BLE001  # recorded, the lock released, reported
            log.warning("rotation.failed", route=route.name, step=journal.step, error=str(exc))
            failure = Failure(at=self._clock(), step=journal.step.value, error=str(exc))
            try:
                await journal.save(replace(journal.state, last_failure=failure), release=True)
            except (VaultError, RotationError) as again:
                log.warning("rotation.unlock_failed", route=route.name, error=str(again))
            return Outcome(route.name, Result.FAILED, str(exc))

    async def _lock(self, route: Route, journal: Journal) -> Outcome | None:
        """Take (or take over) the route's lock; the outcome if that failed."""
        try:
            await journal.save()
        except RotationError:
            return Outcome(route.name, Result.LOCKED, "another runner took the lock first")
        except VaultError as exc:
            return Outcome(route.name, Result.FAILED, f"cannot take the rotation lock: {exc}")
        return None

    async def _drive(self, route: Route, journal: Journal, mode: Mode) -> Outcome:
        """Under the lock: finish what the journal says is under way, then rotate if asked
        or due. Phase 2 of an earlier rotation (revoking its old key) comes first."""
        assert route.rotation is not None  # callers check
        revoked = 0
        if mode is Mode.EMERGENCY and journal.step is not Step.IDLE:
            await journal.save(replace(journal.state, emergency=True))
        if journal.step in (Step.GRACE, Step.REVOKED):
            revoke_after = journal.previous().revoke_after
            if mode is Mode.EMERGENCY or journal.step is Step.REVOKED or self._past(revoke_after):
                await self._phase2(route, journal)
                revoked += 1
            elif mode is Mode.NOW:
                raise RotationError(
                    f"the previous key is in its grace period until {iso(revoke_after)};"
                    " use --emergency to revoke it now"
                )
            else:
                await journal.save(release=True)
                return _in_grace(route, revoke_after)
        if isinstance(route.rotation.rotator, ManualRotator):
            await journal.save(release=True)
            if mode is not Mode.DUE:
                raise RotationError("manual rotator: store a new key with keyproxy keys put")
            return await self._manual_outcome(route)
        if journal.step is Step.ABANDONING:
            # A run died while compensating: finish revoking the key it was abandoning.
            await self._rotator(route).revoke(journal.new_key())
            await journal.save(replace(journal.state, step=Step.IDLE, pending=None))
        rotating = journal.step in PHASE1  # an interrupted rotation is resumed, due or not
        if journal.step is Step.IDLE and (mode is not Mode.DUE or await self._due(route)):
            await self._begin(route, journal, mode)
            rotating = True
        if rotating:
            await self._phase1(route, journal)
            if journal.state.emergency and journal.step is Step.GRACE:
                await self._phase2(route, journal)
                revoked += 1
        await journal.save(release=True)
        version = await self._current_version(route)
        return Outcome(route.name, Result.of(rotated=rotating, revoked=revoked), version=version)

    async def _idle_outcome(self, route: Route, journal: Journal) -> Outcome | None:
        """For --due: the outcome when there is plainly nothing to do, else None. Checked
        again under the lock, since another runner may act in between."""
        assert route.rotation is not None  # callers check
        if journal.step in PHASE1 or journal.step is Step.REVOKED:
            return None
        if journal.step is Step.GRACE:
            revoke_after = journal.previous().revoke_after
            return None if self._past(revoke_after) else _in_grace(route, revoke_after)
        if isinstance(route.rotation.rotator, ManualRotator):
            return await self._manual_outcome(route)
        return None if await self._due(route) else Outcome(route.name, Result.NOT_DUE)

    async def _begin(self, route: Route, journal: Journal, mode: Mode) -> None:
        """idle → creating: a fresh attempt id, and the key version the new key replaces."""
        await journal.save(
            replace(
                journal.state,
                step=Step.CREATING,
                attempt=uuid.uuid4().hex,
                emergency=mode is Mode.EMERGENCY,
                base_version=await self._current_version(route),
                started_at=self._clock(),
                last_failure=None,
            )
        )

    async def _phase1(self, route: Route, journal: Journal) -> int:
        """creating → created → verified → promoted (grace, or idle for a first key)."""
        rotator = self._rotator(route)
        if journal.step is Step.CREATING:
            if journal.state.attempt is None:
                raise JournalError("the journal has no attempt id at step creating")
            key = await rotator.create(journal.state.attempt)
            failpoint("create")
            pending = Pending(key.secret, key.key_id, created=self._clock())
            await journal.save(replace(journal.state, step=Step.CREATED, pending=pending))
            failpoint("record")
        key = journal.new_key()
        if journal.step is Step.CREATED:
            try:
                await rotator.verify(key)
            except RotatorError as exc:
                await self._abandon(route, journal, key, f"verification failed: {exc}")
            await journal.save(replace(journal.state, step=Step.VERIFIED))
            failpoint("verify")
        base = journal.state.base_version
        version = await self._promote(route, journal, key, base)
        failpoint("promote")
        previous = None
        if base:
            grace = 0.0 if journal.state.emergency else _grace(route)
            previous = Previous(version=base, revoke_after=self._clock() + grace)
        await journal.save(
            replace(
                journal.state,
                step=Step.GRACE if previous else Step.IDLE,
                pending=None,
                previous=previous,
                last_rotation=self._clock(),
                rotations=journal.state.rotations + 1,
            )
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
        await journal.save(replace(journal.state, step=Step.ABANDONING))
        await self._rotator(route).revoke(key)
        await journal.save(replace(journal.state, step=Step.IDLE, pending=None))
        raise RotationError(f"{why}; the new key was revoked")

    async def _phase2(self, route: Route, journal: Journal) -> None:
        """grace → revoked (the old key revoked upstream) → idle (its KV version destroyed)."""
        ref, version = route.secret, journal.previous().version
        if journal.step is Step.GRACE:
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
            await journal.save(replace(journal.state, step=Step.REVOKED))
            failpoint("revoked")
        await self.vault.destroy_kv_versions(ref.mount, ref.path, [version])
        failpoint("retire")
        await journal.save(replace(journal.state, step=Step.IDLE, previous=None, emergency=False))
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

    async def _due(self, route: Route) -> bool:
        """Whether the current key is older than `every`; a missing key is always due."""
        created = await key_created(self.vault, route)
        return created is None or self._clock() - created >= _every(route)

    async def _manual_outcome(self, route: Route) -> Outcome:
        """A manual rotator's route: nothing to automate; the detail says if a key is due."""
        detail = "key is due: keys put" if await self._due(route) else ""
        return Outcome(route.name, Result.MANUAL, detail)

    def _past(self, deadline: float) -> bool:
        return self._clock() >= deadline

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


def _in_grace(route: Route, revoke_after: float) -> Outcome:
    return Outcome(route.name, Result.IN_GRACE, f"old key revoked after {iso(revoke_after)}")


def _grace(route: Route) -> float:
    assert route.rotation is not None  # callers check
    return route.rotation.grace


async def run_scheduler(rotations: Rotations, interval: float = 60.0) -> None:
    """Run `run_due` every `interval` seconds until cancelled, under the same locks as
    `keyproxy rotate --due`. Failures are logged and retried on the next tick."""
    while True:
        try:
            for outcome in await rotations.run_due():
                if outcome.result not in _QUIET:
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
