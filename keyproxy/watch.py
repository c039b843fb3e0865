"""Watch a few files for changes of their content: the config file, certificates, trust bundles.

    async for changed in watch_files([config_path, cert_path], stop=stop_event):
        reload(changed)

`watch_files` is an async iterator run by its owner (a task the app starts and stops, or the
server's main loop); it starts no task of its own. It yields the set of watched paths whose
content changed, after a burst of file events has settled (`debounce_ms`). "Changed" means the
SHA-256 of the bytes read through the path (following symlinks) differs from the last one seen,
so a write of identical content, a touch, or an unrelated file in the same directory yields
nothing. A path that is missing or unreadable when the events settle is skipped, not reported:
a writer may be between deleting and re-creating it; once it is back with new content, it is
reported.

What it sees, and how. The watch is on each file's parent directory (not recursive), not on the
file, because the ways files get replaced all change the directory:

- an in-place write modifies the file;
- an atomic replace (`write tmp; rename tmp over file`) moves a new inode into the directory;
- Kubernetes' ConfigMap and Secret volumes hold `name -> ..data/name` and `..data ->
  ..<timestamp>`; an update writes a new timestamped directory and renames a new `..data`
  symlink over the old one. The watched path itself never changes; the rename of `..data` in
  the same directory does.

Only events naming a watched file or a `..`-prefixed entry (`..data`, `..<timestamp>`, their
temporary names) are looked at: a busy neighbour, such as an audit log written next to the
configuration, must not wake the watch on every write. An editor that saves through a
temporary file still renames it over the watched name, which is seen.

Events come from `watchfiles` (inotify on Linux, via the Rust `notify` crate), which sees all
three; the tests run each case against inotify and against polling. `poll=True` switches
`watchfiles` to its stat-polling mode every `poll_ms` for filesystems where inotify says
nothing (NFS, some FUSE and container overlay mounts); hashing is the same either way. We keep
the content hash even with events because inotify reports writes and renames, not whether the
resolved bytes differ, and a reload is not free.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncGenerator, Iterable, Mapping
from pathlib import Path

import watchfiles

from keyproxy import capped
from keyproxy.config import MAX_CONFIG_BYTES

# watchfiles reports every batch ("1 change detected") at INFO; our own events say what changed.
# Left on, a log written into a watched directory would report its own writes for ever.
logging.getLogger("watchfiles.main").setLevel(logging.WARNING)

DEBOUNCE_MS = 200
POLL_MS = 500
SETTLE_ROUNDS = 30  # looks of `_settled` before a file that keeps changing is taken anyway
RECHECK_MS = 5000


def digest(path: Path) -> str | None:
    """SHA-256 of the content read through `path` (its first MAX_CONFIG_BYTES and one more),
    or None if it cannot be read now. A file that long is refused whole when the
    configuration is read (a change beyond that point changes nothing then), and
    certificates and bundles are far shorter: a huge file costs one bounded read per
    change, not a read of all of it."""
    try:
        with capped.open_regular(path) as file:  # a FIFO is unreadable, not waited for
            return hashlib.sha256(file.read(MAX_CONFIG_BYTES + 1)).hexdigest()
    except OSError:
        return None


async def watch_files(
    paths: Iterable[Path],
    *,
    stop: asyncio.Event | None = None,
    baseline: Mapping[Path, str | None] | None = None,
    debounce_ms: int = DEBOUNCE_MS,
    poll: bool = False,
    poll_ms: int = POLL_MS,
    recheck_ms: int = RECHECK_MS,
    settle: float = 0.0,
) -> AsyncGenerator[frozenset[Path], None]:
    """Yield the watched paths whose content changed, until `stop` is set or the loop is closed.

    Paths must be absolute and are not resolved (a symlink is watched as the symlink). Their
    parent directories must exist. Changes are relative to `baseline`: the `digest` of each
    path taken just before its owner read it, so a change between that read and the start of
    the watch is reported too. Without one, the content when iteration starts is the baseline.
    With `settle`, a changed path is reported once its content has stayed the same that many
    seconds (`_settled`), and that content is the next baseline.
    """
    watched = tuple(dict.fromkeys(paths))
    if not watched:
        raise ValueError("nothing to watch")
    if relative := [str(p) for p in watched if not p.is_absolute()]:
        raise ValueError(f"watched paths must be absolute: {relative}")
    known = {
        path: baseline[path]
        if baseline and path in baseline
        else await asyncio.to_thread(digest, path)
        for path in watched
    }
    if baseline and (changed := await _changes(known, settle)):
        yield changed  # changed since the owner read it, before the watch began
    directories = sorted({path.parent for path in watched})
    names = frozenset(path.name for path in watched)

    def relevant(_: watchfiles.Change, name: str) -> bool:
        base = name.rpartition("/")[2]
        return base in names or base.startswith("..")

    async for _events in watchfiles.awatch(
        *directories,
        watch_filter=relevant,
        debounce=debounce_ms,
        stop_event=stop,
        recursive=False,
        force_polling=poll,
        poll_delay_ms=poll_ms,
        rust_timeout=recheck_ms,
        yield_on_timeout=True,  # an empty batch every recheck_ms without events
    ):
        if changed := await _changes(known, settle):
            yield changed


async def _changes(known: dict[Path, str | None], settle: float) -> frozenset[Path]:
    """The paths whose digest differs from `known` (updated in place, with the settled one);
    unreadable ones skipped."""
    changed = set()
    for path, before in known.items():
        now = await asyncio.to_thread(digest, path)
        if now is not None and now != before:
            known[path] = await _settled(path, now, settle) if settle else now
            changed.add(path)
    return frozenset(changed)


async def _settled(path: Path, now: str, wait: float) -> str | None:
    """The digest of `path` once it has stayed the same for `wait` seconds (or after
    SETTLE_ROUNDS looks that each found it changed again).

    SECURITY: a file rewritten in place (truncated, then written: many editors' save, a
    shell's `>`, a template streamed into it) is seen while its writer is still at it. A
    prefix of a configuration is often valid, and what it lacks may be a restriction written
    further down (a policy's source_cidrs, claims or limits). `debounce_ms` is a fraction of
    this."""
    for _ in range(SETTLE_ROUNDS):
        await asyncio.sleep(wait)
        again = await asyncio.to_thread(digest, path)
        if again == now:
            break
        now = again if again is not None else now
    return now
