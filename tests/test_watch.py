"""The file watch on real files: in-place writes, renames, ConfigMap symlink swaps, deletions.

Every case runs twice: on inotify events and on stat polling. A test that expects no change
writes to a second, sentinel file afterwards and checks that the sentinel alone is reported.
A third file, the probe, is written until the watch reports it, so no test writes before the
watch has started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keyproxy.config import MAX_CONFIG_BYTES
from keyproxy.watch import digest, watch_files

WAIT_S = 10


@dataclass
class Watching:
    """What a watch reported. `probe` is written only to see that the watch has started."""

    probe: Path
    changes: asyncio.Queue[frozenset[Path]]

    async def next(self) -> frozenset[Path]:
        """The next reported set of changed paths besides the probe, within WAIT_S seconds."""
        async with asyncio.timeout(WAIT_S):
            while not (changed := await self.changes.get() - {self.probe}):
                pass
        return changed

    async def run(self, paths: list[Path], stop: asyncio.Event, poll: bool) -> None:
        async for changed in watch_files([*paths, self.probe], stop=stop, poll=poll, poll_ms=50):
            self.changes.put_nowait(changed)

    async def started(self) -> None:
        """Write the probe until the watch reports it (events before the watch are lost)."""
        deadline = asyncio.get_running_loop().time() + WAIT_S
        for n in range(1000):
            assert asyncio.get_running_loop().time() < deadline, "the watch never started"
            self.probe.write_text(f"probe {n}")
            try:
                async with asyncio.timeout(0.3):
                    while self.probe not in await self.changes.get():
                        pass
            except TimeoutError:
                continue
            return


@pytest.fixture(params=[False, True], ids=["inotify", "polling"])
def poll(request: pytest.FixtureRequest) -> bool:
    value: bool = request.param
    return value


@pytest.fixture
async def files(tmp_path: Path, poll: bool) -> AsyncIterator[tuple[Watching, Path, Path]]:
    """A watch over `<tmp>/conf/app.yaml` and a sentinel beside it, owned by this fixture."""
    directory = tmp_path / "conf"
    directory.mkdir()
    target, sentinel = directory / "app.yaml", directory / "sentinel"
    target.write_text("version: 1\n")
    sentinel.write_text("start")
    watcher = Watching(directory / "probe", asyncio.Queue())
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run([target, sentinel], stop, poll))
    try:
        await watcher.started()
        yield watcher, target, sentinel
    finally:
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await task


async def test_in_place_write(files: tuple[Watching, Path, Path]) -> None:
    """Writing new content into the file is reported."""
    watcher, target, _ = files
    target.write_text("version: 2\n")
    assert await watcher.next() == {target}


async def test_a_reported_change_logs_nothing_at_info(
    files: tuple[Watching, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """watchfiles' own "1 change detected" stays out of an INFO log: an audit log written into
    the watched directory would otherwise report its own writes for ever."""
    caplog.set_level(logging.INFO)
    watcher, target, _ = files
    target.write_text("version: 2\n")
    assert await watcher.next() == {target}
    assert not [r for r in caplog.records if r.name.startswith("watchfiles")]


async def test_rename_over(files: tuple[Watching, Path, Path]) -> None:
    """An atomic replace (write a temporary file, rename it over) is reported."""
    watcher, target, _ = files
    tmp = target.with_name(".app.yaml.tmp")
    tmp.write_text("version: 2\n")
    tmp.replace(target)
    assert await watcher.next() == {target}


async def test_unchanged_content_is_not_reported(files: tuple[Watching, Path, Path]) -> None:
    """Rewriting the same bytes, touching, or replacing with equal content reports nothing."""
    watcher, target, sentinel = files
    target.write_text("version: 1\n")
    os.utime(target)
    tmp = target.with_name(".app.yaml.tmp")
    tmp.write_text("version: 1\n")
    tmp.replace(target)
    (target.parent / "unrelated.txt").write_text("x")
    sentinel.write_text("after")
    assert await watcher.next() == {sentinel}


async def test_deleted_then_recreated(files: tuple[Watching, Path, Path]) -> None:
    """A deleted file is not reported; re-created with new content, it is."""
    watcher, target, sentinel = files
    target.unlink()
    sentinel.write_text("after delete")
    assert await watcher.next() == {sentinel}
    target.write_text("version: 2\n")
    assert await watcher.next() == {target}


async def test_burst_is_debounced(files: tuple[Watching, Path, Path]) -> None:
    """A burst of writes is reported in fewer batches than writes, ending on the last content."""
    watcher, target, sentinel = files
    for n in range(20):
        target.write_text(f"version: {n + 2}\n")
    sentinel.write_text("after burst")
    batches = []
    while sentinel not in (batch := await watcher.next()):
        batches.append(batch)
    batches.append(batch)
    assert len(batches) < 10
    assert target.read_text() == "version: 21\n"
    assert any(target in batch for batch in batches)


def _configmap(directory: Path, stamp: str, content: str) -> None:
    """Lay out or update a ConfigMap volume the way the kubelet does (atomic ..data swap)."""
    data = directory / f"..{stamp}"
    data.mkdir()
    (data / "app.yaml").write_text(content)
    tmp_link = directory / "..data_tmp"
    tmp_link.symlink_to(data.name)
    tmp_link.replace(directory / "..data")
    link = directory / "app.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/app.yaml")


async def test_configmap_symlink_swap(tmp_path: Path, poll: bool) -> None:
    """Kubernetes' ConfigMap update (a new ..data symlink renamed over the old) is reported."""
    directory = tmp_path / "configmap"
    directory.mkdir()
    _configmap(directory, "2026_01_01_00_00_00.1", "version: 1\n")
    target, sentinel = directory / "app.yaml", tmp_path / "sentinel"
    sentinel.write_text("start")
    watcher = Watching(tmp_path / "probe", asyncio.Queue())
    stop = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        group.create_task(watcher.run([target, sentinel], stop, poll))
        try:
            await watcher.started()
            _configmap(directory, "2026_01_01_00_01_00.2", "version: 2\n")
            old = directory / "..2026_01_01_00_00_00.1"
            (old / "app.yaml").unlink()
            old.rmdir()
            assert await watcher.next() == {target}
            assert target.read_text() == "version: 2\n"
            # The same content under a new timestamp is no change.
            _configmap(directory, "2026_01_01_00_02_00.3", "version: 2\n")
            sentinel.write_text("after")
            assert await watcher.next() == {sentinel}
        finally:
            stop.set()


async def test_nothing_to_watch_refused() -> None:
    """Watching no files is a mistake, refused at once."""
    with pytest.raises(ValueError, match="nothing to watch"):
        async for _ in watch_files([]):
            pass


async def test_change_without_event_found_by_recheck(tmp_path: Path) -> None:
    """A change no event announces (polling once a minute here) is found by the re-check."""
    target = tmp_path / "app.yaml"
    target.write_text("version 0")
    stop = asyncio.Event()
    changes = watch_files([target], stop=stop, poll=True, poll_ms=60_000, recheck_ms=100)
    next_change = asyncio.ensure_future(anext(changes))
    try:
        # Keep changing the file until a change is reported: the first writes may land before
        # the watch has read its baseline.
        deadline = asyncio.get_running_loop().time() + WAIT_S
        for n in range(1, 1000):
            assert asyncio.get_running_loop().time() < deadline, "no change reported"
            target.write_text(f"version {n}")
            done, _ = await asyncio.wait([next_change], timeout=0.5)
            if done:
                break
        assert next_change.result() == {target}
    finally:
        stop.set()
        next_change.cancel()
        await changes.aclose()


async def test_change_since_baseline_reported_at_once(tmp_path: Path) -> None:
    """A change between the owner's read (its baseline digest) and the watch's start is reported."""
    target = tmp_path / "app.yaml"
    target.write_text("version: 1\n")
    baseline = {target: digest(target)}
    target.write_text("version: 2\n")
    stop = asyncio.Event()
    changes = watch_files([target], stop=stop, baseline=baseline)
    try:
        async with asyncio.timeout(WAIT_S):
            assert await anext(changes) == {target}
    finally:
        stop.set()
        await changes.aclose()


def test_a_huge_file_is_digested_in_one_bounded_read(tmp_path: Path) -> None:
    """A watched file far past the configuration's size limit is read no further than that
    limit on each change: a byte beyond it does not change the digest, one within does."""
    path = tmp_path / "huge.yaml"
    content = bytearray(b"a" * (MAX_CONFIG_BYTES + 4096))
    path.write_bytes(content)
    first = digest(path)
    content[-1:] = b"b"
    path.write_bytes(content)
    assert digest(path) == first
    content[:1] = b"b"
    path.write_bytes(content)
    assert digest(path) not in (first, None)


async def test_a_fifo_is_unreadable_not_waited_for(tmp_path: Path) -> None:
    """A FIFO at a watched path has no digest (skipped as unreadable) instead of holding a
    thread until a writer opens it."""
    fifo = tmp_path / "keyproxy.yaml"
    os.mkfifo(fifo)
    try:
        assert await asyncio.wait_for(asyncio.to_thread(digest, fifo), WAIT_S) is None
    finally:
        with contextlib.suppress(OSError):  # no reader waiting (ENXIO): nothing to unblock
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
