"""Read deadlines: a silent wait times out, any other cancellation stays a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from keyproxy.deadline import ReadDeadlines, Watch

SILENT = 5.0  # a wait far longer than any limit below: the deadline must end it first


async def _wait_silent(deadlines: ReadDeadlines, limit: float) -> None:
    with Watch(deadlines, limit, limit):
        await asyncio.sleep(SILENT)  # an upstream that never answers


def test_a_silent_wait_times_out_on_each_loop_in_turn() -> None:
    """Two event loops one after the other (two apps in one process): the second still gets
    its sweep, although the first closed with one due."""
    deadlines = ReadDeadlines(granularity=0.01)
    for _ in range(2):
        with pytest.raises(TimeoutError):
            asyncio.run(_wait_silent(deadlines, 0.05))


async def test_the_silent_side_is_named() -> None:
    """A wait times out as the upstream's silence, or, in the caller's turn to send, as the
    caller's; hearing from the upstream makes it the upstream's again."""
    deadlines = ReadDeadlines(granularity=0.01)

    async def silent(caller_turn: bool, heard_after: bool) -> Watch:
        with Watch(deadlines, 0.05, 0.05) as watch:
            if caller_turn:
                watch.caller_turn()
            if heard_after:
                watch.heard()
            try:
                await asyncio.sleep(SILENT)
            finally:
                watches.append(watch)
        return watch

    watches: list[Watch] = []
    for caller_turn, heard_after, side in [
        (False, False, "upstream"),
        (True, False, "caller"),
        (True, True, "upstream"),
    ]:
        with pytest.raises(TimeoutError):
            await silent(caller_turn, heard_after)
        assert watches[-1].expired == side


async def test_heard_and_pause_hold_the_deadline_off() -> None:
    """A wait that keeps hearing from its upstream, or is paused, does not time out."""
    deadlines = ReadDeadlines(granularity=0.01)
    loop = asyncio.get_running_loop()
    with Watch(deadlines, 0.05, 0.05) as watch:
        until = loop.time() + 0.3
        while loop.time() < until:
            watch.heard()
            await asyncio.sleep(0.01)  # pacing: an upstream answering every 10 ms
        watch.pause()
        await asyncio.sleep(0.2)  # the caller's turn, longer than the limit


async def test_another_cancellation_is_not_turned_into_a_timeout() -> None:
    """A task cancelled by someone else (shutdown, the caller gone) stays cancelled, also
    when its deadline expires at the same moment."""
    deadlines = ReadDeadlines(granularity=0.01)
    entered = asyncio.Event()
    watches: list[Watch] = []

    async def work() -> None:
        with Watch(deadlines, SILENT, SILENT) as watch:
            watches.append(watch)
            entered.set()
            await asyncio.sleep(SILENT)

    for expire_too in (False, True):
        entered.clear()
        task = asyncio.create_task(work())
        await entered.wait()
        if expire_too:
            watches[-1].expire()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
