"""Writing the audit stream's lines whole, whatever else writes to the same place.

`WholeLines(stream).write(text)` writes `text` (whole lines) to `stream`. To a file
descriptor it goes by `os.write` until every byte is out: a signal (a reload's SIGHUP, a
stop's SIGTERM) that interrupts a write blocked on a full pipe makes it return part written,
and Python's text and buffered streams then drop the rest without a word, cutting a line and
losing the lines after it. To a pipe (stdout under a container runtime or a log shipper,
shared by every worker of `serve --workers N`), each write holds whole lines and at most
PIPE_BUF bytes: the kernel never interleaves such a write with another process's, while a
larger one can be cut into by another worker's when the pipe is full, leaving lines that
are no JSON.
"""

from __future__ import annotations

import io
import os
import select
import stat
from collections.abc import Iterator
from typing import TextIO

_ATOMIC = select.PIPE_BUF  # bytes a pipe writes in one piece (POSIX: at least 512)


class WholeLines:
    """Writes whole lines to one stream, all of each text given. What the stream is (a file
    descriptor, a pipe) is read once: the audit sink writes to it for the process's life."""

    __slots__ = ("_fd", "_pipe", "_stream")

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._fd = -1
        if isinstance(stream, io.TextIOWrapper):  # not a wrapper that changes what it is given
            try:
                self._fd = stream.fileno()
            except (OSError, ValueError):  # io.UnsupportedOperation is an OSError
                self._fd = -1
        try:
            self._pipe = self._fd >= 0 and stat.S_ISFIFO(os.fstat(self._fd).st_mode)
        except OSError:  # not open: the first write says so
            self._pipe = False

    def write(self, text: str) -> None:
        """Write `text`, whole lines ending with a newline, all of it."""
        stream = self._stream
        if self._fd < 0:  # an in-memory stream (tests, structlog's capture): nothing to cut
            stream.write(text)
            stream.flush()
            return
        stream.flush()  # what was written to it before goes first
        data = text.encode(stream.encoding or "utf-8", stream.errors or "strict")
        for piece in _pieces(data) if self._pipe else (data,):
            left = memoryview(piece)
            while left:
                left = left[os.write(self._fd, left) :]


def _pieces(data: bytes) -> Iterator[bytes]:
    """`data` in runs of whole lines of at most _ATOMIC bytes; a longer line alone (nothing
    can keep it whole in a shared pipe under pressure, but it cuts no other line)."""
    start = 0
    while start < len(data):
        end = data.rfind(b"\n", start, start + _ATOMIC) + 1
        if end <= start:
            end = data.find(b"\n", start) + 1 or len(data)
        yield data[start:end]
        start = end
