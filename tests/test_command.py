"""keyproxy.command: a helper command run with real processes, its answer read under a limit,
and its whole process group ended on a timeout, on too much output or on cancellation."""

from __future__ import annotations

import asyncio
import sys

import pytest

from keyproxy import command
from tests.helpers.polling import eventually, finishes
from tests.helpers.processes import Helpers, running


async def test_a_command_reads_its_input_and_answers() -> None:
    """The command gets `stdin`, and its output and exit status come back."""
    argv = [sys.executable, "-c", "import sys; print(sys.stdin.read().upper()); exit(3)"]
    done = await finishes(command.run(argv, limit=100, stdin=b"hello"), "the command ends")
    assert done == command.Finished(3, b"HELLO\n")


async def test_a_helper_holding_the_output_is_killed_at_the_timeout(helpers: Helpers) -> None:
    """A command that exits leaving a helper holding its stdout ends at the caller's timeout,
    helper and all, rather than keeping the caller waiting for the helper."""
    run = asyncio.ensure_future(command.run(helpers.command(then="echo partial"), limit=100))
    _, helper = await helpers.started()  # then the timeout: the helper holds the output
    with pytest.raises(TimeoutError):
        await finishes(asyncio.wait_for(run, 0.5), "the caller's timeout ends it")
    await eventually(lambda: not running(helper), "the helper is killed")


async def test_a_cancelled_caller_ends_the_command_and_its_helper(helpers: Helpers) -> None:
    """Cancelling the caller kills the command and what it started, and waits for them."""
    run = asyncio.ensure_future(command.run(helpers.command(then="wait"), limit=100))
    shell, helper = await helpers.started()
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await finishes(run, "the cancelled run ends")
    assert not running(shell)
    await eventually(lambda: not running(helper), "the helper is killed")


async def test_too_much_output_is_refused_unquoted_and_the_command_killed(
    helpers: Helpers,
) -> None:
    """Output past the limit is a CommandError that quotes none of it; the command, still
    printing, is killed with its helper."""
    run = command.run(helpers.command(then="exec yes canary-output"), limit=100)
    with pytest.raises(command.CommandError) as caught:
        await finishes(run, "the limit ends it")
    assert str(caught.value) == "printed more than 100 bytes"
    shell, helper = await helpers.started()
    assert not running(shell)
    await eventually(lambda: not running(helper), "the helper is killed")


async def test_a_helper_that_left_the_session_cannot_hold_the_caller(helpers: Helpers) -> None:
    """A helper in a session of its own escapes the kill, but the output pipe is the caller's:
    the caller returns at its timeout all the same (the helper is killed after the test)."""
    argv = helpers.command(start="setsid sleep 300", then="echo partial")
    run = asyncio.ensure_future(command.run(argv, limit=100))
    await helpers.started()  # recorded, so the escaped helper is killed after the test
    with pytest.raises(TimeoutError):
        await finishes(asyncio.wait_for(run, 0.5), "the caller's timeout ends it")
