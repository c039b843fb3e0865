"""The revocation list's writes in Vault KV (its rules and layout: keyproxy.tokens.revoked;
this replica's copy and its reads: keyproxy.tokens.listread).

Writes are check-and-set, and the revocations of one process that arrive together share
them (`keyproxy.tokens.shared`). Entries are pruned once every token they can name has
expired.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import structlog

from keyproxy import strictjson
from keyproxy.config import Config
from keyproxy.errors import BadRequest, Unavailable, VaultError
from keyproxy.tokens.format import TaskToken
from keyproxy.tokens.listread import MOVES, ListReader
from keyproxy.tokens.revoked import (
    ListCopy,
    index_of,
    merged_ids,
    merged_main,
    shard_of,
    shard_path,
)
from keyproxy.tokens.shared import (
    Batched,
    cas_write,
    finish_running,
    read_state,
    to_the_end,
)
from keyproxy.vault import Vault

log = structlog.get_logger("keyproxy.tokens")

# Why a task token ended, as its `token.revoked` event and the metric name it. The holder
# says which of the first three; the server records the others.
HOLDER_REASONS: Final = ("completed", "failed", "timeout")
END_REASONS: Final = (*HOLDER_REASONS, "heartbeat_lost", "parent_revoked", "operator")
SHUTDOWN_WAIT: Final = 5.0  # seconds a stopping server waits for revocations under way


class _Revocation(NamedTuple):
    """One revocation to record: of a token id (until `expires_at`), a subject, a task."""

    token_id: str | None
    expires_at: float | None
    subject: str | None
    task: str | None


def chain_fields(token: TaskToken) -> dict[str, str]:
    """A delegated token's audit fields: `chain`, its token ids from the root, and `actors`,
    who acted at each delegation ("issuer|subject", in order); none for other tokens."""
    lineage = token.lineage()
    return {} if lineage is None else {"chain": lineage[0], "actors": lineage[1]}


class RevocationStore(ListReader):
    """Records revocations in Vault (and keeps this replica's copy of the list current:
    `ListReader`)."""

    def __init__(
        self, config: Config, vault: Vault, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(config, vault, clock)
        # Told each end reason this process records (the serving app counts them).
        self.on_end: Callable[[str], None] | None = None
        self._revocation_writes = Batched(self._write_revocations)

    async def aclose(self) -> None:
        """At shutdown, before the Vault client closes: the revocations under way end, and
        the writes with them (SHUTDOWN_WAIT at most, in all)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_WAIT
        await finish_running(SHUTDOWN_WAIT)
        for writes in self._shared_writes():
            await writes.aclose(deadline - loop.time())

    def _shared_writes(self) -> list[Batched[Any, Any]]:
        """The shared secrets this process writes (the exception register adds its own)."""
        return [self._revocation_writes]

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
        await self._revocation_writes.change(revocation)

    async def _write_revocations(self, changes: list[_Revocation]) -> None:
        """Write revocations (keyproxy.tokens.revoked): each token id into its shard, then
        the shards' new versions, and any subject or task, into the main secret. Redone at
        the list's new place if a reload moved it meanwhile (MOVES at most)."""
        for _ in range(MOVES):
            if await self._write_here(changes):
                return
        raise _contended()

    async def _write_here(self, changes: list[_Revocation]) -> bool:
        """Write revocations where the list is now; whether it is still there."""
        longest = max(self.cfg.max_ttl, self.cfg.exception_max_ttl)
        place, copy = self._place, self._copy
        mount, main = self.config.vault.kv_mount, self._revocations_path
        now = self.clock()
        shards: dict[int, dict[str, float]] = {}
        for token_id, expires_at, _, _ in changes:
            if token_id is not None:
                until = expires_at if expires_at is not None else now + longest
                shards.setdefault(shard_of(token_id), {})[token_id] = until
        known = await self._known_index(copy, mount, main)
        written: dict[int, int] = {}
        writes = [self._write_shard(mount, shard_path(main, n), ids) for n, ids in shards.items()]
        results = await asyncio.gather(*writes)
        for shard, (_, version) in zip(shards, results, strict=True):
            if version <= known.get(shard, 0):
                # A write makes a version later than any the index ever named, unless the
                # shard was deleted and made afresh: replicas holding a later version would
                # never read it again. Refused, not hidden (readers refuse it too).
                raise VaultError(f"revocation list shard {shard} is behind its index")
            written[shard] = version
        subjects = [c.subject for c in changes if c.subject is not None]
        tasks = [c.task for c in changes if c.task is not None]
        data, version = await cas_write(
            self.vault,
            lambda: (mount, main),
            lambda data: merged_main(
                data,
                subjects=subjects,
                tasks=tasks,
                written=written,
                now=self.clock(),
                longest_ttl=longest,
                path=main,
            ),
            _contended,
        )
        if place != self._place:
            return False
        if copy.main_version is None or version > copy.main_version:
            copy.take_main(data, version, main)
            self._writes_taken += 1
        # After the main secret: one under a new name (the list made afresh) forgets what
        # the copy held, not these shards, which its index now names.
        for shard, (data, version) in zip(shards, results, strict=True):
            copy.take_shard(shard, data, version, shard_path(main, shard))
        self._publish(self._combined(copy))
        return True

    async def _known_index(self, copy: ListCopy, mount: str, main: str) -> dict[int, int]:
        """The shards' index as known before a write: this replica's copy, or (a process that
        never read the list, as a CLI command) the main secret read now."""
        if copy.main_version is not None:
            return dict(copy.index)
        data, version = await read_state(self.vault, mount, main)
        return index_of(data, main) if version else {}

    async def _write_shard(
        self, mount: str, path: str, ids: dict[str, float]
    ) -> tuple[dict[str, Any], int]:
        return await cas_write(
            self.vault,
            lambda: (mount, path),
            lambda data: merged_ids(data, ids, self.clock(), path),
            _contended,
        )


def _contended() -> Unavailable:
    return Unavailable("revocation_contention", "could not record the revocation; try again")
