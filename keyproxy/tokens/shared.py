"""Changes to the secrets every replica writes (the revocation list's, the exception
register), made together.

Each write is check-and-set: read the secret, change it, write it back naming the version
read; a writer that lost the race reads again. Within a process the changes that arrive while
a write is under way wait for it and then go out together in the next one, so a burst (many
leases lapsing in one sweep, many tasks ending at once) costs one or two writes, not one each
racing the others. A conflict with another replica is tried again after a random pause that
grows with each try (full jitter), so replicas that collided do not collide again in step.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Coroutine
from operator import methodcaller
from typing import Any, Final, Generic, TypeVar

import structlog

from keyproxy import strictjson
from keyproxy.errors import RequestError, VaultError
from keyproxy.vault import CasConflict, Vault

log = structlog.get_logger("keyproxy.tokens")

_C = TypeVar("_C")
_R = TypeVar("_R")

ATTEMPTS: Final = 10  # writes tried before the change is refused (503)
FIRST_PAUSE: Final = 0.01  # seconds: the longest pause after the first conflict, doubling
LONGEST_PAUSE: Final = 0.5  # seconds: the pause stops growing here (at most 2.1 s in all)
# The one field a shared secret's data is written in, as JSON text. Vault/OpenBao refuse a
# request whose JSON holds more than a set number of strings (object keys count: about
# 1,000 by default), which a list with an entry per revoked token would pass within the hour;
# one text is one string, however many entries it holds.
STATE_FIELD: Final = "state"
LARGE_STATE: Final = 512 * 1024  # bytes of that text

# Where the secret is (KV mount, path): read at each write, so a reload that moves it counts.
Location = Callable[[], tuple[str, str]]
# The secret's new data, given its data as read and the changes waiting (in order).
Merge = Callable[[dict[str, Any], list[_C]], dict[str, Any]]


class Batched(Generic[_C, _R]):
    """Changes to shared state, written together: `change` waits for the write (`write`,
    given every change waiting, in order) that holds it."""

    def __init__(self, write: Callable[[list[_C]], Awaitable[_R]]) -> None:
        self._write = write
        self._waiting: list[tuple[_C, asyncio.Future[_R]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def change(self, change: _C) -> _R:
        """Make `change`: the outcome of the write that made it. A change whose caller goes
        away (cancelled) is still written."""
        loop = asyncio.get_running_loop()
        writer = self._writer
        if writer is not None and writer.get_loop() is not loop:
            # Left by an event loop that has ended (a CLI command before this one): what
            # waited there has no one left to tell.
            writer, self._waiting = None, []
        done: asyncio.Future[_R] = loop.create_future()
        done.add_done_callback(_retrieved)
        self._waiting.append((change, done))
        if writer is None or writer.done():
            self._writer = loop.create_task(self._write_waiting(), name="shared-secret-write")
        return await asyncio.shield(done)

    async def aclose(self, within: float) -> None:
        """Let the write under way, and those waiting for it, finish (for `within` seconds
        at most) before the Vault client closes: at shutdown."""
        writer = self._writer
        if writer is None or writer.done() or writer.get_loop() is not asyncio.get_running_loop():
            return
        await asyncio.wait([writer], timeout=max(0.0, within))

    async def _write_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                written = await self._write([change for change, _ in batch])
            except Exception as exc:  # noqa: BLE001  # each waiting change fails with it
                _settle(batch, methodcaller("set_exception", exc))
                continue
            except asyncio.CancelledError:  # the loop is closing: nothing waits any more
                _settle(batch, asyncio.Future.cancel)
                raise
            _settle(batch, methodcaller("set_result", written))


class SharedSecret(Batched[_C, tuple[dict[str, Any], int]]):
    """A KV v2 secret written by every replica; `change` waits for the write that holds it
    and returns the data and version written."""

    def __init__(
        self,
        vault: Vault,
        location: Location,
        merge: Merge[_C],
        contended: Callable[[], RequestError],
    ) -> None:
        super().__init__(self._changed)
        self.vault = vault
        self._location = location
        self._merge = merge
        self._contended = contended  # the error of each change of a write that kept conflicting

    async def _changed(self, changes: list[_C]) -> tuple[dict[str, Any], int]:
        return await cas_write(
            self.vault, self._location, lambda data: self._merge(data, changes), self._contended
        )


async def cas_write(
    vault: Vault,
    location: Location,
    merge: Callable[[dict[str, Any]], dict[str, Any]],
    contended: Callable[[], RequestError],
) -> tuple[dict[str, Any], int]:
    """Write `merge` of a shared secret's data with check-and-set, reading it again after
    each conflict (ATTEMPTS at most, with full-jitter pauses; then `contended()` is raised):
    the data and version written."""
    for attempt in range(ATTEMPTS):
        if attempt:
            longest = min(LONGEST_PAUSE, FIRST_PAUSE * 2 ** (attempt - 1))
            await asyncio.sleep(random.uniform(0, longest))  # noqa: S311  # jitter, no secret
        mount, path = location()
        data, version = await read_state(vault, mount, path)
        new = merge(data)
        try:
            written = encoded(new, path)
            return new, await vault.write_kv(mount, path, written, cas=version)
        except CasConflict:
            continue
    raise contended()


def _settle(
    batch: list[tuple[Any, asyncio.Future[Any]]], outcome: Callable[[asyncio.Future[Any]], object]
) -> None:
    """Tell each waiting change how its write ended (`outcome`: written, failed, cancelled)."""
    for _, done in batch:
        if not done.done() and not done.get_loop().is_closed():
            outcome(done)


def _retrieved(done: asyncio.Future[Any]) -> None:
    """Mark a change's failure as seen: its caller may have gone (cancelled) and not read
    it (`to_the_end` reports that)."""
    if not done.cancelled():
        done.exception()


async def to_the_end(work: Coroutine[Any, Any, None], what: str) -> None:
    """Run `work` to its end even if the caller is cancelled (its client disconnected, the
    holder gave up waiting): a revocation once begun is written, logged and counted. If it
    then fails, with no one left to tell, the failure is logged."""
    task = asyncio.ensure_future(work)
    _running.add(task)
    task.add_done_callback(_running.discard)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda done: _report(done, what))
        raise


_running: set[asyncio.Future[None]] = set()  # held here: the loop keeps only weak references


async def finish_running(within: float) -> None:
    """Let the revocations begun in this event loop end (for `within` seconds at most)
    before the clients they use close: at shutdown."""
    loop = asyncio.get_running_loop()
    mine = [task for task in _running if task.get_loop() is loop]
    if mine:
        await asyncio.wait(mine, timeout=within)


def _report(done: asyncio.Future[None], what: str) -> None:
    if done.cancelled():  # the process stopped before it ended (finish_running's bound)
        log.warning("shared_write_abandoned", what=what)
        return
    error = done.exception()
    if error is not None:
        log.warning("shared_write_failed", what=what, error=str(error))


async def read_state(
    vault: Vault, mount: str, path: str, *, earlier: bool = False
) -> tuple[dict[str, Any], int]:
    """A shared secret's data and version (`read_written`); ({}, 0) when it does not exist
    yet (a write with cas=0 creates it)."""
    if await vault.kv_version(mount, path) is None:
        return {}, 0
    return await read_written(vault, mount, path, earlier=earlier)


async def read_written(
    vault: Vault, mount: str, path: str, *, earlier: bool = False
) -> tuple[dict[str, Any], int]:
    """A shared secret's data and version, as `SharedSecret` wrote it (`encoded`); with
    `earlier`, also as an earlier build wrote it (a field per entry, no STATE_FIELD).
    Anything else there is refused (VaultError), never read as an empty list."""
    stored, version = await vault.read_kv(mount, path)
    if earlier and STATE_FIELD not in stored:
        return stored, version
    text = stored.get(STATE_FIELD)
    data = None
    if stored.keys() == {STATE_FIELD} and isinstance(text, str):
        with contextlib.suppress(ValueError):
            data = strictjson.loads(text.encode("utf-8", "surrogatepass"))
    if not isinstance(data, dict):
        raise VaultError(f"read {mount}/{path}: not keyproxy's state")
    return data, version


def encoded(data: dict[str, Any], path: str = "") -> dict[str, str]:
    """A shared secret's data as written: one JSON text in STATE_FIELD, which `read_written`
    reads back (a text it would refuse is never written: VaultError). One past LARGE_STATE is
    logged: about half of what a Raft entry or a Vault JSON string may hold."""
    try:
        text = strictjson.dumps(data)
    except ValueError as exc:
        raise VaultError(f"cannot write {path}: {exc}") from None
    size = len(text.encode())
    if size > LARGE_STATE:
        log.warning("shared_state_large", path=path, bytes=size)
    return {STATE_FIELD: text}
