"""Reading a whole file, HTTP body or pipe, never past a limit: a configuration, an issuer's
keys file or answer, a broker's or a rotator's answer, a request body read before it is used,
what a helper command prints (keyproxy.command).

Each returns None when there is more than `limit` bytes, having read at most one byte past
it, and each caller says what that means in its own error. A body is read to its end however
it arrives: a `StreamReader.read(n)` alone returns what has arrived so far, which is all of a
small body only when it came in one piece.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Readable(Protocol):
    """A stream read in parts: aiohttp's body reader, asyncio's pipe reader."""

    async def read(self, n: int, /) -> bytes: ...


def read_file(path: str | Path, limit: int) -> bytes | None:
    """The file's bytes, or None if it holds more than `limit`. OSError as opening or reading
    raises it."""
    with Path(path).open("rb") as file:
        data = file.read(limit + 1)
    return data if len(data) <= limit else None


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
