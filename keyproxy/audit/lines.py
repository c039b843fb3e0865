"""Writing the audit stream's lines whole, whatever else writes to the same place.

`WholeLines(stream).write(text)` writes `text` (whole lines) to `stream`. To a file
descriptor it goes by `os.write` until every byte is out: a signal (a reload's SIGHUP, a
stop's SIGTERM) that interrupts a write blocked on a full pipe makes it return part written,
and Python's text and buffered streams then drop the rest without a word, cutting a line and
losing the lines after it. To a pipe (stdout under a container runtime or a log shipper,
shared by every worker of `serve --workers N`), each write holds whole lines and at most
PIPE_BUF bytes: the kernel never interleaves such a write with another process's, while a
larger one can be cut into by another worker's when the pipe is full, leaving lines that
are no JSON. A write that fails part way (a full non-blocking pipe, a full disk) keeps what
it did not write, and the next write sends that first: no line is cut, none written twice.
"""

from __future__ import annotations

import io
import os
import select
import stat
from collections.abc import Iterator
from typing import TextIO, TypeVar

_Text = TypeVar("_Text", str, bytes)

_ATOMIC = select.PIPE_BUF  # bytes a pipe writes in one piece (POSIX: at least 512)
# Bytes of lines kept for another try when the stream refuses a write: bounded, so a stream
# that stays broken cannot hold the whole process's memory (the oldest whole lines go).
_KEPT = 64 * 1024 * 1024


class WholeLines:
    """Writes whole lines to one stream, all of each text given. What the stream is (a file
    descriptor, a pipe) is read once: the audit sink writes to it for the process's life."""

    __slots__ = ("_fd", "_pipe", "_stream", "_unsent", "_unwritten")

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._unsent = ""  # what a failed write to an in-memory stream did not write
        self._unwritten = b""  # what a failed write to the descriptor left: it goes first
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
            text, self._unsent = self._unsent + text, ""
            try:
                stream.write(text)
            except BaseException:
                self._unsent = _kept(text)
                raise
            stream.flush()  # written already: a failure here must not write it again
            return
        data = self._unwritten + text.encode(stream.encoding or "utf-8", stream.errors or "strict")
        self._unwritten, done = b"", 0
        try:
            stream.flush()  # what was written to it before goes first
            for piece in _pieces(data) if self._pipe else (data,):
                left = memoryview(piece)
                while left:
                    written = os.write(self._fd, left)
                    left, done = left[written:], done + written
        except BaseException:
            self._unwritten = _kept(data[done:])
            raise


def _kept(rest: _Text) -> _Text:
    """`rest` of a failed write, for the next: all of it, or past _KEPT its first line (the
    end of one maybe half written already) and then the newest whole lines within _KEPT."""
    if len(rest) <= _KEPT:
        return rest
    newline = "\n" if isinstance(rest, str) else b"\n"
    first = rest.find(newline) + 1
    newest = rest.find(newline, len(rest) - _KEPT) + 1
    return rest[:first] + rest[max(first, newest) :]


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
