"""Every route's key in memory, refreshed in the background, so the proxy's hot path
(`KeyCache.get`) does no I/O; and the change index that tells caches which key changed.

SECURITY: key values never appear in a log event; the cache logs fingerprints only.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from keyproxy.config import Route, SecretRef, default_full_refresh
from keyproxy.errors import Unavailable, VaultError
from keyproxy.vault.client import Vault
from keyproxy.vault.kv import KeyVersion
from keyproxy.vault.transport import CONCURRENCY

log = structlog.get_logger("keyproxy.vault")


# The change index: whoever writes a key (`keyproxy rotate`, `keyproxy keys put`,
# vault-dev/put-key.sh) then writes a new version of this KV v2 secret (under vault.kv_mount)
# naming the key's secret. Caches poll its version number (one metadata read) and re-read only
# the secrets it names; a slow sweep re-reads every key anyway, for writes made without it.
KEY_INDEX_PATH = "keyproxy/state/keys"
# More index versions than this since the last poll (or any of them unreadable): re-read all.
# KV v2 keeps 10 versions by default.
INDEX_WINDOW = 8
# A secret the index names is read again at the next refreshes until a new version shows up,
# at most this many times: a lagging standby may answer the first read with the old one.
AWAIT_READS = 5


async def announce_key_change(vault: Vault, ref: SecretRef) -> None:
    """Tell every cache that `ref`'s secret has a new version. Never raises: the key is stored
    already, and caches find it within vault.full_refresh_interval without the notice."""
    try:
        await vault.write_kv(vault.cfg.kv_mount, KEY_INDEX_PATH, {"secret": ref.name})
    except VaultError as exc:
        log.warning("key_index.write_failed", secret=ref.name, error=str(exc))


def _version(entry: _Entry) -> int | None:
    return entry.key.version if entry.key else None


@dataclass
class _Entry:
    key: KeyVersion | None = None
    loaded_at: float | None = None  # clock() of the last read or confirmation (index unchanged)
    error: str | None = None  # the last failure, cleared by a success
    error_at: float | None = None
    errors: int = 0  # failed reads, ever (for metrics)
    changes: int = 0  # new versions seen after the first load (rotations, for metrics)
    reads: int = 0  # reads of the secret, ever


class KeyCache:
    """The current key of every route, refreshed in the background; `get` does no I/O.

    Every `refresh_interval` it polls the change index and re-reads the secrets it names (until
    their new version shows up, a few times at most), plus a slice of all of them so each is
    re-read at least every `full_refresh_interval` (by default a minute, or half of
    `max_staleness` if shorter). A key whose last read succeeded and that the index does not
    name is confirmed current."""

    def __init__(
        self,
        vault: Vault,
        routes: Mapping[str, Route],
        refresh_interval: float,
        max_staleness: float,
        *,
        full_refresh_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._vault = vault
        self._refs = {name: route.secret for name, route in routes.items()}
        self._entries = {ref: _Entry() for ref in self._refs.values()}
        self._interval = refresh_interval
        self._max_staleness = max_staleness
        self._clock = clock
        self._index_version: int | None = None  # None: not read yet, or unreadable
        self._index_created: Any = None  # its creation time: a deleted and recreated index
        self._index_error: str | None = None
        # Named by the index, no new version read yet: (the version cached, reads left).
        self._awaited: dict[SecretRef, tuple[int | None, int]] = {}
        # The sweep: each refresh re-reads the next few secrets in turn, so every one is read
        # once per full_refresh_interval and Vault sees an even trickle rather than bursts.
        self._full = full_refresh_interval or default_full_refresh(refresh_interval, max_staleness)
        self._sweep_credit = 0.0
        self._plan_sweep()

    def _plan_sweep(self) -> None:
        self._sweep = itertools.cycle(list(self._entries))
        self._sweep_rate = len(self._entries) * min(1.0, self._interval / self._full)

    async def prepare(self, routes: Mapping[str, Route]) -> None:
        """Read the secrets of `routes` not cached yet (a reload's new and changed routes),
        before they serve; the routes `get` names are still the running ones."""
        new = {route.secret for route in routes.values()} - self._entries.keys()
        for ref in new:
            self._entries[ref] = _Entry()
        if new:
            self._plan_sweep()
            await self._load_many(new)

    def use(self, routes: Mapping[str, Route]) -> None:
        """Serve `routes` (prepared first): `get`, readiness and status name these now."""
        self._refs = {name: route.secret for name, route in routes.items()}

    def forget(self, keep: Iterable[SecretRef]) -> None:
        """Drop every cached key but those of `keep`: the secrets of the configurations
        still serving a request, once a reload's old one has finished its last."""
        kept = set(keep) | set(self._refs.values())
        gone = [ref for ref in self._entries if ref not in kept]
        for ref in gone:
            del self._entries[ref]
            self._awaited.pop(ref, None)
            log.info("key_cache.key_forgotten", secret=ref.name, field=ref.field)
        if gone:
            self._plan_sweep()

    async def load_all(self) -> None:
        """Read every distinct secret (at most 16 at a time). Failures are recorded per
        secret, never raised: the last good key keeps serving until it is too stale."""
        await self._poll_index()  # before the reads: a change after it shows up next time
        await self._load_many(self._entries)

    async def refresh(self) -> None:
        """One refresh: the secrets the index names, those whose last read failed, and the
        next slice of the sweep; the rest are confirmed if the index was read."""
        started = self._clock()
        changed = await self._poll_index()
        if changed is None and self._index_version is not None:
            await self._load_many(self._entries)  # the index cannot tell what changed
            return
        due = {ref for ref, e in self._entries.items() if e.error is not None or e.key is None}
        self._sweep_credit += self._sweep_rate
        turn = min(len(self._entries), math.floor(self._sweep_credit + 1e-9))
        self._sweep_credit -= turn
        due.update(itertools.islice(self._sweep, turn))
        for ref, entry in self._entries.items():
            if changed and ref.name in changed:
                self._awaited[ref] = (_version(entry), AWAIT_READS)
        due.update(self._awaited)
        await self._load_many(due)
        self._awaited = {
            ref: (before, left - 1)
            for ref, (before, left) in self._awaited.items()
            if left > 1 and ref in self._entries and _version(self._entries[ref]) == before
        }
        if self._index_version is None:
            return  # no index: nothing is confirmed without a read
        for e in self._entries.values():
            if e.error is None and e.loaded_at is not None and e.loaded_at < started:
                e.loaded_at = started

    async def _poll_index(self) -> set[str] | None:
        """The secrets named by index versions written since the last poll; None when it
        cannot tell (the first poll, a gap, an unreadable version). After a failed poll
        `_index_version` is None."""
        mount, last, created = self._vault.cfg.kv_mount, self._index_version, self._index_created
        self._index_version = None
        try:
            metadata = await self._vault.kv_metadata(mount, KEY_INDEX_PATH) or {}
        except VaultError as exc:
            if str(exc) != self._index_error:
                log.warning("key_index.read_failed", error=str(exc))
            self._index_error = str(exc)
            return None
        version = metadata.get("current_version")
        version = version if isinstance(version, int) and version > 0 else 0
        self._index_error = None
        self._index_version, self._index_created = version, metadata.get("created_time")
        recreated = created != self._index_created  # deleted and written again, or restored
        if last is None or recreated or not 0 <= version - last <= INDEX_WINDOW:
            return None
        names: set[str] = set()
        for number in range(last + 1, version + 1):
            try:
                data = await self._vault.read_kv_at(mount, KEY_INDEX_PATH, number)
            except VaultError:
                return None  # pruned (max_versions), deleted, or unreadable: re-read all
            names.add(str(data.get("secret")))
        return names

    async def _load_many(self, refs: Iterable[SecretRef]) -> None:
        limit = asyncio.Semaphore(CONCURRENCY)

        async def load(ref: SecretRef) -> None:
            async with limit:
                await self._load(ref)

        await _gather(load(ref) for ref in refs)

    async def _load(self, ref: SecretRef) -> None:
        entry = self._entries.get(ref)
        if entry is None:
            return  # forgotten while the read waited its turn
        entry.reads += 1
        try:
            key = await self._vault.read_key(ref)
        except VaultError as exc:
            if str(exc) != entry.error:  # once per distinct failure, not every refresh
                log.warning("key_cache.read_failed", secret=ref.name, error=str(exc))
            entry.error, entry.error_at = str(exc), self._clock()
            entry.errors += 1
            return
        if entry.error is not None:
            log.info("key_cache.read_recovered", secret=ref.name)
        if entry.key is not None and entry.key.version != key.version:
            entry.changes += 1
        if entry.key is None or entry.key.version != key.version:
            log.info(
                "key_cache.key_loaded",
                secret=ref.name,
                field=ref.field,
                version=key.version,
                fingerprint=key.fingerprint,
            )
        entry.key, entry.loaded_at, entry.error, entry.error_at = key, self._clock(), None, None

    async def run(self) -> None:
        """Refresh every `refresh_interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            await self.refresh()

    def get(self, route: str) -> KeyVersion:
        """The key to inject for `route`. Raises Unavailable("key_unavailable") if it was never
        loaded, Unavailable("key_stale") if the last good read is older than max_staleness."""
        ref = self._refs.get(route)
        return self.key_of(ref) if ref is not None else self.key_of(None)

    def key_of(self, ref: SecretRef | None) -> KeyVersion:
        """The key cached for the secret `ref` (a route of the configuration a request
        started under: after a reload it may no longer be the running one's), as `get`."""
        entry = self._entries.get(ref) if ref is not None else None
        if entry is None or entry.key is None or entry.loaded_at is None:
            raise Unavailable("key_unavailable", "the key for this route is not loaded")
        if self._clock() - entry.loaded_at > self._max_staleness:
            # SECURITY: a key that may have been rotated and revoked is not injected (inv. 8).
            raise Unavailable("key_stale", "the key for this route could not be refreshed")
        return entry.key

    def ready(self) -> bool:
        """Every route has a key that is not stale."""
        now = self._clock()
        entries = (self._entries[ref] for ref in self._refs.values())
        return all(
            e.loaded_at is not None and now - e.loaded_at <= self._max_staleness for e in entries
        )

    def status(self) -> dict[str, dict[str, Any]]:
        """Per route: where its key lives, version, fingerprint, age of the last good read,
        and the last error. Never a key value."""
        now = self._clock()
        out: dict[str, dict[str, Any]] = {}
        for route, ref in self._refs.items():
            e = self._entries[ref]
            out[route] = {
                "secret": ref.name,
                "field": ref.field,
                "version": e.key.version if e.key else None,
                "fingerprint": e.key.fingerprint if e.key else None,
                "age": None if e.loaded_at is None else now - e.loaded_at,
                "fresh": e.loaded_at is not None and now - e.loaded_at <= self._max_staleness,
                "last_error": e.error,
                "last_error_age": None if e.error_at is None else now - e.error_at,
                "created_at": e.key.created_at if e.key else None,
                "reads": e.reads,
                "read_errors": e.errors,
                "versions_seen": e.changes,
            }
        return out


async def _gather(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    async with asyncio.TaskGroup() as group:
        for coro in coros:
            group.create_task(coro)
