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

The steps, modes and results, and the journal's stored shape, are typed in `state`; the
journal is kept by `journal`, and each step is carried out by `steps`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

import structlog

from keyproxy import secret
from keyproxy.config import ManualRotator, Route
from keyproxy.errors import VaultError
from keyproxy.rotation.journal import Journal, RotationError, failpoint
from keyproxy.rotation.rotators import UpstreamKey
from keyproxy.rotation.state import PHASE1, Failure, Mode, Result, Step, iso, parse_time
from keyproxy.rotation.steps import Outcome, Steps
from keyproxy.secret import Secret
from keyproxy.vault import SecretNotFound, Vault

log = structlog.get_logger("keyproxy.rotation")

# The scheduler logs every other result: something was done, or failed.
_QUIET = frozenset({Result.NOT_DUE, Result.IN_GRACE, Result.LOCKED, Result.MANUAL})


class Rotations(Steps):
    """Rotate, store and report the keys of every route of one configuration."""

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
        why = secret.problem(value)
        if why is not None:
            raise RotationError(f"the key {why}")
        secret.register(value)
        await self._sync_clock()  # created_at and the lock's expiry, in Vault's time
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
        tally = _Tally()
        if mode is Mode.EMERGENCY and journal.step is not Step.IDLE:
            await journal.save(replace(journal.state, emergency=True))
        if journal.step in (Step.GRACE, Step.REVOKED):
            revoke_after = journal.previous().revoke_after
            if mode is Mode.EMERGENCY or journal.step is Step.REVOKED or self._past(revoke_after):
                await self._retire(route, journal, tally)
            elif mode is Mode.NOW:
                raise RotationError(
                    f"the previous key is in its grace period until {iso(revoke_after)};"
                    " use --emergency to revoke it now"
                )
            else:
                await journal.save(release=True)
                return _in_grace(route, revoke_after)
        try:
            return await self._onward(route, journal, mode, tally)
        except NotRevoked:
            raise
        except Exception as exc:
            if tally.lost:  # SECURITY: the journal has moved on; nothing else would say so
                raise RotationError(f"{exc}; and {'; '.join(tally.lost)}") from exc
            raise

    async def _onward(self, route: Route, journal: Journal, mode: Mode, tally: _Tally) -> Outcome:
        """After an earlier rotation's phase 2: the manual rotator's outcome, or an abandoned
        key revoked, phase 1 when asked or due, and an emergency's phase 2 at once."""
        assert route.rotation is not None  # callers check
        if isinstance(route.rotation.rotator, ManualRotator):
            await _release(journal, tally.lost)
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
                await self._retire(route, journal, tally)
        await _release(journal, tally.lost)
        version = await self._current_version(route)
        result = Result.of(rotated=rotating, revoked=tally.revoked)
        return Outcome(route.name, result, "; ".join(tally.kept), version=version)

    async def _retire(self, route: Route, journal: Journal, tally: _Tally) -> None:
        """Phase 2 of the old key, counted in `tally`: revoked upstream, or why not (gone, or
        sharing the current key's id: revoke it by hand; current again: kept)."""
        retired = await self._phase2(route, journal)
        tally.revoked += retired.revoked
        if retired.note:
            (tally.lost if retired.lost else tally.kept).append(retired.note)

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

    async def _due(self, route: Route) -> bool:
        """Whether the current key is older than `every`; a missing key is always due."""
        created = await key_created(self.vault, route)
        return created is None or self._clock() - created >= _every(route)

    async def _manual_outcome(self, route: Route) -> Outcome:
        """A manual rotator's route: nothing to automate; the detail says if a key is due."""
        detail = "key is due: keys put" if await self._due(route) else ""
        return Outcome(route.name, Result.MANUAL, detail)

    def _route(self, name: str) -> Route:
        route = self.config.routes.get(name)
        if route is None:
            raise RotationError(f"unknown route {name!r}")
        return route


async def key_created(vault: Vault, route: Route) -> float | None:
    """When the route's current key was created: its `created_at` field (an imported key
    may be older than its version), but never later than Vault's created_time of the
    version. None when the secret does not exist.

    SECURITY: a date after the key was stored (written by a host whose clock is ahead, or
    by hand) would keep the key from being due for rotation or past max_age until then."""
    ref = route.secret
    try:
        data, _, stored = await vault.read_kv_dated(ref.mount, ref.path)
    except SecretNotFound:
        return None
    created = parse_time(data.get("created_at"))
    if created is None or (stored is not None and created > stored):
        return stored
    return created


class NotRevoked(RotationError):
    """A run's work is done, but an old key it should have revoked upstream was not."""


@dataclass
class _Tally:
    """What a run's phase 2 steps did: old keys revoked, and why others were not (`lost`:
    the run fails naming them; `kept`: said in its outcome)."""

    revoked: int = 0
    lost: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


async def _release(journal: Journal, lost: list[str]) -> None:
    """Release the lock after a run's work; when phase 2 could not revoke an old key, fail
    instead (`_run` records it and releases): the journal has moved on, so the run fails
    once, naming the key that may still be valid upstream (a leak's, perhaps), and never
    reports it revoked."""
    if lost:
        raise NotRevoked("; ".join(lost))
    await journal.save(release=True)


def _every(route: Route) -> float:
    assert route.rotation is not None  # callers check
    return route.rotation.every or float("inf")


def _in_grace(route: Route, revoke_after: float) -> Outcome:
    return Outcome(route.name, Result.IN_GRACE, f"old key revoked after {iso(revoke_after)}")


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
