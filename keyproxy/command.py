"""Running a helper command and reading what it prints: a `command` rotator, the command
`keyproxy run --identity-command` names.

    async with asyncio.timeout(T):
        await run(argv, limit=..., stdin=..., env=..., stderr=...) -> Finished(status, output)

The command runs in a session of its own, so that whatever it starts can be ended with it.
Its output ends when every process holding it has closed it: a command that leaves a helper
holding its stdout runs until the caller's timeout. On more than `limit` bytes of output, or
when the caller is cancelled (its timeout too), the command's whole process group is killed
and waited for, for a moment at most; the output pipe is keyproxy's own, closed on the way
out, so a process that left the session still holding it cannot keep the caller waiting.

Errors: OSError when the command cannot start; CommandError when it printed too much, whose
message never quotes the output (it may hold a key or a token).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Final

from keyproxy import capped
from keyproxy.errors import KeyproxyError

KILL_WAIT: Final = 5.0  # seconds to wait for a killed command to be reaped


class CommandError(KeyproxyError):
    """The command printed more than its limit; it has been killed."""


@dataclass(frozen=True)
class Finished:
    """A command that ended on its own: its exit status (-N for signal N) and its output."""

    status: int
    output: bytes


async def run(
    argv: Sequence[str],
    *,
    limit: int,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
    stderr: int | None = None,
) -> Finished:
    """Run `argv` with `stdin` (None: /dev/null) and `stderr` (None: ours), read its stdout
    to the end (at most `limit` bytes) and wait for it to exit."""
    reading, writing = os.pipe()
    # A pipe's end, no disk behind it; closed below, or by the transport reading it.
    output = open(reading, "rb", buffering=0)  # noqa: PTH123, SIM115, ASYNC230
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL if stdin is None else asyncio.subprocess.PIPE,
            stdout=writing,
            stderr=stderr,
            env=env,
            start_new_session=True,  # its own process group, killed whole below
        )
    except BaseException:
        output.close()
        raise
    finally:
        os.close(writing)  # the command's copy is the only one: its end is our end of file
    try:
        if stdin is not None and proc.stdin is not None:
            # Flushed as the command reads it; one that exits without reading all of it
            # breaks the pipe, which is no error here (its exit status says what happened).
            proc.stdin.write(stdin)
            proc.stdin.close()
        printed = await _read(output, limit)
        status = await proc.wait()
    except BaseException:  # too much output, or the caller cancelled (or timed out)
        await _kill(proc)
        raise
    finally:
        output.close()
    return Finished(status, printed)


async def _read(pipe: IO[bytes], limit: int) -> bytes:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        printed = await capped.read_body(reader, limit)
    finally:
        transport.close()
    if printed is None:
        raise CommandError(f"printed more than {limit} bytes")
    return printed


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL to the command's process group (the command and what it started, unless they
    left it), then a bounded wait for the command itself."""
    with contextlib.suppress(ProcessLookupError):  # every process of the group has exited
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), KILL_WAIT)
