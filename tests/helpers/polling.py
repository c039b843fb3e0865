"""`eventually`: the one way a test waits for state to change, always with a deadline;
`finishes`: a bounded wait for something that must end."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


@overload
async def eventually(
    probe: Callable[[], Awaitable[T]],
    what: str,
    *,
    within: float = ...,
    interval: float = ...,
    until: Callable[[T], object] = ...,
) -> T: ...


@overload
async def eventually(
    probe: Callable[[], T],
    what: str,
    *,
    within: float = ...,
    interval: float = ...,
    until: Callable[[T], object] = ...,
) -> T: ...


async def eventually(
    probe: Callable[[], Any],
    what: str,
    *,
    within: float = 10.0,
    interval: float = 0.01,
    until: Callable[[Any], object] = bool,
) -> Any:
    """Call `probe` (a function or a coroutine function) until `until` holds for what it
    returned, and return that; fail with `what` once `within` seconds have passed. Exceptions
    from `probe` are not caught: a probe that must not fail (a process still running) asserts."""
    deadline = time.monotonic() + within
    while True:
        value = probe()
        result = await value if inspect.isawaitable(value) else value
        if until(result):
            return result
        assert time.monotonic() < deadline, f"{what} (not within {within:g} s)"
        await asyncio.sleep(interval)  # polling interval of a bounded wait


def eventually_blocking(
    probe: Callable[[], T],
    what: str,
    *,
    within: float = 10.0,
    interval: float = 0.1,
    until: Callable[[T], object] = bool,
) -> T:
    """`eventually` for code outside an event loop (fixtures, threads, synchronous tests)."""
    deadline = time.monotonic() + within
    while True:
        result = probe()
        if until(result):
            return result
        assert time.monotonic() < deadline, f"{what} (not within {within:g} s)"
        time.sleep(interval)  # polling interval of a bounded wait


async def finishes(awaitable: Awaitable[T], what: str, *, within: float = 15.0) -> T:
    """What `awaitable` gives, which must end within `within` seconds or fail the test with
    `what`. A hang is cancelled and left, not waited for: `asyncio.wait_for` would wait on
    for code that does not end when cancelled."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=within)
    if not done:
        task.cancel()
        raise AssertionError(f"{what} (not within {within:g} s)")
    return task.result()
