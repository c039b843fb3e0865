"""keyproxy.audit.lines: the audit stream's lines reach a shared pipe whole."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import subprocess
import sys
from subprocess import PIPE

import pytest

from keyproxy.audit import lines

_WORKER = """
import asyncio, sys, structlog
from keyproxy import audit
audit.configure()
log = structlog.get_logger("keyproxy.audit")
print("ready", file=sys.stderr, flush=True)
sys.stdin.read(1)  # both start at once

async def burst() -> None:
    for i in range(20000):
        log.info("request", worker=sys.argv[1], i=i, path="/v1/" + "x" * 300)
        if i % 1000 == 0:
            await asyncio.sleep(0)  # the loop runs: the batch of the last millisecond goes

asyncio.run(burst())
"""


def test_workers_sharing_a_pipe_never_cut_into_each_others_lines() -> None:
    """Two processes writing batches of lines to one pipe (`serve --workers 2` on a log
    shipper's stdout) that is read slower than written: every line comes out whole (a batch
    longer than PIPE_BUF written at once was cut into by the other's, leaving lines that
    are no JSON, which `keyproxy audit` skips)."""
    read_end, write_end = os.pipe()
    argv = [sys.executable, "-c", _WORKER]
    workers = [
        subprocess.Popen([*argv, str(n)], stdin=PIPE, stdout=write_end, stderr=PIPE)
        for n in range(2)
    ]
    os.close(write_end)
    for worker in workers:
        assert worker.stderr is not None
        assert worker.stderr.readline() == b"ready\n"  # bounded: it ends with the process
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.close()  # go
    received = bytearray()
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(512):  # small reads: the pipe is full most of the time
            received += chunk
    assert [w.wait(timeout=60) for w in workers] == [0, 0]
    for worker in workers:
        assert worker.stderr is not None
        worker.stderr.close()
    events = [json.loads(line) for line in received.decode().splitlines()]
    assert sorted((e["worker"], e["i"]) for e in events) == [
        (w, i) for w in ("0", "1") for i in range(20000)
    ]


@pytest.mark.parametrize(
    "sizes",
    [[10] * 1000, [select.PIPE_BUF - 1], [select.PIPE_BUF * 3, 5, select.PIPE_BUF, 1]],
)
def test_a_pipe_gets_whole_lines_of_at_most_pipe_buf_bytes(sizes: list[int]) -> None:
    """Each piece holds whole lines and at most PIPE_BUF bytes, but for a line longer than
    that, which goes alone; together they are the data."""
    data = b"".join(b"x" * (n - 1) + b"\n" for n in sizes)
    pieces = list(lines._pieces(data))
    assert b"".join(pieces) == data
    assert all(p.endswith(b"\n") for p in pieces)
    assert all(len(p) <= select.PIPE_BUF or p.count(b"\n") == 1 for p in pieces)


def test_a_write_the_pipe_takes_in_part_is_finished_by_the_next_never_repeated() -> None:
    """A full pipe takes part of a write (a non-blocking one then fails with EAGAIN): the
    next write sends the rest first, so every line comes out once, whole and in order (the
    sink wrote the whole batch again, so its first lines came out twice)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    os.set_blocking(read_end, False)
    capacity = fcntl.fcntl(write_end, 1032)  # F_GETPIPE_SZ
    batch = [json.dumps({"i": i, "pad": "x" * 90}) + "\n" for i in range(capacity * 3 // 200)]
    received = bytearray()

    def drain() -> None:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_end, 65536):
                received.extend(chunk)

    try:
        with os.fdopen(write_end, "w", encoding="utf-8") as stream:
            out = lines.WholeLines(stream)
            with pytest.raises(BlockingIOError):
                out.write("".join(batch))  # half again the pipe's size
            drain()
            out.write(json.dumps({"i": -1}) + "\n")
            drain()
    finally:
        os.close(read_end)
    events = [json.loads(line) for line in received.decode().splitlines()]
    assert [e["i"] for e in events] == [*range(len(batch)), -1]
