"""Reading a whole file, HTTP body or pipe, never past a limit: a configuration, an issuer's
keys file or answer, a broker's or a rotator's answer, a request body read before it is used,
what a helper command prints (keyproxy.command).

Each returns None when there is more than `limit` bytes, having read at most one byte past
it, and each caller says what that means in its own error. A body is read to its end however
it arrives: a `StreamReader.read(n)` alone returns what has arrived so far, which is all of a
small body only when it came in one piece.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO, Protocol


class Readable(Protocol):
    """A stream read in parts: aiohttp's body reader, asyncio's pipe reader."""

    async def read(self, n: int, /) -> bytes: ...


def read_file(path: str | Path, limit: int, *, regular: bool = True) -> bytes | None:
    """The file's bytes, or None if it holds more than `limit`. OSError as opening or reading
    raises it, and for anything but a regular file (`open_regular`) unless not `regular`:
    then a pipe is read to its end, as a one-shot command's `-c <(...)` needs."""
    with open_regular(path) if regular else Path(path).open("rb") as file:
        data = file.read(limit + 1)
    return data if len(data) <= limit else None


def open_regular(path: str | Path) -> BinaryIO:
    """The regular file at `path` (through symlinks), open for reading; OSError for anything
    else. Opened without blocking first: opening a FIFO would wait for a writer for ever,
    holding a thread (and a reload, and the shutdown behind it); a device may never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    file = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        file.close()
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or directory)")
    os.set_blocking(fd, True)
    return file


async def read_body(content: Readable, limit: int) -> bytes | None:
    """The whole body, however it is cut into parts, or None once it is longer than `limit`.
    The reader's errors (aiohttp's ClientPayloadError for a body cut short) pass through."""
    data = bytearray()
    while len(data) <= limit:
        part = await content.read(limit + 1 - len(data))
        if not part:
            return bytes(data)
        data += part
    return None
