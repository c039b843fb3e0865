"""The steps of a rotation: begin, create, verify and promote the new key (phase 1), abandon
it, and revoke and retire the old one (phase 2); each step is recorded in the journal before
the next one runs. `engine.Rotations` decides which step comes next.

Deadlines in the journal (lock expiry, end of grace) are kept in Vault's time, which every
runner shares, whatever its own clock says.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import structlog

from keyproxy import secret
from keyproxy.config import Config, ManualRotator, Route
from keyproxy.errors import VaultError
from keyproxy.rotation import rotators
from keyproxy.rotation.journal import Journal, RotationError, failpoint, journal_path
from keyproxy.rotation.rotators import RotatorError, UpstreamKey
from keyproxy.rotation.state import (
    UNREVOKED_CURRENT,
    UNREVOKED_GONE,
    UNREVOKED_SAME_ID,
    JournalError,
    Mode,
    Pending,
    Previous,
    Result,
    Step,
    iso,
)
from keyproxy.secret import Secret
from keyproxy.upstream import UpstreamSessions
from keyproxy.vault import CasConflict, SecretNotFound, Vault, announce_key_change

log = structlog.get_logger("keyproxy.rotation")

# Clock differences below this are within what Vault's clock (whole seconds) can show.
_CLOCK_TOLERANCE = 2.0
# Journal writes between recording a new key and promoting it are fewer than this.
_PENDING_VERSIONS = 8


class Retired(NamedTuple):
    """How phase 2 ended for an old key: revoked upstream, or not, and why (`note`): rolled
    back to, kept on purpose; or gone from Vault, or under the current key's id (`lost`: the
    run fails, naming what to revoke by hand)."""

    revoked: bool
    note: str = ""
    lost: bool = False


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


class Steps:
    """The rotation steps over one configuration's routes; `Rotations` runs them."""

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
            await self._refuse_current(route, journal, key)
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
            grace = 0.0 if journal.state.emergency else grace_period(route)
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

    async def _refuse_current(self, route: Route, journal: Journal, key: UpstreamKey) -> None:
        """Fail (back to idle, nothing revoked) when create answered with the current key
        itself (an idempotency key that repeats).

        SECURITY: promoted, it would make the version it replaces a copy of itself, and that
        version's revocation after grace would revoke the only key there is (every request
        fails). Revoking it here would do the same at once: the key is left alone. A new key
        under the current key's id (an upstream that regenerates a key in place, an id that
        names the account) is promoted: it may be the only one that works now; phase 2 then
        leaves the old key to a person (revoking by that id could revoke the new one)."""
        if not await self._is_current(route, key, by_id=False):
            return
        await journal.save(replace(journal.state, step=Step.IDLE, attempt=None))
        raise RotationError("create answered with the current key, not a new one: nothing changed")

    async def _is_current(self, route: Route, key: UpstreamKey, *, by_id: bool = True) -> bool:
        """Whether `key` is, upstream, the route's current key: the same value, or (`by_id`)
        the same key id, which a revocation by id would revoke."""
        ref = route.secret
        try:
            data, _ = await self.vault.read_kv(ref.mount, ref.path)
        except SecretNotFound:
            return False
        same_id = by_id and key.key_id is not None and key.key_id == key_id_of(data)
        return same_id or data.get(ref.field) == key.secret.reveal()

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

    async def _phase2(self, route: Route, journal: Journal) -> Retired:
        """grace → revoked (the old key revoked upstream) → idle (its KV version destroyed).
        Says whether the old key was revoked, and why not if it could not be: the caller
        fails the run once the journal has moved on, so "revoked" is never said of a key that
        was not. Why is kept in the journal with the revocation step, so a run resumed after
        it says so too."""
        ref, previous = route.secret, journal.previous()
        version = previous.version
        if journal.step is Step.GRACE:
            unrevoked = await self._revoke_old(route, version)
            failpoint("revoke")
            previous = replace(previous, unrevoked=unrevoked)
            await journal.save(replace(journal.state, step=Step.REVOKED, previous=previous))
            failpoint("revoked")
        if previous.unrevoked != UNREVOKED_SAME_ID:  # else kept: the only copy to revoke it by
            await self.vault.destroy_kv_versions(ref.mount, ref.path, [version])
        failpoint("retire")
        await journal.save(replace(journal.state, step=Step.IDLE, previous=None, emergency=False))
        if previous.unrevoked is None:
            log.info("rotation.revoked", route=route.name, version=version)
            return Retired(revoked=True)
        log.info("rotation.retired", route=route.name, version=version, why=previous.unrevoked)
        return _unrevoked(version, previous.unrevoked)

    async def _revoke_old(self, route: Route, version: int) -> str | None:
        """Revoke the key of `version` upstream; why not, when it was not (`Previous`)."""
        ref = route.secret
        try:
            data = await self.vault.read_kv_at(ref.mount, ref.path, version)
        except SecretNotFound:
            data = {}
        value = data.get(ref.field)
        if not isinstance(value, str) or not value:
            # Deleted, destroyed, or pruned by max_versions (a secret that keeps one version
            # loses the old key at promotion): nothing to revoke it with.
            log.warning("rotation.old_key_gone", route=route.name, version=version)
            return UNREVOKED_GONE
        secret.register(value)
        old = UpstreamKey(Secret(value), key_id_of(data))
        if await self._is_current(route, old, by_id=False):
            # SECURITY: rolled back to during grace (`kv rollback`): revoking it would revoke
            # the key every proxy now injects.
            log.warning("rotation.old_key_current", route=route.name, version=version)
            return UNREVOKED_CURRENT
        if await self._is_current(route, old):
            # SECURITY: another key under the current key's id (regenerated in place, or an
            # id naming the account): a revocation by that id could revoke the current key,
            # and one by value is not known to be what the rotator does. Left to a person.
            log.warning("rotation.old_key_same_id", route=route.name, version=version)
            return UNREVOKED_SAME_ID
        await self._rotator(route).revoke(old)
        return None

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


def key_id_of(data: dict[str, Any]) -> str | None:
    value = data.get("key_id")
    return value if isinstance(value, str) and value else None


def grace_period(route: Route) -> float:
    assert route.rotation is not None  # callers check
    return route.rotation.grace


def _unrevoked(version: int, why: str) -> Retired:
    """Phase 2's account of an old key it did not revoke upstream (`Previous.unrevoked`)."""
    old = f"the old key (version {version})"
    if why == UNREVOKED_CURRENT:
        return Retired(revoked=False, note=f"{old} is the current key again: not revoked")
    if why == UNREVOKED_SAME_ID:
        note = (
            f"{old} has the current key's key id, and a revocation by that id could revoke the"
            f" current key: not revoked, its version kept; revoke it upstream by hand, then"
            f" destroy version {version}"
        )
        return Retired(revoked=False, note=note, lost=True)
    note = (
        f"{old} was gone from Vault (deleted, destroyed or pruned by max_versions) and was"
        " not revoked: revoke it upstream by hand"
    )
    return Retired(revoked=False, note=note, lost=True)
