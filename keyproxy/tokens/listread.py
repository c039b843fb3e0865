"""This replica's copy of the revocation list, and how it is read (its rules and layout:
keyproxy.tokens.revoked; its writes: keyproxy.tokens.revocation).

Every replica polls the version of the list's main secret and re-reads it on change, and
then the shards whose version its index raised, so a revocation is honoured everywhere within
`revocation_poll_interval` plus one read; a replica whose copy is older than
`revocation_max_staleness` (its poll stalled, Vault out of reach) reads it before it judges a
task token, and refuses the token if it cannot (`list_read`). Each part read is in use at
once, and the task-token requests under way that it names are ended (`inflight`).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from keyproxy.config import Config, TokensConfig
from keyproxy.errors import RequestError, VaultError
from keyproxy.tokens.inflight import UNVERIFIABLE, InFlight, ended
from keyproxy.tokens.revoked import ListCopy, Revocations, shard_path
from keyproxy.tokens.shared import read_state, read_written
from keyproxy.vault import Vault

# The list's main secret under tokens.state_path (one JSON text, keyproxy.tokens.shared; its
# shards beneath it, keyproxy.tokens.revoked), and where earlier builds kept theirs: a
# field per entry at `revocations`, then one text at `revocation-list`. Those are still
# read, every LEGACY_POLL seconds, so that a fleet upgraded replica by replica loses no
# revocation, and never written here.
REVOCATIONS: Final = "revoked"
EARLIER_REVOCATIONS: Final = ("revocations", "revocation-list")
LEGACY_POLL: Final = 10.0
MOVES: Final = 3  # a write redone at the list's new place when a reload moved it meanwhile


class RevocationStatus(NamedTuple):
    """A replica's copy of the list, for its metrics: entries held, whether read yet, and
    seconds since its last whole read began (None before the first)."""

    entries: int
    read: bool
    age: float | None = None


def retry_after(cfg: TokensConfig) -> int:
    """When to try again after a 503 for a list that cannot be read: the next read, in whole
    seconds."""
    return math.ceil(cfg.revocation_poll_interval)


class ListReader:
    """This replica's copy of the revocation list, kept current."""

    def __init__(
        self, config: Config, vault: Vault, clock: Callable[[], float] = time.time
    ) -> None:
        self.config = config
        self.cfg = config.tokens
        self.vault = vault
        self.clock = clock
        # This replica's copy: the list (`_copy`) with what earlier builds wrote at
        # EARLIER_REVOCATIONS (`_earlier`: each list and its version), which only they
        # write; `_revocations` has them all.
        self._revocations = Revocations()
        # The task-token requests under way, ended with their token.
        self.inflight = InFlight(
            lambda token: ended(token, self._revocations, self.clock()),
            retry_after=lambda: retry_after(self.cfg),  # the settings of now: a reload moves it
        )
        self._copy = ListCopy()
        self._writes_taken = 0  # how many writes' results `_copy` took (a poll's read waits)
        self._earlier: dict[str, tuple[Revocations, int | None]] = {}
        self._earlier_read_at: float | None = None  # time.monotonic() of its last look
        self.revocations_read = False  # whether the list (and earlier builds') was read yet
        # time.monotonic() when the last whole read of the list began: the copy is what Vault
        # held then, at least (`list_current`).
        self._read_began = -math.inf
        self._reading = asyncio.Lock()  # one read of the list at a time: none overtakes another
        # Reads begun, and the last that ended (its number, and how it failed, if it did): a
        # caller that finds one begun after it arrived has ended takes its outcome
        # (refresh_revocations).
        self._reads_begun = 0
        self._last_read: tuple[int, VaultError | None] = (0, None)
        self._failed_at = -math.inf  # time.monotonic() when the last read failed, if it did
        self._place = 0  # how many times a reload moved the list (`_moved`)

    @property
    def _revocations_path(self) -> str:
        return f"{self.cfg.state_path}/{REVOCATIONS}"

    def list_mark(self) -> str:
        """Where this replica reads and writes revocations, as a token issued here names it
        (claim `rl`): a digest of the mount and `tokens.state_path`. SECURITY: a token whose
        list is read elsewhere now (the path or mount changed) could have been revoked where
        no one reads any more: it is refused, not taken as never revoked."""
        place = f"{self.config.vault.kv_mount}/{self.cfg.state_path}"
        return hashlib.sha256(place.encode()).hexdigest()[:16]

    async def _read_state(self, path: str, *, earlier: bool = False) -> tuple[dict[str, Any], int]:
        """A state secret and its version; ({}, 0) when it does not exist yet. With `earlier`,
        a secret at a path an earlier build wrote (read only, in either layout)."""
        return await read_state(self.vault, self.config.vault.kv_mount, path, earlier=earlier)

    async def revocation_list(self) -> Revocations:
        """The revocation list as Vault holds it now (with earlier builds')."""
        mount, main = self.config.vault.kv_mount, self._revocations_path
        copy = ListCopy()
        data, version = await self._read_state(main)
        if version:
            copy.take_main(data, version, main)
        for shard in copy.behind():
            path = shard_path(main, shard)
            copy.take_shard(shard, *await read_written(self.vault, mount, path), path)
        listed = copy.revocations()
        for name in EARLIER_REVOCATIONS:
            earlier, _ = await self._read_state(f"{self.cfg.state_path}/{name}", earlier=True)
            listed = listed.union(Revocations.from_data(earlier))
        return listed

    async def refresh_revocations(self) -> None:
        """Bring this replica's copy up to what Vault holds now (one metadata read when
        nothing changed; `_refresh`), or raise VaultError. Callers that arrive while a read is
        under way share the next one, however it ends: whatever was revoked before they arrived
        is seen, and while Vault does not answer they fail together, not one after another."""
        arrived = self._reads_begun
        async with self._reading:
            ended, failure = self._last_read
            if ended > arrived:  # a read begun after this call arrived has ended
                if failure is not None:
                    raise VaultError(str(failure))
                if self.revocations_read:
                    return
            for _ in range(MOVES):  # the list moved or was made afresh meanwhile: again
                self._reads_begun += 1
                begun, began = self._reads_begun, time.monotonic()
                try:
                    await self._refresh()
                except VaultError as exc:
                    self._last_read, self._failed_at = (begun, exc), time.monotonic()
                    raise
                if self.revocations_read:
                    self._last_read, self._failed_at = (begun, None), -math.inf
                    self._read_began = max(self._read_began, began)
                    return
            raise VaultError("the revocation list moved while it was read; try again")

    async def _refresh(self) -> None:
        """Re-read the list's main secret if its version changed, then the shards whose
        version its index raised, and earlier builds' lists every LEGACY_POLL; each part is
        in use as soon as it is read, and `revocations_read` is set once all are. Each step
        stops if a reload moved the list while it waited on Vault (`_moved`): what was read
        at the old place is not the new place's."""
        place, copy = self._place, self._copy
        mount, state_path = self.config.vault.kv_mount, self.cfg.state_path
        main = f"{state_path}/{REVOCATIONS}"
        if (
            await self._read_main(place, copy, mount, main)
            and await self._read_shards(place, copy, mount, main)
            and await self._read_earlier(place, copy, mount, state_path)
        ):
            self.revocations_read = True

    async def _read_main(self, place: int, copy: ListCopy, mount: str, main: str) -> bool:
        taken = self._writes_taken
        version = await self.vault.kv_version(mount, main)
        if place != self._place:
            return False
        if version is None and copy.main_version is not None and taken == self._writes_taken:
            copy.forget()  # deleted (by hand): its next write makes it afresh
            self._publish(self._combined(copy))
        if version is not None and version != copy.main_version:
            data, version = await read_written(self.vault, mount, main)
            if place != self._place:
                return False
            # Unless a write of this replica's, taken meanwhile, is the later (a slow read).
            if taken == self._writes_taken or version > (copy.main_version or 0):
                copy.take_main(data, version, main)
                self._publish(self._combined(copy))
        return True

    async def _read_shards(self, place: int, copy: ListCopy, mount: str, main: str) -> bool:
        """Read the shards the index raised, together; every one that reads is in use, and
        the first failure is raised after."""
        wanted = {shard: copy.index[shard] for shard in copy.behind()}
        if not wanted:
            return True
        name = copy.name
        reads = [read_written(self.vault, mount, shard_path(main, n)) for n in wanted]
        shards = await asyncio.gather(*reads, return_exceptions=True)
        if place != self._place or name != copy.name:
            return False  # moved, or made afresh meanwhile (this replica's write took it)
        failed: BaseException | None = None
        for (shard, indexed), read in zip(wanted.items(), shards, strict=True):
            error = _took(copy, shard, indexed, read, shard_path(main, shard))
            failed = failed or error  # every other shard is still taken
        self._publish(self._combined(copy))
        if failed is not None:
            raise failed
        return True

    async def _read_earlier(self, place: int, copy: ListCopy, mount: str, state_path: str) -> bool:
        """Earlier builds' lists, every LEGACY_POLL (read only, in either layout)."""
        now = time.monotonic()
        if self._earlier_read_at is not None and now - self._earlier_read_at < LEGACY_POLL:
            return True
        for name in EARLIER_REVOCATIONS:
            path = f"{state_path}/{name}"
            version = await self.vault.kv_version(mount, path)
            if place != self._place:
                return False
            if version == self._earlier.get(path, (None, None))[1]:
                continue
            earlier: dict[str, Any] = {}
            if version is not None:
                earlier, version = await read_written(self.vault, mount, path, earlier=True)
                if place != self._place:
                    return False
            self._earlier[path] = Revocations.from_data(earlier), version
            self._publish(self._combined(copy))
        self._earlier_read_at = now
        return True

    def _publish(self, revocations: Revocations) -> None:
        """Judge by `revocations` from now on, and end the requests under way they name."""
        self._revocations = revocations
        self.inflight.end_dead()

    def _combined(self, copy: ListCopy) -> Revocations:
        """The list `copy` holds with what earlier builds wrote, pruned (no one else prunes
        those any more; once they hold nothing live, the list is `copy`'s, not a copy of it)."""
        combined = copy.revocations()
        longest = max(self.cfg.max_ttl, self.cfg.exception_max_ttl)
        for earlier, _ in self._earlier.values():
            earlier.prune(self.clock(), longest)
            combined = combined.union(earlier)
        return combined

    def revocation_status(self) -> RevocationStatus:
        """This replica's copy of the list: its entries, whether it was read yet, and how
        long ago its last whole read began."""
        held = self._revocations
        entries = len(held.ids) + len(held.subjects) + len(held.tasks)
        age = time.monotonic() - self._read_began if self.revocations_read else None
        return RevocationStatus(entries, self.revocations_read, age)

    def list_current(self, *, for_use: bool = True) -> bool:
        """Whether this replica's copy of the list was read whole, by a read begun less than
        `tokens.revocation_max_staleness` ago (the poll keeps it so while Vault answers).
        Not `for_use` (a lease renewed, a task ended), read once is enough: neither lets the
        token be used, and every use checks a current list."""
        if not for_use:
            return self.revocations_read
        age = time.monotonic() - self._read_began
        return self.revocations_read and age < self.cfg.revocation_max_staleness

    async def list_read(self, *, for_use: bool = True) -> None:
        """Return once this replica's copy of the revocation list is current (`list_current`;
        one read for all who wait, however it ends); call it with no wait between it and the
        judging that uses the list. SECURITY: a token is never judged against a list not read
        yet (Vault down at the start, the list unreadable, a reload that moved it), nor for a
        use against one older than revocation_max_staleness (a replica cut off from Vault
        while others record revocations): it is read now, or the token refused with 503 (at
        once for a stale list while the last read failed less than a poll interval ago)."""
        if self.list_current(for_use=for_use):
            return
        poll = self.cfg.revocation_poll_interval
        if self.revocations_read and time.monotonic() - self._failed_at < poll:
            raise self.unreadable()  # stale, and Vault just failed: no read each while it hangs
        try:
            await self.refresh_revocations()
        except VaultError:
            raise self.unreadable() from None

    def unreadable(self) -> RequestError:
        """The refusal of a task token while this replica's list cannot be read: 503, to try
        again after a poll interval."""
        return self.inflight.refusal(UNVERIFIABLE)

    def _moved(self) -> None:
        """`tokens.state_path` changed (a reload): what was read from the old place counts
        no more, and nothing is judged until the new place is read."""
        self._revocations, self._copy, self._earlier = Revocations(), ListCopy(), {}
        self._earlier_read_at, self._last_read = None, (0, None)
        self.revocations_read, self._read_began, self._failed_at = False, -math.inf, -math.inf
        self._place += 1


def _took(
    copy: ListCopy,
    shard: int,
    indexed: int,
    read: tuple[dict[str, Any], int] | BaseException,
    path: str,
) -> BaseException | None:
    """Take a shard as read into `copy`; why it could not be, if it could not."""
    if isinstance(read, BaseException):
        return read
    data, version = read
    if version < indexed:  # never so for a shard keyproxy wrote: made afresh
        return VaultError(f"read {path}: behind its index")
    try:
        copy.take_shard(shard, data, version, path)
    except VaultError as exc:
        return exc
    return None
