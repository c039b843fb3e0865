"""The revocation list: its rules (`Revocations`) and its store in Vault KV.

Revocations live in one secret at `tokens.state_path`/revocations; every replica polls its
version number and re-reads it on change, so a revocation is honoured everywhere within
`revocation_poll_interval` plus one read. Entries are pruned once every token they can name
has expired. Writes are check-and-set, and the revocations of one process that arrive
together share one (`keyproxy.tokens.shared`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import structlog

from keyproxy import strictjson
from keyproxy.config import Config
from keyproxy.errors import BadRequest, Unauthenticated, Unavailable
from keyproxy.tokens.format import CLOCK_SKEW, LEEWAY, Link, TaskToken
from keyproxy.tokens.shared import (
    SharedSecret,
    finish_running,
    read_state,
    read_written,
    to_the_end,
)
from keyproxy.vault import Vault

log = structlog.get_logger("keyproxy.tokens")

# Why a task token ended, as its `token.revoked` event and the metric name it. The holder
# says which of the first three; the server records the others.
HOLDER_REASONS: Final = ("completed", "failed", "timeout")
END_REASONS: Final = (*HOLDER_REASONS, "heartbeat_lost", "parent_revoked", "operator")
SHUTDOWN_WAIT: Final = 5.0  # seconds a stopping server waits for revocations under way
# The list's secret under tokens.state_path (one JSON text, keyproxy.tokens.shared), and the
# one an earlier build wrote with a field per entry: still read, every LEGACY_POLL seconds,
# so that a fleet upgraded replica by replica loses no revocation. Never written here.
REVOCATIONS: Final = "revocation-list"
LEGACY_REVOCATIONS: Final = "revocations"
LEGACY_POLL: Final = 10.0


class RevocationStatus(NamedTuple):
    """A replica's copy of the list, for its metrics: entries held, and whether read yet."""

    entries: int
    read: bool


class _Revocation(NamedTuple):
    """One revocation to record: of a token id (until `expires_at`), a subject, a task."""

    token_id: str | None
    expires_at: float | None
    subject: str | None
    task: str | None


@dataclass
class Revocations:
    """The revocation list as stored in Vault, with the pruning rule."""

    ids: dict[str, float] = field(default_factory=dict)  # jti -> token expiry
    subjects: dict[str, float] = field(default_factory=dict)  # "idp|sub" -> revoked at
    tasks: dict[str, float] = field(default_factory=dict)  # task -> revoked at

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Revocations:
        def floats(name: str) -> dict[str, float]:
            value = data.get(name)
            if not isinstance(value, dict):
                return {}
            return {str(k): float(v) for k, v in value.items() if isinstance(v, int | float)}

        return cls(floats("ids"), floats("subjects"), floats("tasks"))

    def to_data(self) -> dict[str, Any]:
        return {"ids": self.ids, "subjects": self.subjects, "tasks": self.tasks}

    def union(self, other: Revocations) -> Revocations:
        """Every revocation either list holds (the later time where both name the same)."""
        if not (other.ids or other.subjects or other.tasks):
            return self

        def later(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
            return a | {k: max(v, a.get(k, v)) for k, v in b.items()}

        return Revocations(
            later(self.ids, other.ids),
            later(self.subjects, other.subjects),
            later(self.tasks, other.tasks),
        )

    def revoked(self, token: TaskToken) -> bool:
        return self.names(
            token.token_id,
            f"{token.identity.issuer}|{token.identity.subject}",
            token.task,
            token.issued_at,
        )

    def any_id(self, links: Iterable[Link]) -> bool:
        """Whether any of these tokens (a delegated token's ancestors) is revoked by id."""
        return any(link.token_id in self.ids for link in links)

    def any_actor(self, token: TaskToken) -> bool:
        """Whether a delegated token's actor ("issuer|subject") was revoked as a subject at
        or after the token was issued: revoking a sub-agent's identity ends what it acts with."""
        return any(self.covers_subject(actor, token.issued_at) for actor in token.actors)

    def chain_refusal(self, token: TaskToken) -> Unauthenticated | None:
        """Why a delegated token is dead by its chain (the cascade), or None: a token it was
        delegated from is revoked, or an identity that acted in it was revoked as a subject."""
        if not token.ancestors:
            return None
        if self.any_id(token.ancestors):
            return Unauthenticated("parent_revoked", "a token it was delegated from was revoked")
        if self.any_actor(token):
            return Unauthenticated("revoked", "an identity acting with this token was revoked")
        return None

    def names(self, token_id: str, who: str, task: str | None, issued_at: float) -> bool:
        """Whether a token with these facts is revoked: by id, or by subject or task at or
        after it was issued."""
        if token_id in self.ids or self.covers_subject(who, issued_at):
            return True
        return task is not None and self.covers_task(task, issued_at)

    def covers_subject(self, who: str, issued_at: float) -> bool:
        """Whether a revocation of subject `who` ("issuer|subject") names a token issued then."""
        return self.subjects.get(who, -1.0) >= issued_at

    def covers_task(self, task: str, issued_at: float) -> bool:
        """Whether a revocation of `task` names a token of that task issued then."""
        return self.tasks.get(task, -1.0) >= issued_at

    def prune(self, now: float, longest_ttl: float) -> None:
        """Drop entries that can no longer name a live token."""
        margin = LEEWAY + CLOCK_SKEW
        self.ids = {k: exp for k, exp in self.ids.items() if exp + margin > now}
        horizon = now - longest_ttl - margin
        self.subjects = {k: at for k, at in self.subjects.items() if at > horizon}
        self.tasks = {k: at for k, at in self.tasks.items() if at > horizon}


def chain_fields(token: TaskToken) -> dict[str, str]:
    """A delegated token's audit fields: `chain`, its token ids from the root, and `actors`,
    who acted at each delegation ("issuer|subject", in order); none for other tokens."""
    lineage = token.lineage()
    return {} if lineage is None else {"chain": lineage[0], "actors": lineage[1]}


class RevocationStore:
    """Records revocations in Vault and keeps this replica's copy of the list current."""

    def __init__(
        self, config: Config, vault: Vault, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.cfg = config.tokens
        self.vault = vault
        self.clock = clock
        # This replica's copy: the list (`_listed`, at `_revocations_version`) with what an
        # earlier build wrote at LEGACY_REVOCATIONS (`_legacy`), which only it writes.
        self._revocations = Revocations()
        self._listed = Revocations()
        self._revocations_version: int | None = None
        self._legacy = Revocations()
        self._legacy_version: int | None = None
        self._legacy_read_at: float | None = None  # time.monotonic() of its last look
        self.revocations_read = False  # whether both were read at least once
        self._first_read = asyncio.Lock()
        self._place = 0  # how many times a reload moved the list (`_moved`)
        # Told each end reason this process records (the serving app counts them).
        self.on_end: Callable[[str], None] | None = None
        self._revocation_writes = SharedSecret(
            vault,
            lambda: (self.config.vault.kv_mount, self._revocations_path),
            self._merged_revocations,
            _contended,
        )

    async def aclose(self) -> None:
        """At shutdown, before the Vault client closes: the revocations under way end, and
        the writes with them (SHUTDOWN_WAIT at most, in all)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_WAIT
        await finish_running(SHUTDOWN_WAIT)
        for writes in self._shared_writes():
            await writes.aclose(deadline - loop.time())

    def _shared_writes(self) -> list[SharedSecret[Any]]:
        """The shared secrets this process writes (the exception register adds its own)."""
        return [self._revocation_writes]

    @property
    def _revocations_path(self) -> str:
        return f"{self.cfg.state_path}/{REVOCATIONS}"

    # ------------------------------------------------------------------ revocation

    async def revoke(
        self,
        *,
        token_id: str | None = None,
        expires_at: float | None = None,
        subject: str | None = None,
        task: str | None = None,
    ) -> None:
        """An operator's revocation: of one token id, of every token issued so far to a
        subject ("issuer|subject"), or of every token of a task. Once begun it is written and
        logged even if the caller goes away."""
        revocation = _Revocation(token_id, expires_at, subject, task)
        try:  # refused here, not in the write it would share with others (and fail)
            strictjson.dumps(revocation)
        except ValueError:
            raise BadRequest(
                "invalid_text", "the revocation names text that is not valid Unicode"
            ) from None
        await to_the_end(self._revoke(revocation), "revocation")

    async def _revoke(self, revocation: _Revocation) -> None:
        await self._record_revocation(revocation)
        if revocation.token_id is not None:
            await self._end_lease(revocation.token_id)
        token_id, _, subject, task = revocation
        issuer, _, name = subject.partition("|") if subject is not None else (None, "", None)
        log.info(
            "token.revoked",
            by="operator",
            reason="operator",
            token_id=token_id,
            issuer=issuer,
            subject=name,
            task=task,
        )

    async def revoke_held(self, token: TaskToken, reason: str = "completed") -> None:
        """A token ends: its holder ended its task (`reason` one of HOLDER_REASONS), or the
        server found it ended (heartbeat_lost, parent_revoked). The token was verified by the
        caller; every token delegated from it dies with it. Once begun it is written, logged
        and counted even if the caller goes away; the `token.revoked` event is written once,
        by the replica that records the end first."""
        if reason not in END_REASONS:
            raise ValueError(f"not an end reason: {reason}")
        await to_the_end(self._end(token, reason), "token end")

    async def _end(self, token: TaskToken, reason: str) -> None:
        await self._record_revocation(_Revocation(token.token_id, token.expires_at, None, None))
        if not await self._first_to_end(token):
            return  # another replica recorded this end: its event stands
        log.info(
            "token.revoked",
            by="holder" if reason in HOLDER_REASONS else "server",
            reason=reason,
            token_id=token.token_id,
            issuer=token.identity.issuer,
            subject=token.identity.subject,
            task=token.task,
            **chain_fields(token),
        )
        if self.on_end is not None:
            self.on_end(reason)

    async def _first_to_end(self, token: TaskToken) -> bool:
        """Whether this replica is the one to report `token`'s end (TaskTokens asks the
        state store, which every replica shares)."""
        return True

    async def _end_lease(self, token_id: str) -> None:
        """End the heartbeat lease of token `token_id`, if it has one, so that every replica
        refuses it before its next revocation poll (TaskTokens: in the shared state store)."""

    async def _record_revocation(self, revocation: _Revocation) -> None:
        """Record a revocation in Vault, with any others this process records meanwhile."""
        place = self._place
        data, version = await self._revocation_writes.change(revocation)
        if place != self._place:
            return  # written where the list was before a reload moved it: not this list
        if self._revocations_version is None or version > self._revocations_version:
            self._listed, self._revocations_version = Revocations.from_data(data), version
            self._revocations = self._listed.union(self._legacy)

    def _merged_revocations(self, data: dict[str, Any], added: list[_Revocation]) -> dict[str, Any]:
        """The stored list `data` with the revocations `added`, pruned."""
        longest = max(self.cfg.max_ttl, self.cfg.exception_max_ttl)
        revocations = Revocations.from_data(data)
        now = self.clock()
        for token_id, expires_at, subject, task in added:
            if token_id is not None:
                # Whole seconds, rounded up: a shorter entry kept a little longer.
                until = expires_at if expires_at is not None else now + longest
                revocations.ids[token_id] = math.ceil(until)
            if subject is not None:
                revocations.subjects[subject] = now + CLOCK_SKEW
            if task is not None:
                revocations.tasks[task] = now + CLOCK_SKEW
        revocations.prune(now, longest)
        return revocations.to_data()

    async def _read_state(self, path: str, *, earlier: bool = False) -> tuple[dict[str, Any], int]:
        """A state secret and its version; ({}, 0) when it does not exist yet. With `earlier`,
        a secret at a path an earlier build wrote (read only, in either layout)."""
        return await read_state(self.vault, self.config.vault.kv_mount, path, earlier=earlier)

    async def revocation_list(self) -> Revocations:
        """The revocation list as Vault holds it now (with an earlier build's)."""
        data, _ = await self._read_state(self._revocations_path)
        legacy_path = f"{self.cfg.state_path}/{LEGACY_REVOCATIONS}"
        legacy, _ = await self._read_state(legacy_path, earlier=True)
        return Revocations.from_data(data).union(Revocations.from_data(legacy))

    async def refresh_revocations(self) -> None:
        """Re-read the revocation list if its version changed (one metadata read otherwise),
        and an earlier build's every LEGACY_POLL. Raises VaultError."""
        # Each step checks that no reload moved the list while it waited on Vault: what it
        # read from the old place must not be taken for the new place's (`_moved`).
        place, mount, path = self._place, self.config.vault.kv_mount, self._revocations_path
        version = await self.vault.kv_version(mount, path)
        if version is not None and version != self._revocations_version:
            data, version = await read_written(self.vault, mount, path)
            if place != self._place:
                return
            self._listed, self._revocations_version = Revocations.from_data(data), version
            self._revocations = self._listed.union(self._legacy)
        now = time.monotonic()
        if self._legacy_read_at is None or now - self._legacy_read_at >= LEGACY_POLL:
            legacy_path = f"{self.cfg.state_path}/{LEGACY_REVOCATIONS}"
            legacy_version = await self.vault.kv_version(mount, legacy_path)
            if legacy_version != self._legacy_version:
                legacy: dict[str, Any] = {}
                if legacy_version is not None:
                    legacy, legacy_version = await read_written(
                        self.vault, mount, legacy_path, earlier=True
                    )
                if place != self._place:
                    return
                self._legacy, self._legacy_version = Revocations.from_data(legacy), legacy_version
                self._revocations = self._listed.union(self._legacy)
            self._legacy_read_at = now
        if place == self._place:
            self.revocations_read = True

    def revocation_status(self) -> RevocationStatus:
        """This replica's copy of the list: its entries, and whether it was read yet."""
        held = self._revocations
        entries = len(held.ids) + len(held.subjects) + len(held.tasks)
        return RevocationStatus(entries, self.revocations_read)

    async def first_revocations_read(self) -> None:
        """Read the list now if this replica never has (one read at a time, whoever waits)."""
        async with self._first_read:
            if not self.revocations_read:
                await self.refresh_revocations()

    def _moved(self) -> None:
        """`tokens.state_path` changed (a reload): what was read from the old place counts
        no more, and nothing is judged until the new place is read."""
        self._revocations, self._listed, self._legacy = Revocations(), Revocations(), Revocations()
        self._revocations_version = self._legacy_version = self._legacy_read_at = None
        self.revocations_read = False
        self._place += 1


def _contended() -> Unavailable:
    return Unavailable("revocation_contention", "could not record the revocation; try again")
