"""The revocation list: its rules (`Revocations`) and its store in Vault KV.

Revocations live in one secret at `tokens.state_path`/revocations; every replica polls its
version number and re-reads it on change, so a revocation is honoured everywhere within
`revocation_poll_interval` plus one read. Entries are pruned once every token they can name
has expired. A write is check-and-set, retried on a concurrent write.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from keyproxy.config import Config
from keyproxy.errors import Unavailable
from keyproxy.tokens.format import CLOCK_SKEW, LEEWAY, Link, TaskToken
from keyproxy.vault import CasConflict, Vault

log = structlog.get_logger("keyproxy.tokens")

# Why a task token ended, as its `token.revoked` event and the metric name it. The holder
# says which of the first three; the server records the others.
HOLDER_REASONS: Final = ("completed", "failed", "timeout")
END_REASONS: Final = (*HOLDER_REASONS, "heartbeat_lost", "parent_revoked", "operator")


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
    if not token.ancestors:
        return {}
    return {"chain": ",".join(token.chain), "actors": ",".join(token.actors)}


class RevocationStore:
    """Records revocations in Vault and keeps this replica's copy of the list current."""

    def __init__(
        self, config: Config, vault: Vault, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.cfg = config.tokens
        self.vault = vault
        self.clock = clock
        self._revocations = Revocations()
        self._revocations_version: int | None = None

    @property
    def _revocations_path(self) -> str:
        return f"{self.cfg.state_path}/revocations"

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
        subject ("issuer|subject"), or of every token of a task."""
        await self._record_revocation(token_id, expires_at, subject, task)
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
        caller; every token delegated from it dies with it."""
        if reason not in END_REASONS:
            raise ValueError(f"not an end reason: {reason}")
        await self._record_revocation(token.token_id, token.expires_at, None, None)
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

    async def _record_revocation(
        self,
        token_id: str | None,
        expires_at: float | None,
        subject: str | None,
        task: str | None,
    ) -> None:
        """Record a revocation in Vault (check-and-set, retried on a concurrent write)."""
        longest = max(self.cfg.max_ttl, self.cfg.exception_max_ttl)
        for _ in range(8):
            data, version = await self._read_state(self._revocations_path)
            revocations = Revocations.from_data(data)
            now = self.clock()
            if token_id is not None:
                revocations.ids[token_id] = expires_at if expires_at is not None else now + longest
            if subject is not None:
                revocations.subjects[subject] = now + CLOCK_SKEW
            if task is not None:
                revocations.tasks[task] = now + CLOCK_SKEW
            revocations.prune(now, longest)
            try:
                new = await self.vault.write_kv(
                    self.config.vault.kv_mount,
                    self._revocations_path,
                    revocations.to_data(),
                    cas=version,
                )
            except CasConflict:
                continue
            self._revocations, self._revocations_version = revocations, new
            return
        raise Unavailable("revocation_contention", "could not record the revocation; try again")

    async def _read_state(self, path: str) -> tuple[dict[str, Any], int]:
        """A state secret and its version; ({}, 0) when it does not exist yet (cas=0 creates)."""
        if await self.vault.kv_version(self.config.vault.kv_mount, path) is None:
            return {}, 0
        return await self.vault.read_kv(self.config.vault.kv_mount, path)

    async def refresh_revocations(self) -> None:
        """Re-read the revocation list if its version changed (one metadata read otherwise)."""
        version = await self.vault.kv_version(self.config.vault.kv_mount, self._revocations_path)
        if version is None or version == self._revocations_version:
            return
        data, version = await self.vault.read_kv(self.config.vault.kv_mount, self._revocations_path)
        self._revocations = Revocations.from_data(data)
        self._revocations_version = version
